"""``festival-serve validate``: does every runtime this machine offers compute what the reference computes,
and how fast? (The seed app's ``migrate_to_tensorrt.py --validate-only``.)

The reference is **torch fp32 on the CPU**: the checkpoint as trained, on the most deterministic runtime.
Every other backend available here is a *candidate*: ONNX Runtime fp32 on the CPU always; with CUDA also
torch fp32/fp16/bf16, ONNX Runtime on the CUDA provider (where installed) and TensorRT fp16 (where
installed). For held-out synthetic scenes (``synth.scene_seeds("test", n)``, the split ``eval`` scores):

1. environment: Python, torch and its CUDA build, the GPU (NVML), TensorRT, ONNX Runtime and its providers;
2. raw parity, per exportable network (``stages.NETWORKS``): the same real input batch through the
   reference and each candidate; max absolute and relative error of every output against a tolerance
   per precision (``TOLERANCES``; fp32 on CUDA is judged as the TF32 it computes in);
3. task-level parity, per stage, loaded through the stage table with only the backend overridden: the
   signs and hazard cells a candidate finds against the reference's; the sign reader (ONNX Runtime only)
   against the scenes' ground-truth text, and on a GPU its CUDA text against its CPU text;
4. speed: items per second against batch size, per network and backend.

Any parity failure or missing requirement (a configured ``backend: tensorrt`` that cannot load here)
is listed under ``failures`` and makes the command exit 1. No Ray import.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from festival_serve.world import scores
from festival_serve.world import synth
from festival_serve.runtime.errors import BackendUnavailable
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import NETWORKS, STAGES, Network, Stage

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("serve_config.yaml")
NOT_INSTALLED = "not installed"
#: CPU defaults keep a run to about a minute on a laptop; a GPU sweeps up to past the engines' max batch (32).
DEFAULT_BATCH_SIZES = {"cpu": (1, 4, 16), "cuda": (1, 2, 4, 8, 16, 32, 64)}
DEFAULT_SCENES = 8
DEFAULT_REPEATS = 3


# -- what is compared against what ------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One way to run a network: a backend of the registry, a device and a precision."""

    backend: str  # "torch", "onnxruntime" or "tensorrt"
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16" or "bf16" (bf16: torch only, built here; no stage setting asks for it)

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def numerics(self) -> str:
        """The arithmetic it really does, which picks its tolerances: fp32 on CUDA convolves in TF32 by
        default (cuDNN under torch, ONNX Runtime's CUDA provider), 10 mantissa bits like fp16."""
        return "tf32" if self.precision == "fp32" and self.device == "cuda" else self.precision


REFERENCE = Candidate("torch", "cpu", "fp32")


@dataclass(frozen=True)
class Tolerance:
    """``|candidate - reference| <= atol + rtol * |reference|`` for every element of an output, where
    ``atol = atol_of_peak * max|reference|``.

    The floor scales with the output's own range because rounding error grows with the magnitudes that
    flow through the network: YOLO's raw boxes are pixels (hundreds), its class scores and the
    classifier's probabilities lie in [0, 1], YOLIC's logits in tens. A floor in absolute units would be
    either meaningless for the pixels or impossible for the probabilities. What raw parity cannot
    judge finely (a class score riding on a pixel-sized floor) task-level parity does.
    """

    rtol: float
    atol_of_peak: float


#: By ``Candidate.numerics``. Measured on the shipped models (torch fp32 reference, 4 held-out scenes), worst
#: element over all outputs: ORT fp32 on the CPU stays within 1.8e-4 px of ~500 px boxes (4e-7 of the peak);
#: torch fp16 needs atol 0.15 px at rtol 1e-2 on the detector, bf16 (8 mantissa bits) 1.5 px at rtol 5e-2.
#: Each bound leaves about 3x headroom over those and stays far below what a wrong graph or a broken
#: kernel gives; fp32's is tight enough that one fp16 rounding of the outputs already fails it.
#: TF32 shares fp16's mantissa (and keeps fp32's range): it is held to fp16's bound.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(rtol=1e-4, atol_of_peak=1e-5),
    "tf32": Tolerance(rtol=1e-2, atol_of_peak=1e-3),
    "fp16": Tolerance(rtol=1e-2, atol_of_peak=1e-3),
    "bf16": Tolerance(rtol=5e-2, atol_of_peak=1e-2),
}
#: Task level, by ``Candidate.numerics``: the fraction of the reference's detections (and of the candidate's)
#: matched at IoU >= 0.5 with the same label. Reduced precision may flip a box whose score sits at the
#: confidence threshold; fp32 should not.
SIGN_AGREEMENT = {"fp32": 0.95, "tf32": 0.90, "fp16": 0.90}
#: Jaccard index of the flagged (scene, cell, class) triples. A scene flags about 10, so over the default
#: 8 scenes 0.98 allows one flip and 0.95 allows four.
HAZARD_AGREEMENT = {"fp32": 0.98, "tf32": 0.95, "fp16": 0.95}
#: The reader on ground-truth crops must meet the OCR target ``eval`` holds the whole pipeline to.
OCR_EXACT = scores.TARGETS["ocr.exact_match"]
#: Share of crops whose CUDA text equals the CPU text (same ONNX graphs, different kernels).
OCR_DEVICE_AGREEMENT = 0.95
#: Fewer text signs than this say nothing about the reader: more held-out scenes are drawn for it.
MIN_TEXT_SIGNS = 4


def candidates(env: dict[str, Any]) -> list[Candidate]:
    """Every backend that can run here, besides the reference."""
    found = [Candidate("onnxruntime", "cpu", "fp32")]
    if not env["cuda_available"]:
        return found
    found += [Candidate("torch", "cuda", precision) for precision in ("fp32", "fp16", "bf16")]
    if "CUDAExecutionProvider" in env["onnxruntime_providers"]:
        found.append(Candidate("onnxruntime", "cuda", "fp32"))
    if env["tensorrt"] != NOT_INSTALLED:
        found.append(Candidate("tensorrt", "cuda", "fp16"))
    return found


# -- 1. environment ---------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """What this machine runs: the facts a parity or speed number depends on."""
    import onnxruntime as ort
    import torch

    from festival_serve.ops.check_gpu import local_gpus

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,  # None: a CPU-only torch wheel
        "cuda_available": cuda,
        "cuda_devices": [_cuda_device(torch, i) for i in range(torch.cuda.device_count())] if cuda else [],
        "nvml": local_gpus(),  # driver, and per GPU its memory free/total, as NVML sees it
        "tensorrt": _tensorrt_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_package": _onnxruntime_packages(),
        "onnxruntime_providers": ort.get_available_providers(),
    }


def _cuda_device(torch, index: int) -> dict[str, Any]:
    """A device as torch sees it (indices honour CUDA_VISIBLE_DEVICES, unlike NVML's)."""
    major, minor = torch.cuda.get_device_capability(index)
    free, total = torch.cuda.mem_get_info(index)
    return {"index": index, "name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}",
            "memory_free_bytes": free, "memory_total_bytes": total}


def _tensorrt_version() -> str:
    from festival_serve.runtime.tensorrt_engines import require_tensorrt

    try:
        return require_tensorrt().__version__
    except BackendUnavailable:
        return NOT_INSTALLED


def _onnxruntime_packages() -> list[str]:
    """The wheels that provide ``import onnxruntime``. Both at once is a broken install: they write the
    same files, and whichever was installed last decides whether the CUDA provider exists."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


# -- inputs: held-out scenes --------------------------------------------------------------------------

def held_out_scenes(count: int, skip: int = 0) -> list[synth.Scene]:
    """``count`` scenes of the held-out test split, sizes taken in turn as ``eval`` takes them."""
    sizes = scores.DEFAULT_SIZES
    seeds = synth.scene_seeds("test", count, skip=skip)
    return [synth.generate_scene(seed, size=sizes[(skip + i) % len(sizes)]) for i, seed in enumerate(seeds)]




def text_crops(scenes: Sequence[synth.Scene], padding: float) -> tuple[list[np.ndarray], list[str], int]:
    """The reader's crops of the ground-truth text signs (cut as the ingress cuts them), their texts, and
    how many scenes it took. ``scenes`` are the first held-out ones; beyond them the next are drawn until
    there are ``MIN_TEXT_SIGNS`` (most scenes show no text sign), at most 50 more."""
    from festival_serve.serving.imaging import crop

    crops, texts, used = [], [], 0
    while used < len(scenes) + 50 and (used < len(scenes) or len(texts) < MIN_TEXT_SIGNS):
        scene = scenes[used] if used < len(scenes) else held_out_scenes(1, skip=used)[0]
        used += 1
        for sign in scene.signs:
            if sign.text.strip() and sign.occluded <= scores.OCCLUSION_LIMIT:
                crops.append(crop(scene.image, sign.box, padding))
                texts.append(sign.text)
    return crops, texts, used


# -- 2. raw parity ----------------------------------------------------------------------------------

def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    tolerance: Tolerance) -> dict[str, Any]:
    """Every output of ``candidate`` against the reference's: errors, and whether all are within ``tolerance``."""
    if len(reference) != len(candidate):
        return {"passed": False, "error": f"{len(candidate)} outputs, the reference has {len(reference)}",
                "max_abs_error": None, "max_rel_error": None, "outputs": []}
    rows = [_compare_one(ref, out, tolerance) for ref, out in zip(reference, candidate)]
    result = {"passed": all(r["passed"] for r in rows), "max_abs_error": _worst(r["max_abs_error"] for r in rows),
              "max_rel_error": _worst(r["max_rel_error"] for r in rows), "outputs": rows}
    failed = [f"output {i}: {r['error']}" for i, r in enumerate(rows) if not r["passed"]]
    if failed:
        result["error"] = "; ".join(failed)
    return result


def _compare_one(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance) -> dict[str, Any]:
    if reference.shape != candidate.shape:
        return {"shape": list(candidate.shape), "passed": False, "max_abs_error": None, "max_rel_error": None,
                "error": f"shape {tuple(candidate.shape)}, the reference's is {tuple(reference.shape)}"}
    ref = reference.astype(np.float64)
    diff = np.abs(candidate.astype(np.float64) - ref)
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    atol = tolerance.atol_of_peak * (peak or 1.0)
    # Relative to each reference value, but never to less than atol: near-zero values would blow it up.
    relative = diff / np.maximum(np.abs(ref), atol)
    finite = bool(np.isfinite(candidate).all())
    if not finite:
        return {"shape": list(ref.shape), "passed": False, "max_abs_error": None, "max_rel_error": None,
                "error": "NaN or infinity in the output"}
    row = {
        "shape": list(ref.shape),
        "peak": _num(peak),
        "atol": _num(atol),
        "rtol": tolerance.rtol,
        "max_abs_error": _num(float(diff.max())) if diff.size else 0.0,
        "max_rel_error": _num(float(relative.max())) if diff.size else 0.0,
        "passed": bool((diff <= atol + tolerance.rtol * np.abs(ref)).all()),
    }
    if not row["passed"]:
        outside = int(np.sum(diff > atol + tolerance.rtol * np.abs(ref)))
        row["error"] = (f"{outside} of {diff.size} values off by more than {row['atol']} + {tolerance.rtol} x "
                        f"|reference| (max abs {row['max_abs_error']}, max rel {row['max_rel_error']})")
    return row


def _num(value: float) -> float:
    """A float for the report, to 4 significant digits."""
    return float(f"{value:.4g}")


def _worst(values) -> float | None:
    """The largest error, or None when any is unknown (a broken output)."""
    values = list(values)
    return None if any(v is None for v in values) else max(values, default=0.0)


class _Bf16Module:
    """torch in bfloat16 on CUDA, which no backend setting offers: compared because it keeps fp32's range
    (no fp16 overflow) at half the memory traffic, and its error here is what switching to it would cost."""

    def __init__(self, source, device: str) -> None:
        import torch

        self.device = device
        self.module = source.torch_module().to(device, torch.bfloat16).eval()

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, torch.bfloat16))
        # Outputs as TorchBackend returns them: a tensor, or the tensors at the top level of a tuple.
        tensors = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        return [t.float().cpu().numpy() for t in tensors]


def load_network(candidate: Candidate, source, *, threads: int | None, build_engines: bool):
    """``candidate``'s runtime for ``source``: an object with ``forward((N, C, H, W) float32) → outputs``."""
    if candidate.precision == "bf16":
        return _Bf16Module(source, candidate.device)
    from festival_serve.runtime.backends import Placement, create_backend

    return create_backend(candidate.backend, source, device=candidate.device, fp16=candidate.fp16,
                          threads=threads, placement=Placement(build_engines=build_engines))


# -- 3. task-level parity ---------------------------------------------------------------------------

def sign_agreement(reference: Sequence[Sequence[Any]], candidate: Sequence[Sequence[Any]],
                   numerics: str) -> dict[str, Any]:
    """Per scene, the candidate's ``SignDetection``s matched to the reference's (IoU >= 0.5, same label,
    ``eval``'s greedy matching); the value is the smaller of the two matched fractions."""
    matched = ref_count = cand_count = 0
    for ref, cand in zip(reference, candidate, strict=True):
        truths = [scores.GroundTruth(d.box, d.label) for d in ref]
        preds = [scores.Prediction(d.box, d.label, d.score) for d in cand]
        matched += len(scores.match_detections(preds, truths).pairs)
        ref_count, cand_count = ref_count + len(ref), cand_count + len(cand)
    ref_rate = matched / ref_count if ref_count else 1.0
    cand_rate = matched / cand_count if cand_count else 1.0
    return _verdict("signs matched at IoU>=0.5, same label", min(ref_rate, cand_rate), SIGN_AGREEMENT[numerics], {
        "reference_detections": ref_count, "candidate_detections": cand_count, "matched": matched,
        "reference_matched": round(ref_rate, 4), "candidate_matched": round(cand_rate, 4)})


def hazard_agreement(reference: Sequence[Sequence[Any]], candidate: Sequence[Sequence[Any]],
                     numerics: str) -> dict[str, Any]:
    """Jaccard index of the flagged (scene, cell, class) triples of two runs (1.0 when neither flags any)."""
    ref, cand = _flags(reference), _flags(candidate)
    union = ref | cand
    value = len(ref & cand) / len(union) if union else 1.0
    return _verdict("flagged (cell, class) Jaccard", value, HAZARD_AGREEMENT[numerics], {
        "reference_flags": len(ref), "candidate_flags": len(cand), "shared": len(ref & cand)})


def _flags(scenes: Sequence[Sequence[Any]]) -> set[tuple[int, int, str]]:
    return {(i, cell.cell, label.label) for i, cells in enumerate(scenes) for cell in cells for label in cell.labels}


def _verdict(metric: str, value: float, threshold: float, details: dict[str, Any]) -> dict[str, Any]:
    return {"metric": metric, "value": round(value, 4), "threshold": threshold, "passed": value >= threshold,
            "details": details}




# -- 4. speed ---------------------------------------------------------------------------------------

def items_per_second(run: Callable[[Any], Any], batch, *, device: str, repeats: int) -> float:
    """Median throughput of ``run(batch)``. Every runtime returns host arrays, so a call includes the
    copies to and from the device: what a replica pays per batch."""
    run(batch)  # warm-up: a new batch shape allocates (ORT arenas, cuDNN autotuning, TensorRT shapes)
    seconds = [_timed(run, batch, device) for _ in range(repeats)]
    return len(batch) / statistics.median(seconds)


def _timed(run: Callable[[Any], Any], batch, device: str) -> float:
    if device.startswith("cuda"):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(batch)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0  # ms → s
    started = time.perf_counter()
    run(batch)
    return time.perf_counter() - started


def tiled(items, size: int):
    """``items`` repeated cyclically to ``size``: a batch of real inputs at any batch size."""
    if isinstance(items, np.ndarray):
        return np.resize(items, (size, *items.shape[1:]))
    return [items[i % len(items)] for i in range(size)]


def speed_row(label: str, run: Callable[[Any], Any], items, *, device: str, batch_sizes: Sequence[int],
              repeats: int, unit: str) -> dict[str, Any]:
    """``{"backend", "unit", "items_per_s": {batch size: median items/s}}``."""
    rates = {str(n): round(items_per_second(run, tiled(items, n), device=device, repeats=repeats), 2)
             for n in batch_sizes}
    return {"backend": label, "unit": unit, "items_per_s": rates}


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class Options:
    """What the command line decides."""

    config: Path = DEFAULT_CONFIG
    scenes: int = DEFAULT_SCENES
    batch_sizes: tuple[int, ...] | None = None  # None: DEFAULT_BATCH_SIZES by device
    repeats: int = DEFAULT_REPEATS
    validate_only: bool = False  # never build a TensorRT engine
    force_rebuild: bool = False

    def sizes_for(self, device: str) -> tuple[int, ...]:
        return self.batch_sizes or DEFAULT_BATCH_SIZES["cuda" if device.startswith("cuda") else "cpu"]


class Run:
    """One validation: the per-model report it fills, the failures it collects, progress on stderr."""

    def __init__(self, args: PipelineArgs, options: Options, env: dict[str, Any]) -> None:
        self.args, self.options, self.env = args, options, env
        self.candidates = candidates(env)
        self.failures: list[str] = []
        self.models: dict[str, dict[str, Any]] = {}

    def say(self, message: str) -> None:
        print(f"validate: {message}", file=sys.stderr, flush=True)

    def fail(self, model: str, message: str) -> None:
        self.failures.append(f"{model}: {message}")
        self.say(f"FAIL {model}: {message}")

    def model(self, name: str, stage: str) -> dict[str, Any]:
        """The report entry of a network or stage, created on first use."""
        return self.models.setdefault(name, {"stage": stage, "backends": [], "raw": [], "task": [], "speed": [],
                                             "skipped": []})

    def load(self, name: str, candidate: Candidate, load: Callable[[], Any]) -> Any | None:
        """``load()``, or None. A missing engine under ``--validate-only`` is skipped here (the requirement
        check fails the stages configured to need one); any other error fails this candidate only, so one
        broken runtime does not hide the others' results."""
        from festival_serve.runtime.tensorrt_engines import EngineMissing

        try:
            return load()
        except EngineMissing as e:
            self.models[name]["skipped"].append({"backend": candidate.label, "reason": str(e)})
            self.say(f"{name}: {candidate.label} skipped ({e})")
        except Exception as e:  # noqa: BLE001 - reported per candidate; the run goes on
            logger.debug("%s: %s did not load", name, candidate.label, exc_info=True)
            self.fail(name, f"{candidate.label} did not load: {type(e).__name__}: {e}")
        return None

    def build_engines(self) -> bool:
        return not self.options.validate_only


def validate_network(run: Run, network: Network, scenes: Sequence[synth.Scene]) -> None:
    """Raw parity of every candidate against the reference on the network's real input, and its speed."""
    row = run.model(network.name, network.stage)
    row["task_level_in"] = network.stage  # its stage's answers carry it (the classifier names the detector's boxes)
    source = network.source(run.args)
    if source is None:
        row["off"] = True
        run.say(f"{network.name}: off in this config, skipped")
        return
    settings = getattr(run.args, network.stage)
    batch = network.batch(settings, [s.image for s in scenes], [[sign.box for sign in s.signs] for s in scenes])
    row["input_shape"] = list(batch.shape)
    if len(batch) == 0:
        run.fail(network.name, "the scenes gave it no input (no sign in them); use more --scenes")
        return
    threads = getattr(run.args, network.stage).threads  # the network runs under its stage's settings
    expected = None
    for candidate in [REFERENCE, *run.candidates]:
        net = run.load(network.name, candidate, lambda c=candidate: load_network(
            c, source, threads=threads, build_engines=run.build_engines()))
        if net is None:
            if candidate is REFERENCE:
                return  # nothing to compare against
            continue
        row["backends"].append(candidate.label)
        if candidate is REFERENCE:
            expected = net.forward(batch)
        else:
            _raw_parity(run, network.name, candidate, net.forward, batch, expected)
        _speed(run, network.name, candidate, net.forward, batch, network.unit)
        del net  # one runtime's memory at a time (a GPU holds several copies otherwise)


def _raw_parity(run: Run, name: str, candidate: Candidate, forward, batch: np.ndarray, expected) -> None:
    tolerance = TOLERANCES[candidate.numerics]
    try:
        result = compare_outputs(expected, forward(batch), tolerance)
    except Exception as e:  # noqa: BLE001 - a runtime that fails on a real batch fails its parity
        result = {"passed": False, "error": f"{type(e).__name__}: {e}", "max_abs_error": None,
                  "max_rel_error": None, "outputs": []}
    run.models[name]["raw"].append({"backend": candidate.label, "numerics": candidate.numerics,
                                    "tolerance": {"rtol": tolerance.rtol, "atol_of_peak": tolerance.atol_of_peak},
                                    **result})
    run.say(f"{name}: {candidate.label} raw parity {'pass' if result['passed'] else 'FAIL'} "
            f"(max abs {result['max_abs_error']}, max rel {result['max_rel_error']})")
    if not result["passed"]:
        run.fail(name, f"{candidate.label} differs from {REFERENCE.label}: {result['error']}")


def _speed(run: Run, name: str, candidate: Candidate, forward, items, unit: str) -> None:
    try:
        row = speed_row(candidate.label, forward, items, device=candidate.device,
                        batch_sizes=run.options.sizes_for(candidate.device), repeats=run.options.repeats, unit=unit)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch: say so, keep the rest
        run.fail(name, f"{candidate.label} failed while timing: {type(e).__name__}: {e}")
        return
    run.models[name]["speed"].append(row)
    run.say(f"{name}: {candidate.label} " + ", ".join(f"b{n} {v} {unit}/s" for n, v in row["items_per_s"].items()))


def load_stage(run: Run, stage: Stage, candidate: Candidate):
    """The stage's model as serving builds it, with only its backend, device and precision overridden."""
    settings = stage.settings(run.args).model_copy(update={
        "backend": candidate.backend, "device": candidate.device, "fp16": candidate.fp16,
        "build_engines": run.build_engines()})
    return stage.load(settings, model_store=run.args.model_store, gpu_only=False)


def validate_stage(run: Run, stage: Stage, scenes: Sequence[synth.Scene]) -> None:
    """Task-level parity: each candidate's answers on the scenes against the reference's."""
    run.model(stage.name, stage.name)
    images = [s.image for s in scenes]
    expected = None
    # bf16 is not a setting a stage can take: it is judged at the raw level only.
    for candidate in [REFERENCE, *(c for c in run.candidates if c.precision != "bf16")]:
        model = run.load(stage.name, candidate, lambda c=candidate: load_stage(run, stage, c))
        if model is None:
            if candidate is REFERENCE:
                return
            continue
        answers = getattr(model, stage.method)(images)
        del model
        if candidate is REFERENCE:
            expected = answers
            continue
        result = {"backend": candidate.label, **stage.agreement_check()(expected, answers, candidate.numerics)}
        _record_task(run, stage.name, result)


def _record_task(run: Run, name: str, result: dict[str, Any]) -> None:
    run.models[name]["task"].append(result)
    verdict = "pass" if result["passed"] else "FAIL"
    run.say(f"{name}: {result['backend']} {result['metric']} {result['value']} "
            f"(threshold {result['threshold']}) {verdict}")
    if not result["passed"]:
        run.fail(name, f"{result['backend']}: {result['metric']} {result['value']} < {result['threshold']}")


def validate_reader(run: Run, scenes: Sequence[synth.Scene]) -> None:
    """The sign reader runs on ONNX Runtime only (no torch reference): its text on ground-truth crops
    against the truth, per device, and on a GPU its CUDA text against its CPU text."""
    from festival_serve.pipeline.stages import stage as stage_named

    stage = stage_named("sign_reader")
    settings = stage.settings(run.args)
    row = run.model(stage.name, stage.name)
    row["raw_note"] = "PP-OCR ships as ONNX and runs on ONNX Runtime only: no torch reference to compare with"
    crops, truths, used = text_crops(scenes, run.args.ingress.crop_padding)
    row.update(text_signs=len(truths), scenes_read=used)
    if not crops:
        run.fail(stage.name, f"no readable text sign in {used} held-out scenes")
        return
    runtime = "onnxruntime" if settings.engine == "onnx" else settings.engine
    cuda = run.env["cuda_available"] and "CUDAExecutionProvider" in run.env["onnxruntime_providers"]
    texts: dict[str, list[str]] = {}
    for device in ("cpu", "cuda") if cuda else ("cpu",):
        candidate = Candidate(runtime, device, "fp32")
        reader = run.load(stage.name, candidate, lambda d=device: stage.load(
            settings.model_copy(update={"device": d}), model_store=run.args.model_store, gpu_only=False))
        if reader is None:
            continue
        row["backends"].append(candidate.label)
        texts[device] = [sign.text for sign in reader.read(crops)]
        _record_task(run, stage.name, {"backend": candidate.label, **_ocr_exact(texts[device], truths)})
        _speed(run, stage.name, candidate, reader.read, crops, "crops")
    if len(texts) == 2:
        _record_task(run, stage.name, {"backend": Candidate(runtime, "cuda", "fp32").label,
                                       **_text_agreement(texts["cpu"], texts["cuda"])})


def _ocr_exact(read: Sequence[str], truths: Sequence[str]) -> dict[str, Any]:
    metrics = scores.ocr_metrics(list(zip(read, truths)))
    # With tone marks, as `eval` scores the served recognizer; the no-tone figures stay for PP-OCRv6's sake.
    details = {k: metrics[k] for k in ("evaluated", "exact_match", "exact_match_no_tones", "cer", "cer_no_tones")}
    return _verdict("exact text vs truth, with tones", metrics["exact_match"], OCR_EXACT, details)


def _text_agreement(cpu: Sequence[str], cuda: Sequence[str]) -> dict[str, Any]:
    same = sum(a == b for a, b in zip(cpu, cuda, strict=True))
    return _verdict("same text as on the CPU", same / len(cpu), OCR_DEVICE_AGREEMENT,
                    {"crops": len(cpu), "same": same})


# -- requirements: a stage configured for TensorRT -------------------------------------------------

def build_command(config: Path) -> str:
    return f"festival-serve engines build --config {config}"


def requirement_failures(run: Run) -> list[tuple[str, str]]:
    """``(network, problem)`` for each network of a stage configured with ``backend: tensorrt`` that could
    not run here as configured. Under ``--validate-only`` a missing engine is a problem (nothing is
    built); otherwise loading builds it, as ``engines build`` would."""
    from festival_serve.runtime.devices import resolve_fp16

    problems = []
    for stage in STAGES:
        settings = stage.settings(run.args)
        if getattr(settings, "backend", None) != "tensorrt":
            continue
        for network in stage.networks:
            problem = _engine_problem(run, network, fp16=resolve_fp16(settings.fp16, "cuda"))
            if problem:
                problems.append((network.name, f"backend tensorrt is configured, but {problem}"))
    return problems


def _engine_problem(run: Run, network: Network, *, fp16: bool) -> str | None:
    from festival_serve.runtime import tensorrt_engines

    command = build_command(run.options.config)
    if run.env["tensorrt"] == NOT_INSTALLED:
        return f"TensorRT is not installed here; on a GPU node with TensorRT, build its engines with `{command}`"
    if not run.env["cuda_available"]:
        return f"CUDA is not available here; on a GPU node with TensorRT, build its engines with `{command}`"
    if not run.options.validate_only:
        return None  # loading builds a missing engine, as `engines build` would
    find = getattr(tensorrt_engines, "find_engine", None)
    if find is None:
        return f"this build cannot look engines up; build them with `{command}`"
    try:
        source = network.source(run.args)
        found = None if source is None else find(source.onnx_file(), fp16=fp16, device="cuda")
    except FileNotFoundError:
        return None  # missing weights: the network's own check reports them
    except BackendUnavailable as e:
        return f"{e}; then build its engines with `{command}`"
    if source is not None and found is None:
        return f"no {'fp16' if fp16 else 'fp32'} engine is built for this GPU; build it with `{command}`"
    return None


def rebuild_engines(run: Run) -> None:
    """``--force-rebuild``: rebuild, for every network, the fp16 engine the TensorRT candidate loads."""
    if run.env["tensorrt"] == NOT_INSTALLED or not run.env["cuda_available"]:
        run.say("--force-rebuild: TensorRT or CUDA is not available here, so there is no engine to rebuild")
        return
    for network in NETWORKS:
        try:
            source = network.source(run.args)
            if source is not None:
                _rebuild(run, network.name, source.onnx_file())
        except Exception as e:  # noqa: BLE001 - one network's failed build must not hide the others'
            run.model(network.name, network.stage)
            run.fail(network.name, f"TensorRT engine rebuild failed: {type(e).__name__}: {e}")


def _rebuild(run: Run, name: str, onnx: Path) -> None:
    from festival_serve.runtime import tensorrt_engines
    from festival_serve.runtime.backends.tensorrt_backend import TensorRTBackend

    # Same batch limit as the engine loading picks (the largest found), so the rebuilt file replaces that one.
    found = tensorrt_engines.find_engine(onnx, fp16=True, device="cuda")
    max_batch = (json.loads(tensorrt_engines.sidecar_path(found).read_text())["batch"]["max"] if found
                 else TensorRTBackend.max_batch)
    run.say(f"{name}: rebuilding its TensorRT fp16 engine for batch 1..{max_batch} (minutes)")
    tensorrt_engines.build_engine(onnx, fp16=True, max_batch=int(max_batch), device="cuda", rebuild=True,
                         progress=lambda msg: run.say(f"{name}: {msg}"))


# -- the whole validation ---------------------------------------------------------------------------

def validate(args: PipelineArgs, options: Options) -> dict[str, Any]:
    """Every check, in order; the report (``passed`` is False when anything failed)."""
    started = time.perf_counter()
    run = Run(args, options, environment())
    run.say(f"reference {REFERENCE.label}; candidates: {', '.join(c.label for c in run.candidates)}")
    for name, problem in requirement_failures(run):
        run.fail(name, problem)
    if options.force_rebuild:
        rebuild_engines(run)
    scenes = held_out_scenes(options.scenes)
    steps: list[tuple[str, Callable[[], None]]] = [
        *((n.name, lambda n=n: validate_network(run, n, scenes)) for n in NETWORKS),
        *((s.name, lambda s=s: validate_stage(run, s, scenes)) for s in STAGES if s.agreement),
        ("sign_reader", lambda: validate_reader(run, scenes)),
    ]
    for name, step in steps:
        try:
            step()
        except FileNotFoundError as e:  # weights absent from the model store: a missing requirement
            run.model(name, name)
            run.fail(name, str(e))
        except Exception as e:  # noqa: BLE001 - e.g. the reference itself broke: fail this model, check the rest
            logger.exception("validate: %s", name)
            run.model(name, name)
            run.fail(name, f"{type(e).__name__}: {e}")
    return {
        "passed": not run.failures,
        "failures": run.failures,
        "reference": REFERENCE.label,
        "environment": run.env,
        "config": {"config": str(options.config), "model_store": args.model_store, "seed_split": "test",
                   "scenes": options.scenes, "first_seed": synth.scene_seeds("test", 1)[0],
                   "repeats": options.repeats, "validate_only": options.validate_only,
                   "force_rebuild": options.force_rebuild},
        "tolerances": {p: vars(t) for p, t in TOLERANCES.items()},
        "models": run.models,
        "not_validated": {"scene_describer": "runs in transformers, with no exported network to compare; "
                                             "`festival-serve bench` times it"},
        "wall_s": round(time.perf_counter() - started, 1),
    }


# -- tables -----------------------------------------------------------------------------------------

def tables(report: dict[str, Any]) -> str:
    """The report as human-readable tables."""
    sections = [_environment_lines(report["environment"]), _raw_lines(report), _task_lines(report),
                _speed_lines(report)]
    verdict = "PASSED" if report["passed"] else f"FAILED ({len(report['failures'])})"
    footer = [f"validate: {verdict} in {report['wall_s']} s"] + [f"  - {f}" for f in report["failures"]]
    return "\n\n".join("\n".join(lines) for lines in [*sections, footer])


def _environment_lines(env: dict[str, Any]) -> list[str]:
    cuda = "yes" if env["cuda_available"] else "no"
    lines = [
        "environment",
        f"  python {env['python']}  torch {env['torch']} (CUDA build {env['torch_cuda_build'] or 'none'}, "
        f"CUDA available: {cuda})  TensorRT {env['tensorrt']}",
        f"  onnxruntime {env['onnxruntime']} from {', '.join(env['onnxruntime_package']) or '?'}; "
        f"providers {', '.join(env['onnxruntime_providers'])}",
    ]
    driver = env["nvml"].get("driver_version")
    for d in env["cuda_devices"]:
        lines.append(f"  GPU {d['index']} {d['name']}  sm {d['compute_capability']}  driver {driver}  "
                     f"free {d['memory_free_bytes'] / 2**30:.1f} / {d['memory_total_bytes'] / 2**30:.1f} GiB")
    if not env["cuda_devices"]:
        lines.append(f"  GPU none ({env['nvml'].get('reason') or env['nvml'].get('nvml_error')})")
    return lines


def _raw_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"raw parity against {report['reference']}",
             f"  {'model':16} {'backend':24} {'max abs':>10} {'max rel':>10}  {'rtol':>6} {'atol/peak':>9}  result"]
    for name, model in report["models"].items():
        for r in model["raw"]:
            lines.append(f"  {name:16} {r['backend']:24} {_g(r['max_abs_error']):>10} {_g(r['max_rel_error']):>10}  "
                         f"{r['tolerance']['rtol']:>6g} {r['tolerance']['atol_of_peak']:>9g}  {_ok(r['passed'])}")
    return lines


def _task_lines(report: dict[str, Any]) -> list[str]:
    lines = ["task-level parity (held-out scenes)",
             f"  {'model':16} {'backend':24} {'metric':38} {'value':>6} {'min':>6}  result"]
    for name, model in report["models"].items():
        for t in model["task"]:
            lines.append(f"  {name:16} {t['backend']:24} {t['metric']:38} {t['value']:>6.3f} {t['threshold']:>6.2f}  "
                         f"{_ok(t['passed'])}")
    return lines


def _speed_lines(report: dict[str, Any]) -> list[str]:
    rows = [(name, s) for name, model in report["models"].items() for s in model["speed"]]
    sizes = sorted({int(n) for _, s in rows for n in s["items_per_s"]})
    lines = [f"speed (items/s, median of {report['config']['repeats']}) by batch size",
             f"  {'model':16} {'backend':24} {'unit':6} " + " ".join(f"{'b' + str(n):>8}" for n in sizes)]
    for name, s in rows:
        cells = " ".join(f"{_g(s['items_per_s'].get(str(n)), '.1f'):>8}" for n in sizes)
        lines.append(f"  {name:16} {s['backend']:24} {s['unit']:6} {cells}")
    return lines


def _g(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _ok(passed: bool) -> str:
    return "pass" if passed else "FAIL"


# -- the command ------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(_positive(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, e.g. 1,4,16; got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one batch size")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: %(default)s)")
    parser.add_argument("--model-store", help="override args.model_store")
    parser.add_argument("--scenes", type=_positive, default=DEFAULT_SCENES,
                        help="held-out synthetic scenes to compare on (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, metavar="N,N,...",
                        help="batch sizes to time (default: 1,4,16 on the CPU, 1,2,4,...,64 on a GPU)")
    parser.add_argument("--repeats", type=_positive, default=DEFAULT_REPEATS,
                        help="timed runs per batch size; the median counts (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--validate-only", action="store_true",
                      help="never build a TensorRT engine: a configured tensorrt stage without one fails")
    mode.add_argument("--force-rebuild", action="store_true",
                      help="rebuild the TensorRT engines first (only where TensorRT is installed)")
    parser.add_argument("--json", action="store_true", help="also print the whole report as one JSON line, last")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    """Run every check; tables on stdout, then (``--json``) the report as the last line. Exit 1 on any failure."""
    from festival_serve.ops import up

    options = Options(config=args.config, scenes=args.scenes, batch_sizes=args.batch_sizes, repeats=args.repeats,
                      validate_only=args.validate_only, force_rebuild=args.force_rebuild)
    report = validate(up.pipeline_args(up.load_config(args.config), args.model_store), options)
    print(tables(report), flush=True)
    if args.json:
        print(json.dumps(report, ensure_ascii=False), flush=True)
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="festival-serve validate", description=__doc__.split("\n\n")[0]))
    return cmd_validate(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
