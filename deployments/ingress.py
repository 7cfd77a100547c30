"""PipelineIngress: the HTTP API (Starlette) and the DAG it drives (``festival_serve.serving.http``).

    decode once → ray.put ─┬→ SignDetector ─→ crops → SignReader ─┐
                           └→ HazardCells ────────────────────────┴→ SceneDescriber (if describe)

The frame goes into the object store once; every model reads that one copy. Under load, the calls to a stage
travel in few, large Serve requests (``festival_serve.serving.coalesce``). Each request has a time
budget (``x-request-timeout-seconds``, clamped; else the configured default) that bounds every wait;
a request whose safety stages' queues could not answer within it is turned away before decoding, with
``Retry-After``. A stage that fails, times out or has no weights makes the answer degraded
(``degraded`` says why, with a stable code); if neither safety stage answered, the answer is a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from festival_serve.serving.admission import Admission, Budget, TokenBucket, Uploads
from festival_serve.serving.http import BUDGET_HEADER, DISCONNECT_DISABLED_HEADER, ApiHandlers, build_http_app, \
    ms_since, parse_bool, parse_budget, request_id_of
from festival_serve.serving.auth import keys_from_file
from festival_serve.serving.errors import ApiError
from festival_serve.serving.autoscaling import ARRIVALS_PER_S, RateMeter
from festival_serve.serving.coalesce import CallCoalescer
from festival_serve.serving.flow import Rejected, admit, admitted, analyze_frame
from festival_serve.serving.imaging import Decoder
from festival_serve.serving.metrics import record_answer, record_refusal, record_stream_event, record_stream_frame, \
    record_streams_open
from festival_serve.serving.probes import StageStates, readiness
from festival_serve.serving.public_paths import public_model_info
from festival_serve.serving.streams import CLOSE_POLICY, CameraStream, FrameSlots, StreamContext, StreamOptions
from festival_serve.serving.uploads import read_image_bytes
from deployments.stream_router import STREAMS_HELD
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.stages import STAGES

logger = logging.getLogger("ray.serve")


@serve.deployment
@serve.ingress()
class PipelineIngress:
    def __init__(self, settings: IngressSettings, *, model_store: str | None = None,
                 **models: DeploymentHandle) -> None:
        """``models``: one handle per stage, keyed by stage name (``festival_serve.pipeline.stages``); ``model_store``:
        the models' store, which ``/v1/models`` shows weights relative to (without it: file names only)."""
        self.model_store = model_store
        # Read now: a missing, unreadable or malformed keys file fails the deployment with the reason. Then followed:
        # a key removed from the file stops working within keys_reload_s (festival_serve.serving.auth.KeyFile).
        self.keys = keys_from_file(settings.api_keys_file, reload_s=settings.keys_reload_s)
        if self.keys is None:
            logger.warning("ingress: no api_keys_file: /v1 is open to anyone who can reach the port")
        else:
            logger.info("ingress: /v1 needs an API key (%d key digest(s) in %s, reread on change)",
                        len(self.keys.digests), settings.api_keys_file)
        self.models = {stage.name: models[stage.name] for stage in STAGES}
        self.settings = settings
        self.decoder = Decoder(settings)  # off the event loop, bounded in scans, pixels and time
        self.admission = Admission()  # this replica's view of every stage's queue (festival_serve.serving.admission)
        # Bodies arriving now: read before admission, capped in number and in bytes held.
        self.uploads = Uploads(settings.max_bodies_in_flight, settings.max_body_bytes_buffered)
        # A stage's calls that wait while its requests in flight are at the cap leave together as one Serve
        # request (a request costs milliseconds of CPU whatever it carries); the replica hands them one by one to
        # its batcher.
        self.stages = {stage.name: CallCoalescer(models[stage.name].call_many.remote,
                                                 max_calls=settings.stage_request_max_calls,
                                                 max_requests=settings.stage_requests_in_flight)
                       for stage in STAGES}
        # /readyz and /v1/models answer from every stage's model_info, asked in the background: a probe costs the
        # models nothing (festival_serve.serving.probes).
        self.states = StageStates({name: handle.info.remote for name, handle in self.models.items()},
                                  refresh_s=settings.probe_refresh_s, timeout_s=MODEL_INFO_TIMEOUT_S)
        self.arrivals = RateMeter()  # every /v1/analyze whose body arrived, admitted or refused: the autoscaler's load
        # Camera streams (WS /v1/streams) share the decoder, the admission and the stage calls; each holds its
        # tracker here, the models stay stateless (festival_serve.serving.streams).
        self.streams = StreamContext(settings, self.decoder, self.admission, self.stages,
                                     FrameSlots(settings.streams.frames_in_flight, settings.streams.max_streams),
                                     put=ray.put, on_frame=self._stream_frame, on_event=record_stream_event,
                                     on_streams=record_streams_open, replica=_replica_token())

    def __serve_build_asgi_app__(self) -> Starlette:
        # Routes, API keys, /openapi.json and the one error mapper are the baseline's too (festival_serve.serving.http);
        # only the ingress counts the refusals it answers (festival_serve.serving.metrics).
        handlers = ApiHandlers(analyze=self.analyze, models=self.list_models, healthz=self.healthz, readyz=self.readyz,
                               streams=self.stream)
        return build_http_app(handlers, keys=self.keys, log=logger, on_analyze_refusal=record_refusal,
                              probe_limit=TokenBucket(self.settings.probe_rate_per_s))

    # -- routes (each raises what it cannot answer: build_http_app maps it to a status) ---------

    async def analyze(self, request: Request) -> JSONResponse:
        request_id = request_id_of(request)
        started, started_monotonic = time.perf_counter(), time.monotonic()
        budget = Budget(parse_budget(request.headers.get(BUDGET_HEADER), self.settings), started_monotonic)
        describe = parse_bool(request.query_params.get("describe", "true"), "describe")
        # The body arrives before admission: a frame still uploading is not work waiting, and a trickled one is cut
        # off at body_read_max_s (or the budget) with a 408, holding a body slot, never an admission slot.
        if self.uploads.full:
            raise Rejected(503, "overloaded", "too many uploads are arriving at once", self.settings.retry_after_s)
        try:
            # A crowd beyond capacity is refused before its bodies are read: through Serve's proxy, reading a body is
            # a call back to the proxy and a multipart parse, most of what a refusal costs. Admission is asked
            # again once the body is here (the queues may have grown while it arrived).
            admit(self.admission, budget, self.settings)
        except Rejected:
            self.arrivals.mark()  # refused, but load all the same: the autoscaler must see it
            raise
        with self.uploads.body() as take:
            def hold(n: int) -> None:
                if not take(n):
                    raise Rejected(503, "overloaded", "too many bytes of uploads are arriving at once",
                                   self.settings.retry_after_s)

            # At least the answer margin: a frame whose tiny budget is already spent still gets its body read
            # (it is there in microseconds) and an honest answer from admission, not a 408 for a body that came.
            data = await read_image_bytes(request, self.settings.max_body_bytes, hold=hold, within_s=min(
                self.settings.body_read_max_s,
                max(budget.remaining() - self.settings.answer_margin_s, self.settings.answer_margin_s)))
        self.arrivals.mark()  # a request that got this far is load, refused or not; a malformed one was not
        with cancelled_on_disconnect(request):
            # Shed in milliseconds, before decoding; an admitted frame counts as waiting until it is sent.
            with admitted(self.admission, budget, self.settings):
                decoded = await self.decoder.decode(data, deadline=started_monotonic + budget.seconds
                                                    - self.settings.answer_margin_s)
                timings = {"decode": ms_since(started)}
                frame = ray.put(decoded.pixels)  # one copy in the object store, shared by every stage
            result = await analyze_frame(decoded.pixels, frame, describe, self.stages, self.settings, timings,
                                         budget=budget, admission=self.admission, request_id=request_id,
                                         original_size=decoded.original_size)
        timings["total"] = ms_since(started)
        record_answer(result, timings)  # refusals are counted by the error mapper's on_analyze_refusal
        # Serve's proxy puts the same id in the x-request-id response header.
        return JSONResponse({"request_id": request_id, **result, "timings_ms": timings})

    def _stream_frame(self, outcome: str, timings: dict) -> None:
        # A stream frame is an arrival as a POSTed one is (read, decoded, or dropped in microseconds): the
        # autoscaler's load counts both, so cameras held scale the ingress too.
        self.arrivals.mark()
        record_stream_frame(outcome, timings)

    async def stream(self, websocket: WebSocket) -> None:
        """WS /v1/streams: one camera for the socket's life (festival_serve.serving.streams has the protocol)."""
        try:
            options = StreamOptions.from_query(websocket.query_params, self.settings)
        except ApiError as e:
            await websocket.close(CLOSE_POLICY, e.message[:120])
            return
        await CameraStream(websocket, options, self.streams).run()

    async def list_models(self, request: Request) -> JSONResponse:
        infos = await self.states.refresh()  # live: behind the keys and the probes' rate limit
        return JSONResponse({"models": [
            {"name": stage, "deployment": handle.deployment_name, **public_model_info(infos[stage], self.model_store)}
            for stage, handle in self.models.items()
        ]})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> JSONResponse:
        """200 only when every stage in ``ingress.required_stages`` has its model loaded, as the stages last said
        (asked in the background every ``probe_refresh_s``), else 503; the body gives every stage's state."""
        ready, stages = readiness(await self.states.current(), self.settings.required_stages)
        return JSONResponse({"ready": ready, "stages": stages, "age_s": self.states.age_s()},
                            status_code=200 if ready else 503)

    async def record_routing_stats(self) -> dict[str, int]:
        # The ingress's router (deployments.stream_router) sends a new camera socket to the replica holding fewest.
        return {STREAMS_HELD: self.streams.slots.streams}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve samples this for the autoscaler. The ingress's work is per arrival (decoding, or refusing in
        # milliseconds), while its requests in flight only await the models: it scales by arrivals per second
        # (GraphMetricPolicy, serve_config.yaml).
        return {ARRIVALS_PER_S: self.arrivals.rate()}


def _replica_token() -> str:
    """A short opaque name of this replica for the stream's ``ready`` message: which replica holds a camera, without
    Serve's ids (which name the application and deployment) leaving the cluster. An app built outside a replica (the
    in-process tests) names its process."""
    try:
        unique_id = serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        unique_id = f"process-{os.getpid()}"
    return hashlib.sha256(unique_id.encode()).hexdigest()[:8]


#: How long a stage may take to answer model_info before it reads "no replica answered", seconds.
MODEL_INFO_TIMEOUT_S = 5.0


@contextlib.contextmanager
def cancelled_on_disconnect(request: Request):
    """With ``x-request-disconnect-disabled: ?1`` Serve's proxy no longer cancels a request whose client left, so an
    abandoned describe=true frame would keep every model busy: watch for the client's leaving here instead, and cancel
    the handler as the proxy would have. (Without the header the proxy does it; the body must have been read.)"""
    if request.headers.get(DISCONNECT_DISABLED_HEADER) != "?1":
        yield
        return
    handler = asyncio.current_task()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        logger.debug("request %s: client left; its work is cancelled", request_id_of(request))
        handler.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
