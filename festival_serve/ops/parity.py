"""Does a candidate runtime compute what the reference computes? The comparisons ``validate`` makes.

- *What is compared*: a ``Candidate`` is one way to run a network (backend, device, precision); the
  ``REFERENCE`` is torch fp32 on the CPU; ``candidates`` lists what a machine offers, from
  ``festival_serve.runtime.environment.probe``'s answer.
- *Raw parity*: every output of a network on the same input batch, element by element, against a
  tolerance per arithmetic (``TOLERANCES``, by ``Candidate.numerics``).
- *Task-level parity*: two runs' answers on the same scenes, by the kind of answer a stage gives
  (``AGREEMENTS``, keyed by ``Stage.agreement``), and the sign reader's text against the truth and
  across devices. Each gives a verdict ``{"metric", "value", "threshold", "passed", "details"}``.

Pure functions of arrays and answers, besides ``load_network``; no Ray import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from festival_serve.runtime.environment import NOT_INSTALLED
from festival_serve.world import scores


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


# -- raw parity -------------------------------------------------------------------------------------

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


# -- task-level parity ------------------------------------------------------------------------------

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


def ocr_exact(read: Sequence[str], truths: Sequence[str]) -> dict[str, Any]:
    """The reader's text on ground-truth crops against the truth: exact matches, with tone marks."""
    metrics = scores.ocr_metrics(list(zip(read, truths)))
    # With tone marks, as `eval` scores the served recognizer; the no-tone figures stay for PP-OCRv6's sake.
    details = {k: metrics[k] for k in ("evaluated", "exact_match", "exact_match_no_tones", "cer", "cer_no_tones")}
    return _verdict("exact text vs truth, with tones", metrics["exact_match"], OCR_EXACT, details)


def text_agreement(cpu: Sequence[str], cuda: Sequence[str]) -> dict[str, Any]:
    """The share of crops the reader reads the same on CUDA as on the CPU (same ONNX graphs, other kernels)."""
    same = sum(a == b for a, b in zip(cpu, cuda, strict=True))
    return _verdict("same text as on the CPU", same / len(cpu), OCR_DEVICE_AGREEMENT,
                    {"crops": len(cpu), "same": same})


#: The comparison of two runs' answers, by the kind of answer a stage gives (``Stage.agreement``):
#: ``(reference's answers, candidate's answers, Candidate.numerics)`` → a verdict, where answers are one list
#: per scene: "detections" of ``SignDetection``s, "cells" of ``HazardCell``s (the cells flagged with labels).
AGREEMENTS: dict[str, Callable[[Sequence[Sequence[Any]], Sequence[Sequence[Any]], str], dict[str, Any]]] = {
    "detections": sign_agreement,
    "cells": hazard_agreement,
}
