"""A client error (``ApiError``) and the JSON every error answer has, whoever refuses: the error mapper
(``festival_serve.serving.http.error_reply``), the key middleware (``festival_serve.serving.auth``) and the
body reader (``festival_serve.serving.uploads``). The statuses and codes a client can get are
``festival_serve.serving.openapi.ERRORS``. No Ray.

    {"error": {"code": "payload_too_large", "message": "…"}, "request_id": "…"}
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse


class ApiError(Exception):
    """A client error with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, request_id: str | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    """An error answer; ``request_id`` is left out when None (the router's 404/405), and ``retry_after_s``
    becomes ``Retry-After`` in whole seconds, at least 1."""
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if request_id:
        body["request_id"] = request_id
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse(body, status_code=status, headers=headers)
