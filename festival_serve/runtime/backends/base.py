"""The backend protocol: what a network source offers and what every runtime's backend does with it.

A *network source* knows how to produce a network in each portable form (a PyTorch module, an ONNX
file); a *backend* turns one of those forms into something that runs ``(N, C, H, W) float32`` batches
on a device and returns the network's outputs as float32 numpy arrays. Models pick a backend by name
(``torch``, ``onnxruntime``, ``tensorrt``, or ``auto``) from their settings; nothing else branches on
the runtime.

Every backend is told the replica's placement rules when it loads (``Placement``): GPU-only mode,
where the runtime must prove after loading that parameters, sessions and outputs really are on the
GPU (a violation is a ``GpuOnlyViolation`` naming the tensor or provider), and the replica's share
of the GPU, which caps its memory (``festival_serve.runtime.gpu_share``). ``model_info()`` reports what the
runtime says it is running on, not what was asked for.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from festival_serve.runtime.errors import BackendUnavailable  # noqa: F401 - part of the backends API


class NetworkSource(Protocol):
    """A network that can be handed to any backend."""

    #: Short name used in logs, cache file names and error messages.
    name: str

    def torch_module(self) -> "torch.nn.Module":  # noqa: F821 - torch imported lazily by callers
        """The network as an fp32 ``nn.Module`` in eval mode, on the CPU."""

    def onnx_file(self) -> Path:
        """An ONNX export of the network with a dynamic batch axis (exported once, then cached)."""


@dataclass(frozen=True)
class Placement:
    """Where and how a backend must run, beyond the device string."""

    gpu_only: bool = False  # prove the network runs on the GPU, at load and on the first batch
    gpu_fraction: float | None = None  # the replica's Ray num_gpus share: caps its GPU memory
    build_engines: bool = False  # TensorRT: build a missing engine at load instead of refusing
    # CPU (ONNX Runtime): a batch of N items runs as min(N, batch_slices) slices at once, each on the session's
    # threads: a stage with a queue spreads over the cores, an idle one holds none (docs/DESIGN.md, "Cores by need").
    batch_slices: int = 1


#: No GPU-only checks, no GPU share, no engine builds: what tests and tools get unless they say otherwise.
DEFAULT_PLACEMENT = Placement()


class Backend(abc.ABC):
    """Runs one network on batches. ``festival_serve.runtime.backends.registry`` lists the subclasses by ``name``."""

    name: ClassVar[str]
    #: Whether ``forward_tensor`` runs batches already on the device (torch, TensorRT); the others take host
    #: arrays only, so a stage on them pre- and post-processes on the host.
    takes_device_tensors: ClassVar[bool] = False

    def __init__(self, device: str, fp16: bool) -> None:
        self.device = device
        self.fp16 = fp16
        self.memory_cap_bytes: int | None = None
        self.chosen_because = ""  # set by create_backend when "auto" picked this backend

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @classmethod
    @abc.abstractmethod
    def from_source(
        cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None,
        placement: Placement = DEFAULT_PLACEMENT,
    ) -> "Backend":
        """Load ``source`` for this runtime on ``device``."""

    @abc.abstractmethod
    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run ``batch`` ((N, C, H, W) float32) and return every network output as float32 numpy."""

    def forward_tensor(self, x: "torch.Tensor") -> list["torch.Tensor"]:  # noqa: F821 - torch imported lazily
        """Run ``x`` ((N, C, H, W) float32, already on this backend's device) and return every output as a float32
        tensor on that device, nothing copied to the host. Only where ``takes_device_tensors``."""
        raise NotImplementedError(f"the {self.name} backend takes host arrays only (takes_device_tensors is False)")

    @abc.abstractmethod
    def runtime_device(self) -> str:
        """Where the network really runs, read back from the runtime ("cpu", "cuda:0")."""

    def model_info(self) -> dict:
        info = {"backend": self.name, "device": self.device, "runtime_device": self.runtime_device(),
                "precision": self.precision, "gpu_memory_cap_bytes": self.memory_cap_bytes}
        if self.chosen_because:
            info["backend_choice"] = self.chosen_because
        return info


def as_float32(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float32) for o in outputs]
