"""What a GPU node needs, checked on a CPU machine: the preflight that names a missing runtime, the fp16
graphs TensorRT 11 and ONNX Runtime run (on the three real networks), GPU-only refusals, memory caps,
how ``backend: auto`` chooses, and the stage table being the only list of stages."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from festival_serve.runtime import devices
from festival_serve.runtime import gpu_share
from festival_serve.ops import up
from festival_serve.runtime.backends import Placement, choose_backend, create_backend
from festival_serve.runtime.backends.onnxruntime_backend import check_providers
from festival_serve.runtime.devices import check_tensors
from festival_serve.runtime.errors import BackendUnavailable, GpuOnlyViolation
from festival_serve.runtime.onnx_fp16 import fp16_onnx, graph_has_fp16
from festival_serve.models.sign_detector.classifier import preprocess_crops, square_crop
from festival_serve.models.sign_detector.detector import letterbox_batch
from festival_serve.pipeline.stages import NETWORKS, STAGE_NAMES, STAGES, stage
from festival_serve.world.synth import generate_scene
from festival_serve.models.hazard_cells.yolic import preprocess_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_args():
    """serve_config.yaml's settings over the shipped model store (the real trained networks)."""
    return up.pipeline_args(up.load_config(ROOT / "serve_config.yaml"), str(ROOT / "models"))


@pytest.fixture(scope="module")
def real_inputs(shipped_args) -> dict[str, np.ndarray]:
    """Each network's input, preprocessed from held-out synthetic scenes as serving does."""
    scenes = [generate_scene(seed) for seed in (10000001, 10000002, 10000003)]
    images = [scene.image for scene in scenes]
    crops = [square_crop(scene.image, tuple(sign.box), shipped_args.sign_detector.classifier_context)
             for scene in scenes for sign in scene.signs]
    assert crops, "the held-out scenes should hold signs"
    return {
        "sign_detector": letterbox_batch(images, shipped_args.sign_detector.image_size)[0],
        "sign_detector_streams": letterbox_batch(images, shipped_args.sign_detector.stream_image_size)[0],
        "sign_classifier": preprocess_crops(crops, shipped_args.sign_detector.classifier_image_size),
        "hazard_cells": preprocess_batch(images),
    }


# -- fp16 graphs: what TensorRT 11 builds from and ONNX Runtime runs for fp16 ----------------------

#: Largest |fp16 - fp32| accepted per network output, in the output's own units (measured on these
#: scenes: detector 0.28 px on coordinates up to ~500 px and scores within 0.01; classifier
#: probabilities within 1e-5; YOLIC logits within 0.02 of values up to ~43).
FP16_TOLERANCE = {"sign_detector": 1.0, "sign_detector_streams": 1.0, "sign_classifier": 0.01, "hazard_cells": 0.1}


@pytest.mark.parametrize("name", [n.name for n in NETWORKS])
def test_fp16_copy_of_each_real_network_loads_and_matches_fp32(name, shipped_args, real_inputs, tmp_path):
    network = next(n for n in NETWORKS if n.name == name)
    fp32 = network.source(shipped_args).onnx_file()
    fp16, tool = fp16_onnx(fp32, tmp_path)
    assert graph_has_fp16(fp16) and not graph_has_fp16(fp32), tool
    x = real_inputs[name]
    want = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    got = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape  # inputs and outputs stay float32
        assert np.abs(g - w).max() <= FP16_TOLERANCE[name]
    if name.startswith("sign_detector"):  # class scores (rows 4:) must agree closely, not only within the box tolerance
        assert np.abs(got[0][:, 4:] - want[0][:, 4:]).max() <= 0.01


def test_onnxruntime_honours_fp16_instead_of_refusing_it(shipped_args, real_inputs):
    source = next(n for n in NETWORKS if n.name == "hazard_cells").source(shipped_args)
    half = create_backend("onnxruntime", source, device="cpu", fp16=True)
    full = create_backend("onnxruntime", source, device="cpu", fp16=False)
    assert half.model_info()["precision"] == "fp16" and half.session._model_path.endswith(".fp16.onnx")
    x = real_inputs["hazard_cells"]
    np.testing.assert_allclose(half.forward(x)[0], full.forward(x)[0], atol=FP16_TOLERANCE["hazard_cells"])


# -- preflight: a CUDA device visible, the runtime missing ------------------------------------------


@pytest.fixture
def cuda_visible(monkeypatch):
    """Make the device resolver see a GPU, as on a GPU node; the runtimes stay what this machine has."""
    monkeypatch.setattr(devices, "cuda_available", lambda: True)


def test_preflight_names_the_stage_the_missing_provider_and_the_install_command(cuda_visible, shipped_args):
    reader = stage("sign_reader")
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # the CPU wheel, as before the gpu extra
    with pytest.raises(BackendUnavailable) as raised:
        reader.load(reader.settings(shipped_args), model_store=shipped_args.model_store)  # the real loader path
    message = str(raised.value)
    assert message.startswith("sign_reader will run on cuda with onnxruntime")
    assert "CUDA execution provider (onnxruntime-gpu)" in message and "uv sync --frozen --extra gpu" in message


def test_preflight_for_tensorrt_names_tensorrt_and_its_extra(cuda_visible, shipped_args):
    detector = stage("sign_detector")
    settings = detector.settings(shipped_args).model_copy(update={"backend": "tensorrt"})
    with pytest.raises(BackendUnavailable, match=r"sign_detector .* TensorRT is missing.*--extra tensorrt"):
        detector.load(settings, model_store=shipped_args.model_store)


def test_preflight_for_torch_stages_says_torch_sees_no_gpu(cuda_visible, shipped_args):
    describer = stage("scene_describer")
    with pytest.raises(BackendUnavailable, match=r"scene_describer will run on cuda with torch.*sees no usable GPU"):
        describer.preflight(describer.settings(shipped_args))


def test_preflight_passes_on_the_cpu(shipped_args):
    for row in STAGES:
        assert row.preflight(row.settings(shipped_args)) == "cpu"


# -- GPU-only at run time: refusals, exercised with real CPU sessions and tensors -------------------


def test_a_session_whose_providers_are_not_cuda_is_refused(shipped_args):
    source = next(n for n in NETWORKS if n.name == "sign_classifier").source(shipped_args)
    session = ort.InferenceSession(str(source.onnx_file()), providers=["CPUExecutionProvider"])
    with pytest.raises(GpuOnlyViolation, match=r"classifier: asked for cuda:0 .* runs on \['CPUExecutionProvider'\]"):
        check_providers("classifier", "cuda:0", session.get_providers(), gpu_only=True)
    with pytest.raises(BackendUnavailable, match="wanted CUDAExecutionProvider first"):
        check_providers("classifier", "cuda:0", session.get_providers(), gpu_only=False)
    check_providers("classifier", "cpu", session.get_providers(), gpu_only=True)  # asked for the CPU: fine


def test_tensors_off_the_device_or_in_the_wrong_dtype_name_themselves(shipped_args):
    module = next(n for n in NETWORKS if n.name == "hazard_cells").source(shipped_args).torch_module()
    with pytest.raises(GpuOnlyViolation, match=r"yolic after loading: tensor 'features.0.0.weight' is on cpu, not cuda"):
        check_tensors(module.named_parameters(), device="cuda", where="yolic after loading")
    with pytest.raises(GpuOnlyViolation, match=r"tensor 'features.0.0.weight' is torch.float32, not torch.float16"):
        check_tensors(module.named_parameters(), device="cpu", dtype=torch.float16, where="yolic")
    check_tensors(module.named_parameters(), device="cpu", dtype=torch.float32, where="yolic")


def test_torch_backend_checks_its_first_outputs_in_gpu_only_mode(shipped_args, real_inputs):
    source = next(n for n in NETWORKS if n.name == "hazard_cells").source(shipped_args)
    backend = create_backend("torch", source, device="cpu", placement=Placement(gpu_only=True))
    assert backend._check_outputs  # armed for the warm-up batch
    backend.forward(real_inputs["hazard_cells"][:1])
    assert not backend._check_outputs  # checked once, then out of the way of every later batch


# -- GPU shares ------------------------------------------------------------------------------------


def test_memory_cap_is_the_replicas_fraction_of_the_device():
    assert gpu_share.memory_cap_bytes(0.2, 80 << 30) == int(0.2 * (80 << 30))
    assert gpu_share.memory_cap_bytes(None, 80 << 30) is None  # no share: nothing to cap
    assert gpu_share.memory_cap_bytes(1.0, 80 << 30) is None  # whole devices: the device is the cap
    with pytest.raises(ValueError):
        gpu_share.memory_cap_bytes(0.0, 80 << 30)


def test_without_a_driver_runtimes_get_no_cap_and_the_default_workspace():
    assert gpu_share.device_total_bytes(0) is None
    assert gpu_share.ort_cuda_options("cuda:1", 0.2) == {"device_id": 1}
    assert gpu_share.trt_workspace_bytes("cuda", 0.2) == gpu_share.DEFAULT_TRT_WORKSPACE_BYTES


# -- backend: auto -----------------------------------------------------------------------------------


def test_auto_is_onnxruntime_on_cpu_and_torch_on_cuda_without_tensorrt(shipped_args):
    source = next(n for n in NETWORKS if n.name == "hazard_cells").source(shipped_args)
    assert choose_backend("auto", source, device="cpu", fp16=False) == ("onnxruntime", "auto on CPU: onnxruntime")
    name, why = choose_backend("auto", source, device="cuda", fp16=True)
    assert name == "torch" and why.startswith("auto on CUDA: torch (")  # says why no TensorRT engine
    assert choose_backend("torch", source, device="cpu", fp16=False) == ("torch", "")


# -- the stage table is the only list of stages ----------------------------------------------------


def _literal_stage_lists(path: Path) -> list[int]:
    """Lines of collection literals (tuple, list, set, dict keys) naming two or more stages."""
    names, lines = set(STAGE_NAMES), []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items:
            named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
            if len(named) >= 2:
                lines.append(node.lineno)
    return lines


def test_no_module_but_the_stage_table_lists_the_stages():
    sources = [p for folder in ("festival_serve", "deployments", "graphs") for p in (ROOT / folder).rglob("*.py")]
    offenders = {str(p.relative_to(ROOT)): lines for p in sources
                 if p.name != "stages.py" and (lines := _literal_stage_lists(p))}
    assert offenders == {}, "list stages through festival_serve.pipeline.stages, not by hand"
    assert STAGE_NAMES == ("sign_detector", "hazard_cells", "sign_reader", "scene_describer")
