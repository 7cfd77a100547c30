"""PipelineIngress: the HTTP API (Starlette) and the DAG it drives (``festival_serve.api``).

    decode once → ray.put ─┬→ SignDetector ─→ crops → SignReader ─┐
                           └→ HazardCells ────────────────────────┴→ SceneDescriber (if describe)

The frame goes into the object store once; every model reads that one copy. A stage that fails,
times out or has no weights makes the answer degraded (``degraded`` says why), never an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from festival_serve.api import ApiError, analyze_frame, error_response, http_error_code, ms_since, \
    parse_bool, read_image_bytes
from festival_serve.imaging import InvalidImage, decode_image
from festival_serve.settings import IngressSettings
from festival_serve.stages import STAGES

logger = logging.getLogger("ray.serve")


@serve.deployment
@serve.ingress()
class PipelineIngress:
    def __init__(self, settings: IngressSettings, **models: DeploymentHandle) -> None:
        """``models``: one handle per stage, keyed by stage name (``festival_serve.stages``)."""
        self.models = {stage.name: models[stage.name] for stage in STAGES}
        self.settings = settings
        self.stages = {stage.name: getattr(models[stage.name], stage.method).remote for stage in STAGES}

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/analyze", self.analyze, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._unexpected_error},
        )

    # -- routes -------------------------------------------------------------------------------

    async def analyze(self, request: Request) -> JSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        try:
            describe = parse_bool(request.query_params.get("describe", "true"), "describe")
            data = await read_image_bytes(request, self.settings.max_body_bytes)
            image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        except InvalidImage as e:
            return error_response(400, "invalid_image", str(e), request_id)
        except ApiError as e:
            return error_response(e.status, e.code, e.message, request_id)
        timings = {"decode": ms_since(started)}
        frame = ray.put(image)  # one copy in the object store, shared by every stage
        result = await analyze_frame(image, frame, describe, self.stages, self.settings, timings)
        timings["total"] = ms_since(started)
        # Serve's proxy puts the same id in the x-request-id response header.
        return JSONResponse({"request_id": request_id, **result, "timings_ms": timings})

    async def list_models(self, request: Request) -> JSONResponse:
        infos = await self._model_infos()
        return JSONResponse({"models": [
            {"name": stage, "deployment": handle.deployment_name, **info}
            for (stage, handle), info in zip(self.models.items(), infos)
        ]})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> JSONResponse:
        infos = await self._model_infos()
        missing = [stage for stage, info in zip(self.models, infos) if "error" in info]
        status = 503 if missing else 200
        return JSONResponse({"ready": not missing, "not_ready": missing}, status_code=status)

    async def _model_infos(self) -> list[dict]:
        async def one(handle: DeploymentHandle) -> dict:
            try:
                return await asyncio.wait_for(handle.info.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - report, don't fail, the probe
                return {"ready": False, "error": f"{type(e).__name__}: {e}"}

        return await asyncio.gather(*(one(h) for h in self.models.values()))

    # -- errors -----------------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, http_error_code(exc.status_code), str(exc.detail))

    async def _unexpected_error(self, request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal", f"{type(exc).__name__}: {exc}")
