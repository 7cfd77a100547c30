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
  both from the internet; AMP is CPU-irrelevant anyway. The socket guard of ``festival_serve.offline`` is
  installed so that whatever else ultralytics tries to fetch fails at once instead of waiting on a timeout;
- ``model`` is an ultralytics model yaml (``yolov8n.yaml``) or a width multiple: ``narrow_yolov8(0.125)``
  builds YOLOv8 at that width (n is 0.25), the same graph with a quarter of the channels' cost.

Run it: ``python -m festival_serve.training.signs --out models/sign_detector/signs.pt``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import festival_serve.signs  # noqa: F401 - keeps ultralytics offline before anything imports it

logger = logging.getLogger(__name__)

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((848, 480), (1280, 720))
JPEG_QUALITY = 90  # what ``festival-serve eval`` sends
#: Signs hidden beyond this are left unlabelled: too little of them shows to teach anything. The
#: evaluator counts signs hidden over 0.5 as "difficult" (neither found nor missed), so labelling up to
#: 0.8 teaches the detector the partly hidden signs it is scored on without asking it to hallucinate.
MAX_OCCLUDED = 0.8
MIN_BOX_PIXELS = 4  # narrower or shorter boxes (after clipping to the frame) are dropped
#: The ultralytics settings this data needs whatever the caller overrides; see the module docstring.
FIXED = {"device": "cpu", "plots": False, "amp": False, "pretrained": False, "fliplr": 0.0}


# -- the dataset ------------------------------------------------------------------------------------

def yolo_labels(signs, width: int, height: int, *, max_occluded: float = MAX_OCCLUDED) -> list[str]:
    """``synth.SignTruth``s → ultralytics label lines ``class cx cy w h`` (normalised, clipped to the frame)."""
    from festival_serve import synth

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

    from festival_serve import synth

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

    from festival_serve import synth

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
    **overrides: Any,
) -> dict[str, Any]:
    """Train with ``YOLO(model).train(...)`` on the CPU, copy the best checkpoint to ``out``.

    ``overrides`` are any ultralytics training settings (``close_mosaic``, ``mosaic``, ``lr0``, ``cache``,
    ...) except those in ``FIXED``, which this data and machine require. Returns the final validation of the
    best checkpoint (precision, recall, mAP50, mAP50-95), the per-epoch seconds and the total seconds.
    ``project`` keeps ultralytics' run folder (results.csv, last.pt); by default it is a temporary folder."""
    from festival_serve.offline import install_network_guard

    install_network_guard()
    from ultralytics import YOLO

    clash = sorted(set(overrides) & set(FIXED))
    if clash:
        raise ValueError(f"{clash} cannot be overridden: {FIXED}")
    out = Path(out)
    started = time.perf_counter()
    epoch_ends: list[float] = []
    with tempfile.TemporaryDirectory(prefix="festival-signs-") as tmp:
        runs = Path(project).resolve() if project else Path(tmp)
        yolo = YOLO(_model_file(model, Path(tmp)), task="detect")
        yolo.add_callback("on_fit_epoch_end", lambda trainer: epoch_ends.append(time.perf_counter()))
        yolo.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, seed=seed,
                   deterministic=True, project=str(runs), name=name, exist_ok=True, verbose=verbose,
                   **FIXED, **overrides)
        trainer = yolo.trainer
        best = trainer.best if trainer.best.exists() else trainer.last
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, out)
        final = {k: float(v) for k, v in (trainer.metrics or {}).items()}
        best_epoch = _best_epoch(Path(trainer.save_dir) / "results.csv")
    seconds = time.perf_counter() - started
    # The last on_fit_epoch_end is the final validation of best.pt, not an epoch.
    marks = [started, *epoch_ends[:epochs]]
    per_epoch = [round(b - a, 1) for a, b in zip(marks, marks[1:])]
    return {
        "weights": str(out),
        "bytes": out.stat().st_size,
        "precision": final.get("metrics/precision(B)"),
        "recall": final.get("metrics/recall(B)"),
        "mAP50": final.get("metrics/mAP50(B)"),
        "mAP50-95": final.get("metrics/mAP50-95(B)"),
        "best_epoch": best_epoch,
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "model": model if isinstance(model, str) else f"yolov8 width {model.get('width_multiple')}",
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "seconds": {"total": round(seconds, 1), "per_epoch": per_epoch},
    }


def _best_epoch(results_csv: Path) -> int | None:
    """1-based epoch with the best mAP50-95 in ultralytics' ``results.csv``: its fitness, so the epoch
    ``best.pt`` comes from (ultralytics keeps the best fitness but not its epoch)."""
    import csv

    if not results_csv.is_file():
        return None
    with results_csv.open(newline="") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    if not rows:
        return None
    best = max(rows, key=lambda r: float(r["metrics/mAP50-95(B)"]))  # max keeps the first of equals, as ultralytics
    return int(float(best["epoch"]))


# -- the command ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/sign_detector/signs.pt"))
    parser.add_argument("--dataset", type=Path, default=Path("build/sign_dataset"),
                        help="folder for the generated dataset (replaced)")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--imgsz", type=int, default=512)
    parser.add_argument("--model", default="yolov8n.yaml", help="an ultralytics model yaml (ignored with --width)")
    parser.add_argument("--width", type=float, help="YOLOv8 width multiple instead of --model (n = 0.25)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--close-mosaic", type=int, default=5, help="last epochs without mosaic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="processes rendering scenes (default: one per core)")
    parser.add_argument("--project", type=Path, help="keep ultralytics' run folder here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Write the dataset, train, write ``MODEL_CARD.md`` beside the weights, print the result as JSON."""
    from festival_serve.training.cards import write_model_card

    started = time.perf_counter()
    data_yaml = write_yolo_dataset(args.dataset, train=args.train_scenes, val=args.val_scenes, workers=args.workers,
                                   progress=not args.no_progress)
    data_seconds = time.perf_counter() - started
    model = narrow_yolov8(args.width) if args.width else args.model
    result = train_signs(args.out, data_yaml=data_yaml, epochs=args.epochs, imgsz=args.imgsz, model=model,
                         batch=args.batch, seed=args.seed, project=args.project, close_mosaic=args.close_mosaic,
                         verbose=not args.no_progress)
    result["seconds"]["data"] = round(data_seconds, 1)
    seconds = time.perf_counter() - started
    write_model_card(
        args.out.parent / "MODEL_CARD.md",
        model=f"{result['model']} ({result['parameters']:,} parameters), from scratch, {args.imgsz} px; {args.out.name}",
        data=(f"{args.train_scenes} train / {args.val_scenes} val generated scenes (festival_serve.synth seed splits "
              f"'train'/'val'; sizes {[list(s) for s in DEFAULT_SIZES]}; JPEG q{JPEG_QUALITY}; "
              f"signs hidden over {MAX_OCCLUDED:.0%} unlabelled)"),
        seed=args.seed, command=command, seconds=seconds,
        metrics={k: result[k] for k in ("precision", "recall", "mAP50", "mAP50-95", "best_epoch", "seconds")},
        notes=("ultralytics' trainer on the CPU with its default augmentation (mosaic, HSV, scale, translate) except "
               f"fliplr=0 (mirrored signs change meaning), close_mosaic={args.close_mosaic}. Metrics: ultralytics' "
               "validation of the best checkpoint on the val scenes (precision/recall at its best-F1 confidence)."),
    )
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = add_arguments(argparse.ArgumentParser(prog="python -m festival_serve.training.signs",
                                                   description=__doc__.split("\n\n")[0]))
    return cmd_train(parser.parse_args(argv), "python -m festival_serve.training.signs " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
