"""``festival-serve validate``: does every runtime this machine offers compute what the reference computes,
and how fast? (The seed app's ``migrate_to_tensorrt.py --validate-only``.)

The reference is **torch fp32 on the CPU**: the checkpoint as trained, on the most deterministic runtime.
Every other backend available here is a *candidate*: ONNX Runtime fp32 on the CPU always; with CUDA also
torch fp32/fp16/bf16, ONNX Runtime on the CUDA provider (where installed) and TensorRT fp16 (where
installed). For held-out synthetic scenes (``synth.scene_seeds("test", n)``, the split ``eval`` scores):

1. environment (``festival_serve.runtime.environment.probe``): Python, torch and its CUDA build, the GPU
   (NVML), TensorRT, ONNX Runtime and its providers;
2. raw parity, per exportable network (``stages.NETWORKS``): the same real input batch through the
   reference and each candidate; max absolute and relative error of every output against a tolerance
   per precision (``parity.TOLERANCES``; fp32 on CUDA is judged as the TF32 it computes in);
3. task-level parity, per stage, loaded through the stage table with only the backend overridden: the
   signs and hazard cells a candidate finds against the reference's (``parity.AGREEMENTS``, by the
   stage's kind of answer); the sign reader (ONNX Runtime only) against the scenes' ground-truth text,
   and on a GPU its CUDA text against its CPU text;
4. speed: items per second against batch size, per network and backend.

The comparisons themselves are ``festival_serve.ops.parity``'s; this module runs them in order, rebuilds
engines, and writes the report, its tables and the command. Any parity failure or missing requirement (a
configured ``backend: tensorrt`` that cannot load here) is listed under ``failures`` and makes the command
exit 1. No Ray import.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from festival_serve.ops.parity import (AGREEMENTS, REFERENCE, TOLERANCES, Candidate, candidates, compare_outputs,
                                       load_network, ocr_exact, text_agreement)
from festival_serve.pipeline.settings import PipelineArgs
from festival_serve.pipeline.stages import NETWORKS, STAGES, Network, Stage
from festival_serve.runtime import environment
from festival_serve.runtime.environment import NOT_INSTALLED
from festival_serve.runtime.errors import BackendUnavailable
from festival_serve.world import scores
from festival_serve.world import synth

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("serve_config.yaml")
#: CPU defaults keep a run to about a minute on a laptop; a GPU sweeps up to past the engines' max batch (32).
DEFAULT_BATCH_SIZES = {"cpu": (1, 4, 16), "cuda": (1, 2, 4, 8, 16, 32, 64)}
DEFAULT_SCENES = 8
DEFAULT_REPEATS = 3
#: Fewer text signs than this say nothing about the reader: more held-out scenes are drawn for it.
MIN_TEXT_SIGNS = 4


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


# -- speed ------------------------------------------------------------------------------------------

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
        result = {"backend": candidate.label, **AGREEMENTS[stage.agreement](expected, answers, candidate.numerics)}
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
        _record_task(run, stage.name, {"backend": candidate.label, **ocr_exact(texts[device], truths)})
        _speed(run, stage.name, candidate, reader.read, crops, "crops")
    if len(texts) == 2:
        _record_task(run, stage.name, {"backend": Candidate(runtime, "cuda", "fp32").label,
                                       **text_agreement(texts["cpu"], texts["cuda"])})



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
    run = Run(args, options, environment.probe())
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


def _model_table(report: dict[str, Any], title: str, part: str, head: str,
                 cells: Callable[[dict[str, Any]], str]) -> list[str]:
    """``title``, the column heads (model, backend, then ``head``), and a line per model and backend of the
    report's ``part`` ("raw", "task" or "speed" of each model): its name, backend, then ``cells(row)``."""
    lines = [title, f"  {'model':16} {'backend':24} {head}"]
    lines += [f"  {name:16} {row['backend']:24} {cells(row)}"
              for name, model in report["models"].items() for row in model[part]]
    return lines


def _raw_lines(report: dict[str, Any]) -> list[str]:
    return _model_table(
        report, f"raw parity against {report['reference']}", "raw",
        f"{'max abs':>10} {'max rel':>10}  {'rtol':>6} {'atol/peak':>9}  result",
        lambda r: f"{_g(r['max_abs_error']):>10} {_g(r['max_rel_error']):>10}  "
                  f"{r['tolerance']['rtol']:>6g} {r['tolerance']['atol_of_peak']:>9g}  {_ok(r['passed'])}")


def _task_lines(report: dict[str, Any]) -> list[str]:
    return _model_table(
        report, "task-level parity (held-out scenes)", "task", f"{'metric':38} {'value':>6} {'min':>6}  result",
        lambda t: f"{t['metric']:38} {t['value']:>6.3f} {t['threshold']:>6.2f}  {_ok(t['passed'])}")


def _speed_lines(report: dict[str, Any]) -> list[str]:
    sizes = sorted({int(n) for model in report["models"].values() for s in model["speed"] for n in s["items_per_s"]})
    return _model_table(
        report, f"speed (items/s, median of {report['config']['repeats']}) by batch size", "speed",
        f"{'unit':6} " + " ".join(f"{'b' + str(n):>8}" for n in sizes),
        lambda s: f"{s['unit']:6} " + " ".join(f"{_g(s['items_per_s'].get(str(n)), '.1f'):>8}" for n in sizes))


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
