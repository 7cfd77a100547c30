"""The HTTP API's contract and the per-frame flow, without Ray: what the Serve ingress and the
single-process benchmark baseline share, so both answer the same requests with the same JSON.

    frame ─┬→ sign_detector ─→ crops → sign_reader ─┐
           └→ hazard_cells ──────────────────────────┴→ scene_describer (if describe)

A stage is any ``callable(*args) -> awaitable``: a Ray Serve handle call in the graph, a call into a
model in the same process in the baseline. A stage that fails or runs out of time makes the answer
degraded (``degraded`` says why), never an error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from festival_serve.imaging import IMAGE_CONTENT_TYPES, crop
from festival_serve.settings import IngressSettings
from festival_serve.vlm import Findings

logger = logging.getLogger(__name__)

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

StageCall = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class StageError:
    """Stands in for one item's result when the stage could not produce it (one per request, so a
    failure never takes the rest of the batch with it)."""

    stage: str
    reason: str


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


def http_error_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


# -- the flow of one frame --------------------------------------------------------------------------


async def analyze_frame(image: np.ndarray, frame: Any, describe: bool, stages: Mapping[str, StageCall],
                        settings: IngressSettings, timings: dict) -> dict:
    """Run ``image`` through the stages and build the answer. ``frame`` is what the model stages are
    handed (the array itself, or a reference to one shared copy); crops are cut from ``image``."""
    degraded: list[str] = []

    async def stage(name: str, *args):
        return await _await_stage(name, stages[name](*args), settings.stage_timeout_s, timings, degraded)

    found_signs, hazards = await asyncio.gather(stage("sign_detector", frame), stage("hazard_cells", frame))
    found_signs, hazards = found_signs or [], hazards or []

    with_text = [i for i, s in enumerate(found_signs) if s.has_text]  # pictograms have nothing to read
    to_read = with_text[: settings.max_signs_read]
    texts: list = [None] * len(found_signs)
    if to_read:
        crops = [crop(image, found_signs[i].box, settings.crop_padding) for i in to_read]
        read = await stage("sign_reader", crops) or [None] * len(crops)
        for i, text in zip(to_read, read):
            texts[i] = None if isinstance(text, StageError) else text
        if len(with_text) > len(to_read):
            degraded.append(f"sign_reader: read the first {len(to_read)} of {len(with_text)} signs with text")

    description = None
    if describe:
        description = await stage("scene_describer", frame, findings_of(found_signs, texts, hazards))
    return {
        "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
        "signs": [sign_json(s, t) for s, t in zip(found_signs, texts)],
        "hazards": [hazard_json(h) for h in hazards],
        "description": description,
        "degraded": degraded,
    }


async def _await_stage(name: str, pending: Awaitable, timeout_s: float, timings: dict, degraded: list[str]):
    """Await one stage; answer ``None`` and note the reason when it fails or runs out of time."""
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(pending, timeout=timeout_s)
    except asyncio.TimeoutError:
        cancel = getattr(pending, "cancel", None)  # a Serve response: stop the work downstream too
        if cancel:
            cancel()
        result = StageError(name, f"timed out after {timeout_s:g} s")
    except Exception as e:  # noqa: BLE001 - a dead replica or a model error degrades the answer
        logger.exception("stage %s failed", name)
        result = StageError(name, f"{type(e).__name__}: {e}")
    finally:
        timings[name] = ms_since(started)
    if isinstance(result, list) and result and all(isinstance(r, StageError) for r in result):
        result = result[0]  # the whole stage failed for this request (e.g. no weights)
    if isinstance(result, StageError):
        degraded.append(f"{result.stage}: {result.reason}")
        return None
    return result


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


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, "invalid_parameter", f"{name} must be true or false, got {value!r}")


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


# -- the answer's JSON ---------------------------------------------------------------------------------


def sign_json(detection, text) -> dict:
    return {
        "box": [round(v, 1) for v in detection.box],
        "label": detection.label,
        "score": round(detection.score, 4),
        "text": text.text if text is not None else None,
        "text_score": round(text.score, 4) if text is not None else None,
    }


def hazard_json(cell) -> dict:
    return {
        "cell": cell.cell,
        "box": [round(v, 1) for v in cell.box],
        "labels": [{"label": lab.label, "score": round(lab.score, 4)} for lab in cell.labels],
    }


def findings_of(found_signs: list, texts: list, hazards: list) -> Findings:
    counts = collections.Counter(lab.label for cell in hazards for lab in cell.labels)
    return Findings(
        signs=tuple((s.label, t.text if t is not None else "") for s, t in zip(found_signs, texts)),
        hazards=tuple(sorted(counts.items())),
    )
