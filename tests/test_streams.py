"""``WS /v1/streams`` through real Ray Serve with the shipped models, deployed from serve_config.yaml as
`festival-serve up` does: Serve's proxy carries the socket to the ingress and keeps it on one replica (the
tracks continue across a whole clip), the API keys hold for sockets, a full replica refuses with 1013, a
decode bomb is refused for its frame, and `festival-serve watch` works against a file, a real RTSP camera
(GStreamer's RTSP server) and an HTTP live source (ffmpeg)."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import websockets
from PIL import Image

from festival_serve import DATA_DIR
from festival_serve.ops import up
from festival_serve.ops.watch import watch
from festival_serve.pipeline.settings import StreamSettings
from festival_serve.serving import auth

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CLIP = DATA_DIR / "clips" / "road_a.mp4"
MAX_STREAMS = 3  # per ingress replica
INGRESS_REPLICAS = 2
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> tuple[str, Path]:
    key = auth.new_key()
    keys_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys_file.write_text(auth.digest(key) + "\n")
    return key, keys_file


@pytest.fixture(scope="module")
def server(key):
    port = free_port()
    config, _ = up.local_profile(up.load_config(ROOT / "serve_config.yaml"), host="127.0.0.1", port=port,
                                 model_store=None, has_gpu=False, base_dir=ROOT, api_keys_file=str(key[1]))
    app = config["applications"][0]
    app["args"]["ingress"]["streams"] = {"max_streams": MAX_STREAMS}
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = INGRESS_REPLICAS if deployment["name"] == "PipelineIngress" else 1
    up.start(config, offline=True, num_cpus=2, metrics_port=None)
    try:
        up.wait_until_running(timeout_s=420, progress=lambda line: None)
        yield f"http://127.0.0.1:{port}"
    finally:
        up.stop()


def _ws(server: str) -> str:
    return server.replace("http://", "ws://") + "/v1/streams"


def test_a_clip_through_serve_is_tracked_on_one_replica_and_each_sign_is_announced_once(server, key, tmp_path):
    outcome = watch(str(CLIP), server, out=tmp_path / "a.mp4", log=tmp_path / "a.jsonl", api_key=key[0], quiet=True)
    truth = json.loads(CLIP.with_suffix(".json").read_text(encoding="utf-8"))
    assert outcome.results == len(truth["frames"]) and outcome.errors == 0 and outcome.dropped == 0
    appeared = [(e["label"], e["text"]) for e in outcome.events if e["type"] == "sign_appeared"]
    assert appeared.count(("speed_limit", "50")) == 1 and appeared.count(("info", "BẾN XE")) == 1, appeared
    passed = {e["track_id"] for e in outcome.events if e["type"] == "sign_passed"}
    assert passed == {e["track_id"] for e in outcome.events if e["type"] == "sign_appeared"}
    summary = outcome.summaries[-1]
    # One tracker saw every frame (a socket that moved between replicas would restart its track ids) ...
    assert summary["processed"] == len(truth["frames"])
    # ... and read each text sign a few times while it grows, not once a frame.
    text_tracks = [t for t in summary["tracks"] if t["text"]]
    reads = sorted(t["reads"] for t in text_tracks)
    assert text_tracks and reads[-1] <= StreamSettings().max_reads_per_track and reads[len(reads) // 2] <= 2, reads
    assert summary["reads"] < len(truth["frames"]) / 4
    assert (tmp_path / "a.mp4").stat().st_size > 10_000
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    ready = json.loads(lines[0])
    assert ready["type"] == "ready" and json.loads(lines[-1])["type"] == "summary"
    assert "warning" not in ready  # watch disables the proxy's request timeout for its socket


def test_a_socket_needs_the_api_key_as_v1_does(server, key):
    async def handshake(headers):
        async with websockets.connect(_ws(server), additional_headers=headers):
            pass

    for headers in ({}, {"Authorization": "Bearer fs_not-a-key"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(handshake(headers))
        assert refused.value.response.status_code == 403


def test_sockets_opened_together_spread_evenly_over_the_ingress_replicas(server, key):
    headers = {"Authorization": f"Bearer {key[0]}"}
    # The router weighs what each replica last reported (every request_routing_stats_period_s, 1 s): let the earlier
    # tests' closed sockets leave those reports first, as they do within a second or two on a festival day.
    time.sleep(3.0)

    async def run():
        sockets = await asyncio.gather(*[websockets.connect(_ws(server), additional_headers=headers)
                                         for _ in range(2 * INGRESS_REPLICAS)])
        try:
            return [json.loads(await ws.recv()).get("replica", "refused") for ws in sockets]
        finally:
            await asyncio.gather(*[ws.close() for ws in sockets])

    replicas = asyncio.run(run())
    counts = sorted(collections.Counter(replicas).values())
    assert counts == [2] * INGRESS_REPLICAS, replicas  # Serve's default router put 5 of 6 on one


def test_a_full_graph_refuses_a_new_stream_with_1013_and_keeps_the_ones_it_holds(server, key):
    headers = {"Authorization": f"Bearer {key[0]}"}

    async def run():
        held = [await websockets.connect(_ws(server), additional_headers=headers)
                for _ in range(MAX_STREAMS * INGRESS_REPLICAS)]
        try:
            for ws in held:
                assert json.loads(await ws.recv())["type"] == "ready"
            async with websockets.connect(_ws(server), additional_headers=headers) as extra:
                refused = json.loads(await extra.recv())
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await extra.recv()
            await held[0].send(_jpeg())
            answer = json.loads(await held[0].recv())
        finally:
            for ws in held:
                await ws.close()
        return refused, closed.value.rcvd, answer

    refused, close, answer = asyncio.run(run())
    assert refused["type"] == "refused" and refused["retry_after_s"] > 0
    assert close.code == 1013
    assert answer["type"] == "frame"  # the streams held go on


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (848, 480), (90, 120, 90)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_decode_bomb_is_refused_for_its_frame_and_the_stream_goes_on(server, key):
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")  # 144 MP of zeros: a few hundred kB
    headers = {"Authorization": f"Bearer {key[0]}"}

    async def run():
        async with websockets.connect(_ws(server) + "?mode=every_frame", additional_headers=headers,
                                      max_size=2 ** 24) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(buf.getvalue())
            bomb = json.loads(await ws.recv())
            await ws.send(_jpeg())
            return bomb, json.loads(await ws.recv())

    bomb, after = asyncio.run(run())
    assert bomb["type"] == "frame_error" and bomb["error"]["code"] == "invalid_image"
    assert after["type"] == "frame"


def _wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the source exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory) -> Path:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    out = tmp_path_factory.mktemp("rtsp") / "road_a.h264.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(CLIP), "-c:v", "libx264", "-g", "10", "-pix_fmt",
                    "yuv420p", str(out)], check=True, timeout=120)
    return out


def _rtsp_server_available() -> bool:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True)
    return probe.returncode == 0


def test_watch_reads_a_real_rtsp_camera(server, key, h264_clip):
    if not _rtsp_server_available():
        pytest.skip("GStreamer's RTSP server is not installed (Debian: gir1.2-gst-rtsp-server-1.0 python3-gi "
                    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)")
    port = free_port()
    source = subprocess.Popen(["/usr/bin/python3", str(ROOT / "tests" / "rtsp_source.py"), str(port), str(h264_clip)],
                              stdout=subprocess.DEVNULL)
    try:
        _wait_listening(port, source)
        outcome = watch(f"rtsp://127.0.0.1:{port}/cam", server, api_key=key[0], quiet=True)
    finally:
        source.terminate()
        source.wait(10)
    assert outcome.frames_sent >= 50 and outcome.results >= 20 and outcome.errors == 0
    assert any(e["type"] == "sign_appeared" for e in outcome.events)


def test_watch_reads_an_http_live_source(server, key, h264_clip):
    port = free_port()
    source = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-re", "-i", str(h264_clip), "-c", "copy", "-f",
                               "mpegts", "-listen", "1", f"http://127.0.0.1:{port}/cam.ts"])
    try:
        time.sleep(1.0)  # ffmpeg -listen serves one client: a probe connection would be that client
        outcome = watch(f"http://127.0.0.1:{port}/cam.ts", server, api_key=key[0], quiet=True)
    finally:
        source.terminate()
        source.wait(10)
    assert outcome.frames_sent >= 50 and outcome.results >= 20 and outcome.errors == 0


def test_a_camera_reconnects_within_seconds_when_the_ingress_replica_holding_it_is_killed(server, key):
    import hashlib
    import threading

    import ray

    from festival_serve.ops.watch import Watcher, read_frames, stream_url

    frames, _ = read_frames(str(CLIP), realtime=True)  # 7 s of a live camera
    readies: list[dict] = []

    def on_message(message, frame):
        if message.get("type") == "ready":
            readies.append(message)

    watcher = Watcher(stream_url(server, mode="live", fps=None, describe=False, camera="kill-test"), frames,
                      live=True, api_key=key[0], on_message=on_message)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=asyncio.run(watcher.run())))
    runner.start()
    deadline = time.monotonic() + 30
    while not readies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert readies, "the stream never became ready"
    time.sleep(2.0)
    holder = readies[0]["replica"]
    killed = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if "PipelineIngress" in name and hashlib.sha256(name.rsplit("#", 1)[-1].encode()).hexdigest()[:8] == holder:
            ray.kill(ray.get_actor(name, namespace=actor["namespace"]), no_restart=False)
            killed.append(name)
    assert killed, "no ingress replica matched the stream's"
    runner.join(60)
    result = outcome["result"]
    assert result.reconnects >= 1 and result.outages_s and max(result.outages_s) < 5.0, result.outages_s
    assert len(readies) >= 2 and readies[-1]["replica"] != holder  # resumed on the other replica
    assert result.results > 20  # frames were answered before and after
