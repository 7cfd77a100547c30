"""The backends by name, and the one place that picks and builds one for a network.

Its own module so the protocol (``base``) never imports its implementations: each backend module imports
``base``, and this module imports them all.
"""

from __future__ import annotations

import logging

from festival_serve.runtime.backends.base import DEFAULT_PLACEMENT, Backend, NetworkSource, Placement
from festival_serve.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from festival_serve.runtime.backends.tensorrt_backend import TensorRTBackend
from festival_serve.runtime.backends.torch_backend import TorchBackend
from festival_serve.runtime.errors import BackendUnavailable

logger = logging.getLogger(__name__)

#: Every runtime's backend by its settings name (``backend:`` in serve_config.yaml).
BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (OnnxRuntimeBackend, TensorRTBackend, TorchBackend)}


def choose_backend(requested: str, source: NetworkSource, *, device: str, fp16: bool) -> tuple[str, str]:
    """``(backend name, why)``. ``auto``: ONNX Runtime on the CPU; on CUDA, TensorRT where its engine for
    this GPU was built ahead of time and TensorRT is installed, else torch."""
    if requested != "auto":
        return requested, ""
    if not device.startswith("cuda"):
        return "onnxruntime", "auto on CPU: onnxruntime"
    from festival_serve.runtime import tensorrt_engines

    try:
        tensorrt_engines.gpu_facts(device)  # TensorRT importable and CUDA present, before any ONNX export
    except BackendUnavailable as e:
        return "torch", f"auto on CUDA: torch ({e})"
    engine = tensorrt_engines.find_engine(source.onnx_file(), fp16=fp16, device=device)
    if engine is None:
        return "torch", f"auto on CUDA: torch (no TensorRT engine built for this GPU; `{tensorrt_engines.BUILD_COMMAND}`)"
    return "tensorrt", f"auto on CUDA: tensorrt (engine {engine.name})"


def create_backend(
    kind: str, source: NetworkSource, *, device: str, fp16: bool = False, threads: int | None = None,
    placement: Placement = DEFAULT_PLACEMENT,
) -> Backend:
    """Build the backend called ``kind`` (or the one ``auto`` picks); an unknown name lists the known ones."""
    if kind != "auto" and kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; supported backends: auto, {', '.join(sorted(BACKENDS))}")
    kind, why = choose_backend(kind, source, device=device, fp16=fp16)
    backend = BACKENDS[kind].from_source(source, device=device, fp16=fp16, threads=threads, placement=placement)
    backend.chosen_because = why
    logger.info("%s: %s backend on %s (%s)%s", source.name, kind, backend.runtime_device(), backend.precision,
                f"; {why}" if why else "")
    return backend
