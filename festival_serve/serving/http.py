"""The HTTP contract, without Ray: request parsing, the time budget, the mapping of errors to statuses
and their JSON, and the one Starlette app (``build_http_app``: routes, API keys, error mapper, OpenAPI)
that the Serve ingress and the single-process benchmark baseline both serve with their own endpoints
(both run the per-frame flow in ``festival_serve.serving.flow``), so they answer the same requests with the same JSON.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from festival_serve.serving.auth import KeyRing, bearer_key
from festival_serve.serving.flow import Rejected
from festival_serve.serving.imaging import IMAGE_CONTENT_TYPES, InvalidImage
from festival_serve.serving.openapi import openapi_document
from festival_serve.pipeline.settings import IngressSettings

logger = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

#: Ray Serve's own per-request timeout header; the ingress reads it as the request's budget.
BUDGET_HEADER = "x-request-timeout-seconds"


class ApiError(Exception):
    """A client error with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, request_id: str | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if request_id:
        body["request_id"] = request_id
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def rejected_response(rejected: Rejected, request_id: str) -> JSONResponse:
    """A frame the flow refused (overload, safety stages down): its status, code and ``Retry-After``."""
    return error_response(rejected.status, rejected.code, rejected.message, request_id, rejected.retry_after_s)


def http_error_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


# -- request parsing ---------------------------------------------------------------------------------


async def read_image_bytes(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"body is {declared} bytes; the limit is {limit}")
    if content_type in IMAGE_CONTENT_TYPES:
        return await _read_limited(request, limit)
    if content_type == "multipart/form-data":
        return await _read_form_image(request, limit)
    supported = ", ".join([*IMAGE_CONTENT_TYPES, "multipart/form-data"])
    raise ApiError(415, "unsupported_media_type",
                   f"content type {content_type or '(none)'!r} is not supported; send one of: {supported}")


async def _read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"body is over the limit of {limit} bytes")
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send the image bytes")
    return bytes(body)


async def _read_form_image(request: Request, limit: int) -> bytes:
    """The file part named ``image`` of a multipart body, parsed while the body streams in. As for a raw body,
    the whole body (so the image part too) is capped at ``limit`` bytes, counted per chunk before it is parsed:
    an oversize upload, chunked or not, is refused after at most ``limit`` + one chunk has been read."""
    form = _ImageForm(request.headers.get("content-type", ""))
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, "payload_too_large", f"body is over the limit of {limit} bytes")
        form.write(chunk)
    if not received:
        raise ApiError(400, "empty_body", "the request body is empty; send a multipart form with an 'image' file")
    return form.image()


_FORM_MAX_PARTS = 8  # the image and a few small fields; more parts are not a client of this API


class _ImageForm:
    """python-multipart's streaming parser, keeping the bytes of the file part named ``image`` only (the other
    parts are parsed and dropped; their number is bounded, their size by the body's limit)."""

    def __init__(self, content_type: str) -> None:
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise ApiError(400, "invalid_form", "the multipart content type has no boundary")
        self.parts, self.ended = 0, False
        self.data: bytearray | None = None  # the image part's bytes, from when its headers name it
        self._in_image, self._header, self._disposition = False, b"", b""
        callbacks = {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }
        try:
            self.parser = MultipartParser(boundary, callbacks)
        except FormParserError as e:  # a boundary longer than multipart allows
            raise ApiError(400, "invalid_form", "the multipart boundary is invalid") from e

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)  # an ApiError from a callback below passes through as it is
        except FormParserError as e:
            raise ApiError(400, "invalid_form", "the multipart body is malformed") from e

    def image(self) -> bytes:
        self.parser.finalize()
        if not self.ended:
            raise ApiError(400, "invalid_form", "the multipart body ends before its closing boundary")
        if self.data is None:
            raise ApiError(400, "missing_image", "multipart body needs a file field named 'image'")
        if not self.data:
            raise ApiError(400, "empty_body", "the 'image' field is empty")
        return bytes(self.data)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > _FORM_MAX_PARTS:
            raise ApiError(400, "invalid_form", f"the multipart body has more than {_FORM_MAX_PARTS} parts")
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]  # the parser bounds a header's size and a part's number of headers

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition += data[start:end]

    def _header_end(self) -> None:
        self._header = b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        if b"name" not in options:
            raise ApiError(400, "invalid_form", "a multipart part has no content-disposition name")
        self._in_image = options[b"name"] == b"image" and b"filename" in options
        if self._in_image:
            if self.data is not None:
                raise ApiError(400, "invalid_form", "the multipart body has more than one 'image' file")
            self.data = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_image:
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_image = False

    def _end(self) -> None:
        self.ended = True


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, "invalid_parameter", f"{name} must be true or false, got {value!r}")


def parse_budget(value: str | None, settings: IngressSettings) -> float:
    """The request's budget in seconds: the ``x-request-timeout-seconds`` header clamped to the configured
    maximum, or the default without one. Zero, negative or non-numeric values are the client's error (Ray's
    proxy reads <= 0 as "no timeout", which would let one request queue forever)."""
    if value is None:
        return settings.default_budget_s
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, "invalid_budget", f"{BUDGET_HEADER} must be a positive number of seconds, got {value!r}")
    return min(seconds, settings.max_budget_s)


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


#: Paths anyone who reaches the port may call, with or without a key: the load balancers' and Kubernetes' probes,
#: and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})


class RequireApiKey:
    """ASGI middleware: with a key ring, every request but the open paths (``OPEN_PATHS``) needs
    ``Authorization: Bearer <key>`` (``festival_serve.serving.auth``); with ``keys=None`` everything passes.

    It refuses by default rather than guarding ``/v1`` alone, so a path the router reads differently
    from this check, or a route added later, is closed rather than open. A refusal is a 401 with
    ``WWW-Authenticate`` (RFC 6750) and the usual JSON error; neither the answer nor the log shows the key."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys is None or scope["type"] != "http" or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if self.keys.allows(authorization):
            await self.app(scope, receive, send)
            return
        request_id = headers.get("x-request-id")
        if bearer_key(authorization) is None:
            reason, challenge = "no API key", "Bearer"
            message = "this endpoint needs an API key: send the header `Authorization: Bearer <key>`"
        else:
            reason, challenge, message = "unknown API key", 'Bearer error="invalid_token"', "the API key is not valid"
        logger.info("request %s: 401 (%s)", request_id, reason)
        response = error_response(401, "unauthorized", message, request_id)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app's router matches. Ray Serve's proxy keeps an application's route prefix in the path
    and puts it in ``root_path`` too (``/bare/healthz``, ``/bare``); the router, and so this, strips it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path


# -- the app both servers run -------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ApiHandlers:
    """A server's endpoints. They answer success and raise everything else (``ApiError``, ``InvalidImage``,
    ``Rejected``, a bug): ``build_http_app`` maps what they raise to the answer, in one place."""

    analyze: Endpoint  # POST /v1/analyze
    models: Endpoint  # GET /v1/models
    healthz: Endpoint  # GET /healthz
    readyz: Endpoint  # GET /readyz


def request_id_of(request: Request) -> str:
    """The request's id: its ``x-request-id`` (Serve's proxy sets one), else a new one, kept on the request so
    that its handler and the error mapper answer with the same id."""
    if getattr(request.state, "request_id", None) is None:
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return request.state.request_id


def build_http_app(handlers: ApiHandlers, *, keys: KeyRing | None, log: logging.Logger = logger) -> Starlette:
    """The Starlette app of both servers: the route table, ``RequireApiKey`` in front of it (``keys=None``:
    open), ``GET /openapi.json``, and ``error_reply`` for whatever an endpoint or the router raises, logged
    to ``log`` (the ingress passes Serve's logger, so errors land in its replica logs)."""
    document = openapi_document(budget_header=BUDGET_HEADER, open_paths=OPEN_PATHS)  # built once: it never changes

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    def mapped(endpoint: Endpoint) -> Endpoint:
        # Caught here rather than by an exception handler for Exception: Starlette answers those and then
        # re-raises, and the server would log a second traceback for the one error.
        async def call(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as e:  # noqa: BLE001 - every failure is answered, by its status
                return error_reply(request, e, log)

        return call

    async def router_error(request: Request, exc: Exception) -> Response:  # 404/405, or a middleware's bug
        return error_reply(request, exc, log)

    return Starlette(
        routes=[
            Route("/v1/analyze", mapped(handlers.analyze), methods=["POST"]),
            Route("/v1/models", mapped(handlers.models), methods=["GET"]),
            Route("/healthz", mapped(handlers.healthz), methods=["GET"]),
            Route("/readyz", mapped(handlers.readyz), methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[Middleware(RequireApiKey, keys=keys)],
        exception_handlers={HTTPException: router_error, Exception: router_error},
    )


def error_reply(request: Request, exc: Exception, log: logging.Logger = logger) -> JSONResponse:
    """The one mapping of an exception to an answer, logged once with the request id: a client error keeps its
    status, code and message; anything else is a 500 ``internal`` whose details only the log gets."""
    if isinstance(exc, HTTPException):  # the router's: no endpoint ran, and the body has no request id
        log.info("request %s: %d on %s", request.headers.get("x-request-id"), exc.status_code, request.url.path)
        response = error_response(exc.status_code, http_error_code(exc.status_code), str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response
    request_id = request_id_of(request)
    if isinstance(exc, Rejected):
        # Debug, not info: in a surge refusals come by the hundred per second, the access log already has each
        # one's status, and festival_answers_total counts them by code.
        log.debug("request %s: %d %s", request_id, exc.status, exc.code)
        return rejected_response(exc, request_id)
    if isinstance(exc, ApiError):
        status, code, message = exc.status, exc.code, exc.message
    elif isinstance(exc, InvalidImage):
        status, code, message = 400, "invalid_image", str(exc)  # says what is wrong with the image, never a path
    else:
        log.error("request %s: unhandled error on %s", request_id, request.url.path, exc_info=exc)
        return error_response(500, "internal", "internal error; the server log has the details", request_id)
    log.info("request %s: %d %s", request_id, status, code)
    return error_response(status, code, message, request_id)


# -- what /v1/models shows ---------------------------------------------------------------------------

#: The keys of a model's ``model_info()`` that hold weights paths.
PATH_KEYS = ("weights", "classifier")
#: "det=/s/a.onnx rec=/s/b.onnx": the sign reader's weights, one path per network.
_NAMED_PATHS = re.compile(r" (?=[a-z_]+=)")


def public_path(path: str | os.PathLike, model_store: str | os.PathLike | None) -> str:
    """A weights path as a client sees it: relative to the model store when inside it
    (``sign_detector/signs.pt``), else the file name alone, never where a machine keeps its files. A
    relative path is read as the settings read it, relative to the store (so a label such as
    ``rapidocr-3.4.0/PP-OCRv6_det_small.onnx``, or ``bundled``, stays as it is)."""
    given = Path(path).expanduser()
    if model_store is not None:
        store = Path(model_store).expanduser()
        full = given if given.is_absolute() or given.is_relative_to(store) else store / given
        # As written first, then through symlinks (a store reached through a link, weights resolved by a loader).
        for root, inside in ((Path(os.path.abspath(store)), Path(os.path.abspath(full))),
                             (store.resolve(), full.resolve())):
            if inside.is_relative_to(root) and inside != root:
                return inside.relative_to(root).as_posix()
    return given.name


def public_model_info(info: Any, model_store: str | os.PathLike | None) -> Any:
    """A model's ``model_info()`` (nested dicts and lists) with every weights path made public (``public_path``)."""
    if isinstance(info, dict):
        return {key: _public_weights(value, model_store) if key in PATH_KEYS and isinstance(value, str)
                else public_model_info(value, model_store) for key, value in info.items()}
    if isinstance(info, list):
        return [public_model_info(value, model_store) for value in info]
    return info


def _public_weights(value: str, model_store: str | os.PathLike | None) -> str:
    parts = _NAMED_PATHS.split(value)
    if len(parts) > 1 or re.match(r"[a-z_]+=", value):
        return " ".join(f"{name}={public_path(path, model_store)}"
                        for name, _, path in (part.partition("=") for part in parts))
    return public_path(value, model_store)
