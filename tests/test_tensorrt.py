"""The TensorRT backend and engine cache: what holds on any machine, and parity with ONNX Runtime on a GPU.

TensorRT cannot be installed on CPU machines (its libraries come from NVIDIA's index), so the build
flow is checked here against a stand-in ``tensorrt`` module that records the documented API calls, in
its TensorRT 10 shape (``BuilderFlag.FP16``) and its TensorRT 11 shape (no precision flags, strongly
typed). The tests at the bottom build real engines and run only where TensorRT and CUDA both exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from festival_serve.runtime import tensorrt_engines
from festival_serve.runtime.backends import BACKENDS, BackendUnavailable, create_backend
from festival_serve.runtime.tensorrt_engines import EngineBuildError, engine_cache_key, engine_path, require_tensorrt
from festival_serve.runtime.onnx_fp16 import graph_has_fp16

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_gpu_trt = pytest.mark.skipif(
    not (HAS_TRT and HAS_CUDA), reason="needs TensorRT and a CUDA GPU (pip install 'festival-serve[tensorrt]')"
)

IMAGE = (3, 32, 32)  # (C, H, W) of the tiny network's input


class TinyConvSource:
    """A small conv net as a ``NetworkSource``: two outputs, like a detector's (boxes, scores)."""

    name = "tiny-conv"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.exports = 0

    def torch_module(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return _TwoHeads().eval()

    def onnx_file(self) -> Path:
        path = self.folder / "tiny_conv.onnx"
        if not path.exists():
            self.exports += 1
            _export(self.torch_module(), path)
        return path


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
        )
        self.boxes = torch.nn.Conv2d(16, 4, 1)
        self.scores = torch.nn.Linear(16, 5)

    def forward(self, x):
        f = self.body(x)
        return self.boxes(f).flatten(2), torch.sigmoid(self.scores(f.mean((2, 3))))


def _export(module: torch.nn.Module, path: Path) -> None:
    # torch >= 2.9 defaults to the dynamo exporter, which needs onnxscript (not installed); the
    # TorchScript exporter still works and is what a dynamic batch axis needs here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, torch.zeros(1, *IMAGE), str(path), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["boxes", "scores"],
            dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
        )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> TinyConvSource:
    src = TinyConvSource(tmp_path_factory.mktemp("tiny"))
    src.onnx_file()
    return src


@pytest.fixture
def onnx_copy(source, tmp_path) -> Path:
    """The tiny ONNX in a fresh folder, so engines and fp16 copies land in a clean cache."""
    path = tmp_path / "tiny_conv.onnx"
    path.write_bytes(source.onnx_file().read_bytes())
    return path


FACTS = dict(
    fp16=True, max_batch=32, gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), trt_version="10.13.3.9"
)


# --------------------------------------------------------------------------------------------------
# Cache keys and file names


def test_cache_key_is_stable_for_the_same_facts(onnx_copy):
    assert engine_cache_key(onnx_copy, **FACTS) == engine_cache_key(onnx_copy, **dict(FACTS))
    assert engine_path(onnx_copy, Path("/c"), **FACTS) == engine_path(onnx_copy, Path("/c"), **FACTS)
    # "9.0", (9, 0) and "90" name the same compute capability.
    assert engine_cache_key(onnx_copy, **{**FACTS, "compute_capability": "9.0"}) == engine_cache_key(onnx_copy, **FACTS)


@pytest.mark.parametrize(
    "change",
    [
        {"gpu_name": "NVIDIA L4"},
        {"compute_capability": (8, 9)},
        {"trt_version": "11.0.0.1"},
        {"fp16": False},
        {"max_batch": 16},
        {"opt_batch": 4},
    ],
    ids=lambda c: next(iter(c)),
)
def test_cache_key_and_path_change_with_each_fact(onnx_copy, change):
    changed = {**FACTS, **change}
    assert engine_cache_key(onnx_copy, **changed) != engine_cache_key(onnx_copy, **FACTS)
    assert engine_path(onnx_copy, Path("/c"), **changed) != engine_path(onnx_copy, Path("/c"), **FACTS)


def test_cache_key_changes_with_the_onnx_bytes(onnx_copy, tmp_path):
    before = engine_path(onnx_copy, tmp_path, **FACTS)
    model = onnx.load(str(onnx_copy))
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save(model, str(onnx_copy))
    assert engine_path(onnx_copy, tmp_path, **FACTS) != before


def test_engine_file_name_spells_out_gpu_tensorrt_precision_and_batch(onnx_copy, tmp_path):
    path = engine_path(onnx_copy, tmp_path, **FACTS)
    assert path.parent == tmp_path
    pattern = r"tiny_conv\.nvidia-h100-80gb-hbm3-sm90\.trt10\.13\.3\.9\.fp16\.b32\.[0-9a-f]{12}\.engine"
    assert re.fullmatch(pattern, path.name)
    assert ".fp32." in engine_path(onnx_copy, tmp_path, **{**FACTS, "fp16": False}).name


# --------------------------------------------------------------------------------------------------
# Registration, and refusing to run without CUDA / TensorRT


def test_backend_is_registered_as_tensorrt():
    from festival_serve.runtime.backends.tensorrt_backend import TensorRTBackend

    assert BACKENDS["tensorrt"] is TensorRTBackend


def test_require_tensorrt_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    expected = r"TensorRT is not installed: pip install 'festival-serve\[tensorrt\]'"
    with pytest.raises(BackendUnavailable, match=expected):
        require_tensorrt()


def test_cpu_device_is_refused_without_touching_the_network(source):
    exports = source.exports
    with pytest.raises(BackendUnavailable, match="only on CUDA"):
        create_backend("tensorrt", source, device="cpu")
    assert source.exports == exports


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal")
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(source, monkeypatch):
    monkeypatch.setattr(source, "onnx_file", lambda: pytest.fail("exported before the CUDA check"))
    with pytest.raises(BackendUnavailable, match="CUDA is not available"):
        create_backend("tensorrt", source, device="cuda", fp16=True)


# --------------------------------------------------------------------------------------------------
# The build flow, against a stand-in for the documented TensorRT Python API


class FakeTensorRT(types.ModuleType):
    """Records the builder calls ``build_engine`` makes; shaped like TensorRT 10 or 11."""

    def __init__(self, version: str, *, parse_errors: list[str] | None = None) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: dict[str, object] = {"builds": 0}
        fake = self
        flags = ["TF32", "FP16"] if version.startswith("10.") else ["TF32"]  # 11.x removed FP16
        self.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})

        class Network:
            def __init__(self, flags):
                fake.calls["network_flags"] = flags
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.errors = network, list(parse_errors or [])

            def parse_from_file(self, path):
                fake.calls["parsed"] = Path(path)
                graph = onnx.load(path).graph
                for v in graph.input:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                    self.network.inputs.append(types.SimpleNamespace(name=v.name, shape=dims))
                return not self.errors

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def __init__(self):
                self.flags, self.profiles = [], []
                self.timing_cache = None

            def create_timing_cache(self, data):
                fake.calls.setdefault("timing_cache_in", []).append(bytes(data))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = (pool, size)

            def set_flag(self, flag):
                self.flags.append(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Profile(dict):
            def set_shape(self, name, min, opt, max):
                self[name] = (tuple(min), tuple(opt), tuple(max))

        class Builder:
            def __init__(self, logger):
                pass

            create_network = staticmethod(Network)
            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                fake.calls["builds"] += 1
                fake.calls["flags"] = config.flags
                fake.calls["profiles"] = config.profiles
                return b"PLAN"

        self.Builder = Builder
        self.OnnxParser = OnnxParser


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version: str, **kwargs) -> FakeTensorRT:
        trt = FakeTensorRT(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(tensorrt_engines, "_TRT_LOGGER", None)
        monkeypatch.setattr(
            tensorrt_engines, "gpu_facts",
            lambda device="cuda": {"gpu_name": "NVIDIA L4", "compute_capability": "89", "trt_version": version},
        )
        return trt

    return install


def test_trt10_fp16_uses_the_builder_flag_and_one_batch_profile(fake_trt, onnx_copy):
    trt = fake_trt("10.13.3.9")
    messages: list[str] = []
    path = tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=16, progress=messages.append)

    assert path.parent == onnx_copy.parent and path.read_bytes() == b"PLAN"
    assert trt.calls["network_flags"] == 0  # weakly typed: the flag picks fp16 kernels
    assert trt.calls["flags"] == ["FP16"]
    assert trt.calls["parsed"] == onnx_copy
    assert trt.calls["workspace"] == ("WORKSPACE", 2 << 30)
    [profile] = trt.calls["profiles"]
    assert profile == {"images": ((1, *IMAGE), (8, *IMAGE), (16, *IMAGE))}
    sidecar = json.loads(tensorrt_engines.sidecar_path(path).read_text())
    assert sidecar["fp16_via"] == "BuilderFlag.FP16" and sidecar["trt_version"] == "10.13.3.9"
    assert sidecar["batch"] == {"min": 1, "opt": 8, "max": 16}
    assert any("building fp16 engine" in m for m in messages)

    # A second build finds the engine in the cache and builds nothing.
    assert tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=16) == path
    assert trt.calls["builds"] == 1


def test_trt11_fp16_builds_a_strongly_typed_network_from_an_fp16_graph(fake_trt, onnx_copy):
    trt = fake_trt("11.0.0.1")
    path = tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=8, opt_batch=4)

    assert trt.calls["network_flags"] == 1 << 0  # STRONGLY_TYPED
    assert trt.calls["flags"] == []  # no precision flags exist in 11.x
    converted = trt.calls["parsed"]
    assert converted != onnx_copy and converted.name.endswith(".fp16.onnx")
    assert graph_has_fp16(converted) and not graph_has_fp16(onnx_copy)
    assert "fp16 ONNX graph" in json.loads(tensorrt_engines.sidecar_path(path).read_text())["fp16_via"]

    # The converted graph keeps fp32 inputs/outputs and computes what the fp32 graph does.
    import onnxruntime as ort

    x = np.random.default_rng(0).random((3, *IMAGE), dtype=np.float32)
    ref = ort.InferenceSession(str(onnx_copy)).run(None, {"images": x})
    half = ort.InferenceSession(str(converted)).run(None, {"images": x})
    for r, h in zip(ref, half):
        assert h.dtype == np.float32
        np.testing.assert_allclose(h, r, rtol=1e-2, atol=1e-2)


def test_builds_share_a_timing_cache_per_gpu_and_tensorrt_version(fake_trt, onnx_copy):
    trt = fake_trt("10.13.3.9")
    tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=4)
    [cache_file] = onnx_copy.parent.glob("timing.*.cache")
    assert cache_file.name == "timing.nvidia-l4-sm89.trt10.13.3.9.cache"
    assert cache_file.read_bytes() == b"+timings"  # what the builder serialized after the first build
    tensorrt_engines.build_engine(onnx_copy, fp16=False, max_batch=4)  # another engine on the same GPU
    assert trt.calls["timing_cache_in"] == [b"", b"+timings"]  # the second build starts from the first's timings


def test_replicas_find_engines_built_ahead_of_time_and_refuse_to_guess(fake_trt, onnx_copy, tmp_path):
    fake_trt("10.13.3.9")
    assert tensorrt_engines.find_engine(onnx_copy, fp16=True) is None
    built = tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=16)
    assert tensorrt_engines.find_engine(onnx_copy, fp16=True) == built
    assert tensorrt_engines.find_engine(onnx_copy, fp16=False) is None  # another precision is another engine
    # Other bytes under the same name (new weights, same file name) do not match the old engine.
    other = tmp_path / "other" / onnx_copy.name
    other.parent.mkdir()
    other.write_bytes(onnx_copy.read_bytes() + b"\0")
    for f in onnx_copy.parent.glob("*.engine*"):
        (other.parent / f.name).write_bytes(f.read_bytes())
    assert tensorrt_engines.find_engine(other, fp16=True) is None


def test_a_missing_engine_names_the_build_command(fake_trt, onnx_copy):
    fake_trt("10.13.3.9")
    error = tensorrt_engines.missing_engine_error("yolo:signs.pt", onnx_copy, fp16=True)
    assert isinstance(error, BackendUnavailable)
    assert "festival-serve engines build" in str(error) and "NVIDIA L4" in str(error) and "fp16" in str(error)


def test_force_rebuild_replaces_the_cached_engine(fake_trt, onnx_copy):
    trt = fake_trt("10.13.3.9")
    first = tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=4)
    assert tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=4, rebuild=True) == first
    assert trt.calls["builds"] == 2


def test_trt11_fp32_parses_the_onnx_as_is(fake_trt, onnx_copy):
    trt = fake_trt("11.0.0.1")
    tensorrt_engines.build_engine(onnx_copy, fp16=False, max_batch=4)
    assert trt.calls["parsed"] == onnx_copy and trt.calls["flags"] == []


def test_trt11_fp16_without_a_converter_says_what_to_install(fake_trt, onnx_copy, monkeypatch):
    fake_trt("11.0.0.1")
    for blocked in ("modelopt", "modelopt.onnx.autocast", "onnxconverter_common",
                    "onnxruntime.transformers", "onnxruntime.transformers.float16"):
        monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(BackendUnavailable, match="nvidia-modelopt"):
        tensorrt_engines.build_engine(onnx_copy, fp16=True, max_batch=4)


def test_parser_errors_are_listed(fake_trt, onnx_copy):
    fake_trt("10.13.3.9", parse_errors=["node Conv_0: bad weights", "node Foo_1: unsupported op"])
    with pytest.raises(EngineBuildError, match="(?s)rejected.*- node Conv_0: bad weights\n  - node Foo_1"):
        tensorrt_engines.build_engine(onnx_copy, fp16=False, max_batch=4)
    assert not list(onnx_copy.parent.glob("*.engine"))


def test_only_the_batch_axis_may_be_dynamic(fake_trt, onnx_copy):
    fake_trt("10.13.3.9")
    model = onnx.load(str(onnx_copy))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(model, str(onnx_copy))
    with pytest.raises(EngineBuildError, match="only the batch axis may be dynamic"):
        tensorrt_engines.build_engine(onnx_copy, fp16=False, max_batch=4)


def test_batch_limits_are_checked(fake_trt, onnx_copy):
    fake_trt("10.13.3.9")
    with pytest.raises(ValueError, match="opt_batch"):
        tensorrt_engines.build_engine(onnx_copy, fp16=False, max_batch=4, opt_batch=8)


# --------------------------------------------------------------------------------------------------
# Real TensorRT on a GPU


@pytest.fixture
def gpu_source(source, tmp_path) -> TinyConvSource:
    src = TinyConvSource(tmp_path)
    (tmp_path / "tiny_conv.onnx").write_bytes(source.onnx_file().read_bytes())
    return src


def _onnxruntime_outputs(source: TinyConvSource, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(source.onnx_file()), providers=["CPUExecutionProvider"]).run(None, {"images": x})


@needs_gpu_trt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_engine_matches_onnxruntime(gpu_source, fp16):
    backend = create_backend("tensorrt", gpu_source, device="cuda", fp16=fp16)
    x = np.random.default_rng(1).random((5, *IMAGE), dtype=np.float32)
    got, want = backend.forward(x), _onnxruntime_outputs(gpu_source, x)
    tol = 2e-2 if fp16 else 2e-3  # fp32 engines may use TF32 kernels
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@needs_gpu_trt
def test_batches_beyond_the_profile_run_in_chunks(gpu_source):
    from festival_serve.runtime.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend.from_source(gpu_source, device="cuda", fp16=False, max_batch=4)
    assert backend.batch_limit == 4
    x = np.random.default_rng(2).random((10, *IMAGE), dtype=np.float32)
    x.flags.writeable = False  # as Ray Serve hands them over
    for g, w in zip(backend.forward(x), _onnxruntime_outputs(gpu_source, x)):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-3)
    assert [o.shape[0] for o in backend.forward(x[:0])] == [0, 0]


@needs_gpu_trt
def test_second_load_reuses_the_cached_engine(gpu_source):
    first = create_backend("tensorrt", gpu_source, device="cuda", fp16=True)
    built = first.engine_file.stat().st_mtime_ns
    second = create_backend("tensorrt", gpu_source, device="cuda", fp16=True)
    assert second.engine_file == first.engine_file and second.engine_file.stat().st_mtime_ns == built
    assert tensorrt_engines.sidecar_path(first.engine_file).exists()
