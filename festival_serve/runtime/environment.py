"""What this machine runs a network with: the facts a parity or speed number depends on, read in one place.

Python, torch and its CUDA build, the CUDA devices (as torch sees them, and as NVML does), TensorRT,
ONNX Runtime with the wheel that provides it and its execution providers, and the versions of installed
packages. ``validate`` reports them, model cards and the bench record package versions.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any, Iterable

from festival_serve.runtime.errors import BackendUnavailable
from festival_serve.runtime.nvml import local_gpus

NOT_INSTALLED = "not installed"
#: The wheels that provide ``import onnxruntime``, GPU build first.
ONNXRUNTIME_WHEELS = ("onnxruntime-gpu", "onnxruntime")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """``{distribution name: installed version}`` for those of ``names`` that are installed, in their order;
    absent ones are left out."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def tensorrt_version() -> str:
    """The TensorRT Python module's version, or ``NOT_INSTALLED`` (its wheel goes by several names, so the
    module is asked rather than a distribution)."""
    from festival_serve.runtime.tensorrt_engines import require_tensorrt

    try:
        return require_tensorrt().__version__
    except BackendUnavailable:
        return NOT_INSTALLED


def onnxruntime_packages() -> list[str]:
    """The wheels that provide ``import onnxruntime``, as ``"name version"``. Both at once is a broken install:
    they write the same files, and whichever was installed last decides whether the CUDA provider exists."""
    return [f"{name} {version}" for name, version in package_versions(ONNXRUNTIME_WHEELS).items()]


def probe() -> dict[str, Any]:
    """What this machine runs (imports torch and ONNX Runtime)."""
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,  # None: a CPU-only torch wheel
        "cuda_available": cuda,
        "cuda_devices": [_cuda_device(torch, i) for i in range(torch.cuda.device_count())] if cuda else [],
        "nvml": local_gpus(),  # driver, and per GPU its memory free/total, as NVML sees it
        "tensorrt": tensorrt_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_package": onnxruntime_packages(),
        "onnxruntime_providers": ort.get_available_providers(),
    }


def _cuda_device(torch, index: int) -> dict[str, Any]:
    """A device as torch sees it (indices honour CUDA_VISIBLE_DEVICES, unlike NVML's)."""
    major, minor = torch.cuda.get_device_capability(index)
    free, total = torch.cuda.mem_get_info(index)
    return {"index": index, "name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "memory_free_bytes": free, "memory_total_bytes": total}
