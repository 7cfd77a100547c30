"""Device and precision resolution, with the GPU-only rule (no silent CPU fallback); ``auto`` backends are
resolved by ``festival_serve.runtime.backends.choose_backend``."""

from __future__ import annotations

import ctypes
import functools
import logging

from festival_serve.runtime.errors import GpuOnlyViolation

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cuda_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, or None where there is none (no NVIDIA driver)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether the CUDA driver sees a GPU (honouring CUDA_VISIBLE_DEVICES).

    Asks the driver library directly rather than ``torch.cuda``: importing torch costs a process
    ~400 MB of resident memory, and the ONNX Runtime replicas and the CLI need no torch at all."""
    driver = cuda_driver()
    if driver is None:
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


def resolve_fp16(requested: bool | None, device: str) -> bool:
    return device.startswith("cuda") if requested is None else requested


def check_tensors(tensors, *, device: str, dtype=None, where: str) -> None:
    """GPU-only at run time: every ``(name, tensor)`` must sit on ``device``'s type (and be ``dtype`` when
    given), else ``GpuOnlyViolation`` naming the first tensor that is not and ``where`` it was found."""
    want = device.split(":")[0]
    for name, tensor in tensors:
        if tensor.device.type != want:
            raise GpuOnlyViolation(f"{where}: tensor {name!r} is on {tensor.device}, not {device} (gpu_only is set)")
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            raise GpuOnlyViolation(f"{where}: tensor {name!r} is {tensor.dtype}, not {dtype} (gpu_only is set)")


def warn_cpu_beside_gpu(model: str, device: str) -> bool:
    """Log (once per model, at load) that a stage runs on the CPU while a GPU is visible; True if so."""
    if device == "cpu" and cuda_available():
        logger.warning("%s runs on the CPU although a CUDA GPU is visible (device: cpu in its settings?)", model)
        return True
    return False
