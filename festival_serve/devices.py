"""Device, backend and precision resolution, with the GPU-only rule (no silent CPU fallback)."""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)


class GpuOnlyViolation(RuntimeError):
    """GPU-only mode is on and a model would run on the CPU."""


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether the CUDA driver sees a GPU (honouring CUDA_VISIBLE_DEVICES).

    Asks the driver library directly rather than ``torch.cuda``: importing torch costs a process
    ~400 MB of resident memory, and the ONNX Runtime replicas and the CLI need no torch at all."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def resolve_device(requested: str, *, gpu_only: bool, model: str) -> str:
    """``auto`` → ``cuda`` when there is a GPU, else ``cpu`` (logged). Explicit CUDA without a GPU fails."""
    has_cuda = cuda_available()
    if requested == "auto":
        device = "cuda" if has_cuda else "cpu"
        if device == "cpu" and not gpu_only:
            logger.info("%s: no CUDA device visible, running on the CPU", model)
    else:
        device = requested
    if device.startswith("cuda") and not has_cuda:
        raise GpuOnlyViolation(f"{model}: device {device!r} requested but CUDA is not available")
    if gpu_only and not device.startswith("cuda"):
        raise GpuOnlyViolation(f"{model}: gpu_only is set but the model would run on {device!r}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"{model}: unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_backend(requested: str, device: str) -> str:
    """``auto`` → PyTorch on CUDA (fp16 eager), ONNX Runtime on CPU."""
    if requested != "auto":
        return requested
    return "torch" if device.startswith("cuda") else "onnxruntime"


def resolve_fp16(requested: bool | None, device: str) -> bool:
    return device.startswith("cuda") if requested is None else requested
