"""Train YOLIC-M2 hazard cells from scratch on generated scenes, with the paper's recipe.

Su et al. (2024) train a MobileNetV2 whose classifier is ``Linear(1280, cells x (classes + 1))`` with
``BCEWithLogitsLoss`` over every cell and output (background last, its target 1 where the cell holds no
hazard) and Adam. No pretrained backbone can be downloaded here, so the network starts from random
weights; the scenes are plentiful instead. The recipe, step by step:

- scenes ``synth.scene_seeds("train"/"val", n)`` are generated once, frame sizes taken in turn (848x480,
  1280x720), JPEG round-tripped at the evaluator's quality, and preprocessed exactly as in serving
  (``yolic.preprocess_batch``): stored as ``(N, 3, 224, 224) uint8`` (600 MB for 4,000 scenes);
- every batch is jittered in brightness and contrast and mirrored with probability 1/2, the cell labels
  permuted with it (the permutation comes from the layout's boxes, so only a mirror-symmetric layout flips);
- Adam with a cosine learning-rate decay; the classifier's biases start at each output's base rate on the
  training set, so the first steps do not spend themselves learning that most cells are empty;
- after each epoch, micro precision/recall/F1 over every (scene, cell, hazard class) at 0.5 on the
  validation scenes (background excluded, the evaluator's ``cell_metrics``); the best epoch's weights
  are kept and saved as a bare state_dict (fp16 tensors by default: half the bytes, loaded into the fp32
  network by ``load_yolic_checkpoint``), then scored again from the saved file.

Run it: ``python -m festival_serve.training.hazard_cells --out models/hazard_cells/yolic_m2.pth.tar``.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from festival_serve.runtime.cache import write_atomic
from festival_serve.world.scores import cell_metrics
from festival_serve.models.hazard_cells.yolic import CellLayout, load_layout, load_yolic_checkpoint, preprocess_batch

logger = logging.getLogger(__name__)

__all__ = ["cell_metrics", "cell_targets", "mirror_permutation", "render_scenes", "train_yolic"]

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((848, 480), (1280, 720))
JPEG_QUALITY = 90  # what ``festival-serve eval`` sends; training sees the same artefacts
THRESHOLD = 0.5  # the serving default and the paper's
BRIGHTNESS = 0.12  # +- added to [0, 1] pixels
CONTRAST = 0.25  # +- relative, around each image's mean
EVAL_BATCH = 64


# -- labels and augmentation ------------------------------------------------------------------------

def cell_targets(cells: np.ndarray) -> np.ndarray:
    """``(N, cells, classes) bool`` → ``(N, cells x (classes + 1)) float32`` BCE targets, background last:
    1 where a cell holds no hazard class, the layout of the network's head."""
    cells = np.asarray(cells, dtype=bool)
    background = ~cells.any(axis=2, keepdims=True)
    return np.concatenate([cells, background], axis=2).reshape(len(cells), -1).astype(np.float32)


def mirror_permutation(layout: CellLayout, tolerance: float = 1e-4) -> np.ndarray | None:
    """The cell index each cell lands on when the frame is mirrored left-right, or ``None`` when some
    cell has no mirror image in the layout (then flipping would break the labels)."""
    boxes = layout.boxes
    mirrored = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    distance = np.abs(mirrored[:, None, :] - boxes[None, :, :]).max(axis=2)  # (cells, cells)
    permutation = distance.argmin(axis=1)
    if (distance[np.arange(len(boxes)), permutation] > tolerance).any():
        return None
    return permutation


# -- data -------------------------------------------------------------------------------------------

def _render(seed: int, size: tuple[int, int], jpeg_quality: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One scene as the network sees it: ``(3, 224, 224) uint8`` and its ``(cells, classes) bool`` labels."""
    from PIL import Image

    from festival_serve.world import synth

    scene = synth.generate_scene(seed, size=size)
    image = scene.image
    if jpeg_quality:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
        image = np.asarray(Image.open(buffer).convert("RGB"))
    # preprocess_batch divides uint8 by 255 after resizing, so x 255 recovers the resized uint8 exactly.
    pixels = np.rint(preprocess_batch([image])[0] * 255).astype(np.uint8)
    return pixels, np.asarray(scene.cells, dtype=bool)


def render_scenes(
    seeds: list[int],
    *,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    jpeg_quality: int | None = JPEG_QUALITY,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "scenes",
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``seeds`` (sizes taken in turn) → ``(N, 3, 224, 224) uint8`` images, ``(N, cells, classes) bool``.

    ``workers`` > 1 generates in that many spawned processes (spawn, not fork: the parent may already hold
    torch's thread pool, which a forked child can deadlock on)."""
    from tqdm import tqdm

    jobs = [(seed, tuple(sizes[i % len(sizes)]), jpeg_quality) for i, seed in enumerate(seeds)]
    workers = workers or multiprocessing.cpu_count()
    bar = tqdm(total=len(jobs), desc=desc, unit="scene", disable=not progress, leave=False)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for result in pool.map(_render_job, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers)))):
                results.append(result)
                bar.update()
    else:
        results = []
        for job in jobs:
            results.append(_render_job(job))
            bar.update()
    bar.close()
    images = np.stack([r[0] for r in results]) if results else np.zeros((0, 3, 224, 224), np.uint8)
    cells = np.stack([r[1] for r in results]) if results else np.zeros((0, 0, 0), bool)
    return images, cells


def _render_job(job: tuple[int, tuple[int, int], int | None]) -> tuple[np.ndarray, np.ndarray]:
    return _render(*job)


# -- training ---------------------------------------------------------------------------------------

def _augment(images, targets, permutation, num_cells: int, generator):
    """``(B, 3, 224, 224) uint8`` tensor → jittered ``float32`` in [0, 1]; mirrored half with their targets."""
    import torch

    x = images.float().div_(255)
    b = len(x)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * CONTRAST
    brightness = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * BRIGHTNESS
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + brightness).clamp_(0, 1)
    if permutation is not None:
        flip = torch.rand(b, generator=generator) < 0.5
        if flip.any():
            x[flip] = x[flip].flip(-1)
            per_cell = targets[flip].view(int(flip.sum()), num_cells, -1)
            # Mirrored, cell j shows what cell permutation[j] showed (the permutation is its own inverse).
            targets = targets.clone()
            targets[flip] = per_cell[:, torch.from_numpy(permutation)].reshape(int(flip.sum()), -1)
    return x.contiguous(memory_format=torch.channels_last), targets


def _prior_bias(targets: np.ndarray) -> np.ndarray:
    """Each output's base-rate logit on the training set (clipped to 1e-3..1-1e-3)."""
    rate = np.clip(targets.mean(axis=0), 1e-3, 1 - 1e-3)
    return np.log(rate / (1 - rate)).astype(np.float32)


def predict_cells(model, images: np.ndarray, layout: CellLayout, threshold: float = THRESHOLD) -> np.ndarray:
    """``(N, 3, 224, 224) uint8`` → ``(N, cells, classes) bool`` flagged hazard classes (background dropped)."""
    import torch

    model.eval()
    flagged = []
    with torch.inference_mode():
        for start in range(0, len(images), EVAL_BATCH):
            x = torch.from_numpy(images[start:start + EVAL_BATCH]).float().div_(255)
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
            scores = torch.sigmoid(logits).view(len(x), layout.num_cells, layout.outputs_per_cell)[:, :, :-1]
            flagged.append((scores >= threshold).numpy())
    return np.concatenate(flagged) if flagged else np.zeros((0, layout.num_cells, len(layout.classes)), bool)


def save_state_dict(state: dict, path: Path, *, half: bool = True) -> Path:
    """Write a bare state_dict (the paper's ``.pth.tar``); ``half`` stores floating tensors as fp16."""
    import torch

    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return write_atomic(path, lambda tmp: torch.save(state, tmp))


def train_yolic(
    out: Path,
    *,
    train_scenes: int,
    val_scenes: int,
    train_skip: int = 0,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    layout: str = "outdoor",
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    flip: bool = True,
    half: bool = True,
    workers: int | None = None,
    jpeg_quality: int | None = JPEG_QUALITY,
    bf16: bool = False,
    hours: float | None = None,
    init: Path | None = None,
) -> dict[str, Any]:
    """Train YOLIC-M2 on ``train_scenes`` generated scenes, keep the best validation-F1 epoch, save it to ``out``.

    ``bf16`` runs forward and backward under CPU autocast (weights, optimizer and loss stay fp32): faster on
    CPUs with native bfloat16 (AVX512-BF16, AMX), slower elsewhere. ``hours`` trains for that long instead:
    after each epoch the number of epochs (and with it the learning-rate schedule) is re-planned from the
    mean epoch time, ``epochs`` being only the first plan. ``init`` starts from a checkpoint's weights (a
    fresh optimizer) to continue an earlier run; ``train_skip`` then trains on scenes that run never saw. The
    best weights so far are written after every epoch that improves on them, so a run that is stopped early
    still leaves its best checkpoint at ``out``.

    Returns the saved checkpoint's validation metrics (scored from the file), the per-epoch history and the
    timings in seconds."""
    import torch
    from tqdm import tqdm

    from festival_serve.world import synth
    from festival_serve.models.hazard_cells.yolic import build_yolic_m2

    started = time.perf_counter()
    out = Path(out)
    cell_layout = load_layout(layout)
    if threads:
        torch.set_num_threads(threads)

    train_images, train_cells = render_scenes(synth.scene_seeds("train", train_scenes, train_skip), sizes=sizes,
                                              jpeg_quality=jpeg_quality, workers=workers, progress=progress,
                                              desc="train scenes")
    val_images, val_cells = render_scenes(synth.scene_seeds("val", val_scenes), sizes=sizes,
                                          jpeg_quality=jpeg_quality, workers=workers, progress=progress,
                                          desc="val scenes")
    if train_cells.shape[1:] != (cell_layout.num_cells, len(cell_layout.classes)):
        raise ValueError(f"generator labels are {train_cells.shape[1:]}, layout {cell_layout.name!r} needs "
                         f"({cell_layout.num_cells}, {len(cell_layout.classes)})")
    data_seconds = time.perf_counter() - started
    logger.info("rendered %d + %d scenes in %.0f s", train_scenes, val_scenes, data_seconds)
    targets = cell_targets(train_cells)

    permutation = mirror_permutation(cell_layout) if flip else None
    if flip and permutation is None:
        logger.warning("layout %r is not mirror-symmetric: training without horizontal flips", cell_layout.name)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if init:
        model = load_yolic_checkpoint(Path(init), cell_layout)
    else:
        model = build_yolic_m2(cell_layout)
        with torch.no_grad():
            model.classifier[-1].bias.copy_(torch.from_numpy(_prior_bias(targets)))
    model = model.to(memory_format=torch.channels_last)  # 1.6-1.8x faster convolutions on CPU (measured)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    plan = {"epochs": epochs}  # re-planned in place when training for ``hours``

    def cosine(step: int) -> float:  # 1 → 0.02 over the planned steps
        total = max(1, plan["epochs"] * steps_per_epoch)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    images_t, targets_t = torch.from_numpy(train_images), torch.from_numpy(targets)

    history: list[dict[str, Any]] = []
    best_f1, best_state, best_epoch = -1.0, None, 0
    first_loss = None
    train_started = time.perf_counter()
    epoch = 0
    interrupted = False
    try:  # Ctrl-C ends training early and keeps the best epoch so far, with its model card
        while epoch < plan["epochs"]:
            epoch += 1
            epoch_started = time.perf_counter()
            model.train()
            order = torch.randperm(len(images_t), generator=generator)
            running, seen = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{plan['epochs']}", unit="batch", disable=not progress)
            for step in bar:
                index = order[step * batch_size:(step + 1) * batch_size]
                x, y = _augment(images_t[index], targets_t[index], permutation, cell_layout.num_cells, generator)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = loss.item()
                first_loss = value if first_loss is None else first_loss
                running, seen = running + value * len(index), seen + len(index)
                bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            bar.close()
            train_seconds = time.perf_counter() - epoch_started
            metrics = cell_metrics(predict_cells(model, val_images, cell_layout), val_cells)
            record = {"epoch": epoch, "loss": round(running / max(seen, 1), 5), **_prf(metrics),
                      "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - epoch_started, 1)}
            history.append(record)
            message = (f"epoch {epoch}/{plan['epochs']}: loss {record['loss']:.4f}  val P {metrics['precision']:.3f} "
                       f"R {metrics['recall']:.3f} F1 {metrics['f1']:.3f}  ({record['seconds']:.0f} s)")
            if metrics["f1"] > best_f1:
                best_f1, best_epoch = metrics["f1"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_state_dict(best_state, out, half=half)
                message += "  best, saved"
            if progress:
                tqdm.write(message)
            else:
                logger.info(message)
            if hours:
                elapsed = time.perf_counter() - train_started
                plan["epochs"] = max(epoch, math.floor(hours * 3600 / (elapsed / epoch)))
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted during epoch %d: keeping the best epoch so far (%d)", epoch, best_epoch)
    training_seconds = time.perf_counter() - train_started

    if best_state is None:  # no epoch ran: save the initial network so the file always exists
        save_state_dict(model.state_dict(), out, half=half)
    saved = load_yolic_checkpoint(out, cell_layout).to(memory_format=torch.channels_last)
    flagged = predict_cells(saved, val_images, cell_layout)
    val = cell_metrics(flagged, val_cells)
    per_class = {name: _prf(cell_metrics(flagged[:, :, k], val_cells[:, :, k])) for k, name in enumerate(cell_layout.classes)}
    return {
        "weights": str(out),
        "bytes": out.stat().st_size,
        "val": val,
        "val_per_class": per_class,
        "best_epoch": best_epoch,
        "first_loss": first_loss,
        "history": history,
        "train_scenes": train_scenes,
        "train_skip": train_skip,
        "val_scenes": val_scenes,
        "epochs": len(history),
        "interrupted": interrupted,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "sizes": [list(s) for s in sizes],
        "flip": permutation is not None,
        "bf16": bf16,
        "threads": torch.get_num_threads(),
        "seconds": {
            "data": round(data_seconds, 1),
            "training": round(training_seconds, 1),
            "per_epoch": round(training_seconds / max(epoch, 1), 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }


def _prf(metrics: dict) -> dict[str, float]:
    return {k: metrics[k] for k in ("precision", "recall", "f1")}


# -- the command ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/hazard_cells/yolic_m2.pth.tar"))
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--val-scenes", type=int, default=200)
    parser.add_argument("--train-skip", type=int, default=0,
                        help="skip the first N train scenes (continue an --init run on scenes it never saw)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs (with --hours: only the first plan)")
    parser.add_argument("--hours", type=float, help="train for this long instead, re-planning epochs and schedule")
    parser.add_argument("--init", type=Path, help="start from this checkpoint's weights (continue a run)")
    parser.add_argument("--batch-size", type=int, default=16, help="16 learnt faster per second than 32 (2 cores)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--workers", type=int, help="processes generating scenes (default: one per core)")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal mirroring")
    parser.add_argument("--fp32", action="store_true", help="save fp32 tensors (default fp16: half the size)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (~15%% faster on AVX512-BF16 CPUs)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Train, write the weights and ``MODEL_CARD.md`` beside them, print the result as JSON on stdout."""
    import json

    from festival_serve.training.cards import write_model_card

    result = train_yolic(args.out, train_scenes=args.train_scenes, val_scenes=args.val_scenes,
                         train_skip=args.train_skip, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                         progress=not args.no_progress, flip=not args.no_flip, half=not args.fp32,
                         workers=args.workers, bf16=args.bf16, hours=args.hours, init=args.init)
    write_model_card(
        args.out.parent / "MODEL_CARD.md",
        title="YOLIC-M2 hazard cells",
        model=(f"YOLIC-M2 (MobileNetV2, head Linear(1280, 104 x 12)), "
               f"{f'continued from {args.init}' if args.init else 'from scratch'}; {args.out.name}"),
        data=(f"{args.train_scenes} train{f' (after the first {args.train_skip})' if args.train_skip else ''} / "
              f"{args.val_scenes} val generated scenes "
              f"(festival_serve.world.synth seed splits 'train'/'val'; sizes {result['sizes']}; JPEG q{JPEG_QUALITY})"),
        seed=args.seed, command=command, seconds=result["seconds"]["total"],
        metrics={"val": result["val"], "val_per_class": result["val_per_class"], "best_epoch": result["best_epoch"],
                 "seconds": result["seconds"], "history": result["history"]},
        notes=("BCEWithLogits over all cells x (classes + background), Adam with cosine decay, brightness/contrast "
               "jitter, left-right mirroring with the layout's cell permutation. Metrics: micro precision/recall/F1 "
               "over (scene, cell, hazard class) at threshold 0.5, background excluded, scored from the saved file."),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from festival_serve.training import run_trainer

    sys.exit(run_trainer(sys.modules[__name__]))
