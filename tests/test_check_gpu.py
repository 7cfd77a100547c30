"""`festival-serve check-gpu`: it reports this machine's GPUs (none here) and a graph's devices, never
crashes on an absent graph, fails `--require-gpu` without a GPU, and warns where the GPU is shared
badly. The warning rules are fed hand-made entries shaped like `/v1/models`' own."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from festival_serve.ops import check_gpu
from festival_serve.cli import main
from festival_serve.runtime import nvml

from tests.ports import free_port

GIB = 1 << 30
HAS_GPU = nvml.local_gpus()["available"]
no_gpu_here = pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU report; this machine has an NVIDIA GPU")


def check_gpu_against_graph(url: str, capsys) -> dict:
    """Run ``check-gpu --json`` against a graph served on the CPU and check that every stage says where
    and how it runs: device "cpu", the runtime it uses and its threads. Returns the report."""
    capsys.readouterr()
    assert main(["check-gpu", "--url", url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["graph"]["reachable"], report["graph"]["error"]
    assert report["graph"]["stages"], "the graph listed no stage"
    for stage in report["graph"]["stages"]:
        assert stage["ready"], f"{stage['name']}: {stage['unavailable_reason'] or stage['error']}"
        assert stage["device"] == "cpu" and set(stage["runs_on"].values()) == {"cpu"}, stage
        for part in stage["networks"] or [stage]:
            assert part["runtime_device"] == "cpu" and part["backend"], (stage["name"], part)
            assert isinstance(part["threads"], int) and part["threads"] >= 1, (stage["name"], part)
    return report


def _run(capsys, *args: str) -> tuple[int, dict, str]:
    """Exit code, the JSON report (last stdout line) and the human text (stderr with --json)."""
    code = main(["check-gpu", "--json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.splitlines()[-1]), captured.err


def _nowhere() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# -- the command on this machine --------------------------------------------------------------------

@no_gpu_here
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    code, report, text = _run(capsys, "--url", _nowhere(), "--timeout", "2")
    assert code == 0
    assert report["gpu"] is False and report["local"]["available"] is False
    assert report["local"]["reason"] == nvml.NO_GPU and report["local"]["devices"] == []
    assert nvml.NO_GPU in text


@no_gpu_here
def test_require_gpu_fails_without_a_gpu(capsys):
    code, report, text = _run(capsys, "--url", _nowhere(), "--timeout", "2", "--require-gpu")
    assert code == 1
    assert nvml.NO_GPU in report["require_gpu_failures"]
    assert f"required GPU: {nvml.NO_GPU}" in text


def test_an_unreachable_graph_is_reported_not_fatal(capsys):
    url = _nowhere()
    code, report, text = _run(capsys, "--url", url, "--timeout", "2")
    assert code == 0
    assert report["graph"]["reachable"] is False and url in report["graph"]["error"]
    assert report["graph"]["stages"] == [] and "available" in report["local"]  # local devices still reported
    assert url in text and "festival-serve up" in text


def test_plain_text_without_json(capsys):
    url = _nowhere()
    assert main(["check-gpu", "--url", url, "--timeout", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("local: ") and f"graph {url}: not reachable" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[-1])


# -- against a graph (a loopback server answering our own /v1/models shape) --------------------------

def _network(name: str, backend: str = "onnxruntime", device: str = "cpu", runtime_device: str | None = "cpu",
             threads: int = 1, **extra) -> dict:
    providers = ["CPUExecutionProvider"] if backend == "onnxruntime" else None
    return {"name": name, "backend": backend, "device": device, "runtime_device": runtime_device,
            "precision": "fp32", "providers": providers, "threads": threads, **extra}


def _stage(name: str, *networks: dict, ready: bool = True, gpu_fraction: float | None = None, **extra) -> dict:
    """One ``/v1/models`` entry; the stage's own device fields follow its first network."""
    first = networks[0] if networks else {}
    return {"name": name, "deployment": name.title().replace("_", ""), "ready": ready,
            "unavailable_reason": None if ready else "weights missing", "gpu_fraction": gpu_fraction,
            "backend": first.get("backend"), "device": first.get("device"), "runtime_device": first.get("runtime_device"),
            "precision": first.get("precision"), "threads": first.get("threads"),
            "gpu_memory_cap_bytes": None, "gpu_memory_used_bytes": None, "networks": list(networks), **extra}


CPU_GRAPH = [
    _stage("sign_detector", _network("detector"), _network("classifier")),
    _stage("hazard_cells", _network("hazard_cells")),
    _stage("sign_reader", _network("det"), _network("rec")),
    _stage("scene_describer", _network("scene_describer", backend="transformers", threads=2)),
]


@pytest.fixture
def graph_url():
    """A loopback HTTP server answering ``GET /v1/models`` with ``CPU_GRAPH``."""
    body = json.dumps({"models": CPU_GRAPH}).encode()

    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_cpu_graph_lists_every_stage_and_network(graph_url, capsys):
    report = check_gpu_against_graph(graph_url, capsys)
    stages = {s["name"]: s for s in report["graph"]["stages"]}
    assert list(stages) == ["sign_detector", "hazard_cells", "sign_reader", "scene_describer"]
    assert stages["sign_detector"]["runs_on"] == {"detector": "cpu", "classifier": "cpu"}
    assert stages["sign_reader"]["networks"][1]["providers"] == ["CPUExecutionProvider"]
    assert not any(s["on_gpu"] for s in stages.values())


def test_the_text_names_device_runtime_and_threads_per_network(graph_url, capsys):
    assert main(["check-gpu", "--url", graph_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    classifier = next(line for line in lines if line.strip().startswith("classifier:"))
    assert "onnxruntime [CPUExecutionProvider]" in classifier and "on cpu" in classifier
    assert "fp32" in classifier and "threads 1" in classifier


def test_require_gpu_fails_when_a_stage_is_on_the_cpu(graph_url, capsys):
    code, report, _ = _run(capsys, "--url", graph_url, "--require-gpu")
    assert code == 1
    assert "sign_detector is not on a GPU (detector on cpu, classifier on cpu)" in report["require_gpu_failures"]


# -- the warning rules ------------------------------------------------------------------------------

def _gpu_stage(name: str, fraction: float | None = None, cap_gib: float | None = None, device: str = "cuda:0") -> dict:
    entry = _stage(name, _network(name, backend="torch", device=device, runtime_device=device), gpu_fraction=fraction)
    entry["gpu_memory_cap_bytes"] = None if cap_gib is None else int(cap_gib * GIB)
    return entry


def _device(index: int = 0, total_gib: float = 24) -> dict:
    return {"index": index, "name": "test GPU", "memory_total_bytes": int(total_gib * GIB)}


def test_gpu_shares_over_one_device_are_flagged():
    stages = [_gpu_stage("sign_detector", 0.4), _gpu_stage("hazard_cells", 0.4), _gpu_stage("scene_describer", 0.3)]
    [warning] = check_gpu.fraction_warnings(stages)
    assert "cuda:0" in warning and "1.10 > 1.0" in warning
    assert "sign_detector 0.4" in warning and "scene_describer 0.3" in warning


def test_gpu_shares_that_fill_one_device_exactly_are_fine():
    # 0.2 + 0.2 + 0.3 + 0.3 is 1.0000000000000002 in floating point: still one GPU's worth.
    stages = [_gpu_stage("a", 0.2), _gpu_stage("b", 0.2), _gpu_stage("c", 0.3), _gpu_stage("d", 0.3)]
    assert check_gpu.fraction_warnings(stages) == []


def test_gpu_shares_count_per_device():
    stages = [_gpu_stage("a", 0.6), _gpu_stage("b", 0.6, device="cuda:1")]
    assert check_gpu.fraction_warnings(stages) == []


def test_a_share_held_by_a_cpu_stage_still_counts():
    # Ray reserves the share wherever the tensors end up, so it takes room on the replica's GPU.
    stages = [_gpu_stage("a", 0.7), _stage("b", _network("b"), gpu_fraction=0.5)]
    [warning] = check_gpu.fraction_warnings(stages)
    assert "1.20" in warning and "b 0.5" in warning


def test_memory_caps_over_the_device_total_are_flagged():
    stages = [_gpu_stage("sign_detector", cap_gib=10), _gpu_stage("scene_describer", cap_gib=16)]
    [warning] = check_gpu.memory_cap_warnings(stages, [_device(total_gib=24)])
    assert "26.0 GiB" in warning and "24.0 GiB" in warning and "scene_describer 16.0 GiB" in warning
    assert check_gpu.memory_cap_warnings(stages, [_device(total_gib=32)]) == []


def test_memory_caps_are_not_judged_without_the_device():
    # A graph on another machine: this machine's devices say nothing about its GPUs.
    stages = [_gpu_stage("a", cap_gib=100)]
    assert check_gpu.memory_cap_warnings(stages, []) == []


def test_a_cpu_stage_beside_a_gpu_is_flagged():
    stages = [_gpu_stage("sign_detector"), _stage("hazard_cells", _network("hazard_cells"))]
    [warning] = check_gpu.cpu_beside_gpu_warnings(stages, host_has_gpu=True)
    assert warning == "hazard_cells runs on cpu although this machine has a GPU"


def test_cpu_stages_on_a_cpu_only_host_are_fine():
    assert check_gpu.cpu_beside_gpu_warnings(CPU_GRAPH, host_has_gpu=False) == []
    assert check_gpu.gpu_warnings(CPU_GRAPH, [], host_has_gpu=False) == []


def test_the_replica_s_own_gpu_counts_even_when_this_machine_has_none():
    seen = _stage("hazard_cells", _network("hazard_cells"), gpu_visible=True)
    shared = _stage("sign_reader", _network("det"), gpu_fraction=0.2)
    warnings = check_gpu.cpu_beside_gpu_warnings([seen, shared], host_has_gpu=False)
    assert warnings == ["hazard_cells runs on cpu although the replica sees a GPU",
                        "sign_reader/det runs on cpu although the replica holds a GPU share (0.2)"]


def test_a_runtime_that_fell_back_to_the_cpu_is_flagged():
    # ONNX Runtime without its CUDA provider runs on the CPU although the stage resolved cuda:0.
    stage = _stage("sign_detector", _network("detector", device="cuda:0", runtime_device="cuda:0"),
                   _network("classifier", device="cuda:0", runtime_device="cpu"))
    assert check_gpu.cpu_beside_gpu_warnings([stage], host_has_gpu=False) == [
        "sign_detector/classifier runs on cpu although it resolved cuda:0: the runtime fell back"]
    assert check_gpu.on_gpu(stage) is False


def test_a_stage_serving_no_model_runs_nowhere():
    stage = _stage("scene_describer", ready=False)
    assert check_gpu.runs_on(stage) == {} and check_gpu.on_gpu(stage) is False
    assert check_gpu.cpu_beside_gpu_warnings([stage], host_has_gpu=True) == []


def test_entries_without_the_new_fields_are_read_from_device():
    # A replica that predates runtime_device/networks still says where it resolved to run.
    old = {"name": "sign_reader", "deployment": "SignReader", "ready": True, "unavailable_reason": None,
           "gpu_fraction": None, "engine": "rapidocr", "backend": "onnxruntime", "device": "cpu"}
    assert check_gpu.runs_on(old) == {"sign_reader": "cpu"}
    assert check_gpu.stage_row(old)["networks"] == [] and check_gpu.stage_row(old)["threads"] is None


def test_only_a_local_url_makes_this_machine_s_gpus_the_graph_s():
    assert check_gpu.serves_this_machine("http://127.0.0.1:8000")
    assert check_gpu.serves_this_machine("http://localhost:8000/")
    assert not check_gpu.serves_this_machine("http://gpu-node-3:8000")
