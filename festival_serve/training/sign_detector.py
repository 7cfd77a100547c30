"""Train the YOLO sign detector from scratch with ultralytics' own trainer, on generated scenes.

Two steps, each a function and together a command:

- ``write_yolo_dataset`` renders ``synth.scene_seeds("train"/"val", n)`` (frame sizes taken in turn) into
  ultralytics' layout: ``images/{train,val}/*.jpg``, ``labels/{train,val}/*.txt`` with one
  ``class cx cy w h`` line per sign (normalised to the frame), and ``data.yaml`` naming
  ``synth.SIGN_CLASSES`` in id order;
- ``train_signs`` runs ``YOLO(model).train(...)`` on the CPU from random weights (nothing pretrained can
  be downloaded here) and copies the best epoch's checkpoint to ``out``.

Settings that matter for this data and this machine:

- ``fliplr=0``: a mirrored "no left turn" is a "no right turn", and mirrored text is no text at all;
- ``plots=False`` and ``amp=False``: plotting fetches fonts and the AMP check fetches a reference model,
  both from the internet; AMP is CPU-irrelevant anyway. The socket guard of ``festival_serve.runtime.offline`` is
  installed so that whatever else ultralytics tries to fetch fails at once instead of waiting on a timeout;
- ``model`` is an ultralytics model yaml (``yolov8n.yaml``) or a model dict: ``narrow_yolov8(0.125)`` is
  YOLOv8 at half the width of n (0.25): the same graph, 0.9 M parameters instead of 3.0 M.

Run it: ``python -m festival_serve.training.sign_detector --out models/sign_detector/signs.pt``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import festival_serve.models.sign_detector.detector  # noqa: F401 - keeps ultralytics offline before anything imports it

logger = logging.getLogger(__name__)

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((848, 480), (1280, 720))
JPEG_QUALITY = 90  # what ``festival-serve eval`` sends
#: Signs hidden beyond this are left unlabelled: too little of them shows to teach anything. The
#: evaluator counts signs hidden over 0.5 as "difficult" (neither found nor missed), so labelling up to
#: 0.8 teaches the detector the partly hidden signs it is scored on without asking it to hallucinate.
MAX_OCCLUDED = 0.8
MIN_BOX_PIXELS = 4  # narrower or shorter boxes (after clipping to the frame) are dropped
#: The ultralytics settings this data needs whatever the caller overrides; see the module docstring.
FIXED = {"device": "cpu", "plots": False, "amp": False, "fliplr": 0.0}


# -- the dataset ------------------------------------------------------------------------------------

def yolo_labels(signs, width: int, height: int, *, max_occluded: float = MAX_OCCLUDED) -> list[str]:
    """``synth.SignTruth``s → ultralytics label lines ``class cx cy w h`` (normalised, clipped to the frame)."""
    from festival_serve.world import synth

    index = {name: i for i, name in enumerate(synth.SIGN_CLASSES)}
    lines = []
    for sign in signs:
        if sign.occluded > max_occluded:
            continue
        x1, y1, x2, y2 = (float(v) for v in sign.box)
        x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
        y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
        if x2 - x1 < MIN_BOX_PIXELS or y2 - y1 < MIN_BOX_PIXELS:
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"{index[sign.sign_class]} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines


def _write_sample(job: tuple[Path, str, int, tuple[int, int], int, float]) -> int:
    """Render one scene into ``root/images/<split>/<seed>.jpg`` + its label file; returns its label count."""
    from PIL import Image

    from festival_serve.world import synth

    root, split, seed, size, quality, max_occluded = job
    scene = synth.generate_scene(seed, size=size)
    height, width = scene.image.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="JPEG", quality=quality)
    (root / "images" / split / f"{seed}.jpg").write_bytes(buffer.getvalue())
    lines = yolo_labels(scene.signs, width, height, max_occluded=max_occluded)
    (root / "labels" / split / f"{seed}.txt").write_text("".join(line + "\n" for line in lines))
    return len(lines)


def write_yolo_dataset(
    root: Path,
    *,
    train: int,
    val: int,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    jpeg_quality: int = JPEG_QUALITY,
    max_occluded: float = MAX_OCCLUDED,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write ``train`` + ``val`` generated scenes under ``root`` in ultralytics' format; returns ``data.yaml``.

    An existing ``root`` is replaced, so a dataset never mixes two runs' scenes. ``workers`` > 1 renders
    in that many spawned processes (default: one per core)."""
    import yaml
    from tqdm import tqdm

    from festival_serve.world import synth

    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    jobs = []
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        jobs += [(root, split, seed, tuple(sizes[i % len(sizes)]), jpeg_quality, max_occluded)
                 for i, seed in enumerate(synth.scene_seeds(split, count))]
    workers = workers or multiprocessing.cpu_count()
    labels = 0
    with tqdm(total=len(jobs), desc="sign dataset", unit="scene", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the caller may already hold torch's thread pool, which a forked child can deadlock on
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for count in pool.map(_write_sample, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                    labels += count
                    bar.update()
        else:
            for job in jobs:
                labels += _write_sample(job)
                bar.update()
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(synth.SIGN_CLASSES)),
    }
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    logger.info("wrote %d + %d scenes (%d sign labels) to %s", train, val, labels, root)
    return data_yaml


# -- the model --------------------------------------------------------------------------------------

def narrow_yolov8(width: float, depth: float = 0.33, max_channels: int = 1024) -> dict[str, Any]:
    """ultralytics' YOLOv8 detection graph at ``width`` x its channels (n = 0.25, s = 0.5), as a model dict."""
    from ultralytics.utils import ROOT, YAML

    config = YAML.load(ROOT / "cfg" / "models" / "v8" / "yolov8.yaml")
    config.pop("scales", None)
    config.update(depth_multiple=depth, width_multiple=width, max_channels=max_channels)
    return config


def _model_file(model: str | dict, folder: Path) -> str:
    """A model dict written as a yaml ultralytics can read (it builds from files or names, not dicts)."""
    if not isinstance(model, dict):
        return str(model)
    import yaml

    # No scale letter after the version digits: ultralytics would read "yolov8n-..." as scale n.
    path = folder / f"yolov8-w{str(model.get('width_multiple', 1)).replace('.', '')}.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    return str(path)


def train_signs(
    out: Path,
    *,
    data_yaml: Path,
    epochs: int,
    imgsz: int = 640,
    model: str | dict = "yolov8n.yaml",
    batch: int = 16,
    workers: int = 2,
    seed: int = 0,
    project: Path | None = None,
    name: str = "signs",
    verbose: bool = False,
    init: Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train with ``YOLO(model).train(...)`` on the CPU, copy the best checkpoint to ``out``.

    ``overrides`` are any ultralytics training settings (``close_mosaic``, ``mosaic``, ``lr0``, ``cache``,
    ...) except those in ``FIXED``, which this data and machine require. Returns the final validation of the
    best checkpoint (precision, recall, val_mAP50, val_mAP50-95: ultralytics' validator, 101-point interpolated AP;
    not ``festival-serve eval``'s all-point ``map50``, ``world.scores``), the per-epoch seconds and the total seconds.
    ``project`` keeps ultralytics' run folder (results.csv, last.pt); by default it is a temporary folder."""
    started = time.perf_counter()
    out = Path(out)
    # ``init``: start from a checkpoint (its architecture and weights). Otherwise random weights:
    # pretrained=False, or ultralytics would try to download COCO weights for the yaml.
    final, rows, parameters = train_and_keep_best(
        lambda tmp: str(init) if init else _model_file(model, tmp), "detect", out,
        project=project, name=name, overrides=overrides, data=str(data_yaml), epochs=epochs, imgsz=imgsz,
        batch=batch, workers=workers, seed=seed, verbose=verbose, pretrained=str(init) if init else False)
    seconds = time.perf_counter() - started
    return {
        "weights": str(out),
        "bytes": out.stat().st_size,
        "precision": final.get("metrics/precision(B)"),
        "recall": final.get("metrics/recall(B)"),
        "val_mAP50": final.get("metrics/mAP50(B)"),
        "val_mAP50-95": final.get("metrics/mAP50-95(B)"),
        "best_epoch": _best_epoch(rows),
        "epochs": len(rows),
        "imgsz": imgsz,
        "batch": batch,
        "model": (f"fine-tuned from {init}" if init else
                  model if isinstance(model, str) else f"yolov8 width {model.get('width_multiple')}"),
        "parameters": parameters,
        "seconds": {
            "total": round(seconds, 1),
            # results.csv's "time" is the cumulative training + validation time at the end of each epoch
            "per_epoch": [round(b - a, 1) for a, b in zip([0.0, *[r["time"] for r in rows]], [r["time"] for r in rows])],
        },
    }


def train_and_keep_best(model_source, task: str, out: Path, *, project: Path | None, name: str,
                        overrides: dict[str, Any], **train_args: Any) -> tuple[dict[str, float], list[dict[str, float]], int]:
    """``YOLO(model_source(folder), task=task).train(...)`` with ``FIXED`` settings and the network guard on;
    the best (else last) checkpoint is copied to ``out``.

    ``model_source`` gives a checkpoint, yaml or model name (``folder``: a temporary folder for model files).
    ``overrides`` may not touch ``FIXED`` (or ``pretrained``). ``project`` keeps ultralytics' run folder
    (results.csv, last.pt); by default it is a temporary folder.
    Returns the final validation metrics, the per-epoch ``results.csv`` rows and the parameter count."""
    from festival_serve.runtime.offline import install_network_guard

    install_network_guard()
    from ultralytics import YOLO

    clash = sorted(set(overrides) & {*FIXED, "pretrained"})
    if clash:
        raise ValueError(f"{clash} cannot be overridden: {FIXED}")
    with tempfile.TemporaryDirectory(prefix=f"festival-{name}-") as tmp:
        runs = Path(project).resolve() if project else Path(tmp)
        yolo = YOLO(model_source(Path(tmp)), task=task)
        yolo.train(project=str(runs), name=name, exist_ok=True, **train_args, **FIXED, **overrides)
        trainer = yolo.trainer
        best = trainer.best if trainer.best.exists() else trainer.last
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, out)
        final = {k: float(v) for k, v in (trainer.metrics or {}).items()}
        rows = _results(Path(trainer.save_dir) / "results.csv")
        return final, rows, sum(p.numel() for p in trainer.model.parameters())


def _best_epoch(rows: list[dict[str, float]]) -> int | None:
    """The epoch best.pt holds: best fitness (mAP50-95 for detection), the first of equals, except that
    ultralytics treats a best fitness of 0 as none yet, so all-zero epochs end on the last one."""
    if not rows:
        return None
    best = max(rows, key=lambda r: r["metrics/mAP50-95(B)"])
    return int(best["epoch"] if best["metrics/mAP50-95(B)"] > 0 else rows[-1]["epoch"])


def _results(results_csv: Path) -> list[dict[str, float]]:
    """ultralytics' per-epoch ``results.csv`` as numbers (empty when it wrote none)."""
    import csv

    if not results_csv.is_file():
        return []
    with results_csv.open(newline="") as f:
        return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# -- the command ------------------------------------------------------------------------------------

#: What trained best per minute of 2 CPU cores in 5-minute probes (405 scenes, equal wall time):
#: YOLOv8 at width 0.125 (0.9 M parameters, ~21 img/s at 320 px) learnt faster per wall-clock second than
#: YOLOv8n (0.25, ~9 img/s), and 320 px still leaves the smallest sign (40 px at 480 px high) ~15 px wide.
RECOMMENDED = {"width": 0.125, "imgsz": 320, "batch": 8, "optimizer": "AdamW", "lr0": 0.004, "warmup_epochs": 1}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/sign_detector/signs.pt"))
    parser.add_argument("--dataset", type=Path, default=Path("build/sign_dataset"),
                        help="folder for the generated dataset (replaced)")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30, help="epochs (with --hours: only the first estimate)")
    parser.add_argument("--hours", type=float, help="train for this long instead: ultralytics re-plans the epochs "
                                                     "(and the learning-rate schedule) from the measured epoch time")
    parser.add_argument("--imgsz", type=int, default=RECOMMENDED["imgsz"])
    parser.add_argument("--width", type=float, default=RECOMMENDED["width"], help="YOLOv8 width multiple (n = 0.25)")
    parser.add_argument("--model", help="an ultralytics model yaml instead of --width, e.g. yolov8n.yaml")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights (e.g. to continue at a larger --imgsz)")
    parser.add_argument("--batch", type=int, default=RECOMMENDED["batch"])
    parser.add_argument("--lr0", type=float, default=RECOMMENDED["lr0"])
    parser.add_argument("--optimizer", default=RECOMMENDED["optimizer"])
    parser.add_argument("--warmup-epochs", type=float, default=RECOMMENDED["warmup_epochs"])
    parser.add_argument("--close-mosaic", type=int, default=5, help="last epochs without mosaic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="processes rendering scenes (default: one per core)")
    parser.add_argument("--project", type=Path, default=Path("build/sign_runs"),
                        help="ultralytics' run folder (results.csv, last.pt for resuming)")
    parser.add_argument("--reuse-dataset", action="store_true", help="train on --dataset as it is")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Write the dataset, train, write ``MODEL_CARD.md`` beside the weights, print the result as JSON."""
    from festival_serve.training.cards import write_model_card

    started = time.perf_counter()
    data_yaml = args.dataset / "data.yaml"
    if not (args.reuse_dataset and data_yaml.is_file()):
        data_yaml = write_yolo_dataset(args.dataset, train=args.train_scenes, val=args.val_scenes,
                                       workers=args.workers, progress=not args.no_progress)
    data_seconds = time.perf_counter() - started
    model = args.model or narrow_yolov8(args.width)
    overrides = {"close_mosaic": args.close_mosaic, "optimizer": args.optimizer, "lr0": args.lr0,
                 "warmup_epochs": args.warmup_epochs}
    if args.hours:
        overrides["time"] = args.hours
    result = train_signs(args.out, data_yaml=data_yaml, epochs=args.epochs, imgsz=args.imgsz, model=model,
                         batch=args.batch, seed=args.seed, project=args.project, verbose=not args.no_progress,
                         init=args.init, **overrides)
    result["seconds"]["data"] = round(data_seconds, 1)
    seconds = time.perf_counter() - started
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
    write_model_card(
        args.out.parent / "MODEL_CARD.md",
        title="YOLOv8 sign detector",
        model=(f"{result['model']} ({result['parameters']:,} parameters), "
               f"{'from ' + str(args.init) if args.init else 'from scratch'}, {args.imgsz} px; {args.out.name}"),
        data=(f"{args.train_scenes} train / {args.val_scenes} val generated scenes (festival_serve.world.synth seed splits "
              f"'train'/'val'; sizes {[list(s) for s in DEFAULT_SIZES]}; JPEG q{JPEG_QUALITY}; "
              f"signs hidden over {MAX_OCCLUDED:.0%} unlabelled)"),
        seed=args.seed, command=command, seconds=seconds,
        metrics={k: result[k] for k in ("precision", "recall", "val_mAP50", "val_mAP50-95", "best_epoch", "epochs", "seconds")},
        notes=("ultralytics' trainer on the CPU, its default augmentation (mosaic, HSV, scale, translate) except "
               f"fliplr=0 (a mirrored sign changes meaning); {settings}. Serve it at the same letterbox size "
               f"(sign_detector image_size: {args.imgsz}). Metrics: ultralytics' validation of the best checkpoint "
               "on the val scenes (mean precision and recall at the confidence of best mean F1)."),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from festival_serve.training import run_trainer

    sys.exit(run_trainer(sys.modules[__name__]))
