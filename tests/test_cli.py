"""The `festival-serve` commands that need no running server, and the local profile of `up`."""

from pathlib import Path

import pytest

from festival_serve.ops import up
from festival_serve.cli import main
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import STAGE_NAMES
from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_local_profile_drops_gpus_and_makes_the_store_absolute(tmp_path):
    config = up.load_config(ROOT / "serve_config.yaml")
    profiled, changes = up.local_profile(config, host="127.0.0.1", port=8123, model_store=None,
                                            has_gpu=False, base_dir=tmp_path)
    app = profiled["applications"][0]
    assert profiled["http_options"] == {**config["http_options"], "host": "127.0.0.1", "port": 8123}
    assert app["args"]["model_store"] == str(tmp_path / "models")
    assert all((d.get("ray_actor_options") or {}).get("num_gpus", 0) == 0 for d in app["deployments"])
    assert any("num_gpus set to 0" in c for c in changes)
    # the original, for `serve deploy`, is untouched: the four models share one GPU
    gpus = [d["ray_actor_options"].get("num_gpus", 0) for d in config["applications"][0]["deployments"]]
    assert 0 < sum(gpus) <= 1 and all(0 < g < 1 for g in gpus[:4])


def test_local_profile_sizes_threads_and_replicas_to_the_cores(tmp_path):
    config = up.load_config(ROOT / "serve_config.yaml")
    profiled, changes = up.local_profile(config, host="127.0.0.1", port=8123, model_store=None,
                                            has_gpu=False, base_dir=tmp_path, cpus=2)
    app = profiled["applications"][0]
    assert {d["name"]: d["autoscaling_config"]["max_replicas"] for d in app["deployments"]} == dict.fromkeys(
        ["SignDetector", "HazardCells", "SignReader", "SceneDescriber", "PipelineIngress"], 1)
    assert [app["args"][s]["threads"] for s in STAGE_NAMES] == [1, 1, 1, 1]
    # Cores by need: the ONNX Runtime stages spread a batch over both cores; the describer has no such setting.
    assert {s: app["args"][s].get("batch_slices") for s in STAGE_NAMES} == {
        "sign_detector": 2, "hazard_cells": 2, "sign_reader": 2, "scene_describer": None}
    assert any("at most 1 replica" in c for c in changes)
    # Two requests in flight per stage: one running at the stage's one replica, the next queued behind it.
    assert app["args"]["ingress"]["stage_requests_in_flight"] == 2
    big, _ = up.local_profile(config, host="127.0.0.1", port=8123, model_store=None, has_gpu=False,
                                 base_dir=tmp_path, cpus=16)
    assert big["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] == 4
    assert [big["applications"][0]["args"][s]["threads"] for s in STAGE_NAMES] == [8, 8, 8, 8]
    assert big["applications"][0]["args"]["sign_reader"]["batch_slices"] == 2
    assert big["applications"][0]["args"]["ingress"]["stage_requests_in_flight"] == 8


def test_local_profile_keeps_gpus_when_there_is_one(tmp_path):
    config = up.load_config(ROOT / "serve_config.yaml")
    profiled, _ = up.local_profile(config, host="127.0.0.1", port=8000, model_store=str(tmp_path),
                                      has_gpu=True, base_dir=ROOT)
    assert profiled["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.2


def test_fake_gpu_profile_keeps_the_gpu_shares_and_runs_the_models_on_the_cpu(tmp_path):
    """``cluster local up``: Ray places replicas by the real fractions on nodes with fake GPUs; the maths is CPU."""
    config = up.load_config(ROOT / "serve_config.yaml")
    profiled, changes = up.local_profile(config, host="127.0.0.1", port=8000, model_store=None, has_gpu=False,
                                            base_dir=tmp_path, cpus=2, fake_gpus=True, max_replicas=2)
    app, original = profiled["applications"][0], config["applications"][0]
    assert [d["ray_actor_options"].get("num_gpus") for d in app["deployments"]] == [
        d["ray_actor_options"].get("num_gpus") for d in original["deployments"]]
    assert all(app["args"][stage]["device"] == "cpu" for stage in STAGE_NAMES)
    assert {d["autoscaling_config"]["max_replicas"] for d in app["deployments"]} == {2}
    assert any(c.startswith("FAKE GPUs") for c in changes) and not any("num_gpus set to 0" in c for c in changes)
    PipelineArgs.model_validate(app["args"])


@pytest.mark.parametrize("policy", ["graph", "queue-length"])
def test_the_local_cluster_compresses_autoscaling_and_keeps_or_drops_the_graph_policies(tmp_path, policy):
    from festival_serve.ops.local_cluster import COMPRESSED_UPSCALE_DELAY_S, LOCAL_TARGETS, cluster_config

    profile = {"host": "127.0.0.1", "port": 8000, "model_store": None, "base_dir": str(tmp_path), "max_replicas": 2,
               "autoscaling": policy}
    config, changes = cluster_config(up.load_config(ROOT / "serve_config.yaml"), profile, has_gpu=False)
    assert config["proxy_location"] == "HeadOnly"
    scaling = {d["name"]: d["autoscaling_config"] for d in config["applications"][0]["deployments"]}
    assert {s["upscale_delay_s"] for s in scaling.values()} == {COMPRESSED_UPSCALE_DELAY_S}
    policies = {name: s["policy"]["policy_kwargs"] for name, s in scaling.items() if "policy" in s}
    if policy == "queue-length":
        assert policies == {} and sum("queue-length policy" in c for c in changes) == 5
    else:
        assert policies["PipelineIngress"]["target_per_replica"] == LOCAL_TARGETS["arrivals_per_s"]
        assert policies["SignReader"]["target_per_replica"] == LOCAL_TARGETS["crops_in_flight"]
        assert policies["SceneDescriber"]["metric"] == "tokens_in_flight"  # serve_config's target, kept
        assert policies["SignDetector"] == policies["HazardCells"] == {"metric": "frames_in_flight",
                                                                         "target_per_replica": 8}
    with pytest.raises(ValueError, match="graph, queue-length"):
        cluster_config(up.load_config(ROOT / "serve_config.yaml"), {**profile, "autoscaling": "cpu"},
                       has_gpu=False)


def test_local_cluster_shape_refuses_nonsense():
    from festival_serve.ops.local_cluster import ClusterShape

    with pytest.raises(ValueError, match="worker"):
        ClusterShape(workers=0)
    with pytest.raises(ValueError, match="gpus-per-node"):
        ClusterShape(gpus_per_node=-1)


def test_serve_config_args_validate_as_pipeline_args():
    args = up.load_config(ROOT / "serve_config.yaml")["applications"][0]["args"]
    PipelineArgs.model_validate(args)


def test_unknown_setting_is_rejected():
    with pytest.raises(ValueError, match="backnd"):
        PipelineArgs.model_validate({"sign_detector": {"backnd": "torch"}})


def test_gpu_only_refuses_cpu_device():
    with pytest.raises(ValueError, match="gpu_only"):
        PipelineArgs.model_validate({"gpu_only": True, "hazard_cells": {"device": "cpu"}})


def test_models_status_lists_every_model(tmp_path, capsys, yolic_layout):
    build_yolic_checkpoint(tmp_path / "hazard_cells" / "yolic_m2.pth.tar", yolic_layout)
    assert main(["models", "status", "--config", str(ROOT / "serve_config.yaml"), "--model-store", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "MISSING" in lines["sign_detector"] and "present" in lines["hazard_cells"]
    assert "MISSING" in lines["sign_classifier"]
    # The served reader's recognizer is trained here and lives in the store (PP-OCRv6's det is in the wheel).
    assert "MISSING" in lines["sign_reader"] and "MISSING" in lines["scene_describer"]


def test_engines_build_without_gpu_says_why(tmp_path, capsys, yolic_layout):
    from festival_serve.training.standins.sign_detector import build_yolo_checkpoint

    build_yolo_checkpoint(tmp_path / "sign_detector" / "signs.pt", ["stop"])
    code = main(["engines", "build", "--config", str(ROOT / "serve_config.yaml"), "--model-store", str(tmp_path)])
    assert code == 2 and "CUDA" in capsys.readouterr().err


def test_demo_without_server_fails_clearly(capsys):
    assert main(["demo", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "festival-serve up" in capsys.readouterr().err
