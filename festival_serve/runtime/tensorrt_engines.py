"""TensorRT engines: build from ONNX ahead of time, cache per GPU and TensorRT version, load.

An engine is compiled for one GPU architecture by one TensorRT release and does not load anywhere
else, so its file name carries those facts plus a hash of the ONNX bytes and the build options:

    <onnx stem>.<gpu slug>-sm<cc>.trt<version>.<fp16|fp32>.b<max_batch>.<hash12>.engine

A JSON sidecar (``<engine>.json``) records the same facts for humans and tools. Everything that
touches ``tensorrt`` or CUDA imports it inside the function, so this module imports on any machine.

TensorRT 10 vs 11 (see ``_precision_plan``):

* TensorRT 10 builds *weakly typed* networks by default: the graph says fp32 and
  ``BuilderFlag.FP16`` lets the builder pick fp16 kernels wherever it likes.
* TensorRT 11 removed ``BuilderFlag.FP16`` (and every other precision flag) and only builds
  *strongly typed* networks: each tensor runs in the type the ONNX graph gives it, so an fp16 engine
  needs an fp16 (mixed-precision) ONNX, made by ``festival_serve.runtime.onnx_fp16`` (ModelOpt AutoCast,
  NVIDIA's documented route, where installed; else onnxruntime's fp32→fp16 converter).

Replicas only *load* engines (``find_engine``): building takes minutes and a workspace of GPU memory
that the other replicas on the device share, so it happens ahead of time in ``festival-serve engines
build`` (or at start-up only where a stage sets ``build_engines: true``). Builds share a timing cache
per GPU model and TensorRT version (``timing.<gpu>-sm<cc>.trt<version>.cache`` in the cache folder),
so rebuilding after a weights update re-times only new layers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from festival_serve.runtime.errors import BackendUnavailable
from festival_serve.runtime.onnx_fp16 import fp16_onnx, graph_has_fp16
from festival_serve.runtime.cache import build_once, file_sha256, write_atomic

logger = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
#: Ray Serve batches default to 8 requests (``BatchConfig.max_batch_size``): tune kernels for that.
DEFAULT_OPT_BATCH = 8

Progress = Callable[[str], None]


#: What to run to build engines ahead of time; named by every "engine missing" error.
BUILD_COMMAND = "festival-serve engines build --config serve_config.yaml"


class EngineBuildError(RuntimeError):
    """The ONNX could not be parsed or TensorRT could not build an engine from it."""


class EngineMissing(BackendUnavailable):
    """No engine for this network, GPU, TensorRT version and precision, and the replica may not build one."""


def require_tensorrt():
    """Import and return the ``tensorrt`` module, or raise ``BackendUnavailable`` saying how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(
            "TensorRT is not installed: pip install 'festival-serve[tensorrt]' on a machine with an NVIDIA GPU "
            f"(its library wheels come from NVIDIA's package index; import failed with: {e})"
        ) from e
    return tensorrt


def gpu_facts(device: int | str = "cuda") -> dict[str, str]:
    """What an engine is tied to: the GPU's name and compute capability, and the TensorRT version."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT engines need a CUDA GPU, and CUDA is not available here")
    trt = require_tensorrt()
    index = _cuda_index(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu_name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}{minor}",
        "trt_version": trt.__version__,
    }


def engine_cache_key(
    onnx_path: Path,
    *,
    fp16: bool,
    max_batch: int,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    trt_version: str,
    opt_batch: int | None = None,
) -> str:
    """sha256 over the ONNX bytes and every fact the compiled engine depends on (hex digest)."""
    facts = {
        "onnx_sha256": file_sha256(Path(onnx_path)),
        "fp16": bool(fp16),
        "max_batch": int(max_batch),
        "opt_batch": None if opt_batch is None else int(opt_batch),
        "gpu_name": gpu_name,
        "compute_capability": _cc(compute_capability),
        "trt_version": trt_version,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def engine_path(onnx_path: Path, cache_dir: Path, **facts: Any) -> Path:
    """Where the engine for ``onnx_path`` and ``facts`` (``engine_cache_key``'s keywords) lives."""
    onnx_path = Path(onnx_path)
    key = engine_cache_key(onnx_path, **facts)
    precision = "fp16" if facts["fp16"] else "fp32"
    name = (
        f"{onnx_path.stem}.{_slug(facts['gpu_name'])}-sm{_cc(facts['compute_capability'])}"
        f".trt{facts['trt_version']}.{precision}.b{int(facts['max_batch'])}.{key[:12]}{ENGINE_SUFFIX}"
    )
    return Path(cache_dir) / name


def sidecar_path(engine_file: Path) -> Path:
    return engine_file.with_name(engine_file.name + ".json")


def find_engine(onnx_path: Path, *, fp16: bool, device: int | str = "cuda", cache_dir: Path | None = None) -> Path | None:
    """An engine already built from ``onnx_path``'s exact bytes for this GPU, TensorRT version and precision
    (the one accepting the largest batch), or None. Raises ``BackendUnavailable`` without TensorRT or CUDA."""
    onnx_path = Path(onnx_path)
    facts = gpu_facts(device)
    folder = Path(cache_dir) if cache_dir is not None else onnx_path.parent
    pattern = (f"{onnx_path.stem}.{_slug(facts['gpu_name'])}-sm{_cc(facts['compute_capability'])}"
               f".trt{facts['trt_version']}.{'fp16' if fp16 else 'fp32'}.b*{ENGINE_SUFFIX}")
    digest = file_sha256(onnx_path)
    found = []
    for engine_file in folder.glob(pattern):
        try:
            sidecar = json.loads(sidecar_path(engine_file).read_text())
        except (OSError, ValueError):
            continue  # an engine without its facts cannot be trusted to match these bytes
        if sidecar.get("onnx_sha256") == digest:
            found.append((int(sidecar.get("batch", {}).get("max", 0)), engine_file))
    return max(found)[1] if found else None


def missing_engine_error(name: str, onnx_path: Path, *, fp16: bool, device: int | str = "cuda") -> EngineMissing:
    """The start-up error for a replica that may not build its engine: what is missing, and the command."""
    facts = gpu_facts(device)
    return EngineMissing(
        f"{name}: no TensorRT {'fp16' if fp16 else 'fp32'} engine for {Path(onnx_path).name} on this GPU "
        f"({facts['gpu_name']}, sm{_cc(facts['compute_capability'])}, TensorRT {facts['trt_version']}) in "
        f"{Path(onnx_path).parent}; build it ahead of time on a node with this GPU: {BUILD_COMMAND} "
        "(or set build_engines: true to let the replica build it at start-up)"
    )


def build_engine(
    onnx_path: Path,
    *,
    fp16: bool,
    max_batch: int,
    opt_batch: int | None = None,
    cache_dir: Path | None = None,
    workspace_bytes: int = 2 << 30,
    progress: Progress | None = None,
    device: int | str = "cuda",
    rebuild: bool = False,
) -> Path:
    """Return the engine file for ``onnx_path`` on this GPU, building and caching it first if absent.

    The ONNX must have one dynamic batch axis (dim 0) per input and fixed other dims; the engine gets
    one optimisation profile with batch ``1 .. opt_batch .. max_batch``. Builds take minutes: run
    ``festival-serve engines build`` ahead of deployment so replicas only load. ``cache_dir`` defaults
    to the ONNX file's folder. Replicas starting together on one node build once (a file lock), and the
    engine appears by atomic rename, so nobody loads a half-written file. ``rebuild`` replaces a cached engine.
    """
    onnx_path = Path(onnx_path)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must lie in [1, max_batch={max_batch}], got {opt}")
    cache_dir = Path(cache_dir) if cache_dir is not None else onnx_path.parent
    say = _reporter(progress)

    facts = gpu_facts(device)
    target = engine_path(onnx_path, cache_dir, fp16=fp16, max_batch=max_batch, opt_batch=opt, **facts)
    if target.exists() and not rebuild:
        say(f"using cached engine {target}")
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock")):
        if rebuild:
            target.unlink(missing_ok=True)  # asked for a fresh build: never reuse, even one made while we waited
        elif target.exists():  # another replica built it while we waited for the lock
            say(f"using engine {target} built by another process")
            return target
        started = time.perf_counter()
        plan, notes = _build_plan(
            onnx_path, fp16=fp16, opt_batch=opt, max_batch=max_batch, cache_dir=cache_dir,
            workspace_bytes=workspace_bytes, timing_cache=timing_cache_path(cache_dir, facts), say=say,
        )
        seconds = time.perf_counter() - started
        sidecar = {
            "onnx": str(onnx_path),
            "onnx_sha256": file_sha256(onnx_path),
            "fp16": fp16,
            "batch": {"min": 1, "opt": opt, "max": max_batch},
            "workspace_bytes": workspace_bytes,
            **facts,
            **notes,
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic(sidecar_path(target), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
        build_once(target, lambda tmp: tmp.write_bytes(plan))
    say(f"built {target.name} in {seconds:.0f} s ({len(plan) / 2**20:.1f} MiB)")
    return target


def load_engine(engine_file: Path):
    """Deserialize ``engine_file`` on the current CUDA device (an ``ICudaEngine``)."""
    global _TRT_RUNTIME
    trt = require_tensorrt()
    # One runtime per process, kept alive: an IRuntime must outlive the engines it deserialized.
    if _TRT_RUNTIME is None:
        _TRT_RUNTIME = trt.Runtime(_trt_logger(trt))
    engine = _TRT_RUNTIME.deserialize_cuda_engine(Path(engine_file).read_bytes())
    if engine is None:
        raise EngineBuildError(
            f"TensorRT could not deserialize {engine_file} (see its log above); an engine only loads on the GPU "
            "model and TensorRT version that built it: delete the file to rebuild it"
        )
    return engine


def timing_cache_path(cache_dir: Path, facts: dict[str, str]) -> Path:
    """The builder's timing cache for one GPU model and TensorRT version (kernel timings are per both)."""
    return Path(cache_dir) / (f"timing.{_slug(facts['gpu_name'])}-sm{_cc(facts['compute_capability'])}"
                              f".trt{facts['trt_version']}.cache")


# --------------------------------------------------------------------------------------------------
# Building


def _build_plan(
    onnx_path: Path, *, fp16: bool, opt_batch: int, max_batch: int, cache_dir: Path,
    workspace_bytes: int, timing_cache: Path, say: Progress,
) -> tuple[bytes, dict[str, str]]:
    """Parse, configure and build: the serialized engine, plus notes for the sidecar."""
    trt = require_tensorrt()
    trt_logger = _trt_logger(trt)
    builder = trt.Builder(trt_logger)
    strongly_typed, use_fp16_flag = _precision_plan(trt, fp16)

    source = onnx_path
    if fp16 and strongly_typed and not graph_has_fp16(onnx_path):
        say("TensorRT >= 11 takes fp16 from the graph")
        source, converter = fp16_onnx(onnx_path, cache_dir, say)
    else:
        converter = None

    # Explicit batch is the only mode since TensorRT 10 (EXPLICIT_BATCH is deprecated and ignored), so the
    # only creation flag left is STRONGLY_TYPED: required to opt in on 10.x, accepted and ignored on 11.x.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    say(f"parsing {source}")
    # parse_from_file (not parse(bytes)) so ONNX files with external weights resolve their data files.
    if not parser.parse_from_file(str(source)):
        errors = "\n".join(f"  - {parser.get_error(i)}" for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {source}:\n{errors or '  - (no error recorded)'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    # Kernel timings from earlier builds on this GPU model: only layers not seen before are timed again.
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if use_fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        fixed = _batch_profile_dims(tensor.name, tuple(tensor.shape))
        shapes[tensor.name] = fixed
        profile.set_shape(tensor.name, (1, *fixed), (opt_batch, *fixed), (max_batch, *fixed))
    config.add_optimization_profile(profile)

    say(
        f"building {'fp16' if fp16 else 'fp32'} engine for batch 1..{max_batch} (opt {opt_batch}); "
        "this takes a few minutes"
    )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {source}; its log above says why")
    serialized = bytes(config.get_timing_cache().serialize())
    write_atomic(timing_cache, lambda tmp: tmp.write_bytes(serialized))
    notes = {
        "typing": "strongly typed" if strongly_typed else "weakly typed",
        "fp16_via": (
            "BuilderFlag.FP16" if use_fp16_flag
            else f"fp16 ONNX graph ({converter or 'as exported'})" if fp16 else "n/a"
        ),
        "built_from": str(source),
        "inputs": {name: ["batch", *dims] for name, dims in shapes.items()},
    }
    return bytes(plan), notes


def _precision_plan(trt, fp16: bool) -> tuple[bool, bool]:
    """``(strongly_typed, use_fp16_flag)`` for this TensorRT.

    TensorRT 10 has ``BuilderFlag.FP16``: build a weakly typed network and let the flag enable fp16
    kernels (per layer, TensorRT times fp16 and fp32 and keeps the faster). TensorRT 11 removed the flag and
    every network is strongly typed: precision comes from the ONNX graph's own tensor types, and the
    builder never lowers an fp32 tensor to fp16 by itself. Probing the flag rather than parsing the
    version string keeps this right for any 10.x/11.x release.
    """
    has_flag = hasattr(trt.BuilderFlag, "FP16")
    return (not has_flag, fp16 and has_flag)


def _batch_profile_dims(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The fixed dims after the batch axis; the batch axis itself must be dynamic (-1)."""
    if not shape or shape[0] != -1:
        raise EngineBuildError(
            f"input {name!r} has shape {shape}: export the ONNX with a dynamic batch axis (dim 0 = -1)"
        )
    rest = shape[1:]
    if any(d < 0 for d in rest):
        raise EngineBuildError(
            f"input {name!r} has shape {shape}: only the batch axis may be dynamic; export with fixed sizes"
        )
    return rest


# --------------------------------------------------------------------------------------------------
# Helpers


_TRT_LOGGER = None
_TRT_RUNTIME = None


def _trt_logger(trt):
    # One logger per process: TensorRT warns when several loggers are registered.
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def _reporter(progress: Progress | None) -> Progress:
    def say(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    return say


def _cuda_index(device: int | str) -> int:
    import torch

    if isinstance(device, int):
        return device
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def _cc(compute_capability: str | tuple[int, int]) -> str:
    """(8, 9) / "8.9" / "89" → "89"."""
    if isinstance(compute_capability, tuple):
        return "".join(str(int(p)) for p in compute_capability)
    return str(compute_capability).replace(".", "")


def _slug(text: str) -> str:
    """"NVIDIA GeForce RTX 4090" → "nvidia-geforce-rtx-4090"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an advisory lock on ``lock_file`` (POSIX ``flock``; released when the process dies)."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
