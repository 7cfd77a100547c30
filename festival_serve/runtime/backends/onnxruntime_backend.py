"""ONNX Runtime backend: the CPU default, and CUDA through the CUDA execution provider.

fp16 runs an fp16 copy of the exported graph (``festival_serve.runtime.onnx_fp16``; inputs and outputs stay
float32). ONNX Runtime quietly places nodes on the CPU when a provider cannot take them, and quietly
drops a provider it cannot load: so the providers a session really got are read back after it is
built, a CUDA session without the CUDA provider is refused, and in GPU-only mode the session is built
with CPU fallback disabled (``session.disable_cpu_ep_fallback``), so no node may run on the CPU.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from festival_serve.runtime import gpu_share
from festival_serve.runtime.backends.base import (
    DEFAULT_PLACEMENT, Backend, BackendUnavailable, NetworkSource, Placement, as_float32,
)
from festival_serve.runtime.errors import GpuOnlyViolation

logger = logging.getLogger(__name__)

#: device prefix -> the execution provider that must be present to honour it.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: What a GPU node installs to get the CUDA provider (it replaces the CPU-only onnxruntime wheel).
GPU_INSTALL = "uv sync --frozen --extra gpu (onnxruntime-gpu, built for the same CUDA 13 as the locked torch)"


def import_onnxruntime():
    """The ``onnxruntime`` module, or ``BackendUnavailable`` saying which extra brings it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable(
            "ONNX Runtime is not installed: it comes from an extra, `uv sync --frozen --extra cpu` "
            f"(or `--extra gpu` on GPU nodes); import failed with: {e}"
        ) from e
    return onnxruntime


def check_providers(name: str, device: str, providers: list[str], *, gpu_only: bool) -> None:
    """Refuse a session whose first provider is not the one ``device`` needs (it would run elsewhere)."""
    wanted = PROVIDERS[device.split(":")[0]]
    if providers and providers[0] == wanted:
        return
    message = (f"{name}: asked for {device} but the ONNX Runtime session runs on {providers} "
               f"(wanted {wanted} first); install: {GPU_INSTALL}")
    raise GpuOnlyViolation(message) if gpu_only else BackendUnavailable(message)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session, device: str, fp16: bool, threads: int | None = None, batch_slices: int = 1) -> None:
        super().__init__(device, fp16)
        self.session = session
        self.threads = threads
        self.input_name = session.get_inputs()[0].name
        # CPU only: slices of one batch run at once (a session's run is thread-safe), each on the session's own
        # threads. On CUDA one run over the whole batch is what fills the device.
        self.batch_slices = batch_slices if device.split(":")[0] == "cpu" else 1
        self._slice_pool = (ThreadPoolExecutor(self.batch_slices - 1, thread_name_prefix="ort-slice")
                            if self.batch_slices > 1 else None)

    @classmethod
    def from_source(cls, source: NetworkSource, *, device: str, fp16: bool, threads: int | None = None,
                    placement: Placement = DEFAULT_PLACEMENT):
        return cls.from_file(str(source.onnx_file()), device=device, fp16=fp16, threads=threads, name=source.name,
                             placement=placement)

    @classmethod
    def from_file(cls, path: str, *, device: str, fp16: bool = False, threads: int | None = None, name: str = "",
                  placement: Placement = DEFAULT_PLACEMENT):
        ort = import_onnxruntime()
        kind = device.split(":")[0]
        wanted = PROVIDERS.get(kind)
        if wanted is None:
            raise BackendUnavailable(f"{name}: onnxruntime cannot run on device {device!r}")
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(
                f"{name}: {wanted} is not in this onnxruntime build (available: {', '.join(available)}); "
                f"install: {GPU_INSTALL}"
            )
        if fp16:
            from festival_serve.runtime.onnx_fp16 import fp16_onnx

            path = str(fp16_onnx(path)[0])
        options = ort.SessionOptions()
        if threads:
            # Ray and other replicas share the machine's cores; a session that grabs them all thrashes. Its
            # threads also stop spinning between batches: spinning buys microseconds on an idle core and costs
            # whole cores that the proxy, the ingress and the other replicas need under load.
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = [wanted]
        cap = None
        if kind == "cuda":
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels the gpu extra installs
            cuda_options = gpu_share.ort_cuda_options(device, placement.gpu_fraction)
            cap = cuda_options.get("gpu_mem_limit")
            providers = [(wanted, cuda_options)]
            if placement.gpu_only:
                options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
        check_providers(name, device, session.get_providers(), gpu_only=placement.gpu_only)
        backend = cls(session, device, fp16, threads, placement.batch_slices)
        backend.memory_cap_bytes = cap
        return backend

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slices = min(self.batch_slices, len(batch))
        if slices <= 1:
            return self._run(batch)
        # (N, ...) -> `slices` runs at once (this thread takes the first); every output is (N_slice, ...) again.
        parts = np.array_split(batch, slices)
        pending = [self._slice_pool.submit(self._run, part) for part in parts[1:]]
        outputs = [self._run(parts[0])] + [future.result() for future in pending]
        return [np.concatenate(per_slice) for per_slice in zip(*outputs)]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return as_float32(self.session.run(None, {self.input_name: batch}))

    def runtime_device(self) -> str:
        first = self.session.get_providers()[0]
        if first == PROVIDERS["cuda"]:
            return f"cuda:{gpu_share.device_index(self.device)}"
        return "cpu" if first == PROVIDERS["cpu"] else first

    def model_info(self) -> dict:
        return {**super().model_info(), "providers": self.session.get_providers(), "threads": self.threads,
                "batch_slices": self.batch_slices}
