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
negative, every hazard cell too): nothing is silently dropped. The scores themselves are pure functions
in ``festival_serve.world.scores``; this module is the HTTP runner and its report.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from festival_serve.serving.flow import degraded_line
from festival_serve.serving.imaging import encode_jpeg
from festival_serve.world.scores import (
    DEFAULT_SIZES, IOU_THRESHOLD, OCCLUSION_LIMIT, SIGN_TEXTS, GroundTruth, Prediction, cell_metrics, check_targets,
    hazard_array, latency_summary, match_detections, ocr_metrics, predictions_from_api, sign_metrics, targets_for,
    truths_from_scene,
)

logger = logging.getLogger(__name__)

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


    from festival_serve.world import phrases
    targets_for(sign_texts)  # validates the name
    return synth.INFO_TEXTS if sign_texts == "world" else (*phrases.phrases("val"), *phrases.places("val"))


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
        f"signs    precision {pct(s['precision'])}  recall {pct(s['recall'])}  mAP50 (all-point) {pct(s['map50'])}  "
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
    parser.add_argument("--url", "--server", dest="url", default="http://127.0.0.1:8000", help="the running deployment")
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
    from festival_serve.measure import stream_eval

    stream_eval.add_arguments(parser)  # --clips N / --committed: streamed clips instead of scenes
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation; summary on stderr, the whole report as the last line of stdout."""
    from festival_serve.measure import stream_eval

    if stream_eval.wants_clips(args):
        return stream_eval.cmd_eval_clips(args)
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
