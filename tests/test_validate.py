"""`festival-serve validate`: every local backend against torch fp32 on held-out scenes, and the verdict; the
comparisons it makes (`ops.parity`) and the environment it reports (`runtime.environment`).

The end-to-end tests run the real command on the shipped models (models/) with 2 scenes and batch sizes
1,2. They pass ``--validate-only`` so that a GPU machine with TensorRT never spends minutes building
engines here: a missing engine is then skipped, unless a stage is configured to need it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from festival_serve import cli
from festival_serve.ops import parity
from festival_serve.ops import up
from festival_serve.ops import validate
from festival_serve.pipeline.stages import STAGES
from festival_serve.pipeline.types import SignDetection
from festival_serve.pipeline.types import HazardCell, HazardLabel
from festival_serve.runtime import environment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config.yaml"
QUICK = ["--scenes", "2", "--batch-sizes", "1,2", "--repeats", "1", "--validate-only", "--json"]


def run_validate(capsys, *argv: str) -> tuple[int, dict, str]:
    code = cli.main(["validate", "--model-store", str(ROOT / "models"), *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), out + err


def test_validate_json_compares_torch_and_onnxruntime_on_every_model_and_exits_0(capsys):
    code, report, _ = run_validate(capsys, "--config", str(CONFIG), *QUICK)

    assert code == 0, report["failures"]
    assert report["passed"] and report["failures"] == []
    assert report["reference"] == "torch/cpu/fp32"
    for key in ("python", "torch", "torch_cuda_build", "cuda_available", "tensorrt", "onnxruntime",
                "onnxruntime_package", "onnxruntime_providers"):
        assert key in report["environment"]
    models = report["models"]
    for name in ("sign_detector", "sign_classifier", "hazard_cells"):
        model = models[name]
        assert {"torch/cpu/fp32", "onnxruntime/cpu/fp32"} <= set(model["backends"])
        ort = next(r for r in model["raw"] if r["backend"] == "onnxruntime/cpu/fp32")
        assert ort["passed"] and ort["max_abs_error"] is not None and ort["max_rel_error"] is not None
        assert {s["backend"] for s in model["speed"]} >= {"torch/cpu/fp32", "onnxruntime/cpu/fp32"}
        assert all(set(s["items_per_s"]) == {"1", "2"} for s in model["speed"])
    for stage in ("sign_detector", "hazard_cells", "sign_reader"):
        task = next(t for t in models[stage]["task"] if t["backend"] == "onnxruntime/cpu/fp32")
        assert task["passed"] and task["value"] >= task["threshold"]
    assert models["sign_classifier"]["task_level_in"] == "sign_detector"
    assert models["sign_reader"]["backends"][0] == "onnxruntime/cpu/fp32" and models["sign_reader"]["speed"]


def test_configured_tensorrt_without_an_engine_fails_validate_only_naming_engines_build(tmp_path, capsys):
    config = yaml.safe_load(CONFIG.read_text())
    config["applications"][0]["args"]["sign_detector"]["backend"] = "tensorrt"
    path = tmp_path / "trt.yaml"
    path.write_text(yaml.safe_dump(config))

    code, report, output = run_validate(capsys, "--config", str(path), *QUICK)

    assert code == 1
    assert not report["passed"]
    assert any("festival-serve engines build" in f and f.startswith("sign_detector") for f in report["failures"])
    assert "festival-serve engines build" in output


def gpu_run(*, validate_only: bool, **stage_backends: str) -> validate.Run:
    """A run as on a GPU node with TensorRT (no GPU needed: only the requirement check reads this)."""
    config = yaml.safe_load(CONFIG.read_text())
    for stage, backend in stage_backends.items():
        config["applications"][0]["args"][stage]["backend"] = backend
    args = up.pipeline_args(config, str(ROOT / "models"))
    env = {"cuda_available": True, "tensorrt": "10.13.0", "onnxruntime_providers": ["CPUExecutionProvider"]}
    return validate.Run(args, validate.Options(config=Path("gpu.yaml"), validate_only=validate_only), env)


def test_validate_only_fails_a_tensorrt_stage_whose_engine_is_not_built(monkeypatch):
    from festival_serve.runtime import tensorrt_engines

    monkeypatch.setattr(tensorrt_engines, "find_engine", lambda onnx, **_: None)
    problems = validate.requirement_failures(gpu_run(validate_only=True, hazard_cells="tensorrt"))
    assert [name for name, _ in problems] == ["hazard_cells"]
    assert "festival-serve engines build --config gpu.yaml" in problems[0][1]
    # Without --validate-only loading builds the engine, as `engines build` would: nothing is missing.
    assert validate.requirement_failures(gpu_run(validate_only=False, hazard_cells="tensorrt")) == []
    # A stage that does not ask for TensorRT needs no engine.
    assert validate.requirement_failures(gpu_run(validate_only=True)) == []


def test_a_missing_engine_of_an_unconfigured_candidate_is_skipped_not_failed():
    from festival_serve.runtime.tensorrt_engines import EngineMissing

    run = gpu_run(validate_only=True)
    run.model("hazard_cells", "hazard_cells")

    def load():
        raise EngineMissing("no engine; festival-serve engines build")

    assert run.load("hazard_cells", parity.Candidate("tensorrt", "cuda", "fp16"), load) is None
    assert run.failures == []
    assert run.models["hazard_cells"]["skipped"][0]["backend"] == "tensorrt/cuda/fp16"

    def broken():
        raise RuntimeError("cuDNN missing")

    assert run.load("hazard_cells", parity.Candidate("torch", "cuda", "fp16"), broken) is None
    assert run.failures == ["hazard_cells: torch/cuda/fp16 did not load: RuntimeError: cuDNN missing"]


def test_validate_only_and_force_rebuild_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.main(["validate", "--validate-only", "--force-rebuild"])


# -- raw parity -------------------------------------------------------------------------------------

def outputs(seed: int = 0) -> list[np.ndarray]:
    """Outputs shaped like the detector's: pixel boxes and [0, 1] scores in one tensor, plus a logit tensor."""
    rng = np.random.default_rng(seed)
    raw = np.concatenate([rng.uniform(0, 320, (2, 4, 50)), rng.uniform(0, 1, (2, 3, 50))], axis=1)
    return [raw.astype(np.float32), rng.normal(0, 5, (2, 10)).astype(np.float32)]


def test_parity_passes_identical_outputs_and_fp32_rounding_noise():
    reference = outputs()
    noisy = [r * (1 + 1e-6) for r in reference]
    result = parity.compare_outputs(reference, noisy, parity.TOLERANCES["fp32"])
    assert result["passed"]
    assert 0 < result["max_abs_error"] < 1e-3


def test_parity_fails_when_an_output_differs_beyond_tolerance():
    reference = outputs()
    broken = [r.copy() for r in reference]
    broken[1][0, 3] += 0.5  # one logit off by 0.5: far beyond fp32's 1e-3 relative
    result = parity.compare_outputs(reference, broken, parity.TOLERANCES["fp32"])
    assert not result["passed"]
    assert result["outputs"][0]["passed"] and not result["outputs"][1]["passed"]
    assert result["max_abs_error"] == pytest.approx(0.5, rel=1e-3)
    assert "output 1" in result["error"]


def test_half_precision_rounding_passes_fp16_tolerance_but_not_fp32():
    reference = outputs()
    halved = [r.astype(np.float16).astype(np.float32) for r in reference]
    assert parity.compare_outputs(reference, halved, parity.TOLERANCES["fp16"])["passed"]
    assert not parity.compare_outputs(reference, halved, parity.TOLERANCES["fp32"])["passed"]


def test_parity_fails_on_a_wrong_shape_a_missing_output_or_nan():
    reference = outputs()
    tolerance = parity.TOLERANCES["bf16"]
    assert not parity.compare_outputs(reference, [reference[0][:1], reference[1]], tolerance)["passed"]
    assert not parity.compare_outputs(reference, reference[:1], tolerance)["passed"]
    with_nan = [reference[0].copy(), reference[1]]
    with_nan[0][0, 0, 0] = np.nan
    result = parity.compare_outputs(reference, with_nan, tolerance)
    assert not result["passed"] and result["max_abs_error"] is None


# -- task-level parity ------------------------------------------------------------------------------

def sign(x: float, label: str = "stop") -> SignDetection:
    return SignDetection(box=(x, 10.0, x + 40.0, 50.0), label=label, class_id=0, score=0.9)


def test_sign_agreement_counts_missing_extra_and_relabelled_signs():
    reference = [[sign(0), sign(100)], [sign(200)]]
    assert parity.sign_agreement(reference, reference, "fp32")["passed"]

    dropped = parity.sign_agreement(reference, [[sign(0)], [sign(200)]], "fp32")
    assert dropped["value"] == pytest.approx(2 / 3, abs=1e-4) and not dropped["passed"]

    relabelled = parity.sign_agreement(reference, [[sign(0), sign(100, "children")], [sign(200)]], "fp16")
    assert relabelled["details"]["matched"] == 2 and not relabelled["passed"]

    extra = parity.sign_agreement(reference, [[sign(0), sign(100), sign(300)], [sign(200)]], "fp16")
    assert extra["details"]["candidate_matched"] == 0.75 and not extra["passed"]


def cells(*flags: tuple[int, str]) -> list[HazardCell]:
    return [HazardCell(cell, (0.0, 0.0, 1.0, 1.0), (HazardLabel(label, 0.9),)) for cell, label in flags]


def test_hazard_agreement_is_the_jaccard_index_of_flagged_cells():
    reference = [cells((1, "person"), (2, "car")), cells()]
    assert parity.hazard_agreement(reference, reference, "fp32")["value"] == 1.0
    assert parity.hazard_agreement([cells(), cells()], [cells(), cells()], "fp32")["passed"]  # nothing flagged
    moved = parity.hazard_agreement(reference, [cells((1, "person"), (3, "car")), cells()], "fp16")
    assert moved["value"] == pytest.approx(1 / 3, abs=1e-4) and not moved["passed"]


def test_every_kind_of_answer_the_stage_table_names_has_a_comparison():
    kinds = {stage.name: stage.agreement for stage in STAGES if stage.agreement}
    assert kinds == {"sign_detector": "detections", "hazard_cells": "cells"}
    assert set(kinds.values()) <= set(parity.AGREEMENTS)


def test_speed_rows_cover_every_batch_size_with_real_items():
    seen = []
    row = validate.speed_row("numpy/cpu/fp32", lambda batch: seen.append(len(batch)), np.zeros((3, 2)),
                             device="cpu", batch_sizes=(1, 5), repeats=2, unit="images")
    assert set(row["items_per_s"]) == {"1", "5"} and all(v > 0 for v in row["items_per_s"].values())
    assert seen == [1, 1, 1, 5, 5, 5]  # a warm-up, then the timed repeats


def test_candidates_are_every_backend_this_machine_offers():
    cpu_only = {"cuda_available": False, "onnxruntime_providers": ["CPUExecutionProvider"], "tensorrt": "10.13"}
    assert [c.label for c in parity.candidates(cpu_only)] == ["onnxruntime/cpu/fp32"]

    gpu = {"cuda_available": True, "onnxruntime_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
           "tensorrt": environment.NOT_INSTALLED}
    labels = [c.label for c in parity.candidates(gpu)]
    assert labels == ["onnxruntime/cpu/fp32", "torch/cuda/fp32", "torch/cuda/fp16", "torch/cuda/bf16",
                      "onnxruntime/cuda/fp32"]
    # fp32 on CUDA convolves in TF32 by default, and is judged as such.
    assert parity.Candidate("torch", "cuda", "fp32").numerics == "tf32"
    assert parity.REFERENCE.numerics == "fp32"


def test_package_versions_name_the_installed_packages_only_in_the_order_asked():
    versions = environment.package_versions(["pytest", "no-such-package-here", "numpy"])
    assert list(versions) == ["pytest", "numpy"] and versions["numpy"] == np.__version__
