"""The backend protocol and its registry.

A *network source* knows how to produce a network in each portable form (a PyTorch module, an ONNX
file); a *backend* turns one of those forms into something that runs ``(N, C, H, W) float32`` batches
on a device and returns the network's outputs as float32 numpy arrays. Models pick a backend by name
(``torch``, ``onnxruntime``, ``tensorrt``) from their settings; nothing else branches on the runtime.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

logger = logging.getLogger(__name__)


class BackendUnavailable(RuntimeError):
    """The requested runtime or device cannot run here (missing package, provider or GPU)."""


class NetworkSource(Protocol):
    """A network that can be handed to any backend."""

    #: Short name used in logs, cache file names and error messages.
    name: str

    def torch_module(self) -> "torch.nn.Module":  # noqa: F821 - torch imported lazily by callers
        """The network as an fp32 ``nn.Module`` in eval mode, on the CPU."""

    def onnx_file(self) -> Path:
        """An ONNX export of the network with a dynamic batch axis (exported once, then cached)."""


class Backend(abc.ABC):
    """Runs one network on batches. Subclasses register themselves in ``BACKENDS`` by ``name``."""

    name: ClassVar[str]

    def __init__(self, device: str, fp16: bool) -> None:
        self.device = device
        self.fp16 = fp16

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @classmethod
    @abc.abstractmethod
    def from_source(
        cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None
    ) -> "Backend":
        """Load ``source`` for this runtime on ``device``."""

    @abc.abstractmethod
    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run ``batch`` ((N, C, H, W) float32) and return every network output as float32 numpy."""

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "device": self.device, "precision": self.precision}


BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls
    return cls


def create_backend(
    kind: str, source: NetworkSource, *, device: str, fp16: bool = False, threads: int | None = None
) -> Backend:
    """Build the backend called ``kind``; an unknown name is an error that lists the known ones."""
    # Importing the package registers every built-in backend.
    from festival_serve.backends import onnxruntime_backend, tensorrt_backend, torch_backend  # noqa: F401

    try:
        backend_cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown backend {kind!r}; supported backends: {', '.join(sorted(BACKENDS))}"
        ) from None
    backend = backend_cls.from_source(source, device=device, fp16=fp16, threads=threads)
    logger.info("%s: %s backend on %s (%s)", source.name, kind, device, backend.precision)
    return backend


def as_float32(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float32) for o in outputs]
