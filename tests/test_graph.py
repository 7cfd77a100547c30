"""The whole graph on a real local Ray Serve, deployed from serve_config.yaml through the same code as
`festival-serve up`, with small models built by the tests: the HTTP contract end to end.

Two applications share the Serve instance: ``full`` (every model present, route /) and ``bare`` (an
empty model store, route /bare), which shows the honest-degradation path. The node's Prometheus
endpoint is scraped at the end: every answer counted under its outcome, every stage timed.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from festival_serve import DATA_DIR
from festival_serve.serving import auth
from festival_serve.ops import up
from festival_serve.cli import SAMPLE_SCENE
from festival_serve.serving.metrics import TIMED_STEPS
from festival_serve.models.sign_detector.classifier import BACKGROUND
from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint
from festival_serve.training.standins.sign_detector import build_yolo_checkpoint, build_yolo_classifier
from festival_serve.training.standins.scene_describer import build_tiny_idefics3

from tests.ports import free_port
from tests.stores import add_shipped_reader
from tests.test_check_gpu import check_gpu_against_graph

ROOT = Path(__file__).resolve().parents[1]
SIGN_CLASSES = ["speed_limit", "no_parking", "bus_station", "children"]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_store(tmp_path_factory, yolic_layout) -> Path:
    store = tmp_path_factory.mktemp("models")
    # class_bias makes the random detector fire on some anchors, so crops reach the sign reader.
    build_yolo_checkpoint(store / "sign_detector" / "signs.pt", SIGN_CLASSES, class_bias=0.0)
    build_yolo_classifier(store / "sign_classifier" / "sign_classes.pt", [*SIGN_CLASSES, BACKGROUND],
                          favour="bus_station")
    build_yolic_checkpoint(store / "hazard_cells" / "yolic_m2.pth.tar", yolic_layout, head_bias=0.0)
    build_tiny_idefics3(store / "scene_describer" / "festival-describer")
    # The reader's recognizer is a small trained checkpoint the project ships (serve_config.yaml serves it).
    add_shipped_reader(store)
    return store


@pytest.fixture(scope="module")
def bare_keys(tmp_path_factory) -> tuple[str, Path]:
    """An API key for the ``bare`` application, and the keys file that holds its digest (only that)."""
    key = auth.new_key()
    keys_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    keys_file.write_text(auth.digest(key) + "\n")
    return key, keys_file


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The node's Prometheus port (``/metrics``), as ``festival-serve up --metrics-port`` sets it."""
    return free_port()


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory, bare_keys, metrics_port):
    port = free_port()
    config, _ = up.local_profile(up.load_config(ROOT / "serve_config.yaml"), host="127.0.0.1", port=port,
                                    model_store=str(model_store), has_gpu=False, base_dir=ROOT)
    full = config["applications"][0]
    # serve_config names the shipped model's text classes; these stand-ins have their own (the favoured one reads).
    full["args"]["sign_detector"].update(max_detections=3, text_classes=["bus_station", "speed_limit"])
    full["args"]["scene_describer"].update(max_new_tokens=4)
    for deployment in full["deployments"]:
        deployment.pop("autoscaling_config", None)  # one replica each: batches must form on it
        deployment["num_replicas"] = 1
        if "user_config" in deployment:
            deployment["user_config"]["batch_wait_timeout_s"] = 0.2
    bare = {**full, "name": "bare", "route_prefix": "/bare",
            "args": {**full["args"], "model_store": str(tmp_path_factory.mktemp("empty-store")),
                     # Only /bare needs a key: the rest of the module calls the full graph without one.
                     "ingress": {**full["args"]["ingress"], "api_keys_file": str(bare_keys[1])},
                     # The empty store lacks the trained recognizer: PP-OCRv6's own, shipped in the wheel, reads.
                     "sign_reader": {**full["args"]["sign_reader"], "rec_model": None, "rec_dict": None}}}
    config["applications"].append(bare)
    with pytest.MonkeyPatch.context() as env:  # Ray's processes read it once, at start: report every 1 s, not 10
        env.setenv("RAY_metrics_report_interval_ms", "1000")
        up.start(config, offline=True, num_cpus=4, metrics_port=metrics_port)  # two graphs: 2 x 1.5 CPU shares
    try:
        up.wait_until_running(timeout_s=420, progress=lambda line: None)
        yield f"http://127.0.0.1:{port}"
    finally:
        up.stop()


def _jpeg(width=848, height=480, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _post(url, data, content_type="image/jpeg", headers=None, **params):
    return httpx.post(f"{url}/v1/analyze", content=data, headers={"content-type": content_type, **(headers or {})},
                      params=params, timeout=120)


def _assert_analysis(body, width, height):
    assert set(body) >= {"request_id", "image", "signs", "hazards", "description", "timings_ms", "degraded"}
    assert body["image"] == {"width": width, "height": height}
    for sign in body["signs"]:
        x1, y1, x2, y2 = sign["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert sign["label"] in SIGN_CLASSES and 0 <= sign["score"] <= 1
        assert isinstance(sign["text"], str) and 0 <= sign["text_score"] <= 1
    for cell in body["hazards"]:
        assert 0 <= cell["cell"] < 104 and cell["labels"]


def test_analyze_jpeg_runs_every_stage(server):
    reply = _post(server, SAMPLE_SCENE.read_bytes())
    assert reply.status_code == 200, reply.text
    body = reply.json()
    _assert_analysis(body, 848, 480)
    assert body["degraded"] == []
    assert body["signs"], "the biased random detector should find boxes for the reader"
    assert {s["label"] for s in body["signs"]} == {"bus_station"}  # what the stand-in classifier calls every crop
    assert body["hazards"]
    assert isinstance(body["description"], str)
    assert {"decode", "sign_detector", "hazard_cells", "sign_reader", "scene_describer", "total"} <= set(body["timings_ms"])
    assert reply.headers["x-request-id"] == body["request_id"]


@pytest.mark.parametrize("fmt,content_type", [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_analyze_png_and_webp(server, fmt, content_type):
    buf = io.BytesIO()
    Image.open(SAMPLE_SCENE).resize((640, 360)).save(buf, fmt)
    reply = _post(server, buf.getvalue(), content_type, describe="false")
    assert reply.status_code == 200, reply.text
    _assert_analysis(reply.json(), 640, 360)


def test_analyze_multipart(server):
    reply = httpx.post(f"{server}/v1/analyze", params={"describe": "false"},
                       files={"image": ("scene.jpg", SAMPLE_SCENE.read_bytes(), "image/jpeg")}, timeout=120)
    assert reply.status_code == 200, reply.text
    _assert_analysis(reply.json(), 848, 480)


def test_describe_false_skips_the_describer(server):
    body = _post(server, SAMPLE_SCENE.read_bytes(), describe="false").json()
    assert body["description"] is None and body["degraded"] == []
    assert "scene_describer" not in body["timings_ms"]


@pytest.mark.parametrize("data,content_type,params,status,code", [
    (b"", "image/jpeg", {}, 400, "empty_body"),
    (b"this is not an image", "image/jpeg", {}, 400, "invalid_image"),
    (b"GIF89a....", "image/png", {}, 400, "invalid_image"),
    (b"{}", "application/json", {}, 415, "unsupported_media_type"),
    (b"x" * (10 * 1024 * 1024 + 1), "image/jpeg", {}, 413, "payload_too_large"),
    (SAMPLE_SCENE.read_bytes(), "image/jpeg", {"describe": "maybe"}, 400, "invalid_parameter"),
])
def test_bad_requests_get_clear_json_errors(server, data, content_type, params, status, code):
    reply = _post(server, data, content_type, **params)
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code and reply.json()["error"]["message"]


def test_multipart_without_image_field(server):
    reply = httpx.post(f"{server}/v1/analyze", files={"photo": ("a.jpg", b"123", "image/jpeg")}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "missing_image"


def test_unknown_route_is_json_404(server):
    reply = httpx.get(f"{server}/v1/nothing", timeout=30)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


def test_bad_requests_do_not_hurt_the_replica(server):
    for _ in range(3):
        _post(server, b"\xff\xd8\xff garbage")
    assert _post(server, SAMPLE_SCENE.read_bytes(), describe="false").status_code == 200


def test_concurrent_requests_form_batches(server):
    """Eight concurrent frames form batches at every batched stage. The describer's calls arrive only as each
    frame's reader finishes, spread by this machine's load, so a burst may leave it with batches of one: up to
    three bursts, and every stage must have batched two at least once."""
    stages = ("sign_detector", "hazard_cells", "scene_describer")
    for burst in range(3):
        images = [_jpeg(seed=8 * burst + i) for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
            replies = list(pool.map(lambda data: _post(server, data, describe="true"), images))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        models = {m["name"]: m for m in httpx.get(f"{server}/v1/models", timeout=30).json()["models"]}
        largest = {stage: max(int(k) for k in models[stage]["batch"]["observed_sizes"]) for stage in stages}
        if all(size >= 2 for size in largest.values()):
            return
    pytest.fail(f"a stage never batched two requests in three bursts of eight: largest batches {largest}")


def test_health_readiness_and_models(server):
    assert httpx.get(f"{server}/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    models = httpx.get(f"{server}/v1/models", timeout=30).json()["models"]
    assert [m["name"] for m in models] == ["sign_detector", "hazard_cells", "sign_reader", "scene_describer"]
    assert [m["deployment"] for m in models] == ["SignDetector", "HazardCells", "SignReader", "SceneDescriber"]
    for m in models:
        assert m["ready"] is True and m["device"] == "cpu" and m["weights"]
        assert m["batch"]["max_batch_size"] >= 1
    assert models[0]["backend"] == "onnxruntime" and models[1]["backend"] == "onnxruntime"
    assert models[0]["text_classes"] == ["bus_station", "speed_limit"]
    # Where each network really runs, read back from its runtime, with the GPU facts a GPU node would fill in.
    for m in models:
        assert m["gpu_fraction"] is None and m["gpu_visible"] is False and m["cpu_beside_gpu"] is False
        for network in m["networks"]:
            assert network["runtime_device"] == "cpu" and network["gpu_memory_cap_bytes"] is None, network
    # serve_config detects camera-stream frames at a size of their own: the same weights, a second network.
    assert [n["name"] for n in models[0]["networks"]] == ["sign_detector", "sign_detector_streams", "sign_classifier"]
    assert [n["name"] for n in models[2]["networks"]] == ["sign_reader.det", "sign_reader.rec"]
    assert models[2]["networks"][1]["providers"] == ["CPUExecutionProvider"]


def test_check_gpu_reports_every_stage_on_the_cpu_with_its_runtime_and_threads(server, capsys):
    report = check_gpu_against_graph(server, capsys)
    assert [s["name"] for s in report["graph"]["stages"]] == ["sign_detector", "hazard_cells", "sign_reader",
                                                            "scene_describer"]
    assert report["require_gpu_failures"] == []


def test_missing_safety_weights_are_a_503_with_retry_after_not_an_empty_200(server, bare_keys):
    key = {"authorization": f"Bearer {bare_keys[0]}"}
    models = {m["name"]: m for m in httpx.get(f"{server}/bare/v1/models", headers=key, timeout=30).json()["models"]}
    for stage in ("sign_detector", "hazard_cells", "scene_describer"):
        assert models[stage]["ready"] is False and models[stage]["unavailable_reason"]
    assert models["sign_reader"]["ready"] is True  # PP-OCR ships inside the rapidocr wheel
    reply = _post(f"{server}/bare", SAMPLE_SCENE.read_bytes(), headers=key)
    # Neither safety stage could look at the frame: "never looked" must not read as "nothing there".
    assert reply.status_code == 503 and int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["code"] == "safety_stages_unavailable"
    assert httpx.get(f"{server}/bare/readyz", timeout=30).status_code == 503  # required stages have no weights


def test_the_budget_header_is_checked_and_bounds_the_answer(server):
    for bad in ("-1", "0", "soon"):  # -1 would also switch off the proxy's own timeout
        reply = httpx.post(f"{server}/v1/analyze", content=SAMPLE_SCENE.read_bytes(), params={"describe": "false"},
                           headers={"content-type": "image/jpeg", "x-request-timeout-seconds": bad}, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_budget", bad
    # A budget too short for the describer (tiny here, but it waits for a batch): the answer still comes in time,
    # with every stage that could not make it listed by code.
    started = time.monotonic()
    reply = httpx.post(f"{server}/v1/analyze", content=SAMPLE_SCENE.read_bytes(), params={"describe": "true"},
                       headers={"content-type": "image/jpeg", "x-request-timeout-seconds": "0.05"}, timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, elapsed  # budget + answering + HTTP, never a stage's own timeout
    if reply.status_code == 200:
        codes = {d["code"] for d in reply.json()["degraded"]}
        assert codes <= {"timeout", "skipped_over_budget", "partial"}, reply.json()["degraded"]
    else:  # both safety stages missed 50 ms: refused, with when to come back
        assert reply.status_code == 503 and "retry-after" in reply.headers


def test_a_poisoned_frame_fails_alone_in_its_batch(server):
    from ray import serve

    from festival_serve.pipeline.types import StageError, Ticket

    detector = serve.get_deployment_handle("SignDetector", app_name="festival")  # the "full" application
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (480, 848, 3), dtype=np.uint8) for _ in range(5)]
    frames.insert(2, np.zeros((480, 848), np.uint8))  # 2-D: not an (H, W, 3) RGB frame
    ticket = Ticket(sent_at=time.time(), deadline=time.time() + 120)
    pending = [detector.detect.remote(frame, ticket) for frame in frames]  # at once: one batch window (0.2 s here)
    answers = [response.result(timeout_s=120) for response in pending]
    assert isinstance(answers[2], StageError) and answers[2].stage == "sign_detector"
    assert "(480, 848)" not in answers[2].reason  # the exception text stays in the log
    assert all(isinstance(answer, list) for i, answer in enumerate(answers) if i != 2), answers
    assert _post(server, SAMPLE_SCENE.read_bytes(), describe="false").status_code == 200  # the replica still serves


def test_the_reader_and_the_describer_report_their_load_in_their_own_units_for_the_autoscaler(server):
    """What GraphMetricPolicy scales on (serve_config.yaml): the reader's crops and the describer's token budget
    queued or running, the ingress's arrivals per second; back to zero once answered."""
    from ray import serve

    from festival_serve.pipeline.types import Ticket
    from festival_serve.pipeline.types import Findings

    reader = serve.get_deployment_handle("SignReader", app_name="festival")
    describer = serve.get_deployment_handle("SceneDescriber", app_name="festival")
    ingress = serve.get_deployment_handle("PipelineIngress", app_name="festival")
    ticket = Ticket(sent_at=time.time(), deadline=time.time() + 120)
    crops = [np.full((32, 96, 3), 255, np.uint8)] * 3
    frame = np.zeros((480, 848, 3), np.uint8)
    # Four frames' crops and two descriptions wait together in one 0.2 s batch window.
    pending = [reader.read.remote(crops, ticket) for _ in range(4)]
    pending += [describer.describe.remote(frame, Findings(), ticket) for _ in range(2)]
    seen_crops, seen_tokens = set(), set()
    deadline = time.monotonic() + 10  # the work stays in flight >= 0.2 s; the calls reach the replicas in their own time
    while time.monotonic() < deadline and not (seen_crops - {0} and seen_tokens - {0}):
        seen_crops.add(reader.record_autoscaling_stats.remote().result(timeout_s=30)["crops_in_flight"])
        seen_tokens.add(describer.record_autoscaling_stats.remote().result(timeout_s=30)["tokens_in_flight"])
    for response in pending:
        response.result(timeout_s=120)
    assert seen_crops - {0} and seen_crops <= {0, 3, 6, 9, 12}  # whole frames of 3 crops (at most the 4 sent)
    assert seen_tokens - {0} and seen_tokens <= {0, 4, 8}  # max_new_tokens (4 here) per frame
    assert reader.record_autoscaling_stats.remote().result(timeout_s=30) == {"crops_in_flight": 0}
    assert describer.record_autoscaling_stats.remote().result(timeout_s=30) == {"tokens_in_flight": 0}
    assert _post(server, SAMPLE_SCENE.read_bytes(), describe="false").status_code == 200
    assert ingress.record_autoscaling_stats.remote().result(timeout_s=30)["arrivals_per_s"] > 0


def test_an_application_with_a_keys_file_needs_a_key_on_v1_but_not_on_its_probes(server, bare_keys):
    key, _ = bare_keys
    for headers in ({}, {"authorization": f"Bearer {auth.new_key()}"}, {"authorization": key}):
        reply = httpx.get(f"{server}/bare/v1/models", headers=headers, timeout=30)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["code"] == "unauthorized"
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert key not in reply.text
    assert _post(f"{server}/bare", SAMPLE_SCENE.read_bytes()).status_code == 401
    assert httpx.get(f"{server}/bare/v1/models", headers={"authorization": f"Bearer {key}"},
                     timeout=30).status_code == 200
    assert httpx.get(f"{server}/bare/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{server}/bare/readyz", timeout=30).status_code == 503  # open, and honest: no weights
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 200  # the full graph has no keys file


def test_v1_models_shows_weights_relative_to_the_model_store(server, model_store):
    reply = httpx.get(f"{server}/v1/models", timeout=30)
    models = {m["name"]: m for m in reply.json()["models"]}
    assert models["sign_detector"]["weights"] == "sign_detector/signs.pt"
    assert models["sign_detector"]["classifier"] == "sign_classifier/sign_classes.pt"
    assert models["hazard_cells"]["weights"] == "hazard_cells/yolic_m2.pth.tar"
    assert models["scene_describer"]["weights"] == "scene_describer/festival-describer"
    assert str(model_store) not in reply.text


def test_work_whose_deadline_passed_in_the_queue_is_dropped_unrun(server):
    from ray import serve

    from festival_serve.pipeline.types import StageError, Ticket

    hazards = serve.get_deployment_handle("HazardCells", app_name="festival")
    before = httpx.get(f"{server}/v1/models", timeout=30).json()["models"][1]["batch"]["expired_items"]
    frame = np.zeros((480, 848, 3), np.uint8)
    stale = Ticket(sent_at=time.time() - 5, deadline=time.time() - 1)  # nobody waits for this answer any more
    answer = hazards.classify.remote(frame, stale).result(timeout_s=60)
    assert isinstance(answer, StageError) and answer.code == "timeout"
    after = httpx.get(f"{server}/v1/models", timeout=30).json()["models"][1]["batch"]["expired_items"]
    assert after == before + 1


# -- metrics: what an ops team scrapes from the node's /metrics (festival_serve.serving.metrics, Ray Serve's own) ---------

FULL_APP = "festival"  # the full graph's application name in serve_config.yaml


def _scrape(metrics_port) -> dict[str, list]:
    """Every sample on the node's /metrics: name → [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _counts(samples, name, keys, **match) -> dict[tuple, float]:
    """``name``'s values summed by the label ``keys``, over the samples whose labels match ``match``."""
    out: dict[tuple, float] = {}
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in match.items()):
            key = tuple(labels.get(k) for k in keys)
            out[key] = out.get(key, 0.0) + value
    return out


WATCHED = [  # (metric, labels it is counted by, labels it must match)
    ("ray_festival_answers_total", ("application", "outcome", "code"), {}),
    ("ray_festival_degraded_stages_total", ("stage", "code"), {"application": FULL_APP}),
    ("ray_festival_stage_latency_seconds_count", ("stage",), {"application": FULL_APP}),
    ("ray_festival_expired_items_total", ("stage",), {"application": FULL_APP}),
]


def _watched(metrics_port) -> dict[str, dict]:
    samples = _scrape(metrics_port)
    return {name: _counts(samples, name, keys, **match) for name, keys, match in WATCHED}


def _settled(metrics_port, timeout_s=60) -> dict[str, dict]:
    """The watched counts once two scrapes 2.5 s apart agree (the replicas report every second here)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = _watched(metrics_port)
        if now == last:
            return now
        last = now
        time.sleep(2.5)
    raise AssertionError(f"the metrics did not settle within {timeout_s} s")


def _delta(after: dict, before: dict) -> dict:
    return {name: {k: v - before[name].get(k, 0.0) for k, v in counts.items() if v != before[name].get(k, 0.0)}
            for name, counts in after.items()}


def _expired_items(url) -> dict[str, int]:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["models"]
    return {m["name"]: m["batch"]["expired_items"] for m in models}


def _expected_outcome(reply) -> tuple[str, str]:
    """The (outcome, code) the contract says a reply is counted under."""
    if reply.status_code == 200:
        return ("degraded" if reply.json()["degraded"] else "ok"), ""
    code = reply.json()["error"]["code"]
    if code == "overloaded":
        return "shed", code
    return ("rejected" if reply.status_code < 500 else "error"), code


def test_metrics_count_every_answer_by_outcome_and_time_every_stage(server, metrics_port, bare_keys):
    from ray import serve

    from festival_serve.pipeline.types import Ticket

    before, expired_before = _settled(metrics_port), _expired_items(server)
    scene, key = SAMPLE_SCENE.read_bytes(), {"authorization": f"Bearer {bare_keys[0]}"}
    replies = [
        *(_post(server, scene, describe="false") for _ in range(2)),  # ok
        # Short budgets: the describer (0.2 s batch window here) or the reader cannot make it: degraded.
        *(_post(server, scene, headers={"x-request-timeout-seconds": budget}, describe="true")
          for budget in ("0.5", "0.7", "0.9")),
        _post(server, scene, headers={"x-request-timeout-seconds": "0.05"}),  # shed before decoding: 503 overloaded
        _post(server, b""),  # 400 empty_body
        _post(server, scene, headers={"x-request-timeout-seconds": "soon"}),  # 400 invalid_budget
        _post(server, b"{}", "application/json"),  # 415
    ]
    bare = _post(f"{server}/bare", scene, headers=key)  # 503 safety_stages_unavailable: an error, in /bare's series
    hazards = serve.get_deployment_handle("HazardCells", app_name=FULL_APP)
    stale = Ticket(sent_at=time.time() - 5, deadline=time.time() - 1)
    hazards.classify.remote(np.zeros((480, 848, 3), np.uint8), stale).result(timeout_s=60)  # expires in the queue

    expected: dict[tuple, float] = {}
    for reply in replies:
        outcome, code = _expected_outcome(reply)
        expected[(FULL_APP, outcome, code)] = expected.get((FULL_APP, outcome, code), 0) + 1
    expected[("bare", *_expected_outcome(bare))] = 1
    answered = [r.json() for r in replies if r.status_code == 200]
    degraded: dict[tuple, float] = {}
    for body in answered:
        for entry in body["degraded"]:
            degraded[(entry["stage"], entry["code"])] = degraded.get((entry["stage"], entry["code"]), 0) + 1
    assert {k[1] for k in expected} >= {"ok", "degraded", "shed", "rejected", "error"}, expected
    assert bare.status_code == 503 and bare.json()["error"]["code"] == "safety_stages_unavailable"

    deadline, delta = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        delta = _delta(_watched(metrics_port), before)
        if delta["ray_festival_answers_total"] == expected and delta["ray_festival_expired_items_total"]:
            break
        time.sleep(1)
    time.sleep(2.5)  # and nothing more arrives
    delta = _delta(_watched(metrics_port), before)

    assert delta["ray_festival_answers_total"] == expected
    assert delta["ray_festival_degraded_stages_total"] == degraded
    # The replicas' own count (/v1/models) moved as the exported one did: the stale frame, and any item of the
    # short budgets above that expired in a queue.
    expired = {(stage,): after - expired_before[stage] for stage, after in _expired_items(server).items()
               if after != expired_before[stage]}
    assert delta["ray_festival_expired_items_total"] == expired and expired[("hazard_cells",)] >= 1
    # Every 200 answer decoded its frame once; each stage it waited for has a timing, and the histogram has it.
    latency = delta["ray_festival_stage_latency_seconds_count"]
    assert latency[("decode",)] == len(answered)
    for step in TIMED_STEPS:
        assert latency.get((step,), 0) == sum(step in body_timings for body_timings in
                                              (r.json()["timings_ms"] for r in replies if r.status_code == 200)), step


def test_metrics_include_queue_waits_batch_sizes_and_ray_serves_own_series(server, metrics_port):
    from festival_serve.pipeline.stages import STAGES

    samples = _scrape(metrics_port)
    for model in STAGES:
        batches = _counts(samples, f"ray_festival_batch_size_{model.batch_unit}_count", (), application=FULL_APP,
                          stage=model.name)
        waits = _counts(samples, "ray_festival_queue_wait_seconds_count", (), application=FULL_APP, stage=model.name)
        assert batches.get((), 0) >= 1 and waits.get((), 0) >= batches[()], model.name
        # Every call reached the replica in a Serve request the replica counted (festival_serve.serving.coalesce).
        requests = _counts(samples, "ray_festival_stage_request_frames_count", (), application=FULL_APP,
                           stage=model.name)
        assert requests.get((), 0) >= 1, model.name
        replica = {labels["deployment"] for labels, _ in samples["ray_festival_queue_wait_seconds_count"]
                   if labels.get("stage") == model.name}
        assert replica == {model.deployment}  # measured in the model's own replica
    assert _counts(samples, "ray_serve_num_http_requests_total", ("status_code",), application=FULL_APP)
    # A camera, so that the stream series exist: a committed clip over WS /v1/streams, every frame.
    from festival_serve.ops.watch import watch

    camera = watch(str(DATA_DIR / "clips" / "road_a.mp4"), server, quiet=True)
    assert camera.results > 0 and camera.errors == 0
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    plotted = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"ray_\w+", target["expr"])}
    if not camera.events:  # a counter is exported once it counted something: these stand-ins may announce nothing
        plotted.discard("ray_festival_stream_events_total")

    def every_plotted_series_exported():
        missing = plotted - set(_scrape(metrics_port))
        assert not missing, f"the dashboard plots series Ray does not export: {missing}"

    # Ray's own gauges (replica health) are reported on their own period: give them a few report rounds.
    _eventually(every_plotted_series_exported, timeout_s=60)


def _eventually(check, *, timeout_s: float, every_s: float = 1.0) -> None:
    """Run ``check`` until it stops raising AssertionError, or fail with its last error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(every_s)


def _dashboard_queries(job: str, application: str) -> list[str]:
    dashboard = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return [e.replace("$job", job).replace("$application", application).replace("$__rate_interval", "1m")
            for e in exprs]


def test_the_shipped_prometheus_config_scrapes_the_graph_and_answers_the_dashboards_queries(
        server, metrics_port, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` binary (Debian: apt-get install prometheus; .ci/run installs it when it can)")
    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    local_job = next(job for job in config["scrape_configs"] if job["job_name"] == "festival-local")
    local_job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = [local_job]  # no cluster here: the discovery file may be another run's
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = tmp_path / "prometheus.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        quantile = ('histogram_quantile(0.5, sum by (le, stage) '
                    f'(ray_festival_stage_latency_seconds_bucket{{job="festival-local",application="{FULL_APP}"}}))')
        deadline, stages = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                result = httpx.get(f"{api}/query", params={"query": quantile}, timeout=10).json()["data"]["result"]
                stages = {r["metric"]["stage"]: float(r["value"][1]) for r in result}
            except (httpx.HTTPError, KeyError, ValueError):  # not up yet, or not ready to answer
                pass
            if set(stages) >= set(TIMED_STEPS):
                break
            time.sleep(1)
        assert set(stages) >= set(TIMED_STEPS), (stages, log.read_text()[-2000:])
        assert all(0 < seconds <= 30 for seconds in stages.values()), stages  # a finite bucket, in seconds
        for query in _dashboard_queries("festival-local", FULL_APP):
            reply = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()
            assert reply["status"] == "success", (query, reply)
        # The dashboard's job and application selectors read their values from this series.
        def both_applications_selectable():
            # Ray re-reports this gauge per replica on its own period, so an instant query may miss one application:
            # look back over the window, as a dashboard variable does.
            selectors = httpx.get(f"{api}/query", params={"query": "count by (job, application) (last_over_time("
                                                          "ray_serve_deployment_replica_healthy[5m]))"},
                                  timeout=10).json()
            assert {(r["metric"]["job"], r["metric"]["application"]) for r in selectors["data"]["result"]} >= \
                {("festival-local", FULL_APP), ("festival-local", "bare")}

        _eventually(both_applications_selectable, timeout_s=60)
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- the hostile edge (issue 29), through real Ray Serve ----------------------------------------------------------


def _raw_request(server: str, path: str, headers: dict[str, str], body: bytes = b""):
    """A raw connection that has sent a request's head (and ``body``, maybe only part of what it declared)."""
    import socket
    from urllib.parse import urlparse

    address = urlparse(server)
    sock = socket.create_connection((address.hostname, address.port), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nhost: {address.hostname}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sock.sendall(head.encode() + body)
    return sock


def _status_and_body(sock) -> tuple[int, dict, float]:
    """The status line, the JSON body and when the head arrived (monotonic) of the answer on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed without an answer: {data!r}")
        data += chunk
    arrived = time.monotonic()
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length]), arrived


def test_trickled_bodies_get_a_json_408_within_their_budget_while_a_normal_client_is_served(server):
    frame = SAMPLE_SCENE.read_bytes()
    started = time.monotonic()
    # A budget of 2 s, and one that asks for 10^6 s (clamped by the ingress; the proxy's own timer would be off).
    tricklers = [_raw_request(server, "/v1/analyze?describe=false",
                              {"content-type": "image/jpeg", "content-length": str(len(frame)),
                               "x-request-timeout-seconds": budget}, frame[:2])
                 for budget in ["2"] * 7 + ["1000000"]]
    try:
        normal = [_post(server, frame, describe="false", headers={"x-request-timeout-seconds": "10"})
                  for _ in range(3)]
        assert [r.status_code for r in normal] == [200, 200, 200], [r.text for r in normal]
        answers = [_status_and_body(sock) for sock in tricklers]
    finally:
        for sock in tricklers:
            sock.close()
    for (status, body, arrived), budget in zip(answers, ["2"] * 7 + ["1000000"]):
        assert status == 408 and body["error"]["code"] == "body_timeout", body
        limit = 2 if budget == "2" else 5  # ingress.body_read_max_s (default 5 s) caps the clamped budget's read
        assert arrived - started < limit + 3, (budget, arrived - started)


def test_a_jpeg_of_thousands_of_scans_is_refused_within_its_budget_and_the_graph_serves_on(server):
    from festival_serve.measure.hostile import scan_bomb

    bomb = scan_bomb()
    started = time.monotonic()
    replies = [_post(server, bomb, describe="false", headers={"x-request-timeout-seconds": "2"}) for _ in range(2)]
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "invalid_image" for r in replies), \
        [r.text for r in replies]
    assert "scans" in replies[0].json()["error"]["message"]
    assert time.monotonic() - started < 4
    after = time.monotonic()
    assert _post(server, SAMPLE_SCENE.read_bytes(), describe="false").status_code == 200
    assert time.monotonic() - after < 5


def test_a_readyz_flood_is_answered_from_background_state_at_a_limited_rate(server):
    def poll(_):
        reply = httpx.get(f"{server}/readyz", timeout=30)
        return reply.status_code, reply.json()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(poll, range(200)))
    elapsed = time.monotonic() - started
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 40, statuses
    assert all(body["age_s"] is not None and body["age_s"] < 10 for status, body in answers if status == 200)
    assert all(body["error"]["code"] == "rate_limited" for status, body in answers if status == 429)
    assert elapsed < 30, elapsed
    assert _post(server, SAMPLE_SCENE.read_bytes(), describe="false").status_code == 200


def test_clients_that_leave_are_counted_as_client_closed_and_their_work_is_cancelled(server, metrics_port):
    frame = SAMPLE_SCENE.read_bytes()
    before = _settled(metrics_port)
    # One leaves while its body is arriving: the ingress's body read ends with the client's leaving.
    leaving = _raw_request(server, "/v1/analyze?describe=false",
                           {"content-type": "image/jpeg", "content-length": str(len(frame))}, frame[:1000])
    time.sleep(0.5)
    leaving.close()
    _eventually(lambda: _assert_answers(metrics_port, before, client_closed=1, ok=0), timeout_s=60)
    # One asks Serve not to cancel on disconnect (``?1``) and leaves at once after sending a whole describe=true
    # frame: the ingress watches for it and cancels the work itself. A frame the graph finishes before the
    # client's leaving reaches the ingress is honestly ``ok``; this one-model graph answers in a few hundred ms,
    # so the leaving is tried up to three times and must win at least once (a broken watcher never wins).
    for attempt in range(1, 4):
        abandoned = _raw_request(server, "/v1/analyze?describe=true",
                                 {"content-type": "image/jpeg", "content-length": str(len(frame)),
                                  "x-request-disconnect-disabled": "?1"}, frame)
        abandoned.close()
        _eventually(lambda answered=1 + attempt: _assert_answers(metrics_port, before, answered=answered), timeout_s=60)
        if _answer_counts(metrics_port, before).get((FULL_APP, "client_closed", "client_closed")) == 2:
            break
    _assert_answers(metrics_port, before, client_closed=2, answered=1 + attempt)


def _answer_counts(metrics_port, before) -> dict:
    return _delta(_watched(metrics_port), before)["ray_festival_answers_total"]


def _assert_answers(metrics_port, before, *, client_closed=None, ok=None, answered=None) -> None:
    """The answers counted since ``before``: so many ``client_closed``, ``ok``, in all; never an error."""
    counts = _answer_counts(metrics_port, before)
    assert not any(outcome == "error" for _, outcome, _ in counts), counts
    if client_closed is not None:
        assert counts.get((FULL_APP, "client_closed", "client_closed"), 0) == client_closed, counts
    if ok is not None:
        assert counts.get((FULL_APP, "ok", ""), 0) == ok, counts
    if answered is not None:
        assert sum(counts.values()) == answered, counts


def test_a_key_removed_from_the_keys_file_stops_working_within_seconds(server, bare_keys):
    key, keys_file = bare_keys
    original = keys_file.read_text()
    extra = auth.new_key()
    url, headers = f"{server}/bare/v1/models", {"authorization": f"Bearer {extra}"}
    try:
        keys_file.write_text(original + auth.digest(extra) + "\n")
        _eventually(lambda: httpx.get(url, headers=headers, timeout=30).raise_for_status(), timeout_s=15, every_s=0.5)
        keys_file.write_text(original)
        removed = time.monotonic()
        _eventually(lambda: _assert_status(httpx.get(url, headers=headers, timeout=30), 401), timeout_s=15,
                    every_s=0.25)
        assert time.monotonic() - removed < 5  # ingress.keys_reload_s is 2 s
        assert httpx.get(url, headers={"authorization": f"Bearer {key}"}, timeout=30).status_code == 200
    finally:
        keys_file.write_text(original)


def _assert_status(reply, status: int) -> None:
    assert reply.status_code == status, reply.status_code


def test_an_outsized_request_id_is_replaced_not_echoed_into_the_answer(server):
    reply = _post(server, SAMPLE_SCENE.read_bytes(), describe="false", headers={"x-request-id": "r" * 4000})
    assert reply.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", reply.json()["request_id"])
