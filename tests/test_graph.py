"""The whole graph on a real local Ray Serve, deployed from serve_config.yaml through the same code as
`festival-serve up`, with small models built by the tests: the HTTP contract end to end.

Two applications share the Serve instance: ``full`` (every model present, route /) and ``bare`` (an
empty model store, route /bare), which shows the honest-degradation path.
"""

from __future__ import annotations

import concurrent.futures
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from festival_serve import local
from festival_serve.cli import SAMPLE_SCENE
from festival_serve.sign_classes import BACKGROUND
from festival_serve.standins.hazards import build_yolic_checkpoint
from festival_serve.standins.signs import build_yolo_checkpoint, build_yolo_classifier
from festival_serve.standins.vlm import build_tiny_idefics3

from tests.ports import free_port
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
    build_tiny_idefics3(store / "scene_describer" / "SmolVLM-256M-Instruct")
    return store


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    port = free_port()
    config, _ = local.local_profile(local.load_config(ROOT / "serve_config.yaml"), host="127.0.0.1", port=port,
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
            "args": {**full["args"], "model_store": str(tmp_path_factory.mktemp("empty-store"))}}
    config["applications"].append(bare)
    local.start(config, offline=True, num_cpus=4)  # two copies of the graph: 2 x 1.5 CPU shares
    try:
        local.wait_until_running(timeout_s=420, progress=lambda line: None)
        yield f"http://127.0.0.1:{port}"
    finally:
        local.stop()


def _jpeg(width=848, height=480, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _post(url, data, content_type="image/jpeg", **params):
    return httpx.post(f"{url}/v1/analyze", content=data, headers={"content-type": content_type},
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
    images = [_jpeg(seed=i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        replies = list(pool.map(lambda data: _post(server, data, describe="true"), images))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    models = {m["name"]: m for m in httpx.get(f"{server}/v1/models", timeout=30).json()["models"]}
    for stage in ("sign_detector", "hazard_cells", "scene_describer"):
        sizes = {int(k) for k in models[stage]["batch"]["observed_sizes"]}
        assert max(sizes) >= 2, f"{stage} never batched two requests: {sizes}"


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
    assert [n["name"] for n in models[0]["networks"]] == ["sign_detector", "sign_classifier"]
    assert [n["name"] for n in models[2]["networks"]] == ["sign_reader.det", "sign_reader.rec"]
    assert models[2]["networks"][1]["providers"] == ["CPUExecutionProvider"]


def test_check_gpu_reports_every_stage_on_the_cpu_with_its_runtime_and_threads(server, capsys):
    report = check_gpu_against_graph(server, capsys)
    assert [s["name"] for s in report["graph"]["stages"]] == ["sign_detector", "hazard_cells", "sign_reader",
                                                            "scene_describer"]
    assert report["require_gpu_failures"] == []


def test_missing_weights_degrade_instead_of_failing(server):
    models = {m["name"]: m for m in httpx.get(f"{server}/bare/v1/models", timeout=30).json()["models"]}
    for stage in ("sign_detector", "hazard_cells", "scene_describer"):
        assert models[stage]["ready"] is False and models[stage]["unavailable_reason"]
    assert models["sign_reader"]["ready"] is True  # PP-OCR ships inside the rapidocr wheel
    reply = _post(f"{server}/bare", SAMPLE_SCENE.read_bytes())
    assert reply.status_code == 200
    body = reply.json()
    assert body["signs"] == [] and body["hazards"] == [] and body["description"] is None
    assert {reason.split(":")[0] for reason in body["degraded"]} == {"sign_detector", "hazard_cells", "scene_describer"}
    assert httpx.get(f"{server}/bare/readyz", timeout=30).status_code == 200
