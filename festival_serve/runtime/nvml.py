"""NVML, the NVIDIA driver's management library: what the driver sees on this machine, read in one place.

NVML rather than ``torch.cuda``: importing torch costs ~400 MB and seconds, and NVML also sees other
processes. Its device indices are the driver's, not ``CUDA_VISIBLE_DEVICES``'. Every reader here starts
NVML and shuts it down again, and a machine without a driver (or without a GPU) is an answer, not an error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pynvml

logger = logging.getLogger(__name__)

NO_GPU = "no NVIDIA GPU or driver on this machine"


def local_gpus() -> dict[str, Any]:
    """NVML's view of this machine: ``{"available", "reason", "nvml_error", "driver_version",
    "cuda_driver_version", "devices": [...]}``; ``available`` is False without a driver or GPU.

    Per device: index, name, uuid, memory total/used/free (bytes), utilisation (percent) and the
    processes holding memory on it."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no libnvidia-ml (no driver), or a driver/library mismatch
        logger.debug("NVML did not start: %s", e)
        return _no_gpu(nvml_error=str(e))
    try:
        return _read_nvml()
    except pynvml.NVMLError as e:  # the driver is there but a device does not answer (lost, being reset)
        logger.warning("NVML could not list the devices: %s", e)
        return _no_gpu(nvml_error=str(e), reason="an NVIDIA driver is installed but its GPUs did not answer NVML")
    finally:
        pynvml.nvmlShutdown()


def process_gpu_memory_bytes() -> int | None:
    """GPU memory this process holds on every device (bytes), as the driver counts it: every runtime's
    arenas and contexts. None without a driver."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver / no NVML: nothing to report
        return None
    try:
        used, pid = 0, os.getpid()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    used += int(proc.usedGpuMemory)
        return used
    finally:
        pynvml.nvmlShutdown()


def _read_nvml() -> dict[str, Any]:
    devices = [_device(i) for i in range(pynvml.nvmlDeviceGetCount())]
    if not devices:
        return _no_gpu(nvml_error="NVML started but counts no device")
    return {"available": True, "reason": None, "nvml_error": None,
            "driver_version": _nvml(pynvml.nvmlSystemGetDriverVersion),
            "cuda_driver_version": _cuda_version(_nvml(pynvml.nvmlSystemGetCudaDriverVersion)),
            "devices": devices}


def _no_gpu(nvml_error: str, reason: str = NO_GPU) -> dict[str, Any]:
    return {"available": False, "reason": reason, "nvml_error": nvml_error,
            "driver_version": None, "cuda_driver_version": None, "devices": []}


def _nvml(query, *args):
    """One NVML query, or None where the device does not support it (utilisation on some vGPUs,
    process names of other users' processes): one missing field must not hide the rest."""
    try:
        return query(*args)
    except pynvml.NVMLError as e:
        logger.debug("%s%s: %s", getattr(query, "__name__", query), args, e)
        return None


def _cuda_version(encoded: int | None) -> str | None:
    """NVML encodes the CUDA driver version as 1000 * major + 10 * minor (12040 → "12.4")."""
    return None if encoded is None else f"{encoded // 1000}.{encoded % 1000 // 10}"


def _device(index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = _nvml(pynvml.nvmlDeviceGetMemoryInfo, handle)
    rates = _nvml(pynvml.nvmlDeviceGetUtilizationRates, handle)
    return {
        "index": index,
        "name": _nvml(pynvml.nvmlDeviceGetName, handle),
        "uuid": _nvml(pynvml.nvmlDeviceGetUUID, handle),
        "memory_total_bytes": memory.total if memory else None,
        "memory_used_bytes": memory.used if memory else None,
        "memory_free_bytes": memory.free if memory else None,
        "utilization_percent": rates.gpu if rates else None,
        "processes": _processes(handle),
    }


def _processes(handle) -> list[dict[str, Any]]:
    """Compute and graphics processes on one device, once each (a process can be both)."""
    found = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _nvml(query, handle) or []:
            found.setdefault(proc.pid, {
                "pid": proc.pid,
                "name": _nvml(pynvml.nvmlSystemGetProcessName, proc.pid),
                "used_memory_bytes": proc.usedGpuMemory,  # None where the driver does not say (WDDM)
            })
    return list(found.values())
