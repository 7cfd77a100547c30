"""Start-up preflight: a stage that will run on CUDA must find the runtime it needs, before it loads anything.

Without it, a GPU node that lacks a runtime fails deep inside model loading (or, worse, runs on the
CPU). The preflight fails the replica at once with one message naming the stage, what is missing and
the command that installs it. Checks import only the runtime in question (never torch for an ONNX
Runtime stage).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from festival_serve.runtime.errors import BackendUnavailable

GPU_EXTRA = "uv sync --frozen --extra gpu"


@dataclass(frozen=True)
class Runtime:
    what: str  # in the error: what the stage needs
    ready: Callable[[], str | None]  # None when usable on CUDA, else what is wrong
    install: str  # the command that fixes it


def _torch_cuda() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU (driver too old or none?)"
    return None


def _onnxruntime_cuda() -> str | None:
    from festival_serve.runtime.backends.onnxruntime_backend import import_onnxruntime

    try:
        ort = import_onnxruntime()
    except BackendUnavailable as e:
        return str(e)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(available)})"
    return None


def _tensorrt() -> str | None:
    return None if importlib.util.find_spec("tensorrt") else "the tensorrt package is not installed"


def _paddle_cuda() -> str | None:
    if importlib.util.find_spec("paddle") is None:
        return "paddlepaddle-gpu is not installed"
    import paddle

    return None if paddle.device.is_compiled_with_cuda() else "paddlepaddle is a CPU-only build"


RUNTIMES: dict[str, tuple[Runtime, ...]] = {
    "torch": (Runtime("torch with CUDA", _torch_cuda, GPU_EXTRA),),
    "onnxruntime": (Runtime("ONNX Runtime's CUDA execution provider (onnxruntime-gpu)", _onnxruntime_cuda,
                            f"{GPU_EXTRA} (installs onnxruntime-gpu in place of the CPU onnxruntime)"),),
    "tensorrt": (Runtime("TensorRT", _tensorrt, f"{GPU_EXTRA} --extra tensorrt"),
                 Runtime("torch with CUDA", _torch_cuda, GPU_EXTRA)),
    "paddle": (Runtime("PaddlePaddle with CUDA", _paddle_cuda,
                       "uv sync --frozen --extra gpu --extra paddle, plus paddlepaddle-gpu 3.x from Paddle's index"),),
}


def require_runtime(stage: str, runtime: str, device: str) -> None:
    """Raise ``BackendUnavailable`` when ``stage`` will run ``runtime`` on a CUDA ``device`` that lacks it."""
    if not device.startswith("cuda"):
        return
    # "auto" on CUDA serves TensorRT engines only where TensorRT is present, else torch: torch is what it needs.
    for need in RUNTIMES["torch" if runtime == "auto" else runtime]:
        problem = need.ready()
        if problem is not None:
            raise BackendUnavailable(
                f"{stage} will run on {device} with {runtime}, but {need.what} is missing: {problem}. "
                f"Install it on this node: {need.install}"
            )
