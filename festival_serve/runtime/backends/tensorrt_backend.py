"""TensorRT backend: an engine built ahead of time per GPU and TensorRT version, run on its own CUDA stream.

GPU only: there is no CPU fallback, and asking for one is an error. Engines are built from the
source's ONNX export by ``festival-serve engines build`` and cached next to that ONNX; a replica only
loads them (``engines.find_engine``), and a missing engine fails it at start-up naming that command,
unless its stage sets ``build_engines: true``. Each backend runs on a CUDA stream of its own, so its
copies and kernels never queue behind other work on the device's default stream. ``tensorrt`` is
imported inside methods so this module imports on machines without it (``create_backend`` imports
every backend to fill the registry).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np

from festival_serve.runtime import gpu_share
from festival_serve.runtime.backends.base import (
    DEFAULT_PLACEMENT, Backend, BackendUnavailable, NetworkSource, Placement, as_float32,
)
from festival_serve.runtime.tensorrt_engines import build_engine, find_engine, load_engine, missing_engine_error, require_tensorrt

logger = logging.getLogger(__name__)

#: TensorRT ``DataType`` name → torch dtype name, for allocating output buffers.
_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def torch_dtype(trt_dtype):
    """The torch dtype holding a TensorRT tensor of ``trt_dtype`` (a ``tensorrt.DataType``)."""
    import torch

    try:
        return getattr(torch, _TORCH_DTYPES[trt_dtype.name])
    except KeyError:
        raise BackendUnavailable(f"TensorRT tensor type {trt_dtype.name} has no torch equivalent here") from None


class TensorRTBackend(Backend):
    name = "tensorrt"
    takes_device_tensors = True

    #: Largest batch the engine's optimisation profile accepts; bigger batches run in chunks of this.
    max_batch: ClassVar[int] = 32

    def __init__(self, engine, engine_file: Path, device: str, fp16: bool) -> None:
        import torch

        trt = require_tensorrt()
        super().__init__(device, fp16)
        self.engine = engine
        self.engine_file = Path(engine_file)
        self._device = torch.device(device)
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise BackendUnavailable(f"{engine_file}: expected one input tensor (N, C, H, W), found {inputs}")
        self.input_name = inputs[0]
        # Engine order = the ONNX graph's output order, the order the other backends return.
        self.output_names = [n for n in names if n != self.input_name]
        self._dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        _, _, max_shape = engine.get_tensor_profile_shape(self.input_name, 0)
        self.batch_limit = int(max_shape[0])
        # One execution context holds per-call shapes and addresses: calls must not interleave
        # (Ray Serve runs batches through asyncio.to_thread, so two may overlap).
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self._device)

    @classmethod
    def from_source(
        cls,
        source: NetworkSource,
        *,
        device: str,
        fp16: bool,
        threads: int | None = None,
        placement: Placement = DEFAULT_PLACEMENT,
        max_batch: int | None = None,
        cache_dir: Path | None = None,
    ) -> "TensorRTBackend":
        """Load the engine for ``source`` on ``device`` (build it only where ``placement.build_engines``).
        ``threads`` is unused (GPU runtime)."""
        import torch

        # Checked before anything expensive (the ONNX export) and before TensorRT: no CPU fallback.
        if not device.startswith("cuda"):
            raise BackendUnavailable(
                f"{source.name}: the tensorrt backend runs only on CUDA devices, not {device!r}; "
                "use 'onnxruntime' or 'torch' on the CPU"
            )
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"{source.name}: the tensorrt backend needs CUDA, and CUDA is not available here")
        require_tensorrt()
        cuda = torch.device(device)
        if cuda.index is None:
            cuda = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(cuda):
            engine_file = find_engine(source.onnx_file(), fp16=fp16, device=cuda.index, cache_dir=cache_dir)
            if engine_file is None and not placement.build_engines:
                raise missing_engine_error(source.name, source.onnx_file(), fp16=fp16, device=cuda.index)
            if engine_file is None:
                engine_file = build_engine(
                    source.onnx_file(),
                    fp16=fp16,
                    max_batch=max_batch or cls.max_batch,
                    cache_dir=cache_dir,
                    device=cuda.index,
                    workspace_bytes=gpu_share.trt_workspace_bytes(str(cuda), placement.gpu_fraction),
                    progress=lambda msg: logger.info("%s: %s", source.name, msg),
                )
            backend = cls(load_engine(engine_file), engine_file, str(cuda), fp16)
            backend.memory_cap_bytes = gpu_share.cap_torch(str(cuda), placement.gpu_fraction)  # buffers are torch's
            return backend

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        if batch.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {batch.shape}")
        import torch

        with self._lock, torch.cuda.device(self._device):
            if len(batch) == 0:
                return self._empty_outputs(batch.shape[1:])
            chunks = [
                self._run(batch[start : start + self.batch_limit]) for start in range(0, len(batch), self.batch_limit)
            ]
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate(parts, axis=0) for parts in zip(*chunks)]

    def forward_tensor(self, x: "torch.Tensor") -> list["torch.Tensor"]:  # noqa: F821 - torch imported lazily
        """``forward`` for an (N, C, H, W) batch already on this GPU: outputs stay there, as float32."""
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        import torch

        with self._lock, torch.cuda.device(self._device):
            if len(x) == 0:
                return [torch.from_numpy(o).to(self._device) for o in self._empty_outputs(tuple(x.shape[1:]))]
            chunks = [
                self._run_tensor(x[start : start + self.batch_limit]) for start in range(0, len(x), self.batch_limit)
            ]
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(parts) for parts in zip(*chunks)]

    def runtime_device(self) -> str:
        return str(self._device)  # an engine cannot run anywhere else

    def model_info(self) -> dict:
        import torch

        return {**super().model_info(), "engine": self.engine_file.name, "threads": None,
                "gpu_memory_used_bytes": torch.cuda.memory_reserved(self._device)}

    def _run(self, chunk: np.ndarray) -> list[np.ndarray]:
        """One execution over a host ``chunk`` ((n <= batch_limit, C, H, W) float32); outputs to the host."""
        import torch

        # Ray hands over read-only arrays, which torch.from_numpy warns about: copy those (and non-float32).
        host = np.require(chunk, dtype=np.float32, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        # The H2D copy is queued on this backend's stream, so the engine (same stream) sees finished data.
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(host).to(self._device, dtype=self._dtypes[self.input_name], non_blocking=True)
        return as_float32([o.float().cpu().numpy() for o in self._execute(x)])

    def _run_tensor(self, chunk: "torch.Tensor") -> list["torch.Tensor"]:  # noqa: F821 - torch imported lazily
        """``_run`` for a chunk on this GPU, made on the caller's stream: no host copy either way."""
        import torch

        caller = torch.cuda.current_stream(self._device)
        x = chunk.to(self._dtypes[self.input_name]).contiguous()  # the engine reads one dense buffer of its type
        # The engine runs on this backend's stream: it must first wait for the caller's kernels that wrote x.
        self._stream.wait_stream(caller)
        outputs = self._execute(x)
        for out in outputs:
            out.record_stream(caller)  # allocated on this stream, read on the caller's: no early reuse
        return [o.float() for o in outputs]

    def _execute(self, x: "torch.Tensor") -> list["torch.Tensor"]:  # noqa: F821 - torch imported lazily
        """Bind ``x`` (on the device) and fresh outputs, run the engine on this backend's stream, wait for it.

        Synchronised before returning (under the caller's lock), so the next call may rebind this context; it
        costs little, since every caller reads these outputs right after (NMS, host copies)."""
        import torch

        ctx, stream = self.context, self._stream
        self._set_input_shape(tuple(x.shape))
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outputs = []
        for name in self.output_names:
            # Known once the input shape is set; -1 would mean a data-dependent output (unsupported).
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.engine_file.name}: output {name!r} has data-dependent shape {shape}")
            with torch.cuda.stream(stream):
                out = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.engine_file.name}: TensorRT execution failed (see its log)")
        stream.synchronize()  # x (held by the caller) stayed alive until here: TensorRT only holds its raw address
        return outputs

    def _empty_outputs(self, item_shape: tuple[int, ...]) -> list[np.ndarray]:
        """Zero-length outputs for an empty batch: shapes from the engine at batch 1, nothing run."""
        self._set_input_shape((1, *item_shape))
        shapes = [tuple(self.context.get_tensor_shape(n)) for n in self.output_names]
        return [np.zeros((0, *s[1:]), dtype=np.float32) for s in shapes]

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.input_name, shape):
            profile = self.engine.get_tensor_profile_shape(self.input_name, 0)
            raise ValueError(
                f"{self.engine_file.name}: input shape {shape} is outside the engine's profile "
                f"(min {tuple(profile[0])}, max {tuple(profile[2])})"
            )
