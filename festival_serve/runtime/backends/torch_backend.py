"""PyTorch eager backend: the reference runtime, and the GPU fp16 path.

In GPU-only mode every parameter and buffer is checked on the device (and in fp16 where fp16 is asked)
after loading, and the outputs of the first batch (the warm-up) likewise, so a module that keeps a
tensor on the CPU fails the replica at start-up instead of running slowly.
"""

from __future__ import annotations

import numpy as np

from festival_serve.runtime import gpu_share
from festival_serve.runtime.backends.base import (
    DEFAULT_PLACEMENT, Backend, BackendUnavailable, NetworkSource, Placement, as_float32,
)
from festival_serve.runtime.devices import check_tensors


class TorchBackend(Backend):
    name = "torch"
    takes_device_tensors = True

    def __init__(self, module, device: str, fp16: bool, *, gpu_only: bool = False, name: str = "") -> None:
        super().__init__(device, fp16)
        self.module = module
        self.network = name
        self._check_outputs = gpu_only  # on the first batch only: a check per batch would cost a sync each

    @classmethod
    def from_source(cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None,
                    placement: Placement = DEFAULT_PLACEMENT):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"{source.name}: device {device!r} requested but CUDA is not available")
        if fp16 and not device.startswith("cuda"):
            raise BackendUnavailable(f"{source.name}: fp16 needs a CUDA device, got {device!r}")
        if threads:
            torch.set_num_threads(threads)
        cap = gpu_share.cap_torch(device, placement.gpu_fraction) if device.startswith("cuda") else None
        module = source.torch_module().to(device).eval()
        if fp16:
            module = module.half()
        if placement.gpu_only:
            check_tensors([*module.named_parameters(), *module.named_buffers()], device=device,
                          dtype=torch.float16 if fp16 else None, where=f"{source.name} after loading")
        backend = cls(module, device, fp16, gpu_only=placement.gpu_only, name=source.name)
        backend.memory_cap_bytes = cap
        return backend

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        dtype = torch.float16 if self.fp16 else torch.float32
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=dtype, non_blocking=True)
            tensors = self._outputs(self.module(x))
        if self._check_outputs:
            check_tensors([(f"output {i}", t) for i, t in enumerate(tensors)], device=self.device,
                          dtype=dtype, where=f"{self.network} on its first batch")
            self._check_outputs = False
        return as_float32([t.float().cpu().numpy() for t in tensors])

    def forward_tensor(self, x: "torch.Tensor") -> list["torch.Tensor"]:  # noqa: F821 - torch imported lazily
        """``forward`` for a float32 batch already on this device: outputs stay there, as float32."""
        import torch

        dtype = torch.float16 if self.fp16 else torch.float32
        with torch.inference_mode():
            tensors = self._outputs(self.module(x.to(dtype)))
        if self._check_outputs:
            check_tensors([(f"output {i}", t) for i, t in enumerate(tensors)], device=self.device,
                          dtype=dtype, where=f"{self.network} on its first batch")
            self._check_outputs = False
        return [t.float() for t in tensors]  # no copy in fp32; fp16 outputs widened as forward's host copies are

    @staticmethod
    def _outputs(out) -> list:
        """Networks return a tensor, or a tuple/list whose tensors are the outputs (ultralytics' Detect
        returns ``(predictions, raw_feature_maps)`` in eval mode: only tensors at the top level count)."""
        import torch

        return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]

    def runtime_device(self) -> str:
        parameter = next(self.module.parameters(), None)
        return str(parameter.device) if parameter is not None else self.device

    def model_info(self) -> dict:
        import torch

        info = super().model_info()
        parameter = next(self.module.parameters(), None)
        if parameter is not None:
            info["dtype"] = str(parameter.dtype).removeprefix("torch.")
        info["threads"] = torch.get_num_threads() if self.device == "cpu" else None
        if self.device.startswith("cuda"):
            info["gpu_memory_used_bytes"] = torch.cuda.memory_reserved(gpu_share.device_index(self.device))
        return info
