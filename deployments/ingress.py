"""PipelineIngress: the HTTP API (Starlette) and the DAG it drives.

    decode once → ray.put ─┬→ SignDetector ─→ crops → SignReader ─┐
                           └→ HazardCells ────────────────────────┴→ SceneDescriber (if describe)

The frame goes into the object store once; every model reads that one copy. A stage that fails,
times out or has no weights makes the answer degraded (``degraded`` says why), never an error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deployments.base import StageError
from festival_serve.imaging import IMAGE_CONTENT_TYPES, InvalidImage, crop, decode_image
from festival_serve.settings import IngressSettings
from festival_serve.vlm import Findings

logger = logging.getLogger("ray.serve")

STAGES = ("sign_detector", "hazard_cells", "sign_reader", "scene_describer")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ApiError(Exception):
    """A client error with its HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, request_id: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status)


@serve.deployment
@serve.ingress()
class PipelineIngress:
    def __init__(
        self,
        sign_detector: DeploymentHandle,
        hazard_cells: DeploymentHandle,
        sign_reader: DeploymentHandle,
        scene_describer: DeploymentHandle,
        settings: IngressSettings,
    ) -> None:
        self.models = dict(zip(STAGES, (sign_detector, hazard_cells, sign_reader, scene_describer)))
        self.settings = settings

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
            describe = _parse_bool(request.query_params.get("describe", "true"), "describe")
            data = await self._read_image_bytes(request)
            image = decode_image(data, max_pixels=self.settings.max_image_pixels)
        except InvalidImage as e:
            return error_response(400, "invalid_image", str(e), request_id)
        except ApiError as e:
            return error_response(e.status, e.code, e.message, request_id)
        timings = {"decode": _ms_since(started)}
        result = await self._run_graph(image, describe, timings)
        timings["total"] = _ms_since(started)
        # Serve's proxy puts the same id in the x-request-id response header.
        return JSONResponse({"request_id": request_id, **result, "timings_ms": timings})

    async def list_models(self, request: Request) -> JSONResponse:
        infos = await self._model_infos()
        return JSONResponse({"models": [
            {"name": stage, "deployment": _deployment_name(handle), **info}
            for (stage, handle), info in zip(self.models.items(), infos)
        ]})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> JSONResponse:
        infos = await self._model_infos()
        missing = [stage for stage, info in zip(self.models, infos) if "error" in info]
        status = 503 if missing else 200
        return JSONResponse({"ready": not missing, "not_ready": missing}, status_code=status)

    # -- the graph ----------------------------------------------------------------------------

    async def _run_graph(self, image: np.ndarray, describe: bool, timings: dict) -> dict:
        degraded: list[str] = []
        frame = ray.put(image)  # one copy in the object store, shared by every stage
        found_signs, hazards = await asyncio.gather(
            self._stage("sign_detector", self.models["sign_detector"].detect.remote(frame), timings, degraded),
            self._stage("hazard_cells", self.models["hazard_cells"].classify.remote(frame), timings, degraded),
        )
        found_signs, hazards = found_signs or [], hazards or []
        texts = await self._read_signs(image, found_signs, timings, degraded)
        signs = [_sign_json(s, t) for s, t in zip(found_signs, texts)]
        description = None
        if describe:
            findings = _findings(found_signs, texts, hazards)
            description = await self._stage(
                "scene_describer", self.models["scene_describer"].describe.remote(frame, findings), timings, degraded
            )
        return {
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "signs": signs,
            "hazards": [_hazard_json(h) for h in hazards],
            "description": description,
            "degraded": degraded,
        }

    async def _read_signs(self, image: np.ndarray, found: list, timings: dict, degraded: list[str]) -> list:
        """The text of each detected sign (``None`` where it could not be read)."""
        to_read = found[: self.settings.max_signs_read]
        if not to_read:
            return [None] * len(found)
        crops = [crop(image, s.box, self.settings.crop_padding) for s in to_read]
        texts = await self._stage("sign_reader", self.models["sign_reader"].read.remote(crops), timings, degraded)
        texts = [None if isinstance(t, StageError) else t for t in (texts or [None] * len(crops))]
        if len(found) > len(to_read):
            degraded.append(f"sign_reader: read the first {len(to_read)} of {len(found)} signs")
        return texts + [None] * (len(found) - len(to_read))

    async def _stage(self, stage: str, response, timings: dict, degraded: list[str]):
        """Await one stage; answer ``None`` and note the reason when it fails or runs out of time."""
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(response, timeout=self.settings.stage_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            result = StageError(stage, f"timed out after {self.settings.stage_timeout_s:g} s")
        except Exception as e:  # noqa: BLE001 - a dead replica or actor error degrades the answer
            logger.exception("stage %s failed", stage)
            result = StageError(stage, f"{type(e).__name__}: {e}")
        finally:
            timings[stage] = _ms_since(started)
        if isinstance(result, list) and result and all(isinstance(r, StageError) for r in result):
            result = result[0]  # the whole stage failed for this request (e.g. no weights)
        if isinstance(result, StageError):
            degraded.append(f"{result.stage}: {result.reason}")
            return None
        return result

    async def _model_infos(self) -> list[dict]:
        async def one(handle: DeploymentHandle) -> dict:
            try:
                return await asyncio.wait_for(handle.info.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001 - report, don't fail, the probe
                return {"ready": False, "error": f"{type(e).__name__}: {e}"}

        return await asyncio.gather(*(one(h) for h in self.models.values()))

    # -- request parsing and errors -------------------------------------------------------------

    async def _read_image_bytes(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.settings.max_body_bytes
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

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    async def _unexpected_error(self, request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal", f"{type(exc).__name__}: {exc}")


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
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
    except Exception as e:  # noqa: BLE001 - malformed multipart is the client's error
        raise ApiError(400, "invalid_form", f"could not parse multipart body: {e}") from e
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "missing_image", "multipart body needs a file field named 'image'")
    data = await upload.read()
    if not data:
        raise ApiError(400, "empty_body", "the 'image' field is empty")
    if len(data) > limit:
        raise ApiError(413, "payload_too_large", f"image is over the limit of {limit} bytes")
    return data


def _parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, "invalid_parameter", f"{name} must be true or false, got {value!r}")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _deployment_name(handle: DeploymentHandle) -> str:
    return handle.deployment_name


def _sign_json(detection, text) -> dict:
    return {
        "box": [round(v, 1) for v in detection.box],
        "label": detection.label,
        "score": round(detection.score, 4),
        "text": text.text if text is not None else None,
        "text_score": round(text.score, 4) if text is not None else None,
    }


def _hazard_json(cell) -> dict:
    return {
        "cell": cell.cell,
        "box": [round(v, 1) for v in cell.box],
        "labels": [{"label": lab.label, "score": round(lab.score, 4)} for lab in cell.labels],
    }


def _findings(found_signs: list, texts: list, hazards: list) -> Findings:
    counts = collections.Counter(lab.label for cell in hazards for lab in cell.labels)
    return Findings(
        signs=tuple((s.label, t.text if t is not None else "") for s, t in zip(found_signs, texts)),
        hazards=tuple(sorted(counts.items())),
    )
