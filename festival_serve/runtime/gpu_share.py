"""A replica's share of a GPU, turned into memory caps for every runtime, in one place.

Ray's fractional ``num_gpus`` (serve_config.yaml: 0.2 + 0.1 + 0.2 + 0.4 of a device) only books
capacity: nothing stops one replica's allocator from taking the whole device. Each runtime is told
its cap here: torch (``set_per_process_memory_fraction``), ONNX Runtime's CUDA arena
(``gpu_mem_limit``) and TensorRT's builder workspace. Sizes are in bytes; the device's total comes
from the CUDA driver (which honours ``CUDA_VISIBLE_DEVICES``, as Ray sets it per replica), so this
module needs no torch.
"""

from __future__ import annotations

import ctypes
import logging

from festival_serve.runtime.devices import cuda_driver

logger = logging.getLogger(__name__)

#: TensorRT builder workspace when nothing caps it (bytes): what the engine builder always used.
DEFAULT_TRT_WORKSPACE_BYTES = 2 << 30
#: The builder workspace may take this part of a replica's memory cap; the rest holds the engine and its I/O.
TRT_WORKSPACE_SHARE_OF_CAP = 0.5


def device_index(device: str) -> int:
    """``"cuda:1"`` → 1; ``"cuda"`` → 0 (the first device this process sees)."""
    return int(device.split(":")[1]) if ":" in device else 0


def device_total_bytes(index: int) -> int | None:
    """Total memory of visible CUDA device ``index`` (bytes), or None without a CUDA driver/device."""
    driver = cuda_driver()
    if driver is None or driver.cuInit(0) != 0:
        return None
    handle, total = ctypes.c_int(0), ctypes.c_size_t(0)
    if driver.cuDeviceGet(ctypes.byref(handle), index) != 0:
        return None
    if driver.cuDeviceTotalMem_v2(ctypes.byref(total), handle) != 0:
        return None
    return int(total.value)


def memory_cap_bytes(fraction: float | None, total_bytes: int | None) -> int | None:
    """The replica's cap: its ``num_gpus`` fraction of the device (None: no fraction, or whole devices)."""
    if fraction is None or total_bytes is None or fraction >= 1:
        return None
    if fraction <= 0:
        raise ValueError(f"a GPU share must be > 0, got {fraction}")
    return int(total_bytes * fraction)


def cap_torch(device: str, fraction: float | None) -> int | None:
    """Cap this process's torch CUDA allocator on ``device`` at ``fraction``; returns the cap in bytes."""
    if fraction is None or fraction >= 1:
        return None
    import torch

    index = device_index(device)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return memory_cap_bytes(fraction, torch.cuda.get_device_properties(index).total_memory)


def ort_cuda_options(device: str, fraction: float | None) -> dict:
    """CUDA execution provider options: the device, and the arena capped at the replica's share."""
    index = device_index(device)
    options: dict = {"device_id": index}
    cap = memory_cap_bytes(fraction, device_total_bytes(index))
    if cap is not None:
        options["gpu_mem_limit"] = cap
        # Grow the arena by what is asked, not by doubling: doubling overshoots a small cap.
        options["arena_extend_strategy"] = "kSameAsRequested"
    return options


def trt_workspace_bytes(device: str, fraction: float | None) -> int:
    """TensorRT builder workspace: the default, or less when the replica's cap is small."""
    cap = memory_cap_bytes(fraction, device_total_bytes(device_index(device)))
    if cap is None:
        return DEFAULT_TRT_WORKSPACE_BYTES
    return min(DEFAULT_TRT_WORKSPACE_BYTES, int(cap * TRT_WORKSPACE_SHARE_OF_CAP))
