"""``WS /v1/streams``: one camera per WebSocket, without Ray. The ingress hands each socket a ``CameraStream``;
the socket stays on that replica for its life (Serve's proxy pins it), so the stream's tracker lives here while
the models stay stateless and batch frames across every camera.

Protocol (the README's "Camera streams" has it in full):

* open ``/v1/streams?mode=live|every_frame&fps=F&describe=false&camera=NAME`` with the API key as for ``/v1``;
  the server says ``{"type": "ready", ...}`` with its limits, or ``{"type": "refused", "retry_after_s": s}``
  and closes with 1013 when the replica holds ``max_streams`` or the safety stages are over capacity;
* the client sends frames as binary messages (JPEG/PNG/WebP), each optionally after a text message
  ``{"id": ..., "t": capture seconds}``; ``{"ack": seq}`` (alone or in a header) says which results it read;
  ``{"type": "end"}`` asks for the summary and a clean close (1000);
* the server answers one ``{"type": "frame", "seq": n, ...}`` per processed frame (signs with ``track_id``,
  hazards, ``events``, ``dropped`` so far, ``timings_ms``), ``{"type": "frame_error", ...}`` for a frame it
  could not use (the stream goes on), and ``{"type": "summary", ...}`` after ``end``.

Live sources (``mode=live``, the default): the newest frame wins. A frame arriving while one waits replaces it
(``dropped`` counts it), at most ``fps`` frames a second are processed, and latency does not grow with time.
Files (``mode=every_frame``): every frame is processed in order; the client keeps at most ``window`` frames
unanswered, and a frame beyond it is refused (``window_exceeded``) rather than queued without bound.

Fairness: each stream has one frame in the graph at a time, and the replica's ``frames_in_flight`` slots go to
the streams in the order they asked (``FrameSlots``): under overload every camera gets the same processed fps,
the fast ones drop more. Close codes: 1000 end, 1008 policy (idle, results not read), 1011 server error,
1013 try again later.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.types import HazardCell, SignDetection, SignText
from festival_serve.serving.admission import Admission, Budget
from festival_serve.serving.errors import ApiError
from festival_serve.serving.flow import Rejected, StageCall, admit, analyze_frame
from festival_serve.serving.imaging import Decoder, DecoderBusy, DecodeTimedOut, InvalidImage
from festival_serve.serving.tracking import StreamMemory, TrackedSign

logger = logging.getLogger(__name__)

MODES = ("live", "every_frame")

#: WebSocket close codes (RFC 6455 §7.4.1) the stream uses.
CLOSE_NORMAL, CLOSE_POLICY, CLOSE_ERROR, CLOSE_RESTART, CLOSE_TRY_LATER = 1000, 1008, 1011, 1012, 1013
#: A client's frame id is echoed back: a short token, never a megabyte of it.
_MAX_ID_CHARS = 64
#: A predicted box with less of itself inside the frame than this is leaving the view: not drawn (fraction of area).
PREDICTED_IN_VIEW = 0.5
#: A text message is a small JSON header or ack; more is not one.
_MAX_TEXT_BYTES = 4096


#: Serve's proxy ends every request after ``http_options.request_timeout_s`` (60 s in serve_config.yaml), a socket
#: too (measured: every camera's socket got a 408 at 60 s), unless its handshake says otherwise.
PROXY_TIMEOUT_WARNING = ("Serve's proxy ends a request, this socket too, after its timeout (http_options.request_timeout_s):"
                         " send `x-request-timeout-seconds: 0` with the handshake to keep a camera's socket open")


class StreamRefused(Exception):
    """A new stream cannot be taken now: closed with 1013 after a ``refused`` message."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


@dataclass(frozen=True)
class StreamOptions:
    mode: str = "live"
    fps: float = 15.0
    describe: bool = False
    camera: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str], settings: IngressSettings) -> "StreamOptions":
        """The stream's options from its URL's query; ``ApiError`` (400) names what is wrong."""
        from festival_serve.serving.http import parse_bool

        mode = query.get("mode", "live")
        if mode not in MODES:
            raise ApiError(400, "invalid_parameter", f"mode must be one of {', '.join(MODES)}, got {mode[:32]!r}")
        cap = settings.streams.max_fps
        try:
            fps = float(query.get("fps", cap))
        except ValueError:
            fps = math.nan
        if not math.isfinite(fps) or fps <= 0:
            raise ApiError(400, "invalid_parameter", "fps must be a positive number")
        camera = query.get("camera", "")
        if len(camera) > _MAX_ID_CHARS:
            raise ApiError(400, "invalid_parameter", f"camera must be at most {_MAX_ID_CHARS} characters")
        return cls(mode, min(fps, cap), parse_bool(query.get("describe", "false"), "describe"), camera)


class FrameSlots:
    """The replica's stream frames in the graph at once (``frames_in_flight``), handed out first come first
    served: each stream asks for one slot per frame and holds at most one, so the order of asking is a round
    robin over the streams with a frame ready. Also counts the streams held (``max_streams``)."""

    def __init__(self, slots: int, max_streams: int) -> None:
        self.semaphore = asyncio.Semaphore(slots)
        self.max_streams = max_streams
        self.streams = 0

    def open(self, retry_after_s: float) -> None:
        if self.streams >= self.max_streams:
            raise StreamRefused(f"this replica holds its {self.max_streams} streams", retry_after_s)
        self.streams += 1

    def close(self) -> None:
        self.streams -= 1


@dataclass
class StreamContext:
    """What every stream of a replica shares: the ingress's settings, decoder, admission and stage calls."""

    settings: IngressSettings
    decoder: Decoder
    admission: Admission
    stages: Mapping[str, StageCall]
    slots: FrameSlots
    put: Callable[[np.ndarray], Any] = lambda pixels: pixels  # the ingress: ray.put, one copy for every stage
    on_frame: Callable[[str, dict], None] = lambda outcome, timings: None  # metrics: analysed/predicted/dropped/error
    on_event: Callable[[dict], None] = lambda event: None
    on_streams: Callable[[int], None] = lambda held: None  # metrics: the streams this replica holds now
    replica: str = ""  # an opaque token of the replica holding the stream (ops: which one a camera is on)


@dataclass
class _Arrived:
    data: bytes
    frame: int  # the stream's count of frames received, from 0
    client_id: str | int | None
    capture_s: float | None
    arrived: float = field(default_factory=time.monotonic)


class _Tracking:
    """The stream's ``FrameWatcher`` (festival_serve.serving.flow) for one frame at a time."""

    def __init__(self, memory: StreamMemory, settings: IngressSettings) -> None:
        self.memory, self.settings = memory, settings
        self.frame, self.time_s, self.size = 0, 0.0, (0, 0)
        self.tracked: list[TrackedSign] = []
        self.events: list[dict] = []
        self.describe_every_s, self.last_description = settings.streams.describe_every_s, -math.inf

    def begin(self, frame: int, time_s: float, size: tuple[int, int]) -> None:
        self.frame, self.time_s, self.size, self.tracked, self.events = frame, time_s, size, [], []

    def choose_reads(self, image: np.ndarray, found_signs: list[SignDetection]) -> list[int]:
        self.tracked = self.memory.track(self.frame, self.time_s, found_signs)
        return self.memory.to_read(self.tracked, image, self.settings.crop_padding)

    def texts(self, found_signs: list[SignDetection], read: dict[int, SignText | None]) -> list[SignText | None]:
        for i, text in read.items():
            self.memory.record_text(self.tracked[i], text)
        out: list[SignText | None] = []
        for item in self.tracked:
            track = item.track
            out.append(SignText(track.text, track.text_score, ()) if track is not None and track.text else None)
        return out

    def wants_description(self, hazards: list[HazardCell] | None) -> bool:
        self.events = self.memory.events(self.frame, self.time_s, hazards, self.size)
        if self.events and self.time_s - self.last_description >= self.describe_every_s:
            self.last_description = self.time_s
            return True
        return False


class CameraStream:
    """One socket's camera: intake (newest wins, or every frame within the window), one frame at a time
    through the graph, its tracks and events, and the protocol's messages."""

    def __init__(self, websocket: WebSocket, options: StreamOptions, context: StreamContext) -> None:
        self.ws, self.options, self.context = websocket, options, context
        self.settings = context.settings
        self.limits = context.settings.streams
        self.stream_id = uuid.uuid4().hex[:12]
        self.memory = StreamMemory(self.limits)
        self.tracking = _Tracking(self.memory, self.settings)
        self.waiting: collections.deque[_Arrived] = collections.deque()
        self.ready = asyncio.Event()  # a frame waits, or the stream ends
        self.received = self.processed = self.dropped = self.errors = 0
        self.predicted = 0  # processed frames that skipped the graph (analyze_every)
        self.last_time_s = 0.0  # the capture time of the last frame processed: when the signs still in view pass
        self.skipped_since = 0  # frames predicted since the last analysed one
        self.last_analysed: tuple | None = None  # (scale to client pixels, client size, hazards) of the last analysed
        self.seq = self.acked = 0  # results sent (and numbered) / the last one the client says it read
        self.ending = False
        self.closed: tuple[int, str] | None = None
        self.started = time.monotonic()
        self.latencies_ms: list[float] = []

    # -- the socket's life ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Accept (or refuse with 1013), then receive and process until the client ends or leaves."""
        await self.ws.accept()
        try:
            admit(self.context.admission, Budget(self.limits.frame_budget_s), self.settings)
            self.context.slots.open(self.settings.retry_after_s)
            self.context.on_streams(self.context.slots.streams)
        except (Rejected, StreamRefused) as e:
            retry = e.retry_after_s
            await self._send({"type": "refused", "message": e.message, "retry_after_s": round(retry, 2)})
            await self.ws.close(CLOSE_TRY_LATER, f"full; retry after {max(1, math.ceil(retry))} s")
            logger.info("stream refused (%s)", e.message)
            return
        try:
            await self._send({"type": "ready", "stream_id": self.stream_id, "replica": self.context.replica,
                              "mode": self.options.mode,
                              "fps": self.options.fps, "describe": self.options.describe,
                              "window": self.limits.every_frame_window if self.options.mode == "every_frame" else None,
                              "max_unacked_results": self.limits.max_unacked_results,
                              "max_frame_bytes": self.settings.max_body_bytes,
                              "idle_timeout_s": self.limits.idle_timeout_s,
                              **({} if self._timeout_disabled() else {"warning": PROXY_TIMEOUT_WARNING})})
            processor = asyncio.get_running_loop().create_task(self._process_loop())
            try:
                await self._receive_loop()
                if self.ending:
                    self.ready.set()
                    await processor
                    final = self.memory.close(self.received, self.last_time_s)  # the signs still in view pass
                    for event in final:
                        self.context.on_event(event)
                    await self._send({"type": "summary", "events": final, **self.summary()})
                    await self._close(CLOSE_NORMAL, "end of stream")
            finally:
                processor.cancel()
        except WebSocketDisconnect:
            pass
        finally:
            self.context.slots.close()
            self.context.on_streams(self.context.slots.streams)
            for event in self.memory.close(self.received, self.last_time_s):
                self.context.on_event(event)
            logger.info("stream %s (%s) ended: %d received, %d processed, %d dropped, %d errors", self.stream_id,
                        self.options.camera or "-", self.received, self.processed, self.dropped, self.errors)

    def _timeout_disabled(self) -> bool:
        value = self.ws.headers.get("x-request-timeout-seconds", "")
        try:
            return float(value) <= 0
        except ValueError:
            return False

    async def _receive_loop(self) -> None:
        header: dict = {}
        while self.closed is None and not self.ending:
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=self.limits.idle_timeout_s)
            except asyncio.TimeoutError:
                await self._close(CLOSE_POLICY, f"idle for {self.limits.idle_timeout_s:g} s")
                return
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1005))
            if message.get("bytes") is not None:
                self._arrive(message["bytes"], header)
                header = {}
            elif message.get("text") is not None:
                header = await self._read_text(message["text"])

    async def _read_text(self, text: str) -> dict:
        """A header for the next frame, an ack, or ``end``; a malformed one is answered and skipped."""
        try:
            if len(text) > _MAX_TEXT_BYTES:
                raise ValueError(f"a text message is at most {_MAX_TEXT_BYTES} bytes")
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("a text message is a JSON object")
            if "ack" in value:
                ack = value["ack"]
                if not isinstance(ack, int) or isinstance(ack, bool) or ack < 0:
                    raise ValueError("ack is the seq of the last result read")
                self.acked = max(self.acked, min(ack, self.seq))
            if value.get("type") == "end":
                self.ending = True
                return {}
            client_id, capture = value.get("id"), value.get("t")
            if client_id is not None and not (isinstance(client_id, int | str) and len(str(client_id)) <= _MAX_ID_CHARS):
                raise ValueError(f"id is a number or a string of at most {_MAX_ID_CHARS} characters")
            if capture is not None and not (isinstance(capture, int | float) and math.isfinite(capture)):
                raise ValueError("t is the capture time in seconds")
            return {"id": client_id, "t": capture}
        except ValueError as e:  # json.JSONDecodeError is one
            self.errors += 1
            await self._send({"type": "frame_error", "error": {"code": "invalid_message", "message": str(e)[:200]}})
            return {}

    def _arrive(self, data: bytes, header: dict) -> None:
        frame = self.received
        self.received += 1
        arrived = _Arrived(data, frame, header.get("id"), header.get("t"))
        if len(data) > self.settings.max_body_bytes:
            self._refuse_soon(arrived, "payload_too_large", f"a frame is at most {self.settings.max_body_bytes} bytes")
            return
        if self.options.mode == "live":
            while self.waiting:  # the newest frame wins: what waits is stale now
                self.waiting.popleft()
                self._drop()
        elif len(self.waiting) >= self.limits.every_frame_window:
            self._refuse_soon(arrived, "window_exceeded", f"at most {self.limits.every_frame_window} frames may "
                              "wait for their results in mode every_frame; wait for results before sending more")
            return
        self.waiting.append(arrived)
        self.ready.set()

    def _refuse_soon(self, arrived: _Arrived, code: str, message: str) -> None:
        self.errors += 1
        self.context.on_frame("error", {})
        asyncio.get_running_loop().create_task(self._send(self._error(arrived, code, message)))

    def _drop(self) -> None:
        self.dropped += 1
        self.context.on_frame("dropped", {})

    # -- processing ------------------------------------------------------------------------------------

    async def _process_loop(self) -> None:
        period = 1.0 / self.options.fps
        next_start = 0.0
        while True:
            if not self.waiting:
                if self.ending:
                    return
                self.ready.clear()
                await self.ready.wait()
                continue
            if self.options.mode == "live" and time.monotonic() < next_start:
                # The fps cap: frames arriving meanwhile replace the one waiting.
                await asyncio.sleep(next_start - time.monotonic())
                continue
            if self._skippable():
                item = self.waiting.popleft()
                next_start = time.monotonic() + period
                await self._send_result(self._predicted(item))
                continue
            async with self.context.slots.semaphore:
                if not self.waiting:
                    continue
                item = self.waiting.popleft()
                if self.options.mode == "live" and time.monotonic() - item.arrived > self.limits.frame_budget_s:
                    self._drop()  # waited out its budget for a slot: stale
                    continue
                next_start = time.monotonic() + period
                message = await self._analyze(item)
            if message is not None:
                await self._send_result(message)

    def _skippable(self) -> bool:
        """Whether the next frame may skip the graph (``StreamSettings.analyze_every``): the last analysed frame is
        recent enough and the tracks need nothing of the models."""
        return (self.last_analysed is not None and self.skipped_since < self.limits.analyze_every - 1
                and self.memory.settled())

    def _predicted(self, item: _Arrived) -> dict:
        """A frame between analysed ones: the tracks' predicted boxes, the hazards last seen; never decoded."""
        started = time.perf_counter()
        self.skipped_since += 1
        scale, (width, height), hazards = self.last_analysed
        signs = []
        for track, (x1, y1, x2, y2) in self.memory.predict(item.frame, self._capture_time(item)):
            box = [max(0.0, x1 * scale[0]), max(0.0, y1 * scale[1]), min(width, x2 * scale[0]), min(height, y2 * scale[1])]
            in_view = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
            if in_view >= PREDICTED_IN_VIEW * (x2 - x1) * scale[0] * (y2 - y1) * scale[1]:  # not leaving the view
                signs.append({"box": [round(v, 1) for v in box], "label": track.label, "score": None,
                              "text": track.text, "text_score": round(track.text_score, 4) if track.text else None,
                              "track_id": track.track_id, "predicted": True})
        events = self.memory.events(item.frame, self._capture_time(item), None, (width, height))
        for event in events:
            self.context.on_event(event)
        self.processed += 1
        self.predicted += 1
        timings = {"total": round((time.perf_counter() - started) * 1000, 2)}
        timings["queued"] = round((time.monotonic() - item.arrived) * 1000 - timings["total"], 2)
        self.latencies_ms.append(timings["total"] + timings["queued"])
        self.context.on_frame("predicted", timings)
        return {"type": "frame", "frame": item.frame, "id": item.client_id, "t": item.capture_s, "analysed": False,
                "image": {"width": width, "height": height}, "signs": signs, "hazards": hazards, "description": None,
                "degraded": [], "events": events, "dropped": self.dropped, "timings_ms": timings}

    async def _analyze(self, item: _Arrived) -> dict | None:
        """The frame's result message, a ``frame_error`` message, or ``None`` when it was dropped (overload)."""
        settings, context = self.settings, self.context
        live = self.options.mode == "live"
        if not live:
            # A file's frame is never dropped: it waits until admission takes it, and the client, whose window is
            # full meanwhile, waits with it (backpressure). Its budget starts when it is admitted.
            while True:
                try:
                    admit(context.admission, Budget(self.limits.frame_budget_s), settings)
                    break
                except Rejected as e:
                    await asyncio.sleep(min(e.retry_after_s, settings.retry_after_s))
        started = time.perf_counter()
        budget = Budget(self.limits.frame_budget_s, item.arrived if live else time.monotonic())
        try:
            admit(context.admission, budget, settings)
        except Rejected:
            self._drop()  # over capacity: every camera drops its share; no stream is closed for it
            return None
        try:
            decoded = await context.decoder.decode(item.data, deadline=budget.started + budget.seconds
                                                   - settings.answer_margin_s)
            timings = {"decode": round((time.perf_counter() - started) * 1000, 2)}
            self.tracking.begin(item.frame, self._capture_time(item), decoded.original_size)
            result = await analyze_frame(decoded.pixels, context.put(decoded.pixels), self.options.describe,
                                         context.stages, settings, timings, budget=budget,
                                         admission=context.admission, request_id=f"{self.stream_id}:{item.frame}",
                                         original_size=decoded.original_size, watcher=self.tracking)
        except InvalidImage as e:
            return self._failed(item, "invalid_image", str(e))
        except DecodeTimedOut as e:
            return self._failed(item, "decode_timeout", str(e))
        except (DecoderBusy, Rejected) as e:
            if not live:  # the client waits for every frame's answer: it gets one, and may send the frame again
                self.errors += 1
                context.on_frame("error", {})
                return {**self._error(item, "overloaded", str(e)), "retry_after_s": round(e.retry_after_s, 2)}
            self._drop()  # the decoder or the safety stages are full now: a later frame will do
            logger.debug("stream %s frame %d dropped: %s", self.stream_id, item.frame, e)
            return None
        except Exception:  # noqa: BLE001 - one frame's bug must not end the camera's stream
            logger.exception("stream %s frame %d failed", self.stream_id, item.frame)
            return self._failed(item, "internal", "internal error; the server log has the details")
        timings["total"] = round((time.perf_counter() - started) * 1000, 2)
        timings["queued"] = round((time.monotonic() - item.arrived) * 1000 - timings["total"], 2)
        for sign, tracked in zip(result["signs"], self.tracking.tracked):
            sign["track_id"] = tracked.track.track_id if tracked.track is not None else None
        width, height = decoded.original_size
        pixels_h, pixels_w = decoded.pixels.shape[:2]
        self.last_analysed = ((width / pixels_w, height / pixels_h), (width, height), result["hazards"])
        self.skipped_since = 0
        for event in self.tracking.events:
            context.on_event(event)
        self.processed += 1
        self.latencies_ms.append(timings["total"] + timings["queued"])
        context.on_frame("analysed", timings)
        return {"type": "frame", "frame": item.frame, "id": item.client_id, "t": item.capture_s, "analysed": True,
                **result,
                "events": self.tracking.events, "dropped": self.dropped, "timings_ms": timings}

    def _failed(self, item: _Arrived, code: str, message: str) -> dict:
        self.errors += 1
        self.context.on_frame("error", {})
        return self._error(item, code, message)

    @staticmethod
    def _error(item: _Arrived, code: str, message: str) -> dict:
        return {"type": "frame_error", "frame": item.frame, "id": item.client_id,
                "error": {"code": code, "message": message}}

    def _capture_time(self, item: _Arrived) -> float:
        """The frame's time for the tracker: the client's capture time when it sends one, else its arrival."""
        self.last_time_s = float(item.capture_s) if item.capture_s is not None else item.arrived - self.started
        return self.last_time_s

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- sending -----------------------------------------------------------------------------------------

    async def _send_result(self, message: dict) -> None:
        if message["type"] == "frame":
            if self.seq - self.acked >= self.limits.max_unacked_results:
                await self._close(CLOSE_POLICY, f"over {self.limits.max_unacked_results} results not acknowledged")
                return
            self.seq += 1
            message = {"seq": self.seq, **message}
        await self._send(message)

    async def _send(self, message: dict) -> None:
        if self.closed is None:
            await self.ws.send_text(json.dumps(message, ensure_ascii=False, allow_nan=False))

    async def _close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)
            logger.info("stream %s closed: %d %s", self.stream_id, code, reason)
            await self.ws.close(code, reason[:120])

    def summary(self) -> dict:
        latencies = sorted(self.latencies_ms)

        def quantile(q: float) -> float | None:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None

        elapsed = self._elapsed()
        return {"stream_id": self.stream_id, "received": self.received, "processed": self.processed,
                "analysed": self.processed - self.predicted,
                "dropped": self.dropped, "errors": self.errors, "seconds": round(elapsed, 3),
                "processed_fps": round(self.processed / elapsed, 3) if elapsed > 0 else None,
                "latency_ms": {"p50": quantile(0.5), "p95": quantile(0.95)}, **self.memory.summary()}
