"""``festival-serve bench``: its parts (load client, process sampler, stand-ins, baseline server,
summary) and its whole plumbing on a tiny configuration — timings are not asserted, only that every
number the report promises is measured and written."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from festival_serve.measure.bench import run
from festival_serve.measure import loadgen
from festival_serve.measure import procstats
from festival_serve.measure.bench import report, tune
from festival_serve.serving.imaging import encode_jpeg
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint
from festival_serve.models.sign_detector.classifier import BACKGROUND
from festival_serve.training.standins.sign_detector import build_yolo_checkpoint, build_yolo_classifier
from festival_serve.training.standins.scene_describer import SMOLVLM_256M, build_tiny_idefics3
from festival_serve.world.synth import SIGN_CLASSES, generate_scene

from tests.ports import free_port
from tests.stores import add_shipped_reader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, yolic_layout) -> Path:
    store = tmp_path_factory.mktemp("bench-models")
    # A bias that makes the random detector fire, so crops reach the reader; a few boxes at most.
    build_yolo_checkpoint(store / "sign_detector" / "signs.pt", list(SIGN_CLASSES), class_bias=-1.0)
    build_yolo_classifier(store / "sign_classifier" / "sign_classes.pt", [*SIGN_CLASSES, BACKGROUND], favour="info")
    build_yolic_checkpoint(store / "hazard_cells" / "yolic_m2.pth.tar", yolic_layout, head_bias=0.0)
    build_tiny_idefics3(store / "scene_describer" / "festival-describer")
    add_shipped_reader(store)
    return store


def _tiny_args(store: Path) -> PipelineArgs:
    return PipelineArgs.model_validate({
        "model_store": str(store),
        "sign_detector": {"max_detections": 3, "image_size": 320},
        "scene_describer": {"max_new_tokens": 4},
    })


# -- load client ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server():
    """A real HTTP server whose answers the test controls: ok, degraded, or HTTP 500, per body."""
    import uvicorn

    async def analyze(request):
        body = await request.body()
        if body == b"fail":
            return PlainTextResponse("boom", status_code=500)
        if body in (b"shed", b"slow-shed"):
            await asyncio.sleep(0.3 if body == b"slow-shed" else 0)
            return JSONResponse({"error": {"code": "overloaded", "message": "full"}}, status_code=503,
                                headers={"Retry-After": "1"})
        if body == b"proxy-shed":  # Ray's proxy answers its own backpressure in plain text
            return PlainTextResponse("dropped", status_code=503)
        await asyncio.sleep(0.01)
        if body == b"unsafe":
            return JSONResponse({"degraded": [{"stage": "hazard_cells", "code": "timeout", "message": "late"}]})
        return JSONResponse({"degraded": ["x: slow"] if body == b"degraded" else []})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/analyze", analyze, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1/analyze"
    server.should_exit = True
    thread.join(10)


def test_closed_loop_counts_answers_errors_and_degraded(fake_server):
    result = asyncio.run(loadgen.closed_loop(fake_server, [b"ok", b"fail", b"degraded"], concurrency=3,
                                             duration_s=0.5, describe=False))
    summary = result.summary()
    assert summary["ok"] > 0 and summary["errors"] > 0 and summary["degraded"] > 0
    assert summary["requests"] == summary["ok"] + summary["errors"]
    assert "HTTP 500" in summary["error_examples"][0]
    # The fake server sleeps 10 ms; the two clocks and the 2-decimal rounding can put a sample a hair under it.
    assert 9.5 <= summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
    assert summary["throughput_rps"] == pytest.approx(summary["ok"] / result.duration_s, rel=1e-2)


def test_open_loop_sends_about_the_rate(fake_server):
    result = asyncio.run(loadgen.open_loop(fake_server, [b"ok"], rate=40, duration_s=1.0, describe=True))
    assert result.errors == 0
    assert 15 <= len(result.latencies_ms) <= 80  # Poisson: 40 expected
    assert result.summary()["mode"] == "open" and result.summary()["describe"] is True


def test_overload_point_sorts_answers_and_refusals_and_keeps_a_timeline(fake_server):
    bodies = [b"ok", b"shed", b"slow-shed", b"proxy-shed", b"unsafe", b"fail"]
    result = asyncio.run(loadgen.overload(fake_server, bodies, rate=60, duration_s=1.0, budget_s=2.0))
    summary = result.summary()
    assert summary["sent"] == summary["answered"] + summary["shed"] + summary["errors"] + summary["hung"]
    assert summary["hung"] == 0 and summary["errors"] > 0  # the 500s
    codes = summary["shed_codes"]
    assert codes["overloaded"]["count"] > codes["overloaded"]["slow"] > 0  # the 0.3 s refusals are slow
    assert codes["proxy"]["count"] > 0 and codes["proxy"]["slow"] == 0
    # Fast needs Retry-After too: the proxy's plain 503s have none, the slow ones are slow.
    fast_with_retry = codes["overloaded"]["count"] - codes["overloaded"]["slow"]
    assert summary["shed_fast"] == pytest.approx(fast_with_retry / summary["shed"], abs=1e-4)
    # Only "ok" answers are good: "unsafe" lost a safety stage.
    assert summary["goodput_rps"] * result.duration_s == pytest.approx(
        sum(row.get("good", 0) for row in summary["timeline"]), abs=0.01)
    assert sum(row.get("answered_not_good", 0) for row in summary["timeline"]) > 0
    timeline = summary["timeline"]
    assert sum(row["sent"] for row in timeline) == summary["sent"]
    assert [row["second"] for row in timeline] == sorted(row["second"] for row in timeline)


def test_unreachable_server_is_an_error_not_a_crash():
    url = f"http://127.0.0.1:{free_port()}/v1/analyze"
    result = asyncio.run(loadgen.closed_loop(url, [b"x"], concurrency=1, duration_s=0.2, describe=False))
    assert result.errors > 0 and not result.latencies_ms
    assert result.summary()["p50_ms"] is None


# -- process sampler --------------------------------------------------------------------------------------


def test_tree_sampler_measures_cpu_and_memory_of_a_process_tree():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    try:
        sampler = procstats.TreeSampler(os.getpid(), interval_s=0.1).start()
        child.wait(10)
        summary = sampler.stop().summary()
    finally:
        child.kill()
    assert summary["peak_rss_gb"] > 0
    assert summary["cpu_s"] >= 0.5  # the busy child's CPU counts towards the tree
    assert sum(row["processes"] for row in summary["processes"].values()) >= 2


def test_process_labels_name_ray_replicas_by_deployment():
    class Fake:
        def __init__(self, cmdline):
            self._cmdline = cmdline

        def cmdline(self):
            return self._cmdline

        def name(self):
            return "python"

    assert procstats.process_label(Fake(["ray::ServeReplica:festival:SignDetector"])) == "SignDetector"
    assert procstats.process_label(Fake(["ray::ServeController"])) == "ServeController"
    assert procstats.process_label(Fake(["/x/ray/core/src/ray/raylet/raylet", "--flag"])) == "raylet"
    assert procstats.process_label(Fake(["/v/bin/python", "-m", "festival_serve.measure.baseline", "--port", "1"])) == "baseline"
    assert procstats.process_label(Fake(["/v/bin/python", "/v/bin/festival-serve", "up"])) == "driver"
    assert procstats.process_label(Fake(["/v/bin/python", "-u", "/v/ray/_private/log_monitor.py", "--x"])) == "log_monitor"


# -- stand-ins ----------------------------------------------------------------------------------------------


def test_smolvlm_stand_in_has_the_published_size():
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from festival_serve.training.standins import scene_describer as standin

    tokenizer = standin.build_tokenizer(SMOLVLM_256M.vocab_size)
    assert len(tokenizer) == 49280
    assert tokenizer.decode([40000]) == "x40000"  # every id a random model emits decodes
    config = standin._build_config(tokenizer, SMOLVLM_256M)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 250e6 < params < 262e6  # SmolVLM-256M
    assert SMOLVLM_256M.image_seq_len == 64


def test_stand_ins_fill_only_what_the_store_lacks(tmp_path, tiny_store):
    from festival_serve.training.standins.store import with_stand_ins

    store = tmp_path / "store"
    (store / "scene_describer").mkdir(parents=True)
    os.symlink(tiny_store / "scene_describer" / "festival-describer",
               store / "scene_describer" / "festival-describer")
    args = PipelineArgs(model_store=str(store))
    lines: list[str] = []
    resolved, sources = with_stand_ins(args, tmp_path / "cache", progress=lines.append)
    kinds = {s.stage: s.kind for s in sources}
    assert kinds == {"sign_detector": "stand-in", "sign_classifier": "stand-in", "hazard_cells": "stand-in",
                     "sign_reader": "bundled", "scene_describer": "trained"}
    for weights in (resolved.sign_detector.weights, resolved.sign_detector.classifier, resolved.hazard_cells.weights):
        assert Path(weights).is_file()
    assert resolved.scene_describer.model == args.scene_describer.model
    assert len(lines) == 3  # built once …
    lines.clear()
    with_stand_ins(args, tmp_path / "cache", progress=lines.append)
    assert lines == []  # … then cached


# -- baseline ---------------------------------------------------------------------------------------------


def test_baseline_answers_the_same_api_one_model_call_per_image_or_crop(tiny_store):
    from festival_serve.measure.baseline import build_app

    client = TestClient(build_app(_tiny_args(tiny_store)))
    image = encode_jpeg(generate_scene(10_000_000).image)
    reply = client.post("/v1/analyze", content=image, headers={"content-type": "image/jpeg"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) >= {"request_id", "image", "signs", "hazards", "description", "degraded", "timings_ms"}
    assert body["degraded"] == [] and isinstance(body["description"], str)
    assert reply.headers["x-request-id"] == body["request_id"]
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["sign_detector"]["batch"]["observed_sizes"] == {"1": 1}
    reads = sum(1 for s in body["signs"] if s["text"] is not None)
    assert models["sign_reader"]["batch"]["observed_sizes"].get("1", 0) == len(body["signs"]) >= reads

    assert client.post("/v1/analyze", content=b"not an image", headers={"content-type": "image/jpeg"}).json()[
        "error"]["code"] == "invalid_image"
    assert client.post("/v1/analyze", content=image, headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/v1/analyze?describe=maybe", content=image,
                       headers={"content-type": "image/jpeg"}).status_code == 400
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"


def test_litserve_peer_batches_each_model_once_and_answers_what_the_baseline_answers(tiny_store):
    """The peer's worker on a batch of three frames (one to describe): one call per model for the batch, the
    reader over every text sign's crop of the batch, and the same signs, hazards and description as the
    baseline's one-frame-at-a-time answers."""
    import io
    from types import SimpleNamespace

    from fastapi import HTTPException

    from festival_serve.measure.baseline import build_app
    from festival_serve.measure.bench.peer import PipelineAPI

    args = _tiny_args(tiny_store)
    api = PipelineAPI(args)
    api.setup("cpu")
    calls = {}
    from festival_serve.pipeline.stages import STAGES

    for stage in STAGES:
        name, model, method = stage.name, api.models[stage.name], stage.method
        original = getattr(model, method)

        def counted(*batch, _name=name, _original=original):
            calls.setdefault(_name, []).append(len(batch[0]))
            return _original(*batch)

        setattr(model, method, counted)
    images = [encode_jpeg(generate_scene(seed).image) for seed in (10_000_000, 10_000_001, 10_000_002)]
    form = [{"image": SimpleNamespace(file=io.BytesIO(body)), "describe": describe}
            for body, describe in zip(images, ("false", "true", "false"))]
    answers = [api.encode_response(a) for a in api.predict([api.decode_request(f) for f in form])]
    assert calls["sign_detector"] == [3] and calls["hazard_cells"] == [3] and calls["scene_describer"] == [1]
    reads = calls.get("sign_reader", [])
    assert len(reads) <= 1 and sum(reads) >= sum(1 for a in answers for sign in a["signs"] if sign["text"] is not None)
    assert [a["description"] is not None for a in answers] == [False, True, False]

    client = TestClient(build_app(args))
    for body, describe, answer in zip(images, ("false", "true", "false"), answers):
        expected = client.post(f"/v1/analyze?describe={describe}", content=body,
                               headers={"content-type": "image/jpeg"}).json()
        for key in ("image", "signs", "hazards", "description"):
            assert answer[key] == expected[key], key

    with pytest.raises(HTTPException) as bad:
        api.decode_request({"image": SimpleNamespace(file=io.BytesIO(b"not an image"))})
    assert bad.value.status_code == 400
    with pytest.raises(HTTPException):
        api.decode_request({"describe": "true"})


# -- summary and report -------------------------------------------------------------------------------------


def _point(describe, mode, level, goodput, p50, degraded=0):
    return {"describe": describe, "mode": mode, "level": level, "goodput_rps": goodput, "p50_ms": p50,
            "p95_ms": p50 * 2, "p99_ms": p50 * 3, "errors": 0, "degraded": degraded, "ok": 10,
            "resources": {"cpu_cores": 1.0, "peak_rss_gb": 1.0}, "batches": {}}


def test_summary_ratios_and_target_verdicts():
    systems = {
        "baseline": {"points": [_point(False, "closed", 1, 4.0, 200.0), _point(False, "closed", 4, 5.0, 700.0),
                                _point(True, "closed", 1, 0.2, 4000.0)], "peak_rss_gb": 1.5},
        "graph": {"points": [_point(False, "closed", 1, 3.9, 215.0), _point(False, "open", 6.0, 6.0, 500.0),
                             _point(True, "closed", 8, 0.4, 9000.0)], "peak_rss_gb": 6.5,
                  "resident_at_end": {"pss_gb": 4.0}},
    }
    summary = run.summarize(systems)
    assert summary["overhead_ms_p50"] == 15.0
    assert summary["throughput_ratio_nodescribe"] == pytest.approx(1.2)
    assert summary["throughput_ratio_describe"] == pytest.approx(2.0)
    assert summary["targets_met"] == {"overhead_ms_p50": False, "throughput_ratio_nodescribe": True,
                                      "throughput_ratio_describe": True, "graph_rss_gb": False}


def test_plans_quick_full_and_overrides():
    import argparse

    parse = run.add_arguments(argparse.ArgumentParser()).parse_args
    assert run.plan_from(parse(["--quick"])).mode == "quick"
    full_cpu = run.plan_from(parse([]), cuda=False)
    assert full_cpu.concurrency == (1, 4, 16, 64) and full_cpu.describe_concurrency == (1, 4, 16)
    assert run.plan_from(parse([]), cuda=True).describe_concurrency == (1, 4, 16, 64)
    custom = run.plan_from(parse(["--quick", "--concurrency", "2,3", "--duration", "1.5", "--new-tokens", "4"]))
    assert (custom.concurrency, custom.duration_s, custom.new_tokens, custom.mode) == ((2, 3), 1.5, 4, "quick")


def test_thread_candidates_go_from_one_to_the_cores():
    assert tune.thread_candidates(1) == (1,)
    assert tune.thread_candidates(2) == (1, 2)
    assert tune.thread_candidates(6) == (1, 2, 4, 6)
    assert tune.thread_candidates(16) == (1, 2, 4, 8, 16)


def test_coordinate_search_tunes_one_knob_at_a_time_and_measures_each_setting_once():
    scores = {(1, "a"): 3.0, (2, "a"): 5.0, (4, "a"): 4.0, (2, "b"): 6.0, (2, "c"): 1.0}
    calls = []

    def score(setting):
        calls.append((setting["threads"], setting["batching"]))
        return scores[calls[-1]]

    best, tried = tune.coordinate_search({"threads": 1, "batching": "a"},
                                         {"threads": (1, 2, 4), "batching": ("a", "b", "c")}, score)
    assert best == {"threads": 2, "batching": "b"}
    assert calls == [(1, "a"), (2, "a"), (4, "a"), (2, "b"), (2, "c")]  # (2, "a") is not measured twice
    assert [t["score"] for t in tried] == [3.0, 5.0, 4.0, 6.0, 1.0]


def test_rounds_rotate_and_medians_keep_one_measurement():
    assert tune.round_orders(["baseline", "graph", "peer"], 3) == [
        ["baseline", "graph", "peer"], ["graph", "peer", "baseline"], ["peer", "baseline", "graph"]]
    repeats = [_point(False, "closed", 16, g, p50) for g, p50 in ((30.0, 500.0), (20.0, 900.0), (25.0, 600.0))]
    median = tune.median_point(repeats)
    assert (median["goodput_rps"], median["p50_ms"]) == (25.0, 600.0)  # both from the median round
    assert median["round_goodput_rps"] == [30.0, 20.0, 25.0] and median["repeats"] == 3
    assert tune.median_and_spread([1.2, None, 0.9, 1.0]) == (1.0, [0.9, 1.2])
    assert tune.median_and_spread([None]) == (None, None)


def test_summary_ratios_are_medians_of_the_rounds_with_their_spread():
    def rounds(values, clients=16, describe=False):
        return [{**_point(describe, "closed", clients, g, 100.0 + r), "round": r, "frames": "mixed",
                 "cpu_ms_per_answer": 50.0 + r}
                for r, g in enumerate(values)]

    graph = rounds([30.0, 24.0, 33.0]) + rounds([6.0, 5.0, 7.0], 8, True)
    peer = rounds([25.0, 30.0, 30.0]) + rounds([5.0, 5.0, 5.0], 8, True)
    systems = {name: {"round_points": repeated, "points": [tune.median_point(repeated[:3]), tune.median_point(repeated[3:])]}
               for name, repeated in (("graph", graph), ("peer", peer))}
    summary = run.summarize(systems, {"mixed": {"ms_per_frame": 40.0}})
    # Per round 1.2, 0.8, 1.1: the median, not the ratio of medians (30 / 30 = 1.0).
    assert summary["peer_goodput_ratio_c16"] == 1.1 and summary["peer_goodput_ratio_c16_spread"] == [0.8, 1.2]
    assert summary["peer_goodput_ratio_describe"] == 1.2 and summary["peer_goodput_ratio_describe_spread"] == [1.0, 1.4]
    assert summary["serving_efficiency"] == 0.8  # 40 ms of model CPU in the median round's 50 ms per answer
    assert summary["targets_met"]["peer_goodput_ratio_c16"] is False  # 1.1 < 1.2


def test_published_paths_name_no_machine_directories():
    assert run.portable_path(str(Path.cwd() / "models" / "signs.pt")) == "models/signs.pt"
    assert run.portable_path(str(Path.home() / ".cache" / "x")) == "~/.cache/x"
    assert run.portable_path("rapidocr PP-OCR (det + rec ONNX)") == "rapidocr PP-OCR (det + rec ONNX)"


def test_batch_delta_counts_only_this_points_batches():
    before = [{"name": "sign_reader", "batch": {"observed_sizes": {"1": 2, "4": 1}}}]
    after = [{"name": "sign_reader", "batch": {"observed_sizes": {"1": 2, "4": 3, "8": 1}}}]
    assert run._batch_delta(before, after) == {"sign_reader": {"sizes": {4: 2, 8: 1}, "batches": 3, "mean": 5.33}}


# -- the whole command, tiny ----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_bench_quick_plumbing_end_to_end(tiny_store, tmp_path, capsys):
    from festival_serve.cli import main

    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["sign_detector"].update(max_detections=3, image_size=320)  # cheap requests
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--config", str(tmp_path / "serve_config.yaml"), "--model-store", str(tiny_store),
                 "--stand-ins", str(tmp_path / "stand-ins"), "--out", str(out),
                 "--graph-port", str(free_port()), "--baseline-port", str(free_port()), "--peer-port", str(free_port()),
                 "--split-concurrency", "1",
                 "--concurrency", "1,2", "--describe-concurrency", "2", "--rate-fractions", "1",
                 "--duration", "2", "--describe-duration", "2", "--warmup", "0.5", "--scenes", "2",
                 "--new-tokens", "2", "--micro-batches", "1,2", "--vlm-batches", "2",
                 "--overload-multiples", "1,5", "--overload-duration", "2", "--overload-budget", "2",
                 "--rounds", "2", "--calibration", "1", "--peer-threads", "1,2", "--peer-batches", "4:0.001,2:0.01",
                 "--baseline-threads", "1,2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert json.loads(printed.strip().splitlines()[-1])["mode"] == "quick"  # ratios printed last, as JSON

    latest = json.loads((out / "latest.json").read_text())
    assert latest["mode"] == "quick"
    for key in ("overhead_ms_p50", "throughput_ratio_nodescribe", "throughput_ratio_describe", "graph_rss_gb"):
        assert isinstance(latest[key], (int, float)), key
    assert latest["graph_rss_gb"] > 0.5  # Ray's processes and four replicas, measured
    # Overload at 5x each system's capacity, a 2 s budget per request: every answer counted, none hung.
    assert 0 <= latest["overload_within_budget_5x"] <= 1 and latest["overload_hung_5x"] == 0
    assert "overload_goodput_ratio_5x" in latest and "overload_shed_fast_5x" in latest
    assert "baseline_overload_within_budget_5x" in latest
    # Against the LitServe peer: at one client on every frame set (no 16-client point in this plan).
    for tag in ("", "_text", "_no_text"):
        assert isinstance(latest[f"peer_p50_delta_ms_c1{tag}"], float), tag
    assert latest["peer_peak_rps_nodescribe"] > 0 and latest["peer_peak_rps_describe"] > 0

    result = json.loads((out / "quick.json").read_text())
    # Tuned before measured: every candidate started and loaded, one knob at a time, the best kept.
    peer = result["tuning"]["peer"]
    tried = [(t["threads"], t["max_batch_size"], t["batch_timeout_s"]) for t in peer["tried"]]
    best_threads = max((t for t in peer["tried"] if t["max_batch_size"] == 4), key=lambda t: t["goodput_rps"])["threads"]
    assert tried == [(1, 4, 0.001), (2, 4, 0.001), (best_threads, 2, 0.01)]
    assert all(t["goodput_rps"] > 0 for t in peer["tried"])
    kept = max((t for t in peer["tried"] if t["threads"] == best_threads), key=lambda t: t["goodput_rps"])
    assert peer["chosen"] == {k: kept[k] for k in ("threads", "max_batch_size", "batch_timeout_s")}
    assert [t["threads"] for t in result["tuning"]["baseline"]["tried"]] == [1, 2]
    # Interleaved: each headline point measured on every system in turn, twice, in rotated orders, the other
    # systems frozen meanwhile; a ratio is the median of the rounds' ratios, with their spread.
    schedule = [(s["round"], s["system"], s["describe"], s["frames"], s["clients"]) for s in result["schedule"]]
    rounds = [[(system, point) for r, system, *point in schedule if r == k] for k in (0, 1)]
    assert [system for system, point in rounds[0] if point == [False, "mixed", 1]] == ["baseline", "graph", "peer"]
    assert [system for system, point in rounds[1] if point == [False, "mixed", 1]] == ["graph", "peer", "baseline"]
    assert [system for system, point in rounds[0] if point == [True, "mixed", 2]] == ["baseline", "graph", "peer"]
    assert [system for system, point in rounds[0] if point == [False, "mixed", 2]] == ["graph", "peer"]
    for name in ("baseline", "graph", "peer"):
        repeated = result["systems"][name]["round_points"]
        assert sorted({p["round"] for p in repeated}) == [0, 1]
        assert all(p["others_frozen"] for p in repeated + result["systems"][name]["points"] if "others_frozen" in p)
    low, high = latest["peer_p50_delta_ms_c1_spread"]
    assert low <= latest["peer_p50_delta_ms_c1"] <= high
    assert latest["peer_goodput_ratio_describe"] > 0 and len(latest["throughput_ratio_describe_spread"]) == 2
    # The models' own CPU per frame, and what share of each system's CPU per answer it is.
    assert all(result["efficiency"][f]["ms_per_frame"] > 0 for f in ("mixed", "text_signs", "no_text"))
    assert 0 < latest["serving_efficiency"] < 1.5 and 0 < latest["peer_serving_efficiency_no_text"] < 1.5
    for name in ("baseline", "graph", "peer"):
        points = result["systems"][name]["points"]
        assert [(p["mode"], p["level"], p["describe"], p["frames"]) for p in points][:4] == [
            ("closed", 1, False, "mixed"), ("closed", 2, False, "mixed"), ("closed", 1, False, "text_signs"),
            ("closed", 1, False, "no_text")]
        assert all(p["ok"] > 0 and p["errors"] == 0 and p["degraded"] == 0 for p in points), points
        assert all(p["resources"]["cpu_cores"] > 0 and p["cpu_ms_per_answer"] > 0 for p in points)
        described = [p for p in points if p["describe"]]
        assert described and (name == "peer" or all(p["batches"]["scene_describer"]["batches"] > 0 for p in described))
    graph_processes = result["systems"]["graph"]["processes"]
    assert {"SignDetector", "HazardCells", "SignReader", "SceneDescriber", "PipelineIngress"} <= set(graph_processes)
    models = {(r["model"], r["backend"], r["batch"]) for r in result["micro"]}
    assert {("sign_detector", "onnxruntime", 2), ("hazard_cells", "torch", 1), ("sign_reader", "onnxruntime", 2),
            ("scene_describer", "torch", 2)} <= models
    assert all(r["items_per_s"] > 0 for r in result["micro"])
    for name in ("baseline", "graph", "peer"):
        rows = result["systems"][name]["overload"]
        assert [r["multiple"] for r in rows] == [1.0, 5.0] and all(r["sent"] > 0 for r in rows)
        assert all(r["sent"] == r["answered"] + r["shed"] + r["errors"] + r["hung"] for r in rows)
    for name in ("quick.md", "quick-latency.png", "quick-goodput.png", "quick-micro.png", "quick-overload.png"):
        assert (out / name).stat().st_size > 0
    assert "| metric | value | target | met |" in (out / "quick.md").read_text()


def test_report_writes_without_load_points(tmp_path):
    result = {"mode": "quick", "date": "d", "elapsed_s": 1.0, "plan": {"new_tokens": 2},
              "machine": {"cpus": 2, "cuda": False, "python": "3.11"}, "models": [], "systems": {}, "micro": [],
              "summary": run.summarize({})}
    paths = report.write(result, tmp_path)
    assert json.loads(paths["latest"].read_text())["overhead_ms_p50"] is None
    assert "latency" not in paths


def test_bad_plan_and_busy_port_are_clear_errors(tmp_path, capsys):
    from festival_serve.cli import main

    assert main(["bench", "--systems", "graph,triton", "--out", str(tmp_path)]) == 1
    assert "unknown system(s) triton" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["bench", "--graph-port", str(port), "--out", str(tmp_path)]) == 1
    assert f"port {port} is already in use" in capsys.readouterr().err
