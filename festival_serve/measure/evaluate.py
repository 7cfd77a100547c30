"""End-to-end accuracy through the HTTP API: ``festival-serve eval``.

Held-out synthetic scenes (``synth.scene_seeds("test", n)``, never seen by a training run) are
JPEG-encoded, posted to ``/v1/analyze?describe=false`` of a running deployment with a bounded number
of requests in flight, and the answers are scored against the generator's ground truth:

- signs: greedy class-aware matching at IoU 0.5 → precision, recall, per-class AP, mAP50;
- OCR on the matched signs that carry text: exact match and character error rate, with tone marks
  and with them stripped, and the characters of the truth texts that were never read (the shipped
  PP-OCR dictionary lacks most tone-marked Vietnamese letters);
- hazards: the answer's flagged cells as a (cells, classes) bool array → micro precision/recall/F1;
- latency: client wall time per request and the server's own ``timings_ms``.

A request that fails counts as an error and its scene as entirely missed (every sign a false
negative, every hazard cell too): nothing is silently dropped. The metric functions are pure and
take plain values, so they are tested on hand-made cases without a server.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from festival_serve.serving.flow import degraded_line
from festival_serve.serving.imaging import encode_jpeg
from festival_serve.models.sign_reader.reader import strip_tones

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels

IOU_THRESHOLD = 0.5
#: Signs hidden more than this are "difficult" (PASCAL VOC's term): a detection of one is neither a
#: true nor a false positive, missing one is no false negative, and its text is not scored.
OCCLUSION_LIMIT = 0.5
#: The issue's targets on the held-out set, checked by ``--strict``: each metric at least this.
TARGETS = {
    "signs.precision": 0.95,
    "signs.recall": 0.95,
    "ocr.exact_match": 0.90,  # with tone marks: a place name with a wrong tone is a wrong place name
    "ocr.exact_match_no_tones": 0.97,
    "hazards.f1": 0.87,
}
#: Targets where lower is better: each metric at most this.
CEILINGS = {"ocr.cer": 0.03}
#: What the information signs say: the world's phrases (``synth.INFO_TEXTS``, which the recognizer trained
#: on), or phrases and places no training line contained (``vietnamese`` "val" split), read to the
#: issue's own bar for text never seen.
SIGN_TEXTS = ("world", "held-out")
HELD_OUT_TARGETS = {"ocr.exact_match": 0.85}
#: With --describe: how faithful the descriptions are (``descriptions.faithfulness``), read over the answers.
DESCRIBE_TARGETS = {"descriptions.mention_recall": 0.90, "descriptions.lighting_accuracy": 0.85,
                    "descriptions.lanes_accuracy": 0.85}
DESCRIBE_CEILINGS = {"descriptions.hallucinations_per_description": 0.05}
#: Letters listed in a report's ``ocr.confusions``, worst first.
CONFUSIONS_SHOWN = 15
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((848, 480), (1280, 720))


# -- signs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    box: Box
    label: str
    score: float = 1.0
    text: str | None = None


@dataclass(frozen=True)
class GroundTruth:
    box: Box
    label: str
    text: str = ""
    difficult: bool = False


@dataclass(frozen=True)
class Matching:
    """The outcome of matching one image's predictions to its ground truth."""

    pairs: tuple[tuple[int, int], ...]  # (prediction index, truth index), true positives
    false_positives: tuple[int, ...]  # prediction indices
    missed: tuple[int, ...]  # truth indices (difficult truths excluded)
    ignored: tuple[int, ...] = ()  # prediction indices matched to a difficult truth


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (0 when either is empty)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_detections(preds: Sequence[Prediction], truths: Sequence[GroundTruth], iou: float = IOU_THRESHOLD) -> Matching:
    """Greedy class-aware matching, highest score first (COCO's rule): each prediction takes the
    unmatched truth of its own label with the highest IoU, if that IoU is at least ``iou``.

    A prediction left without a truth is a false positive; a non-difficult truth left without a
    prediction is missed. Ties in score keep the predictions' order.
    """
    order = sorted(range(len(preds)), key=lambda i: -preds[i].score)
    taken: set[int] = set()
    pairs, false_positives, ignored = [], [], []
    for p in order:
        best, best_iou = None, iou
        for t, truth in enumerate(truths):
            if t in taken or truth.label != preds[p].label:
                continue
            overlap = box_iou(preds[p].box, truth.box)
            if overlap >= iou and (best is None or overlap > best_iou):
                best, best_iou = t, overlap
        if best is None:
            false_positives.append(p)
            continue
        taken.add(best)
        if truths[best].difficult:
            ignored.append(p)
        else:
            pairs.append((p, best))
    missed = tuple(t for t, truth in enumerate(truths) if t not in taken and not truth.difficult)
    return Matching(tuple(pairs), tuple(false_positives), missed, tuple(ignored))


def average_precision(scored: Iterable[tuple[float, bool]], num_truths: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+, COCO's at a single IoU) of one class.

    ``scored`` holds ``(score, is_true_positive)`` for every prediction of the class over the whole
    set; ``num_truths`` counts its non-difficult truths. The area under the precision–recall curve
    after making precision monotonically non-increasing in recall.
    """
    if num_truths == 0:
        raise ValueError("AP is undefined for a class with no ground truth")
    ranked = sorted(scored, key=lambda s: -s[0])
    if not ranked:
        return 0.0
    hits = np.array([tp for _, tp in ranked], dtype=np.float64)
    tp = np.cumsum(hits)
    fp = np.cumsum(1.0 - hits)
    recall = np.concatenate([[0.0], tp / num_truths])
    precision = np.concatenate([[1.0], tp / (tp + fp)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def sign_metrics(
    images: Sequence[tuple[Sequence[Prediction], Sequence[GroundTruth]]],
    *,
    iou: float = IOU_THRESHOLD,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Precision and recall of the served detections, and per-class AP / mAP50, over a set of images.

    Precision and recall are at the deployment's own confidence threshold (every returned sign
    counts). ``per_class_ap`` covers the classes with ground truth (and any of ``classes`` that have
    some); ``map50`` is their mean. A class that is only ever predicted, never present, shows up as
    false positives in ``precision`` and in ``false_positives_by_class``.
    """
    scored: dict[str, list[tuple[float, bool]]] = collections.defaultdict(list)
    num_truths: collections.Counter[str] = collections.Counter()
    fp_by_class: collections.Counter[str] = collections.Counter()
    tp = fp = fn = ignored = 0
    for preds, truths in images:
        m = match_detections(preds, truths, iou)
        matched = {p for p, _ in m.pairs}
        for p, pred in enumerate(preds):
            if p in m.ignored:
                continue
            scored[pred.label].append((pred.score, p in matched))
        for p in m.false_positives:
            fp_by_class[preds[p].label] += 1
        num_truths.update(t.label for t in truths if not t.difficult)
        tp, fp, fn, ignored = tp + len(m.pairs), fp + len(m.false_positives), fn + len(m.missed), ignored + len(m.ignored)
    wanted = [c for c in (classes or sorted(num_truths)) if num_truths[c] > 0]
    per_class = {c: round(average_precision(scored[c], num_truths[c]), 4) for c in wanted}
    return {
        "precision": _rate(tp, tp + fp, empty=1.0 if fn == 0 else 0.0),
        "recall": _rate(tp, tp + fn, empty=1.0),
        "map50": round(float(np.mean(list(per_class.values()))), 4) if per_class else None,
        "per_class_ap": per_class,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "ignored_difficult": ignored,
        "truths_by_class": dict(sorted(num_truths.items())),
        "false_positives_by_class": dict(sorted(fp_by_class.items())),
    }


def _rate(numerator: int, denominator: int, *, empty: float) -> float:
    """``numerator / denominator`` rounded for the report; ``empty`` when there is nothing to count."""
    return round(numerator / denominator, 4) if denominator else empty


# -- OCR --------------------------------------------------------------------------------------------

def normalize_text(text: str | None) -> str:
    """NFC, whitespace runs collapsed to one space, trimmed; case is kept (signs are upper case)."""
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(pred: str | None, truth: str) -> float:
    """Character error rate: edit distance / truth length (0 for two empty strings, 1 for text
    invented where there is none). Unbounded above, as insertions can outnumber the truth."""
    pred = pred or ""
    if not truth:
        return 0.0 if not pred else 1.0
    return levenshtein(pred, truth) / len(truth)


def align(pred: str, truth: str) -> list[tuple[str, str]]:
    """Each character of ``truth`` with what ``pred`` has in its place (``""`` where it was dropped),
    from one minimal edit script."""
    rows, cols = len(truth) + 1, len(pred) + 1
    cost = np.zeros((rows, cols), dtype=np.int32)
    cost[:, 0], cost[0, :] = np.arange(rows), np.arange(cols)
    for i in range(1, rows):
        for j in range(1, cols):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (truth[i - 1] != pred[j - 1]))
    pairs: list[tuple[str, str]] = []
    i, j = len(truth), len(pred)
    while i > 0:
        if j > 0 and cost[i, j] == cost[i - 1, j - 1] + (truth[i - 1] != pred[j - 1]):
            pairs.append((truth[i - 1], pred[j - 1]))
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            pairs.append((truth[i - 1], ""))
            i -= 1
        else:
            j -= 1  # an inserted character: nothing of the truth in its place
    return pairs[::-1]


def letter_confusions(pairs: Sequence[tuple[str | None, str]], *, top: int = 3) -> list[dict[str, Any]]:
    """Per letter of the truth texts that was misread at least once, worst first: how often the truths
    contain it, the share read right, and what was read in its place (the ``top`` most common; ``""`` =
    dropped). Spaces are not letters. With the shipped PP-OCR model, the tone-marked letters its
    dictionary lacks are read right 0% of the time."""
    seen: collections.Counter[str] = collections.Counter()
    correct: collections.Counter[str] = collections.Counter()
    read_as: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pred, truth in pairs:
        for want, got in align(normalize_text(pred), normalize_text(truth)):
            if want.isspace():
                continue
            seen[want] += 1
            if want == got:
                correct[want] += 1
            else:
                read_as[want][got] += 1
    misread = [c for c in seen if correct[c] < seen[c]]
    misread.sort(key=lambda c: (-(seen[c] - correct[c]), c))
    return [
        {"char": c, "codepoint": f"U+{ord(c):04X}", "count": seen[c], "read_right": round(correct[c] / seen[c], 3),
         "read_as": dict(read_as[c].most_common(top))}
        for c in misread
    ]


def unreadable_characters(pairs: Sequence[tuple[str | None, str]], *, top: int = 3) -> list[dict[str, Any]]:
    """The characters of the truth texts that were never read correctly, most frequent first (the
    ``letter_confusions`` read right 0% of the time, without that share)."""
    never = [entry for entry in letter_confusions(pairs, top=top) if entry["read_right"] == 0]
    never.sort(key=lambda e: (-e["count"], e["char"]))
    return [{k: v for k, v in entry.items() if k != "read_right"} for entry in never]


def ocr_metrics(pairs: Sequence[tuple[str | None, str]]) -> dict[str, Any]:
    """OCR quality over ``(read text, truth text)`` pairs: the matched signs whose truth has text.

    ``cer``/``cer_no_tones`` are corpus-level (total edits / total truth characters), each sign's
    edits capped at its own length so that a garbage read weighs like an unread sign, which keeps
    the rate in [0, 1]. ``None`` (a sign the reader could not read) counts as the empty string.
    """
    pairs = [(normalize_text(p), normalize_text(t)) for p, t in pairs if normalize_text(t)]
    if not pairs:
        return {"evaluated": 0, "exact_match": None, "exact_match_no_tones": None, "cer": None,
                "cer_no_tones": None, "unreadable_characters": [], "confusions": []}
    toneless = [(strip_tones(p), strip_tones(t)) for p, t in pairs]
    return {
        "evaluated": len(pairs),
        "exact_match": _rate(sum(p == t for p, t in pairs), len(pairs), empty=1.0),
        "exact_match_no_tones": _rate(sum(p == t for p, t in toneless), len(pairs), empty=1.0),
        "cer": _corpus_cer(pairs),
        "cer_no_tones": _corpus_cer(toneless),
        "unreadable_characters": unreadable_characters(pairs),
        "confusions": letter_confusions(pairs)[:CONFUSIONS_SHOWN],
    }


def _corpus_cer(pairs: Sequence[tuple[str, str]]) -> float:
    edits = sum(min(levenshtein(p, t), len(t)) for p, t in pairs)
    return round(edits / sum(len(t) for _, t in pairs), 4)


# -- hazard cells -----------------------------------------------------------------------------------

def hazard_array(hazards: Sequence[dict], classes: Sequence[str], num_cells: int) -> np.ndarray:
    """The API's ``hazards`` list as a ``(num_cells, len(classes))`` bool array (class order =
    ``classes``, the layout's). An unknown cell index or label is an error: it means the server runs
    a different layout than the one evaluated against."""
    out = np.zeros((num_cells, len(classes)), dtype=bool)
    index = {c: i for i, c in enumerate(classes)}
    for cell in hazards:
        c = int(cell["cell"])
        if not 0 <= c < num_cells:
            raise ValueError(f"hazard cell {c} is outside the layout's {num_cells} cells")
        for label in cell.get("labels", ()):
            if label["label"] not in index:
                raise ValueError(f"hazard label {label['label']!r} is not one of the layout's classes {list(classes)}")
            out[c, index[label["label"]]] = True
    return out


def cell_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro precision/recall/F1 over every (image, cell, class) entry of two same-shape bool arrays."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: predicted {pred.shape}, truth {truth.shape}")
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "true_positives": tp, "false_positives": fp, "false_negatives": fn}


# -- latency ----------------------------------------------------------------------------------------

def latency_summary(values_ms: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/p99/mean/max of a list of milliseconds (``None`` when empty)."""
    if not len(values_ms):
        return None
    v = np.asarray(values_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "p99": round(float(p99), 1),
            "mean": round(float(v.mean()), 1), "max": round(float(v.max()), 1), "count": int(v.size)}


# -- converting between the API, the generator and the metrics --------------------------------------

def predictions_from_api(signs: Sequence[dict]) -> list[Prediction]:
    return [Prediction(tuple(s["box"]), s["label"], float(s.get("score", 1.0)), s.get("text")) for s in signs]


def truths_from_scene(signs: Iterable[Any], occlusion_limit: float = OCCLUSION_LIMIT) -> list[GroundTruth]:
    """``synth.SignTruth``s as ground truth; signs hidden more than ``occlusion_limit`` are difficult."""
    return [GroundTruth(tuple(float(v) for v in s.box), s.sign_class, s.text, s.occluded > occlusion_limit)
            for s in signs]


# -- the client -------------------------------------------------------------------------------------

class EvaluationError(RuntimeError):
    """The evaluation could not run at all (e.g. nothing answers at the URL)."""


@dataclass
class Outcome:
    """One scene's ground truth and what the server said about it (``error`` set when it failed)."""

    seed: int
    size: tuple[int, int]
    truths: list[GroundTruth]
    cells: np.ndarray  # (cells, classes) bool
    signs: list[Prediction] = field(default_factory=list)
    hazards: np.ndarray | None = None
    client_ms: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    error: str | None = None
    facts: Any = None  # synth SceneFacts: what only the image shows
    description: str | None = None  # the answer's, when it was asked for one
    findings: Any = None  # vlm.Findings the describer was given, rebuilt from the answer's signs and cells


def info_texts(sign_texts: str) -> tuple[str, ...]:
    """What the scenes' information signs say for ``sign_texts`` (``SIGN_TEXTS``)."""
    from festival_serve.world import synth

    from festival_serve.models.sign_reader import charset
    targets_for(sign_texts)  # validates the name
    return synth.INFO_TEXTS if sign_texts == "world" else (*charset.phrases("val"), *charset.places("val"))


def _scenes(seeds: Sequence[int], sizes: Sequence[tuple[int, int]], quality: int,
            sign_texts: str = "world") -> Iterator[tuple[Outcome, bytes]]:
    """Each held-out scene, sizes taken in turn, as (its ground truth, its JPEG); the pixels are
    dropped once encoded so only the truths stay in memory."""
    from festival_serve.world import synth

    texts = info_texts(sign_texts)
    for i, seed in enumerate(seeds):
        size = tuple(sizes[i % len(sizes)])
        scene = synth.generate_scene(seed, size=size, info_texts=texts)
        truth = Outcome(seed, size, truths_from_scene(scene.signs), np.asarray(scene.cells, dtype=bool),
                        facts=scene.facts)
        yield truth, encode_jpeg(scene.image, quality)


def _post(client, url: str, outcome: Outcome, jpeg: bytes, classes: Sequence[str], describe: bool) -> Outcome:
    """Send one scene and fill ``outcome`` with the answer, or with the reason there is none."""
    import httpx

    headers = {"content-type": "image/jpeg", "x-scene-seed": str(outcome.seed), "x-request-id": f"eval-{outcome.seed}-{uuid.uuid4().hex[:8]}"}
    started = time.perf_counter()
    try:
        reply = client.post(f"{url}/v1/analyze", content=jpeg, params={"describe": str(describe).lower()}, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        if reply.status_code != 200:
            outcome.error = f"http_{reply.status_code}"
            return outcome
        body = reply.json()
        outcome.signs = predictions_from_api(body.get("signs") or [])
        outcome.hazards = hazard_array(body.get("hazards") or [], classes, outcome.cells.shape[0])
        if describe:
            outcome.description = body.get("description")
            outcome.findings = findings_from_answer(body)
    except httpx.HTTPError as e:
        outcome.error = type(e).__name__
        return outcome
    except (ValueError, KeyError, TypeError) as e:  # a 200 whose body does not follow the API
        logger.warning("scene %d: the answer does not follow the API: %s: %s", outcome.seed, type(e).__name__, e)
        outcome.error = f"bad_response:{type(e).__name__}"
        outcome.signs, outcome.hazards = [], None
        return outcome
    outcome.client_ms = elapsed
    outcome.timings_ms = {k: float(v) for k, v in (body.get("timings_ms") or {}).items()}
    outcome.degraded = [degraded_line(entry) for entry in body.get("degraded") or []]
    return outcome


def findings_from_answer(body: dict[str, Any]):
    """The findings the ingress gave the describer for this answer: its signs (label, text) and its hazard
    cells placed as the ingress places them (``places.hazard_places``)."""
    from festival_serve.pipeline.places import hazard_places
    from festival_serve.pipeline.types import Findings

    size = (int(body["image"]["width"]), int(body["image"]["height"]))
    cells = [([lab["label"] for lab in cell["labels"]], cell["box"]) for cell in body.get("hazards") or []]
    return Findings(signs=tuple((s["label"], s.get("text") or "") for s in body.get("signs") or []),
                    hazards=hazard_places(cells, size))


def description_metrics(outcomes: Sequence[Outcome], classes: Sequence[str]) -> dict[str, Any]:
    """Faithfulness of every answer's description (``descriptions.faithfulness``) against the findings it was
    given and the scene's truth, summarised; answers that came back without one are counted apart."""
    from festival_serve.world import descriptions

    scores, words = [], []
    for o in outcomes:
        if o.error is None and o.description:
            truth_hazards = [label for k, label in enumerate(classes) if o.cells[:, k].any()]
            scores.append(descriptions.faithfulness(
                o.description, o.findings, truth_signs=[(t.label, t.text) for t in o.truths],
                truth_hazards=truth_hazards, facts=o.facts))
            words.append(len(o.description.split()))
    asked = [o for o in outcomes if o.error is None]
    return {**descriptions.summarize(scores), "without_description": len(asked) - len(scores),
            "words": latency_summary(words),
            # "sign:info:BẾN XE" -> "sign:info": which kinds of finding go unmentioned.
            "missed": dict(collections.Counter(":".join(m.split(":")[:2]) for s in scores
                                               for m in s.missed).most_common(10)),
            "hallucinated": dict(collections.Counter(h for s in scores for h in s.hallucinated).most_common(10))}


def _check_reachable(client, url: str) -> None:
    import httpx

    try:
        client.get(f"{url}/healthz", timeout=10)
    except httpx.HTTPError as e:
        raise EvaluationError(f"cannot reach {url}: {type(e).__name__}: {e} (is `festival-serve up` running?)") from e


def run_requests(
    url: str,
    scenes: Iterable[tuple[Outcome, bytes]],
    *,
    total: int,
    classes: Sequence[str],
    concurrency: int,
    timeout: float,
    describe: bool = False,
    progress: bool = True,
) -> list[Outcome]:
    """Post every scene with at most ``concurrency`` requests in flight, in seed order back.

    Scenes are generated on this thread while the pool posts; a semaphore bounds the scenes waiting
    to be sent to ``2 × concurrency``, so memory stays flat for any number of images.
    """
    import httpx
    from tqdm import tqdm

    slots = threading.Semaphore(2 * concurrency)
    futures: list[Future] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout, limits=limits) as client, \
            ThreadPoolExecutor(concurrency, thread_name_prefix="eval") as pool, \
            tqdm(total=total, desc="eval", unit="img", disable=not progress, file=sys.stderr) as bar:
        _check_reachable(client, url)
        errors = 0

        def done(future: Future) -> None:
            nonlocal errors
            slots.release()
            errors += future.result().error is not None
            bar.set_postfix(errors=errors, refresh=False)
            bar.update()

        for outcome, jpeg in scenes:
            slots.acquire()
            future = pool.submit(_post, client, url, outcome, jpeg, classes, describe)
            future.add_done_callback(done)
            futures.append(future)
        return [f.result() for f in futures]


def report(outcomes: Sequence[Outcome], *, sign_classes: Sequence[str] | None = None,
           wall_s: float | None = None, sign_texts: str = "world", describe: bool = False,
           hazard_classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The full report from every scene's outcome; a failed scene scores as entirely missed."""
    signs = sign_metrics([(o.signs if o.error is None else [], o.truths) for o in outcomes], classes=sign_classes)
    ocr = ocr_metrics(_text_pairs(outcomes, detected_only=True))
    # End to end, as a user sees it: every sign with text, an undetected or failed one read as "".
    end_to_end = ocr_metrics(_text_pairs(outcomes, detected_only=False))
    ocr["signs_with_text"] = end_to_end["evaluated"]
    ocr["end_to_end"] = {k: v for k, v in end_to_end.items() if k not in ("unreadable_characters", "confusions")}
    cells = [o.cells for o in outcomes]
    predicted = [o.hazards if o.error is None and o.hazards is not None else np.zeros_like(o.cells) for o in outcomes]
    answered = [o for o in outcomes if o.error is None]
    stages = sorted({k for o in answered for k in o.timings_ms if k != "total"})
    result = {
        "images": len(outcomes),
        "answered": len(answered),
        "errors": len(outcomes) - len(answered),
        "error_kinds": dict(collections.Counter(o.error for o in outcomes if o.error).most_common()),
        "degraded_responses": sum(bool(o.degraded) for o in answered),
        "degraded_reasons": dict(collections.Counter(r for o in answered for r in o.degraded).most_common(10)),
        "signs": signs,
        "ocr": ocr,
        "hazards": cell_metrics(np.stack(predicted), np.stack(cells)) if outcomes else None,
        "latency_ms": {
            "client": latency_summary([o.client_ms for o in answered]),
            "server_total": latency_summary([o.timings_ms["total"] for o in answered if "total" in o.timings_ms]),
            "stages": {s: latency_summary([o.timings_ms[s] for o in answered if s in o.timings_ms]) for s in stages},
        },
    }
    if describe:
        from festival_serve.models.hazard_cells.yolic import load_layout

        result["descriptions"] = description_metrics(outcomes, hazard_classes or load_layout("outdoor").classes)
    if wall_s:
        result["throughput_images_per_s"] = round(len(answered) / wall_s, 2)
    result["targets"] = check_targets(result, sign_texts, describe)
    return result


def _text_pairs(outcomes: Sequence[Outcome], *, detected_only: bool) -> list[tuple[str | None, str]]:
    """``(read text, truth text)`` of the non-difficult signs whose truth has text: the detected ones,
    or all of them with ``None`` for those not detected."""
    pairs: list[tuple[str | None, str]] = []
    for o in outcomes:
        read = {}
        if o.error is None:
            read = {t: o.signs[p].text for p, t in match_detections(o.signs, o.truths).pairs}
        for t, truth in enumerate(o.truths):
            if truth.text.strip() and not truth.difficult and (t in read or not detected_only):
                pairs.append((read.get(t), truth.text))
    return pairs


def targets_for(sign_texts: str = "world", describe: bool = False) -> dict[str, tuple[float, str]]:
    """``metric path -> (target, "min" | "max")`` for scenes whose signs say ``sign_texts`` (``SIGN_TEXTS``):
    held-out phrases are held to ``HELD_OUT_TARGETS`` instead of the world's OCR targets; ``describe`` adds
    the descriptions' targets."""
    if sign_texts not in SIGN_TEXTS:
        raise ValueError(f"sign_texts must be one of {', '.join(SIGN_TEXTS)}, not {sign_texts!r}")
    floors, ceilings = dict(TARGETS), dict(CEILINGS)
    if sign_texts == "held-out":
        floors = {k: v for k, v in floors.items() if not k.startswith("ocr.")} | HELD_OUT_TARGETS
        ceilings = {}
    if describe:
        floors, ceilings = floors | DESCRIBE_TARGETS, ceilings | DESCRIBE_CEILINGS
    return {k: (v, "min") for k, v in floors.items()} | {k: (v, "max") for k, v in ceilings.items()}


def check_targets(result: dict[str, Any], sign_texts: str = "world",
                  describe: bool = False) -> dict[str, dict[str, Any]]:
    """The issue's targets: each metric's value, its target, which way it must lie, whether it is met."""
    out = {}
    for path, (target, bound) in targets_for(sign_texts, describe).items():
        section, key = path.split(".")
        value = (result.get(section) or {}).get(key)
        met = value is not None and (value >= target if bound == "min" else value <= target)
        out[path] = {"value": value, "target": target, "bound": bound, "met": met}
    return out


def evaluate(
    url: str,
    *,
    images: int,
    seed_split: str = "test",
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    concurrency: int = 4,
    jpeg_quality: int = 90,
    timeout: float = 120,
    describe: bool = False,
    progress: bool = True,
    sign_texts: str = "world",
) -> dict[str, Any]:
    """Send ``images`` held-out scenes through the deployment at ``url`` and score its answers;
    ``sign_texts``: what their information signs say (``SIGN_TEXTS``)."""
    from festival_serve.world import synth
    from festival_serve.models.hazard_cells.yolic import load_layout

    if images < 1 or concurrency < 1:
        raise ValueError("images and concurrency must be at least 1")
    classes = load_layout("outdoor").classes  # Scene.cells' column order
    seeds = synth.scene_seeds(seed_split, images)
    started = time.perf_counter()
    outcomes = run_requests(
        url.rstrip("/"), _scenes(seeds, sizes, jpeg_quality, sign_texts), total=len(seeds), classes=classes,
        concurrency=concurrency, timeout=timeout, describe=describe, progress=progress,
    )
    result = report(outcomes, sign_classes=synth.SIGN_CLASSES, wall_s=time.perf_counter() - started,
                    sign_texts=sign_texts, describe=describe, hazard_classes=classes)
    result["config"] = {"url": url, "seed_split": seed_split, "sign_texts": sign_texts, "seeds": [seeds[0], seeds[-1]],
                        "sizes": [list(s) for s in sizes], "concurrency": concurrency, "jpeg_quality": jpeg_quality,
                        "iou": IOU_THRESHOLD, "occlusion_limit": OCCLUSION_LIMIT, "describe": describe}
    return result


# -- the command ------------------------------------------------------------------------------------

def summary(result: dict[str, Any]) -> str:
    """A few human-readable lines of the report."""
    s, o, h, lat = result["signs"], result["ocr"], result["hazards"], result["latency_ms"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"images {result['images']}  answered {result['answered']}  errors {result['errors']}  "
        f"degraded {result['degraded_responses']}",
        f"signs    precision {pct(s['precision'])}  recall {pct(s['recall'])}  mAP50 {pct(s['map50'])}  "
        f"(tp {s['true_positives']}, fp {s['false_positives']}, fn {s['false_negatives']})",
        "         AP " + "  ".join(f"{c} {pct(v)}" for c, v in s["per_class_ap"].items()),
        f"ocr      exact {pct(o['exact_match'])}  exact without tones {pct(o['exact_match_no_tones'])}  "
        f"CER {pct(o['cer'])}  CER without tones {pct(o['cer_no_tones'])}  ({o['evaluated']} detected of "
        f"{o['signs_with_text']} signs with text)",
        f"         end to end (undetected signs count as unread): exact without tones "
        f"{pct(o['end_to_end']['exact_match_no_tones'])}",
    ]
    if o["unreadable_characters"]:
        chars = " ".join(u["char"] for u in o["unreadable_characters"])
        lines.append(f"         never read: {chars}")
    if o.get("confusions"):
        worst = "  ".join(f"{c['char']} {pct(c['read_right'])}" for c in o["confusions"][:8])
        lines.append(f"         most misread (share read right): {worst}")
    if h:
        lines.append(f"hazards  precision {pct(h['precision'])}  recall {pct(h['recall'])}  F1 {pct(h['f1'])}")
    d = result.get("descriptions")
    if d:
        lines.append(f"describe mention recall {pct(d['mention_recall'])}  hallucinated signs/hazards "
                     f"{d['hallucinations_per_description']} a description  lighting {pct(d['lighting_accuracy'])}  "
                     f"lanes {pct(d['lanes_accuracy'])}  vehicles/people placed {pct(d['road_users_accuracy'])}  "
                     f"({d['descriptions']} described, {d['without_description']} without)")
    for name, values in (("client", lat["client"]), ("server", lat["server_total"])):
        if values:
            lines.append(f"latency  {name:6} p50 {values['p50']:.0f} ms  p95 {values['p95']:.0f} ms  p99 {values['p99']:.0f} ms")
    if result["error_kinds"]:
        lines.append("errors   " + ", ".join(f"{k} ×{n}" for k, n in result["error_kinds"].items()))
    if result["degraded_reasons"]:
        lines.append("degraded " + "; ".join(f"{k} ×{n}" for k, n in result["degraded_reasons"].items()))
    lines.append("targets  " + "  ".join(f"{k} {'ok' if t['met'] else 'MISSED'}" for k, t in result["targets"].items()))
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, e.g. 848x480; got {text!r}") from None
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running deployment")
    parser.add_argument("--images", type=_positive, default=200, help="held-out scenes to send")
    parser.add_argument("--split", default="test", help="the generator's seed split (default: the held-out test split)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES), metavar="WxH",
                        help="frame sizes, taken in turn (default: 848x480 1280x720)")
    parser.add_argument("--concurrency", type=_positive, default=4, help="requests in flight")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    parser.add_argument("--sign-texts", choices=SIGN_TEXTS, default="world",
                        help="what the information signs say: the world's phrases, or phrases and places no "
                             "recognizer training line contained (scored to the held-out OCR target)")
    parser.add_argument("--describe", action="store_true",
                        help="also run the scene describer and score its descriptions' faithfulness (slower)")
    parser.add_argument("--out", help="also write the report to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target of the issue is missed")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation; summary on stderr, the whole report as the last line of stdout."""
    try:
        result = evaluate(args.url, images=args.images, seed_split=args.split, sizes=args.sizes,
                          concurrency=args.concurrency, jpeg_quality=args.jpeg_quality, timeout=args.timeout,
                          describe=args.describe, progress=not args.no_progress, sign_texts=args.sign_texts)
    except EvaluationError as e:
        print(f"festival-serve eval: {e}", file=sys.stderr)
        return 1
    print(summary(result), file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    print(json.dumps(result, ensure_ascii=False), flush=True)
    missed = [k for k, t in result["targets"].items() if not t["met"]]
    return 1 if args.strict and missed else 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="festival-serve eval", description=__doc__.split("\n\n")[0]))
    return cmd_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
