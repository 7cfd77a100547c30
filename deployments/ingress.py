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
import logging
import time

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from festival_serve.serving.admission import Admission, Budget
from festival_serve.serving.http import BUDGET_HEADER, ApiHandlers, build_http_app, ms_since, parse_bool, parse_budget, \
    request_id_of
from festival_serve.serving.auth import KeyRing
from festival_serve.serving.autoscaling import ARRIVALS_PER_S, RateMeter
from festival_serve.serving.coalesce import CallCoalescer
from festival_serve.serving.flow import admitted, analyze_frame
from festival_serve.serving.imaging import Decoder
from festival_serve.serving.metrics import record_answer, record_refusal
from festival_serve.serving.public_paths import public_model_info
from festival_serve.serving.uploads import read_image_bytes
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
        # Read once: a missing, unreadable or malformed keys file fails the deployment with the reason.
        self.keys = KeyRing.from_file(settings.api_keys_file) if settings.api_keys_file else None
        if self.keys is None:
            logger.warning("ingress: no api_keys_file: /v1 is open to anyone who can reach the port")
        else:
            logger.info("ingress: /v1 needs an API key (%d key digest(s) in %s)", len(self.keys.digests),
                        settings.api_keys_file)
        self.models = {stage.name: models[stage.name] for stage in STAGES}
        self.settings = settings
        self.decoder = Decoder(settings.decode_threads, settings.max_image_pixels)  # off the event loop
        self.admission = Admission()  # this replica's view of every stage's queue (festival_serve.serving.admission)
        # A stage's calls that wait while its requests in flight are at the cap leave together as one Serve
        # request (a request costs milliseconds of CPU whatever it carries); the replica hands them one by one to
        # its batcher.
        self.stages = {stage.name: CallCoalescer(models[stage.name].call_many.remote,
                                                 max_calls=settings.stage_request_max_calls,
                                                 max_requests=settings.stage_requests_in_flight)
                       for stage in STAGES}
        self.arrivals = RateMeter()  # every /v1/analyze, admitted or refused: the autoscaler's load

    def __serve_build_asgi_app__(self) -> Starlette:
        # Routes, API keys, /openapi.json and the one error mapper are the baseline's too (festival_serve.serving.http);
        # only the ingress counts the refusals it answers (festival_serve.serving.metrics).
        handlers = ApiHandlers(analyze=self.analyze, models=self.list_models, healthz=self.healthz, readyz=self.readyz)
        return build_http_app(handlers, keys=self.keys, log=logger, on_analyze_refusal=record_refusal)

    # -- routes (each raises what it cannot answer: build_http_app maps it to a status) ---------

    async def analyze(self, request: Request) -> JSONResponse:
        self.arrivals.mark()
        request_id = request_id_of(request)
        started, started_monotonic = time.perf_counter(), time.monotonic()
        budget = Budget(parse_budget(request.headers.get(BUDGET_HEADER), self.settings), started_monotonic)
        # Shed in milliseconds, before reading or decoding; an admitted frame counts as waiting until it is sent.
        with admitted(self.admission, budget, self.settings):
            describe = parse_bool(request.query_params.get("describe", "true"), "describe")
            data = await read_image_bytes(request, self.settings.max_body_bytes)
            image = await self.decoder.decode(data)
            timings = {"decode": ms_since(started)}
            frame = ray.put(image)  # one copy in the object store, shared by every stage
        result = await analyze_frame(image, frame, describe, self.stages, self.settings, timings, budget=budget,
                                     admission=self.admission, request_id=request_id)
        timings["total"] = ms_since(started)
        record_answer(result, timings)  # refusals are counted by the error mapper's on_analyze_refusal
        # Serve's proxy puts the same id in the x-request-id response header.
        return JSONResponse({"request_id": request_id, **result, "timings_ms": timings})

    async def list_models(self, request: Request) -> JSONResponse:
        infos = await self._model_infos()
        return JSONResponse({"models": [
            {"name": stage, "deployment": handle.deployment_name, **public_model_info(info, self.model_store)}
            for (stage, handle), info in zip(self.models.items(), infos)
        ]})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> JSONResponse:
        """200 only when every stage in ``ingress.required_stages`` answers ``info`` with its model loaded,
        else 503; the body gives every stage's state (``/v1/models`` has the details)."""
        required = set(self.settings.required_stages)
        infos = await self._model_infos()
        stages = {stage: {"ready": info.get("ready") is True, "required": stage in required,
                          "reason": _not_ready_reason(info)} for stage, info in zip(self.models, infos)}
        ready = all(state["ready"] for state in stages.values() if state["required"])
        return JSONResponse({"ready": ready, "stages": stages}, status_code=200 if ready else 503)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve samples this for the autoscaler. The ingress's work is per arrival (decoding, or refusing in
        # milliseconds), while its requests in flight only await the models: it scales by arrivals per second
        # (GraphMetricPolicy, serve_config.yaml).
        return {ARRIVALS_PER_S: self.arrivals.rate()}

    async def _model_infos(self) -> list[dict]:
        async def one(handle: DeploymentHandle) -> dict:
            try:
                return await asyncio.wait_for(handle.info.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - report, don't fail, the probe
                return {"ready": False, "error": f"{type(e).__name__}: {e}"}

        return await asyncio.gather(*(one(h) for h in self.models.values()))


def _not_ready_reason(info: dict) -> str | None:
    """Why a stage is not ready, in words a probe may show: no file paths, no exception text."""
    if info.get("ready") is True:
        return None
    if "error" in info:  # ``_model_infos`` could not get an answer from a replica
        return "no replica answered"
    return "model not loaded (weights missing)" if info.get("unavailable_reason") else "model not loaded"
