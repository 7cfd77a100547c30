"""Train the sign classifier (``festival_serve.models.sign_detector.classifier``) with ultralytics' own classification trainer.

- ``write_crop_dataset`` cuts every labelled sign of a sign-detector dataset (``training.signs``'s
  ``write_yolo_dataset``: same generated scenes, same seeds) out of its full-resolution frame with
  ``sign_classes.square_crop``, into ultralytics' classification layout ``{train,val}/<class>/*.png``.
  Training crops are cut ``copies`` times around jittered boxes (scale, shift, context), because served
  crops come from detector boxes, not from the truth; validation crops use the serving context as is.
  A ``background`` class holds random sign-sized boxes and the shipped detector's false alarms.
- ``train_sign_classes`` runs ``YOLO("yolov8n-cls.yaml").train(...)`` on the CPU from random weights and
  copies the best checkpoint to ``out``. ``fliplr=0`` (mirrored arrows change meaning), ``scale`` small
  (RandomResizedCrop must not cut a pictogram away), ``plots``/``amp`` off (both fetch files).

Run it: ``festival-serve train sign-classes`` (or ``python -m festival_serve.training.sign_classifier``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import festival_serve.models.sign_detector.detector  # noqa: F401 - keeps ultralytics offline before anything imports it
from festival_serve.pipeline.settings import SignDetectorSettings

logger = logging.getLogger(__name__)

#: What the serving crop uses (``sign_detector.classifier_context``); training jitters around it.
CONTEXT = SignDetectorSettings.model_fields["classifier_context"].default
IMAGE_SIZE = SignDetectorSettings.model_fields["classifier_image_size"].default


def _jittered(box: np.ndarray, rng: np.random.Generator) -> tuple[tuple[float, float, float, float], float]:
    """A detector-like box around the true one (±8% shift, 0.85-1.15x size) and a context near ``CONTEXT``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + rng.uniform(-0.08, 0.08) * w, (y1 + y2) / 2 + rng.uniform(-0.08, 0.08) * h
    w, h = w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), CONTEXT * rng.uniform(0.9, 1.2)


def _overlap(box, boxes: np.ndarray) -> float:
    """The largest IoU of ``box`` with any of ``boxes`` ``(n, 4)`` (0 when there are none)."""
    if not len(boxes):
        return 0.0
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return float((inter / union).max())


def _random_box(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A box of sign-like size and shape anywhere in the frame."""
    side = rng.uniform(0.04, 0.25) * height
    aspect = rng.uniform(0.6, 2.5)
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.array([x, y, x + w, y + h])


def write_crop_dataset(yolo_root: Path, out: Path, *, copies: int = 2, negatives_from: Path | None = None,
                       detector_imgsz: int = 320, seed: int = 0, progress: bool = True) -> dict:
    """Crops of every labelled sign in ``yolo_root`` (a ``write_yolo_dataset`` folder) → ``out`` (replaced).

    The ``background`` class gets one random sign-sized box per scene that overlaps no sign, plus, with
    ``negatives_from`` (a sign detector checkpoint), every box that detector proposes at confidence 0.05 that
    overlaps no sign (IoU < 0.2): the blue windows and red awnings a detector mistakes for signs are exactly
    what the classifier must learn to turn away."""
    import yaml
    from PIL import Image
    from tqdm import tqdm

    from festival_serve.models.sign_detector.classifier import BACKGROUND, square_crop

    names = yaml.safe_load((yolo_root / "data.yaml").read_text())["names"]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    detector = None
    if negatives_from is not None:
        from ultralytics import YOLO

        detector = YOLO(str(negatives_from), task="detect")
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        for name in [*names.values(), BACKGROUND]:
            (out / split / name).mkdir(parents=True)
        images = sorted((yolo_root / "images" / split).glob("*.jpg"))
        for path in tqdm(images, desc=f"sign crops ({split})", unit="scene", disable=not progress):
            lines = (yolo_root / "labels" / split / f"{path.stem}.txt").read_text().split()
            image = np.asarray(Image.open(path).convert("RGB"))
            height, width = image.shape[:2]
            labels = np.asarray(lines, dtype=np.float64).reshape(-1, 5)
            truths = np.stack([(labels[:, 1] - labels[:, 3] / 2) * width, (labels[:, 2] - labels[:, 4] / 2) * height,
                               (labels[:, 1] + labels[:, 3] / 2) * width, (labels[:, 2] + labels[:, 4] / 2) * height], 1)
            cuts: list[tuple[str, tuple, float]] = []
            for cls, box in zip(labels[:, 0].astype(int), truths):
                jittered = [_jittered(box, rng) for _ in range(copies)] if split == "train" else [(tuple(box), CONTEXT)]
                cuts += [(names[cls], cut, context) for cut, context in jittered]
            candidates = [_random_box(width, height, rng)]
            if detector is not None:
                found = detector.predict(image[..., ::-1], imgsz=detector_imgsz, conf=0.05, agnostic_nms=True,
                                         device="cpu", verbose=False)[0]
                candidates += list(found.boxes.xyxy.numpy())
            cuts += [(BACKGROUND, tuple(box), CONTEXT) for box in candidates if _overlap(box, truths) < 0.2]
            for j, (name, cut, context) in enumerate(cuts):
                Image.fromarray(square_crop(image, cut, context)).save(out / split / name / f"{path.stem}_{j}.png")
                counts[f"{split}/{name}"] = counts.get(f"{split}/{name}", 0) + 1
    logger.info("wrote sign crops to %s: %s", out, counts)
    return counts


def train_sign_classes(out: Path, *, data: Path, epochs: int, imgsz: int = IMAGE_SIZE, model: str = "yolov8n-cls.yaml",
                       batch: int = 64, workers: int = 2, seed: int = 0, project: Path | None = None,
                       verbose: bool = False, **overrides: Any) -> dict[str, Any]:
    """``YOLO(model).train(...)`` on the crop folder ``data``; the best checkpoint is copied to ``out``."""
    from festival_serve.training.sign_detector import train_and_keep_best

    started = time.perf_counter()
    out = Path(out)
    final, rows, parameters = train_and_keep_best(
        lambda _folder: model, "classify", out, project=project, name="sign_classes", overrides=overrides,
        data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, seed=seed, verbose=verbose,
        pretrained=False)
    return {
        "weights": str(out),
        "bytes": out.stat().st_size,
        "top1": final.get("metrics/accuracy_top1"),
        "best_epoch": int(max(rows, key=lambda r: r["metrics/accuracy_top1"])["epoch"]) if rows else None,
        "epochs": len(rows),
        "imgsz": imgsz,
        "parameters": parameters,
        "seconds": round(time.perf_counter() - started, 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/sign_classifier/sign_classes.pt"))
    parser.add_argument("--scenes", type=Path, default=Path("build/sign_dataset"),
                        help="a sign-detector dataset (festival-serve train signs --dataset); written if missing")
    parser.add_argument("--train-scenes", type=int, default=2000, help="scenes to write when --scenes is missing")
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--crops", type=Path, default=Path("build/sign_crops"), help="crop folder (replaced)")
    parser.add_argument("--copies", type=int, default=2, help="jittered crops per training sign")
    parser.add_argument("--negatives-from", type=Path, default=Path("models/sign_detector/signs.pt"),
                        help="sign detector whose false alarms become 'background' crops (skipped if missing)")
    parser.add_argument("--detector-imgsz", type=int, default=320, help="the letterbox size that detector is served at")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hours", type=float, help="train for this long instead (ultralytics re-plans the epochs)")
    parser.add_argument("--imgsz", type=int, default=IMAGE_SIZE)
    parser.add_argument("--model", default="yolov8n-cls.yaml", help="an ultralytics classification model yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--project", type=Path, help="keep ultralytics' run folder here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Write the crops (and the scenes if needed), train, write ``MODEL_CARD.md``, print the result as JSON."""
    from festival_serve.training.cards import write_model_card
    from festival_serve.training.sign_detector import DEFAULT_SIZES, JPEG_QUALITY, MAX_OCCLUDED, write_yolo_dataset

    started = time.perf_counter()
    if not (args.scenes / "data.yaml").is_file():
        write_yolo_dataset(args.scenes, train=args.train_scenes, val=args.val_scenes, workers=args.workers,
                           progress=not args.no_progress)
    negatives = args.negatives_from if args.negatives_from and args.negatives_from.is_file() else None
    counts = write_crop_dataset(args.scenes, args.crops, copies=args.copies, negatives_from=negatives,
                                detector_imgsz=args.detector_imgsz, seed=args.seed, progress=not args.no_progress)
    # scale 0.1: RandomResizedCrop keeps 90-100% of a crop; erasing off: it would blank out whole pictograms.
    overrides = {"scale": 0.1, "erasing": 0.0}
    if args.hours:
        overrides["time"] = args.hours
    result = train_sign_classes(args.out, data=args.crops, epochs=args.epochs, imgsz=args.imgsz, model=args.model,
                                batch=args.batch, workers=args.workers, seed=args.seed, project=args.project,
                                verbose=not args.no_progress, **overrides)
    result["crops"] = counts
    seconds = time.perf_counter() - started
    write_model_card(
        args.out.parent / "MODEL_CARD.md",
        title="YOLOv8n-cls sign classifier",
        model=f"{args.model} ({result['parameters']:,} parameters), from scratch, {args.imgsz} px; {args.out.name}",
        data=(f"square crops (context {CONTEXT}) of every labelled sign ({args.copies} jittered per training sign) "
              f"and of background (one random box per scene, plus the false alarms of {negatives or 'no detector'}) "
              f"in {args.train_scenes} train / {args.val_scenes} val generated scenes (festival_serve.world.synth seed splits "
              f"'train'/'val'; sizes {[list(s) for s in DEFAULT_SIZES]}; JPEG q{JPEG_QUALITY}; signs hidden over "
              f"{MAX_OCCLUDED:.0%} unlabelled). Crops per split/class: {json.dumps(counts)}"),
        seed=args.seed, command=command, seconds=seconds,
        metrics={k: result[k] for k in ("top1", "best_epoch", "epochs", "seconds")},
        notes=("ultralytics' classification trainer on the CPU, fliplr=0, scale=0.1, erasing=0. Served by the "
               f"SignDetector at classifier_image_size {args.imgsz}: it names every detected box from its crop."),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from festival_serve.training import run_trainer

    sys.exit(run_trainer(sys.modules[__name__]))
