"""PyTorch eager backend: the reference runtime, and the GPU fp16 path."""

from __future__ import annotations

import numpy as np

from festival_serve.backends.base import Backend, BackendUnavailable, NetworkSource, as_float32, register


@register
class TorchBackend(Backend):
    name = "torch"

    def __init__(self, module, device: str, fp16: bool) -> None:
        super().__init__(device, fp16)
        self.module = module

    @classmethod
    def from_source(cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"{source.name}: device {device!r} requested but CUDA is not available")
        if fp16 and not device.startswith("cuda"):
            raise BackendUnavailable(f"{source.name}: fp16 needs a CUDA device, got {device!r}")
        if threads:
            torch.set_num_threads(threads)
        module = source.torch_module().to(device).eval()
        if fp16:
            module = module.half()
        return cls(module, device, fp16)

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        dtype = torch.float16 if self.fp16 else torch.float32
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, dtype=dtype, non_blocking=True)
            out = self.module(x)
        # Networks return a tensor, or a tuple/list whose tensors are the outputs (ultralytics' Detect
        # returns ``(predictions, raw_feature_maps)`` in eval mode: only tensors at the top level count).
        tensors = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        return as_float32([t.float().cpu().numpy() for t in tensors])
