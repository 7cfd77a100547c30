"""ONNX Runtime backend: the CPU default, and CUDA / TensorRT through execution providers."""

from __future__ import annotations

import logging

import numpy as np

from festival_serve.backends.base import Backend, BackendUnavailable, NetworkSource, as_float32, register

logger = logging.getLogger(__name__)

#: device prefix -> the execution provider that must be present to honour it.
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session, device: str, fp16: bool) -> None:
        super().__init__(device, fp16)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_source(cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None):
        return cls.from_file(str(source.onnx_file()), device=device, fp16=fp16, threads=threads, name=source.name)

    @classmethod
    def from_file(cls, path: str, *, device: str, fp16: bool = False, threads: int | None = None, name: str = ""):
        import onnxruntime as ort

        if fp16:
            raise BackendUnavailable(
                f"{name}: the onnxruntime backend runs the exported fp32 graph; use 'torch' or 'tensorrt' for fp16"
            )
        kind = device.split(":")[0]
        wanted = _PROVIDERS.get(kind)
        if wanted is None:
            raise BackendUnavailable(f"{name}: onnxruntime cannot run on device {device!r}")
        available = ort.get_available_providers()
        # ONNX Runtime silently drops a provider it does not have and runs on the CPU; refuse instead.
        if wanted not in available:
            raise BackendUnavailable(
                f"{name}: {wanted} is not in this onnxruntime build (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA"
            )
        providers: list = [wanted]
        if kind == "cuda":
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers = [(wanted, {"device_id": device_id})]
        options = ort.SessionOptions()
        if threads:
            # Ray and other replicas share the machine's cores; a session that grabs them all thrashes.
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
        return cls(session, device, fp16)

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        return as_float32(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}))
