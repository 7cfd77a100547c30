"""The flow of one frame through the stages, without HTTP or Ray: what the Serve ingress and the
single-process baseline both run, so they answer the same requests with the same JSON.

    frame ─┬→ sign_detector ─→ crops → sign_reader ─┐
           └→ hazard_cells ──────────────────────────┴→ scene_describer (if describe)

A stage is any ``callable(*args, ticket) -> awaitable``: a Ray Serve handle call in the graph, a call
into a model in the same process in the baseline; the ``Ticket`` lets a model drop work that expired
while it queued. Every wait is bounded by what is left of the request's
``Budget``. A stage that fails, is shed, or would not finish in time makes the answer degraded:
``degraded`` lists ``{stage, code, message}`` with a stable code and a message free of paths and
exception text (those go to the log with the request id). Only when neither safety stage (signs,
hazards) answered, or one was shed by a full queue, is the request refused (``Rejected``: 503/429
with ``Retry-After``) — "nothing there" and "never looked" must not look the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Iterator, Mapping, Protocol

import numpy as np

from festival_serve.serving.admission import SAFETY_STAGES, Admission, Budget
from festival_serve.serving.imaging import crop
from festival_serve.pipeline.places import hazard_places
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.types import DegradedCode, Findings, HazardCell, SignDetection, SignText, StageError, Ticket

logger = logging.getLogger(__name__)

StageCall = Callable[..., Awaitable[Any]]
@dataclass(frozen=True)
class Degraded:
    """One entry of an answer's ``degraded`` list."""

    stage: str
    code: DegradedCode
    message: str


def degraded_line(entry: dict | str) -> str:
    """One ``degraded`` entry as a line of text (``stage (code): message``), for reports and banners."""
    if isinstance(entry, dict):
        return f"{entry.get('stage')} ({entry.get('code')}): {entry.get('message')}"
    return str(entry)


class Rejected(Exception):
    """The request cannot be answered usefully now; the client should retry after ``retry_after_s``."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


@dataclass
class _Frame:
    """What one request collects on its way through the stages."""

    budget: Budget
    settings: IngressSettings
    admission: Admission
    timings: dict
    request_id: str
    degraded: list[Degraded]
    shed: dict[str, float]  # stage → Retry-After its queue asked for
    stream: bool = False  # a camera-stream frame (its tickets say so)


@contextlib.contextmanager
def admitted(admission: Admission, budget: Budget, settings: IngressSettings) -> Iterator[None]:
    """``admit``, then count the frame as waiting (``Admission.waiting``) while the block reads and decodes
    it; leave the block right before ``analyze_frame`` sends it to the stages."""
    admit(admission, budget, settings)
    admission.waiting += 1
    try:
        yield
    finally:
        admission.waiting -= 1


def admit(admission: Admission, budget: Budget, settings: IngressSettings) -> None:
    """Turn a request away in milliseconds, before its image is even decoded, when the safety stages'
    queues already would not answer within ``admit_wait_fraction`` of its budget (``Rejected`` with the
    drain time as Retry-After)."""
    retry_after = admission.admit((budget.remaining() - settings.answer_margin_s) * settings.admit_wait_fraction)
    if retry_after is not None:
        raise Rejected(503, "overloaded", "the sign and hazard queues would not answer within the request's budget",
                       retry_after)


class FrameWatcher(Protocol):
    """What a stream (festival_serve.serving.streams) adds to a frame's flow: which signs to read now, every
    sign's text from what was read and what its track knows, and whether this frame is one to describe."""

    def choose_reads(self, image: np.ndarray, found_signs: list[SignDetection]) -> list[int]: ...

    def texts(self, found_signs: list[SignDetection], read: dict[int, SignText | None]) -> list[SignText | None]: ...

    def wants_description(self, hazards: list[HazardCell] | None) -> bool: ...


async def analyze_frame(image: np.ndarray, frame: Any, describe: bool, stages: Mapping[str, StageCall],
                        settings: IngressSettings, timings: dict, *, budget: Budget | None = None,
                        admission: Admission | None = None, request_id: str = "",
                        original_size: tuple[int, int] | None = None, watcher: FrameWatcher | None = None) -> dict:
    """Run ``image`` through the stages and build the answer. ``frame`` is what the model stages are
    handed (the array itself, or a reference to one shared copy); crops are cut from ``image``.
    ``original_size`` (width, height): the client's frame when ``image`` was decoded smaller
    (``ingress.decode_max_side``); the answer's sizes and boxes are in the client's pixels.
    ``watcher``: a stream's tracking (reads only what its tracks still need; describes only when it says).
    Raises ``Rejected`` when the safety stages cannot answer."""
    run = _Frame(budget or Budget(settings.default_budget_s), settings, admission or Admission(), timings,
                 request_id, [], {}, stream=watcher is not None)
    found_signs, hazards = await asyncio.gather(_stage(run, stages, "sign_detector", 1, frame),
                                                _stage(run, stages, "hazard_cells", 1, frame))
    _refuse_without_safety(run, found_signs, hazards)
    hazards_seen = hazards  # None: the hazard stage gave nothing for this frame (not "no hazards")
    found_signs, hazards = found_signs or [], hazards or []
    if watcher is None:
        texts = await _read_signs(run, stages, image, found_signs, signs_with_text(found_signs))
    else:
        chosen = watcher.choose_reads(image, found_signs)
        read = await _read_signs(run, stages, image, found_signs, chosen)
        texts = watcher.texts(found_signs, {i: read[i] for i in chosen})
        describe = watcher.wants_description(hazards_seen) and describe  # the watcher's events come either way
    description = None
    if describe:
        if run.admission.describer_fits(run.budget.remaining() - settings.answer_margin_s):
            description = await _stage(run, stages, "scene_describer", 1, frame,
                                       findings_of(found_signs, texts, hazards, (image.shape[1], image.shape[0])))
        else:
            run.degraded.append(Degraded("scene_describer", "skipped_over_budget",
                                         "the describer's queue would not answer within the request's budget"))
    width, height = original_size or (int(image.shape[1]), int(image.shape[0]))
    scale = (width / image.shape[1], height / image.shape[0])  # decoded pixels → the client's
    return {
        "image": {"width": width, "height": height},
        "signs": [sign_json(s, t, scale) for s, t in zip(found_signs, texts)],
        "hazards": [hazard_json(h, scale) for h in hazards],
        "description": description,
        "degraded": [asdict(d) for d in run.degraded],
    }


def _refuse_without_safety(run: _Frame, found_signs, hazards) -> None:
    """A frame the safety stages did not both look at is no answer: refuse it, saying when to retry."""
    shed = {stage: after for stage, after in run.shed.items() if stage in SAFETY_STAGES}
    if shed:
        raise Rejected(503, "overloaded", f"{', '.join(sorted(shed))} turned the frame away: its queue is full",
                       max(shed.values()))
    if found_signs is None and hazards is None:
        raise Rejected(503, "safety_stages_unavailable",
                       "neither the sign detector nor the hazard cells could analyse the frame",
                       run.settings.retry_after_s)


async def _read_signs(run: _Frame, stages: Mapping[str, StageCall], image: np.ndarray, found_signs: list,
                     with_text: list[int]) -> list:
    """Text of the signs ``with_text`` names (indices, surest first), within what the budget allows."""
    texts: list = [None] * len(found_signs)
    if not with_text:
        return texts
    capped = with_text[: run.settings.max_signs_read]
    fits = run.admission.reader_items(len(capped), run.budget.remaining() - run.settings.answer_margin_s)
    to_read = capped[:fits]
    if len(to_read) < len(with_text):
        code: DegradedCode = "skipped_over_budget" if fits == 0 else "partial"
        run.degraded.append(Degraded("sign_reader", code, f"read {len(to_read)} of {len(with_text)} signs with text"
                                     + (" (reader queue over budget)" if fits < len(capped) else "")))
    if not to_read:
        return texts
    crops = [crop(image, found_signs[i].box, run.settings.crop_padding) for i in to_read]
    read = await _stage(run, stages, "sign_reader", len(crops), crops) or [None] * len(crops)
    for i, text in zip(to_read, read):
        texts[i] = None if isinstance(text, StageError) else text
    return texts


def signs_with_text(found_signs: list) -> list[int]:
    """Indices of the signs that print text (pictograms have nothing to read), surest first: if only some can
    be read, those are."""
    return sorted((i for i, s in enumerate(found_signs) if s.has_text), key=lambda i: -found_signs[i].score)


async def _stage(run: _Frame, stages: Mapping[str, StageCall], name: str, items: int, *args):
    """Call one stage and await it within the budget; ``None`` (and a ``degraded`` entry) when it gave nothing."""
    load = run.admission.loads[name]
    started = time.perf_counter()
    ahead = load.begin(items)
    completed = False
    ticket = Ticket(sent_at=time.time(), deadline=run.budget.deadline_unix() - run.settings.answer_margin_s,
                    stream=run.stream)
    try:
        result = await _bounded(run, name, stages[name](*args, ticket))
        if isinstance(result, StageError) and result.code == "unavailable" and \
                run.budget.remaining() > run.settings.answer_margin_s:
            # The replica died or went away with the call. Every stage is a pure function of what it is sent, so
            # sending it again is safe: once, and Serve routes it to a live replica (on another node if need be).
            logger.info("request %s: %s retried once after its replica was lost", run.request_id, name)
            result = await _bounded(run, name, stages[name](*args, ticket))
        # A call cut off by the budget still says what an item costs at least: under a surge those are the
        # samples that matter, so they count (as lower bounds) in the estimate; other failures do not.
        completed = not isinstance(result, StageError) or result.code == "timeout"
    finally:
        elapsed = time.perf_counter() - started
        load.end(items, ahead, elapsed, completed=completed)
        run.timings[name] = round(elapsed * 1000, 2)
    if isinstance(result, list) and result and all(isinstance(r, StageError) for r in result):
        result = result[0]  # the whole stage failed for this request (e.g. no weights)
    if isinstance(result, StageError):
        run.degraded.append(Degraded(name, result.code, result.reason))
        return None
    if malformed(result):  # a NaN box would fail the answer's JSON, or a crop: the stage gave nothing usable
        logger.error("request %s: stage %s answered a malformed result: %.200r", run.request_id, name, result)
        run.degraded.append(Degraded(name, "malformed", "the stage's answer for this frame was not well formed"))
        return None
    return result


#: How deep ``malformed`` looks: a stage's answer is a list of records of numbers and short tuples.
_MAX_RESULT_DEPTH = 6


def malformed(value: Any, depth: int = 0) -> bool:
    """Whether a stage's result holds a number that is not finite, a ``box`` of four numbers without x1 <= x2 and
    y1 <= y2, or nesting deeper than any stage answers with."""
    if depth > _MAX_RESULT_DEPTH:
        return True
    if isinstance(value, float | np.floating):
        return not np.isfinite(value)
    if isinstance(value, str | bytes | int | np.integer | bool | None):
        return False
    if isinstance(value, list | tuple):
        return any(malformed(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return any(malformed(item, depth + 1) for item in value.values())
    if hasattr(value, "__dataclass_fields__"):
        box = getattr(value, "box", None)  # (x1, y1, x2, y2); a text line's box is a polygon: finiteness only
        if _flat_box(box) and not _well_formed_box(box):
            return True
        return any(malformed(getattr(value, name), depth + 1) for name in value.__dataclass_fields__)
    return False


def _flat_box(box: Any) -> bool:
    return isinstance(box, list | tuple) and len(box) == 4 and not any(isinstance(v, list | tuple) for v in box)


def _well_formed_box(box: Any) -> bool:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite([x1, y1, x2, y2]).all()) and x1 <= x2 and y1 <= y2


async def _bounded(run: _Frame, name: str, pending: Awaitable):
    """``pending``'s result, or a ``StageError`` when it fails or the budget runs out first."""
    timeout = run.budget.remaining() - run.settings.answer_margin_s
    try:
        if timeout <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(pending, timeout=timeout)
    except asyncio.TimeoutError:
        cancel = getattr(pending, "cancel", None)  # a Serve response: stop the work downstream too
        if cancel:
            cancel()
        elif asyncio.iscoroutine(pending):
            pending.close()
        return StageError(name, "no answer within the request's budget", "timeout")
    except Exception as e:  # noqa: BLE001 - a full queue, a dead replica or a model error degrades the answer
        return _stage_failure(run, name, e)


def _stage_failure(run: _Frame, name: str, error: Exception) -> StageError:
    """Map what a stage call raised to a client-safe ``StageError``; details go to the log only."""
    kind = type(error).__name__
    retry_after = getattr(error, "retry_after_s", None)
    if kind == "BackPressureError":  # ray.serve.exceptions: the deployment's max_queued_requests is full
        run.shed[name] = float(retry_after or run.settings.retry_after_s)
        logger.warning("request %s: %s shed by backpressure", run.request_id, name)
        return StageError(name, "the stage's queue is full", "shed")
    if kind in {"DeploymentUnavailableError", "RayActorError", "ActorDiedError", "ActorUnavailableError"}:
        logger.warning("request %s: %s unavailable: %s", run.request_id, name, error)
        return StageError(name, "no replica of the stage could take the frame", "unavailable")
    logger.error("request %s: stage %s failed", run.request_id, name, exc_info=error)
    return StageError(name, "the stage failed on this frame", "error")


# -- the answer's JSON ---------------------------------------------------------------------------------


def _scaled(box, scale: tuple[float, float]) -> list[float]:
    sx, sy = scale
    x1, y1, x2, y2 = box
    return [round(x1 * sx, 1), round(y1 * sy, 1), round(x2 * sx, 1), round(y2 * sy, 1)]


def sign_json(detection, text, scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    return {
        "box": _scaled(detection.box, scale),
        "label": detection.label,
        "score": round(detection.score, 4),
        "text": text.text if text is not None else None,
        "text_score": round(text.score, 4) if text is not None else None,
    }


def hazard_json(cell, scale: tuple[float, float] = (1.0, 1.0)) -> dict:
    return {
        "cell": cell.cell,
        "box": _scaled(cell.box, scale),
        "labels": [{"label": lab.label, "score": round(lab.score, 4)} for lab in cell.labels],
    }


def findings_of(found_signs: list, texts: list, hazards: list, frame_size: tuple[int, int]) -> Findings:
    """What the describer is told: each sign with its text, each hazard label with its cell count and where
    its cells are (``frame_size`` = (width, height) of the frame the cell boxes are in)."""
    return Findings(
        signs=tuple((s.label, t.text if t is not None else "") for s, t in zip(found_signs, texts)),
        hazards=hazard_places((((lab.label for lab in cell.labels), cell.box) for cell in hazards), frame_size),
    )
