"""The stream protocol's load behaviour on one real server process, without Ray: the shipped models in process
(the baseline's sequential stages), the ingress's ``CameraStream`` behind uvicorn, real WebSocket clients.

Newest frame wins under a fast sender (latency does not grow), two cameras at different rates get the same
share when the slots are scarce, files get every frame within the window, and the protections hold: a malformed
frame is answered and the stream goes on, an oversized one is refused for itself, a client that reads nothing
is closed, a silent one times out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time

import numpy as np
import pytest
import uvicorn
import websockets
from PIL import Image

from festival_serve.measure.baseline import SequentialPipeline
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGES
from festival_serve.serving.admission import Admission
from festival_serve.serving.http import ApiHandlers, build_http_app
from festival_serve.serving.imaging import Decoder
from festival_serve.serving.streams import CameraStream, FrameSlots, StreamContext, StreamOptions
from festival_serve.world.synth.clips import clip_seeds, generate_clip

from tests.ports import free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models():
    args = PipelineArgs()
    return {stage.name: stage.load(stage.settings(args), model_store=args.model_store, gpu_only=False)
            for stage in STAGES if stage.name != "scene_describer"}


@pytest.fixture(scope="module")
def clip_jpegs() -> list[bytes]:
    clip = generate_clip(clip_seeds("test", 1)[0], frames=40)
    out = []
    for frame in clip.frames:
        buf = io.BytesIO()
        Image.fromarray(frame.image).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _Server:
    """uvicorn on a thread: one event loop, as an ingress replica has."""

    def __init__(self, models, **stream_settings) -> None:
        args = PipelineArgs(ingress={"streams": stream_settings, "max_body_bytes": 2 * 1024 * 1024})
        pipeline = SequentialPipeline(args, models)
        settings = args.ingress
        self.contexts: list[StreamContext] = []

        async def streams(websocket) -> None:
            if not self.contexts:  # made on the server's loop
                self.contexts.append(StreamContext(settings, Decoder(settings), Admission(), pipeline.stages,
                                                   FrameSlots(settings.streams.frames_in_flight,
                                                              settings.streams.max_streams)))
            await CameraStream(websocket, StreamOptions.from_query(websocket.query_params, settings),
                               self.contexts[0]).run()

        async def unused(request):
            raise AssertionError("not in this test")

        app = build_http_app(ApiHandlers(analyze=unused, models=unused, healthz=unused, readyz=unused,
                                         streams=streams), keys=None)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ws_max_size=16 * 1024 * 1024))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"ws://127.0.0.1:{self.port}/v1/streams"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def _ready(ws) -> dict:
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ready


async def _live_camera(url: str, jpegs: list[bytes], fps: float, seconds: float) -> tuple[list[dict], dict]:
    """Send on a clock at ``fps`` (never waiting for results), ack as results come, then end: results, summary."""
    results: list[dict] = []
    async with websockets.connect(url, max_size=2 ** 24) as ws:
        await _ready(ws)

        async def read() -> dict:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "frame":
                    results.append(message)
                    with contextlib.suppress(websockets.ConnectionClosed):  # the summary and the close may be next
                        await ws.send(json.dumps({"ack": message["seq"]}))
                elif message["type"] == "summary":
                    return message
            raise AssertionError("closed before the summary")

        reader = asyncio.ensure_future(read())
        started, sent = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            await ws.send(json.dumps({"id": sent, "t": time.monotonic() - started}))
            await ws.send(jpegs[sent % len(jpegs)])
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / fps - time.monotonic()))
        await ws.send(json.dumps({"type": "end"}))
        summary = await asyncio.wait_for(reader, 30)
    assert summary["received"] == sent
    return results, summary


def test_a_camera_faster_than_the_graph_drops_stale_frames_and_its_latency_does_not_grow(models, clip_jpegs):
    with _Server(models, max_fps=100.0, frames_in_flight=1) as url:
        results, summary = asyncio.run(_live_camera(url, clip_jpegs, fps=60, seconds=6))
    assert summary["dropped"] > summary["processed"] > 10  # CPU models: ~10-20 frames/s of 60 sent
    assert summary["dropped"] + summary["processed"] + summary["errors"] == summary["received"]
    latency = [r["timings_ms"]["total"] + r["timings_ms"]["queued"] for r in results]
    third = len(latency) // 3
    first, last = np.median(latency[:third]), np.median(latency[-third:])
    assert last < max(2 * first, first + 100), (first, last)  # newest wins: no queue building up
    assert max(r["frame"] for r in results) >= summary["received"] - 10  # it kept up with the newest frames
    assert [r["dropped"] for r in results] == sorted(r["dropped"] for r in results)


def test_two_cameras_get_the_same_share_when_the_graph_is_the_bottleneck(models, clip_jpegs):
    with _Server(models, max_fps=100.0, frames_in_flight=1) as url:
        async def both():
            return await asyncio.gather(_live_camera(url, clip_jpegs, 50, 6), _live_camera(url, clip_jpegs, 12, 6))

        (_, fast), (_, slow) = asyncio.run(both())
    # One slot, taken in turn: the 50 fps camera cannot starve the 12 fps one; it drops more of its own.
    low, high = sorted([fast["processed"], slow["processed"]])
    assert low / high >= 0.75, (fast["processed"], slow["processed"])
    assert fast["dropped"] > slow["dropped"]


def test_a_file_gets_every_frame_in_order_within_the_window_and_a_frame_beyond_it_is_refused(models, clip_jpegs):
    async def run(url):
        async with websockets.connect(url + "?mode=every_frame", max_size=2 ** 24) as ws:
            ready = await _ready(ws)
            window = ready["window"]
            for i in range(window + 2):  # two more than the window, without waiting
                await ws.send(json.dumps({"id": i}))
                await ws.send(clip_jpegs[i])
            messages = [json.loads(await ws.recv()) for _ in range(window + 2)]
            await ws.send(json.dumps({"type": "end"}))
            summary = json.loads(await ws.recv())
            return window, messages, summary

    with _Server(models, every_frame_window=3) as url:
        window, messages, summary = asyncio.run(run(url))
    refused = [m for m in messages if m["type"] == "frame_error"]
    answered = [m for m in messages if m["type"] == "frame"]
    assert {m["error"]["code"] for m in refused} == {"window_exceeded"} and len(refused) >= 1
    assert [m["id"] for m in answered] == sorted(m["id"] for m in answered)  # in order
    assert summary["dropped"] == 0 and summary["processed"] == len(answered) >= window


def test_bad_frames_are_answered_for_themselves_and_the_stream_goes_on(models, clip_jpegs):
    async def run(url):
        async with websockets.connect(url + "?mode=every_frame", max_size=2 ** 24) as ws:
            await _ready(ws)
            await ws.send("not json")
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"id": "junk"}))
            await ws.send(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # a truncated PNG
            second = json.loads(await ws.recv())
            await ws.send(json.dumps({"id": "big"}))
            await ws.send(b"\xff" * (3 * 1024 * 1024))  # over max_body_bytes (2 MiB here)
            third = json.loads(await ws.recv())
            await ws.send(json.dumps({"id": "good"}))
            await ws.send(clip_jpegs[0])
            fourth = json.loads(await ws.recv())
            return first, second, third, fourth

    with _Server(models) as url:
        first, second, third, fourth = asyncio.run(run(url))
    assert first["type"] == "frame_error" and first["error"]["code"] == "invalid_message"
    assert (second["type"], second["id"], second["error"]["code"]) == ("frame_error", "junk", "invalid_image")
    assert (third["type"], third["id"], third["error"]["code"]) == ("frame_error", "big", "payload_too_large")
    assert fourth["type"] == "frame" and fourth["id"] == "good" and fourth["image"] == {"width": 848, "height": 480}


def test_a_client_that_reads_no_results_is_closed_and_a_silent_one_times_out(models, clip_jpegs):
    async def unread(url):
        async with websockets.connect(url + "?mode=every_frame", max_size=2 ** 24) as ws:
            await _ready(ws)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                for i in range(40):  # never acks, never reads
                    await ws.send(json.dumps({"id": i}))
                    await ws.send(clip_jpegs[i])
                    await asyncio.sleep(0.15)
            return closed.value.rcvd

    async def silent(url):
        async with websockets.connect(url, max_size=2 ** 24) as ws:
            await _ready(ws)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd, time.monotonic() - started

    with _Server(models, max_unacked_results=4, idle_timeout_s=1.0) as url:
        unread_close = asyncio.run(unread(url))
        silent_close, waited = asyncio.run(silent(url))
    assert unread_close.code == 1008 and "not acknowledged" in unread_close.reason
    assert silent_close.code == 1008 and "idle" in silent_close.reason and 0.9 <= waited < 5


def test_a_replica_holding_its_streams_refuses_the_next_with_1013_and_a_retry_hint(models):
    async def run(url):
        async with websockets.connect(url) as held:
            await _ready(held)
            async with websockets.connect(url) as extra:
                refused = json.loads(await extra.recv())
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await extra.recv()
            return refused, closed.value.rcvd

    with _Server(models, max_streams=1) as url:
        refused, close = asyncio.run(run(url))
    assert refused["type"] == "refused" and refused["retry_after_s"] > 0
    assert close.code == 1013 and "retry after" in close.reason


def test_bad_stream_options_are_refused_with_a_reason():
    from festival_serve.serving.errors import ApiError

    settings = PipelineArgs().ingress
    with pytest.raises(ApiError, match="mode"):
        StreamOptions.from_query({"mode": "sometimes"}, settings)
    with pytest.raises(ApiError, match="fps"):
        StreamOptions.from_query({"fps": "-3"}, settings)
    assert StreamOptions.from_query({"fps": "1000"}, settings).fps == settings.streams.max_fps  # capped


def _every_frame(url: str, jpegs: list[bytes]) -> tuple[list[dict], dict]:
    async def run():
        async with websockets.connect(url + "?mode=every_frame", max_size=2 ** 24) as ws:
            await _ready(ws)
            results = []
            for i, jpeg in enumerate(jpegs):  # one at a time: within any window
                await ws.send(json.dumps({"id": i, "t": i / 10}))
                await ws.send(jpeg)
                results.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "end"}))
            return results, json.loads(await ws.recv())

    return asyncio.run(run())


def test_settled_tracks_let_frames_skip_the_graph_with_predicted_boxes_and_the_same_track_ids(models, clip_jpegs):
    with _Server(models, analyze_every=3) as url:
        skipping, summary = _every_frame(url, clip_jpegs)
    with _Server(models, analyze_every=1) as url:
        every, every_summary = _every_frame(url, clip_jpegs)
    assert every_summary["analysed"] == every_summary["processed"] == len(clip_jpegs)
    assert summary["processed"] == len(clip_jpegs) and summary["analysed"] < len(clip_jpegs)
    predicted = [r for r in skipping if not r["analysed"]]
    assert predicted and all(s.get("predicted") for r in predicted for s in r["signs"])
    # No run of more than analyze_every - 1 predicted frames, and every predicted sign is a known track.
    run_length = longest = 0
    for r in skipping:
        run_length = 0 if r["analysed"] else run_length + 1
        longest = max(longest, run_length)
    assert longest <= 2
    tracks = {t["track_id"] for t in summary["tracks"]}
    assert {s["track_id"] for r in predicted for s in r["signs"]} <= tracks
    # Each sign is still announced once, skipping or not.
    def announced(results):
        return sorted((e["label"], e["text"]) for r in results for e in r["events"] if e["type"] == "sign_appeared")

    assert announced(skipping) == announced(every)
