"""``festival-serve watch SOURCE``: a camera client of ``WS /v1/streams``.

SOURCE is a video file, a webcam device number (``0``) or an ``rtsp://`` / ``http://`` URL, read with OpenCV
(its FFmpeg backend). A file is sent every frame (``mode=every_frame``: within the server's window, so nothing
is dropped); a live source is sent as it is captured (``mode=live``: the server keeps the newest frame).
``--realtime`` sends a file at its own frame rate as if it were live.

Events are printed as they come (each sign once: "sign speed_limit '50' (track 3)"). With ``--out`` the
frames the server answered are written as an annotated video (track ids drawn), with ``--json`` every message
as one JSON line. When the socket drops (a rolling update, a lost ingress replica) the client reconnects with
backoff and goes on from the first frame without a result; a 1013 refusal is retried after its hint.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

import cv2
import numpy as np
import websockets

logger = logging.getLogger(__name__)

#: Backoff between reconnects, seconds: doubled per failed try up to the cap, reset by a good connection.
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.25, 5.0
#: JPEG quality of the frames sent (the server decodes JPEG fastest of its formats).
JPEG_QUALITY = 90
#: A live client keeps this many sent frames for annotating their results (older ones are dropped anyway).
LIVE_FRAMES_KEPT = 64
#: Serve's proxy ends every request, sockets too, after ``http_options.request_timeout_s`` (60 s) unless the request
#: says otherwise; a camera's socket lasts as long as the camera (the stream has its own idle timeout).
STREAM_HEADERS = {"x-request-timeout-seconds": "0"}
#: Close codes after which reconnecting would not help.
FINAL_CLOSE_CODES = {1000, 1003, 1008}


@dataclass
class Frame:
    index: int
    time_s: float
    image: np.ndarray  # (H, W, 3) uint8 RGB


def is_live(source: str) -> bool:
    return source.isdigit() or urlsplit(source).scheme in {"rtsp", "rtsps", "http", "https", "udp", "rtp", "srt"}


def read_frames(source: str, *, realtime: bool = False) -> tuple[Iterator[Frame], float]:
    """The source's frames (RGB) and its frame rate. A live source's times are the capture clock; a file's are
    index / fps (and with ``realtime`` it is read at that rate)."""
    if source.startswith("rtsp") and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"  # no UDP ports to open through NAT
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise SystemExit(f"watch: cannot open {source!r} (not a readable video file, device or stream URL)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if math.isfinite(fps) and 0 < fps < 240 else 10.0
    live = is_live(source)

    def frames() -> Iterator[Frame]:
        started, index = time.monotonic(), 0
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                now = time.monotonic() - started
                if realtime and not live and index / fps > now:
                    time.sleep(index / fps - now)
                yield Frame(index, now if live else index / fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                index += 1
        finally:
            capture.release()

    return frames(), fps


def event_line(event: dict) -> str:
    """One event as a person reads it: ``12.3 s  sign speed_limit '50' (track 3)``."""
    kind, t = event["type"], f"{event.get('time_s', 0):7.2f} s"
    if kind in ("sign_appeared", "sign_read", "sign_passed"):
        label = str(event.get("label", "sign")).replace("_", " ")
        text = f" {event['text']!r}" if event.get("text") else ""
        verb = {"sign_appeared": "sign", "sign_read": "sign reads", "sign_passed": "passed sign"}[kind]
        return f"{t}  {verb} {label}{text} (track {event.get('track_id')})"
    if kind == "hazard_ahead":
        return f"{t}  hazard {event.get('label')} ({event.get('place') or 'in view'})"
    if kind == "hazard_cleared":
        return f"{t}  clear of {event.get('label')}"
    return f"{t}  {kind}"


def stream_url(server: str, *, mode: str, fps: float | None, describe: bool, camera: str) -> str:
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = {"mode": mode, "describe": str(describe).lower(), **({"fps": fps} if fps else {}),
             **({"camera": camera} if camera else {})}
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/streams", urlencode(query), ""))


@dataclass
class WatchOutcome:
    frames_sent: int = 0
    results: int = 0
    dropped: int = 0
    errors: int = 0
    reconnects: int = 0
    outages_s: list[float] = field(default_factory=list)  # from losing a stream to the next one being ready, s
    events: list[dict] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


class Watcher:
    """Sends a source's frames over one socket at a time, reconnecting, and hands out what comes back."""

    def __init__(self, url: str, frames: Iterator[Frame], *, live: bool, api_key: str | None,
                 on_message: Callable[[dict, Frame | None], None], max_reconnect_s: float = 60.0) -> None:
        self.url, self.frames, self.live, self.api_key = url, frames, live, api_key
        self.on_message, self.max_reconnect_s = on_message, max_reconnect_s
        self.outcome = WatchOutcome()
        self.unanswered: collections.OrderedDict[int, tuple[Frame, float]] = collections.OrderedDict()
        self.resend: collections.deque[Frame] = collections.deque()  # sent, never answered, before a reconnect
        self.source_done = False
        self.lost_at: float | None = None  # time.monotonic() when the last stream was lost, until the next is ready
        self.backoff = RECONNECT_FIRST_S

    async def run(self) -> WatchOutcome:
        self.backoff = RECONNECT_FIRST_S
        while True:
            try:
                headers = {**STREAM_HEADERS, **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
                async with websockets.connect(self.url, additional_headers=headers, max_size=2 ** 24,
                                              open_timeout=10) as ws:
                    done = await self._session(ws)
                    if done:
                        return self.outcome
            except websockets.ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else 1006
                if code in FINAL_CLOSE_CODES:
                    reason = e.rcvd.reason if e.rcvd else ""
                    raise SystemExit(f"watch: the server closed the stream ({code} {reason})") from None
                print(f"watch: stream closed ({code}); reconnecting", file=sys.stderr)
            except websockets.InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403):
                    raise SystemExit(f"watch: the server refused the stream ({status}): check the API key") from None
                print(f"watch: handshake answered {status}; retrying", file=sys.stderr)
            except (OSError, asyncio.TimeoutError) as e:
                print(f"watch: cannot reach the server ({e}); retrying", file=sys.stderr)
            except _Refused as e:
                self.backoff = max(self.backoff, e.retry_after_s)
                print(f"watch: the server is full; retrying in {self.backoff:.1f} s", file=sys.stderr)
            if self.lost_at is None:
                self.lost_at = time.monotonic()
            if time.monotonic() - self.lost_at > self.max_reconnect_s:
                raise SystemExit(f"watch: no stream for {self.max_reconnect_s:.0f} s; giving up")
            self.outcome.reconnects += 1
            self.resend.extendleft(reversed([frame for frame, _ in self.unanswered.values()]))
            self.unanswered.clear()
            await asyncio.sleep(self.backoff)
            self.backoff = min(self.backoff * 2, RECONNECT_MAX_S)

    async def _session(self, ws) -> bool:
        """One connection: True once the source ended and the summary came."""
        ready = json.loads(await ws.recv())
        self.on_message(ready, None)
        if ready.get("type") == "refused":
            raise _Refused(float(ready.get("retry_after_s", 1.0)))
        if self.lost_at is not None:  # streaming again: how long the camera was without a stream
            self.outcome.outages_s.append(round(time.monotonic() - self.lost_at, 3))
            self.lost_at = None
        self.backoff = RECONNECT_FIRST_S
        window = ready.get("window") or LIVE_FRAMES_KEPT
        ack_every = max(1, int(ready.get("max_unacked_results", 64)) // 4)
        room = asyncio.Semaphore(window if not self.live else LIVE_FRAMES_KEPT)
        finished = asyncio.Event()

        async def receive() -> None:
            acked = 0
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                frame = None
                if kind in ("frame", "frame_error") and message.get("id") in self.unanswered:
                    frame, sent_at = self.unanswered.pop(message["id"])
                    if kind == "frame":
                        self.outcome.latencies_ms.append((time.monotonic() - sent_at) * 1000)
                    if not self.live:
                        room.release()
                if kind == "frame":
                    self.outcome.results += 1
                    self.outcome.dropped = message.get("dropped", 0)
                    self.outcome.events += message.get("events", [])
                    if message["seq"] - acked >= ack_every:
                        acked = message["seq"]
                        with contextlib.suppress(websockets.ConnectionClosedOK):  # the summary and close came first
                            await ws.send(json.dumps({"ack": acked}))
                elif kind == "frame_error":
                    self.outcome.errors += 1
                elif kind == "summary":
                    self.outcome.events += message.get("events", [])
                    self.outcome.summaries.append(message)
                    finished.set()
                self.on_message(message, frame)
                if finished.is_set():
                    return

        receiver = asyncio.get_running_loop().create_task(receive())
        try:
            while True:
                frame = self.resend.popleft() if self.resend else await asyncio.to_thread(next, self.frames, None)
                if frame is None:
                    break
                if self.live:
                    while len(self.unanswered) >= LIVE_FRAMES_KEPT:  # the server dropped them: stop waiting
                        self.unanswered.popitem(last=False)
                else:
                    await _wait_either(room.acquire(), receiver)
                ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR),
                                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                self.unanswered[frame.index] = (frame, time.monotonic())
                await ws.send(json.dumps({"id": frame.index, "t": round(frame.time_s, 4)}))
                await ws.send(jpeg.tobytes())
                self.outcome.frames_sent += 1
            if not self.live:  # every frame answered before the end (the server answers in order)
                for _ in range(window):
                    await _wait_either(room.acquire(), receiver)
            await ws.send(json.dumps({"type": "end"}))
            await receiver
        finally:
            receiver.cancel()
        return True


class _Refused(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"refused; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


async def _wait_either(waiting, receiver: asyncio.Task) -> None:
    """Await ``waiting`` unless the receiver ends first (the socket closed): then raise what it raised."""
    task = asyncio.ensure_future(waiting)
    done, _ = await asyncio.wait({task, receiver}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        receiver.result()  # re-raises ConnectionClosed
        raise ConnectionError("the socket closed")


class Outputs:
    """The annotated video and the message log, written as messages arrive."""

    def __init__(self, out: Path | None, log: Path | None, fps: float, quiet: bool) -> None:
        self.out, self.fps, self.quiet = out, fps, quiet
        self.writer: cv2.VideoWriter | None = None
        self.log = open(log, "w", encoding="utf-8") if log else None
        self.last_events: collections.deque[str] = collections.deque(maxlen=2)

    def __call__(self, message: dict, frame: Frame | None) -> None:
        if self.log:
            self.log.write(json.dumps(message, ensure_ascii=False) + "\n")
        for event in message.get("events", []):
            line = event_line(event)
            self.last_events.append(line.strip())
            if not self.quiet:
                print(line, flush=True)
        if message.get("type") == "frame_error" and not self.quiet:
            print(f"watch: frame {message.get('id')}: {message['error']['code']}: {message['error']['message']}",
                  file=sys.stderr)
        if self.out and frame is not None and message.get("type") == "frame":
            from festival_serve.ops.annotate import annotate

            drawn = np.asarray(annotate(frame.image, message, banner="   ".join(self.last_events) or " "))
            if self.writer is None:
                height, width = drawn.shape[:2]
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.writer = cv2.VideoWriter(str(self.out), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                              (width, height))
            self.writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        if self.log:
            self.log.close()


def watch(source: str, server: str, *, out: Path | None = None, log: Path | None = None, realtime: bool = False,
          fps: float | None = None, describe: bool = False, camera: str = "", api_key: str | None = None,
          quiet: bool = False) -> WatchOutcome:
    frames, source_fps = read_frames(source, realtime=realtime)
    live = is_live(source) or realtime
    url = stream_url(server, mode="live" if live else "every_frame", fps=fps, describe=describe,
                     camera=camera or Path(source).stem[:64])
    outputs = Outputs(out, log, source_fps, quiet)
    try:
        outcome = asyncio.run(Watcher(url, frames, live=live, api_key=api_key, on_message=outputs).run())
    finally:
        outputs.close()
    return outcome


def summary_lines(outcome: WatchOutcome) -> list[str]:
    latencies = sorted(outcome.latencies_ms)
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    signs = [e for e in outcome.events if e["type"] == "sign_appeared"]
    lines = [f"sent {outcome.frames_sent} frames, {outcome.results} results, {outcome.dropped} dropped by the "
             f"server, {outcome.errors} errors, {outcome.reconnects} reconnects; round trip p50 {p50:.0f} ms, "
             f"p95 {p95:.0f} ms; {len(signs)} signs announced"]
    for summary in outcome.summaries[-1:]:
        reads = [t["reads"] for t in summary.get("tracks", []) if t.get("text") or t.get("reads")]
        lines.append(f"server: {summary['processed']} processed at {summary.get('processed_fps')} fps, "
                     f"{summary.get('reads')} reads over {len(summary.get('tracks', []))} tracks"
                     + (f" (median {sorted(reads)[len(reads) // 2]} per text track)" if reads else ""))
    return lines


def add_arguments(parser) -> None:
    parser.add_argument("source", help="video file, webcam device number (0) or rtsp:// / http:// URL")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the graph's URL (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the answered frames, annotated, to this .mp4")
    parser.add_argument("--json", type=Path, dest="log", help="write every server message as a JSON line here")
    parser.add_argument("--realtime", action="store_true", help="send a file at its frame rate, as a live camera")
    parser.add_argument("--fps", type=float, help="ask the server to process at most this many frames a second")
    parser.add_argument("--describe", action="store_true", help="describe the scene on new events (slow on CPU)")
    parser.add_argument("--camera", default="", help="the camera's name in the server's logs (default: the file's)")
    parser.add_argument("--api-key", default=os.environ.get("FESTIVAL_API_KEY"),
                        help="API key (default: $FESTIVAL_API_KEY)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def cmd_watch(args) -> int:
    outcome = watch(args.source, args.server, out=args.out, log=args.log, realtime=args.realtime, fps=args.fps,
                    describe=args.describe, camera=args.camera, api_key=args.api_key, quiet=args.quiet)
    for line in summary_lines(outcome):
        print(line)
    if args.out:
        print(f"annotated video: {args.out}")
    return 0

