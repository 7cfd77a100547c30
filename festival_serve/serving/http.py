"""The HTTP contract, without Ray: the query and the time budget read from a request, the one Starlette app
(``build_http_app``: routes, API keys, ``/openapi.json``) and the one mapping of whatever an endpoint raises
to its status and JSON (``error_reply``). The Serve ingress and the single-process benchmark baseline both
serve this app with their own endpoints (both run the per-frame flow in ``festival_serve.serving.flow``), so
they answer the same requests with the same JSON.

Around it, below it: the error JSON (``festival_serve.serving.errors``), reading the image body
(``festival_serve.serving.uploads``), the API keys and their middleware (``festival_serve.serving.auth``) and
the weights paths a client may see (``festival_serve.serving.public_paths``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from festival_serve.serving.admission import TokenBucket
from festival_serve.serving.auth import OPEN_PATHS, KeyFile, KeyRing, RequireApiKey
from festival_serve.serving.errors import ApiError, error_response
from festival_serve.serving.flow import Rejected
from festival_serve.serving.imaging import DecoderBusy, DecodeTimedOut, InvalidImage
from festival_serve.serving.openapi import openapi_document
from festival_serve.pipeline.settings import IngressSettings

logger = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

#: Ray Serve's own per-request timeout header; the ingress reads it as the request's budget.
BUDGET_HEADER = "x-request-timeout-seconds"
#: Ray Serve's header that switches off cancelling a request whose client left (``?1``); the ingress watches instead.
DISCONNECT_DISABLED_HEADER = "x-request-disconnect-disabled"


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


# -- the app both servers run -------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]
#: Hears a refusal's status and error code (the answer's ``error.code``), after the mapper answered and logged it.
RefusalObserver = Callable[[int, str], None]


@dataclass(frozen=True)
class ApiHandlers:
    """A server's endpoints. They answer success and raise everything else (``ApiError``, ``InvalidImage``,
    ``Rejected``, a bug): ``build_http_app`` maps what they raise to the answer, in one place."""

    analyze: Endpoint  # POST /v1/analyze
    models: Endpoint  # GET /v1/models
    healthz: Endpoint  # GET /healthz
    readyz: Endpoint  # GET /readyz
    streams: Callable[[WebSocket], Awaitable[None]] | None = None  # WS /v1/streams (the ingress only)


#: A request id a client may choose: what log lines and tracing ids are made of, at most 128 characters. Anything
#: else (a megabyte of it, a newline that forges a log line) is replaced by an id of our own.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: The status of a request whose client left before its answer (nginx's convention; no client ever reads it).
CLIENT_CLOSED_STATUS = 499


def request_id_of(request: Request) -> str:
    """The request's id: its ``x-request-id`` (Serve's proxy sets one) when it is a sane id (``REQUEST_ID``), else a
    new one, kept on the request so that its handler and the error mapper answer with the same id."""
    if getattr(request.state, "request_id", None) is None:
        given = request.headers.get("x-request-id") or ""
        request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return request.state.request_id


def build_http_app(handlers: ApiHandlers, *, keys: KeyRing | KeyFile | None, log: logging.Logger = logger,
                   on_analyze_refusal: RefusalObserver | None = None,
                   probe_limit: TokenBucket | None = None) -> Starlette:
    """The Starlette app of both servers: the route table, ``RequireApiKey`` in front of it (``keys=None``:
    open), ``GET /openapi.json``, and ``error_reply`` for whatever an endpoint or the router raises, logged
    to ``log`` (the ingress passes Serve's logger, so errors land in its replica logs). ``on_analyze_refusal``
    hears the status and code of each ``/v1/analyze`` request its handler did not answer (the ingress counts
    them: ``festival_serve.serving.metrics.record_refusal``). ``probe_limit``: the rate ``/healthz``, ``/readyz`` and
    ``/v1/models`` are answered at, together; beyond it a 429 with ``Retry-After``."""
    document = openapi_document(budget_header=BUDGET_HEADER, open_paths=OPEN_PATHS)  # built once: it never changes

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(document)

    def mapped(endpoint: Endpoint, on_refusal: RefusalObserver | None = None, *, limit: TokenBucket | None = None
               ) -> Endpoint:
        # Caught here rather than by an exception handler for Exception: Starlette answers those and then
        # re-raises, and the server would log a second traceback for the one error.
        async def call(request: Request) -> Response:
            try:
                if limit is not None and not limit.take():
                    raise Rejected(429, "rate_limited", "probes and /v1/models are answered at a limited rate; "
                                   "poll less often", limit.retry_after_s())
                return await endpoint(request)
            except asyncio.CancelledError:
                # Serve's proxy cancels the handler when the client disconnects: counted as the client's leaving,
                # and the cancellation goes on (it is what stops the work).
                if on_refusal is not None:
                    on_refusal(CLIENT_CLOSED_STATUS, "client_closed")
                raise
            except Exception as e:  # noqa: BLE001 - every failure is answered, by its status
                return error_reply(request, e, log, on_refusal)

        return call

    async def router_error(request: Request, exc: Exception) -> Response:  # 404/405, or a middleware's bug
        return error_reply(request, exc, log)

    return Starlette(
        routes=[
            Route("/v1/analyze", mapped(handlers.analyze, on_analyze_refusal), methods=["POST"]),
            Route("/v1/models", mapped(handlers.models, limit=probe_limit), methods=["GET"]),
            Route("/healthz", mapped(handlers.healthz, limit=probe_limit), methods=["GET"]),
            Route("/readyz", mapped(handlers.readyz, limit=probe_limit), methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            *([WebSocketRoute("/v1/streams", handlers.streams)] if handlers.streams is not None else []),
        ],
        middleware=[Middleware(RequireApiKey, keys=keys)],
        exception_handlers={HTTPException: router_error, Exception: router_error},
    )


def error_reply(request: Request, exc: Exception, log: logging.Logger = logger,
                on_refusal: RefusalObserver | None = None) -> JSONResponse:
    """The one mapping of an exception to an answer, logged once with the request id: a client error keeps its
    status, code and message; anything else is a 500 ``internal`` whose details only the log gets.
    ``on_refusal``, when given, hears the answer's status and code."""
    request_id = None if isinstance(exc, HTTPException) else request_id_of(request)
    retry_after_s, headers = None, {}
    if isinstance(exc, HTTPException):  # the router's: no endpoint ran, and the body has no request id
        status, code, message = exc.status_code, http_error_code(exc.status_code), str(exc.detail)
        headers = exc.headers or {}  # a 405's Allow
        log.info("request %s: %d on %s", request.headers.get("x-request-id"), status, request.url.path)
    elif isinstance(exc, Rejected):
        status, code, message, retry_after_s = exc.status, exc.code, exc.message, exc.retry_after_s
        # Debug, not info: in a surge refusals come by the hundred per second, the access log already has each
        # one's status, and festival_answers_total counts them by code.
        log.debug("request %s: %d %s", request_id, status, code)
    elif isinstance(exc, ClientDisconnect):  # the client left while its body was arriving: its doing, not ours
        status, code, message = CLIENT_CLOSED_STATUS, "client_closed", "the client closed the connection"
        log.debug("request %s: client closed the connection", request_id)
    elif isinstance(exc, DecoderBusy):  # pixels are admitted as well as frames: too many decoding now
        status, code, message, retry_after_s = 503, "overloaded", str(exc), exc.retry_after_s
        log.debug("request %s: 503 decoder busy", request_id)
    elif isinstance(exc, DecodeTimedOut):
        status, code, message = 408, "decode_timeout", str(exc)
        log.info("request %s: 408 decode_timeout", request_id)
    elif isinstance(exc, (ApiError, InvalidImage)):
        status, code, message = ((exc.status, exc.code, exc.message) if isinstance(exc, ApiError)
                                 else (400, "invalid_image", str(exc)))  # what is wrong with the image, never a path
        log.info("request %s: %d %s", request_id, status, code)
    else:
        status, code, message = 500, "internal", "internal error; the server log has the details"
        log.error("request %s: unhandled error on %s", request_id, request.url.path, exc_info=exc)
    if on_refusal is not None:
        on_refusal(status, code)
    response = error_response(status, code, message, request_id, retry_after_s)
    response.headers.update(headers)
    return response


def http_error_code(status: int) -> str:
    """The code of a refusal by the router: no endpoint ran to say more."""
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
