"""Train the Vietnamese sign-text recognizer (``festival_serve.models.sign_reader.crnn``) that the PP-OCR
reader serves as its ``rec_model``.

- **Lines** are drawn on the fly by the world's ``synth.text_lines`` (``render_line``, ``degrade``): sign
  text from ``phrases.sample_text``, in the fonts of this machine that cover the whole dictionary, on the
  colours of the world's signs, degraded as a real crop is. Whole single-line signs with the crop padding
  are drawn too, for reading sign crops straight.
- **Model and I/O** are the served CRNN's (``crnn``): input ``(N, 3, 48, W)`` float32 BGR in [-1, 1],
  right-padded with 0 to the batch's widest line (``ppocr.rec_batch``, used here for training too); output
  ``(N, W // 4, classes)`` softmax, class 0 the CTC blank, then ``charset.DICTIONARY``, then the space.
  ``vi_dict.txt`` beside the checkpoint serves as ``rec_dict``.
- **Training.** CTC loss, AdamW, a warm-up then cosine learning rate over the time budget (``--hours``)
  or ``--steps``, in bfloat16 autocast where the CPU has native bf16 (``--precision``); lines are
  rendered on the fly (``--workers`` processes; seeded per worker, so a run
  is reproducible for a given worker count). Every ``--val-minutes`` the held-out phrases (phrases and
  places never in a training line, ``phrases.split_of``) are read and scored with the evaluator's
  ``ocr_metrics`` (exact match with tones, without, CER), and the checkpoint is saved. At the end the
  model is exported, read back through the production reader, scored again, and the model card written.

Run it: ``festival-serve train sign-text --hours 6`` (or ``python -m festival_serve.training.sign_reader``).
Serve it: ``sign_reader: {rec_model: sign_reader/vi_rec.pt, rec_dict: sign_reader/vi_dict.txt}``: the reader
runs the checkpoint's ONNX export (``crnn.cached_onnx``: made once beside it, keyed by the checkpoint's hash).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from festival_serve.models.sign_reader import charset

from festival_serve.world import phrases
from festival_serve.models.sign_reader.crnn import (
    HEIGHT, WIDTH_STRIDE, CRNNConfig, build_crnn, cached_onnx, load_checkpoint, save_checkpoint,
)
from festival_serve.world.synth.text_lines import sample_lines, vietnamese_fonts
from festival_serve.training.schedule import learning_rate, start_run, use_bf16

logger = logging.getLogger(__name__)

CHECKPOINT, DICT_FILE, CARD = "vi_rec.pt", "vi_dict.txt", "MODEL_CARD.md"

# --------------------------------------------------------------------------------------------------
# The model's files

def write_dictionary(out_dir: Path) -> Path:
    """``vi_dict.txt``: one character per line, as ``rec_dict`` reads it."""
    path = Path(out_dir) / DICT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(charset.DICTIONARY) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Data and scoring

def to_batch(lines_rgb: list[np.ndarray]) -> np.ndarray:
    """RGB lines -> the recognizer's ``(N, 3, 48, W)`` input, exactly as the production reader builds it."""
    from festival_serve.models.sign_reader.ppocr import rec_batch, rgb_to_bgr

    return rec_batch([rgb_to_bgr(line) for line in lines_rgb], HEIGHT)


#: Lines rendered together and cut into this many batches of similar width: a batch is padded to its widest
#: line, so grouping by width saves ~25% of the convolution work at batch 32 (measured).
BUCKETS = 4
#: Share of batches padded wider still, as the reader pads a sign's short line beside a long one.
EXTRA_PAD_P = 0.25


def _batches(images: list[np.ndarray], labels: list[str], size: int, rng: np.random.Generator):
    """``(x, targets, target_lengths)`` tensors for CTC, lines grouped by aspect ratio into batches of ``size``."""
    import torch
    order = sorted(range(len(images)), key=lambda i: images[i].shape[1] / images[i].shape[0])
    groups = [order[k:k + size] for k in range(0, len(order), size)]
    for g in rng.permutation(len(groups)):
        chunk = groups[g]
        x = to_batch([images[i] for i in chunk])
        if rng.random() < EXTRA_PAD_P:  # right padding is 0 in normalised space, as rec_batch pads
            x = np.pad(x, ((0, 0), (0, 0), (0, 0), (0, int(x.shape[3] * rng.uniform(0.1, 0.8)))))
        codes = [charset.encode(labels[i]) for i in chunk]
        yield (torch.from_numpy(x), torch.tensor([c for code in codes for c in code]),
               torch.tensor([len(code) for code in codes]))


def _lines_dataset(seed: int, batch_size: int, fonts: tuple[str, ...]):
    import torch

    class Lines(torch.utils.data.IterableDataset):
        """An endless stream of training batches ``(x, targets, target_lengths)``; each worker its own seed."""

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([seed, info.id if info else 0])
            while True:
                images, labels = sample_lines(batch_size * BUCKETS, rng, "train", fonts)
                yield from _batches(images, labels, batch_size, rng)

    return Lines()


def predict(model, batch: np.ndarray) -> list[str]:
    """Greedy CTC decoding of one ``(N, 3, 48, W)`` batch."""
    import torch
    with torch.inference_mode():
        steps = model(torch.from_numpy(batch)).argmax(-1).numpy()
    return [charset.decode(row) for row in steps]


def read_lines(recognize, lines_rgb: list[np.ndarray], batch: int = 64) -> list[str]:
    """``recognize(batch) -> texts`` over many lines, batched by similar width (as little padding as
    serving sees); texts in the order of ``lines_rgb``."""
    order = sorted(range(len(lines_rgb)), key=lambda i: lines_rgb[i].shape[1] / lines_rgb[i].shape[0])
    texts: list[str] = [""] * len(lines_rgb)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, text in zip(chunk, recognize([lines_rgb[i] for i in chunk])):
            texts[i] = text
    return texts


def score(predicted: list[str], truths: list[str]) -> dict[str, Any]:
    """The evaluator's OCR metrics (``festival_serve.world.scores.ocr_metrics``), confusions cut to five."""
    from festival_serve.world.scores import ocr_metrics

    metrics = ocr_metrics(list(zip(predicted, truths)))
    metrics["unreadable_characters"] = metrics["unreadable_characters"][:5]
    return metrics


def validation_set(count: int, seed: int, fonts: tuple[str, ...]) -> tuple[list[np.ndarray], list[str]]:
    """``count`` lines of the held-out phrases and places, the same for every run with ``seed``."""
    return sample_lines(count, np.random.default_rng([seed, 0x7A1]), "val", fonts)


def production_reader(out_dir: Path):
    """The served reader (bundled PP-OCRv6 detector) with this checkpoint as ``rec_model`` (through its
    cached export, as serving reads it) and the dictionary as ``rec_dict``."""
    from festival_serve.models.sign_reader.reader import PPOCROnnxReader
    from festival_serve.pipeline.settings import SignReaderSettings

    settings = SignReaderSettings(device="cpu", rec_model=str((out_dir / CHECKPOINT).resolve()),
                                  rec_dict=str((out_dir / DICT_FILE).resolve()))
    return PPOCROnnxReader(settings, model_store=out_dir)


# --------------------------------------------------------------------------------------------------
# Training

def train_sign_text(
    out_dir: Path,
    *,
    hours: float | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    warmup: int = 300,
    seed: int = 0,
    threads: int | None = None,
    workers: int = 1,
    init: Path | None = None,
    config: CRNNConfig = CRNNConfig(),
    val_lines: int = 400,
    val_minutes: float = 10.0,
    log_every: int = 50,
    fonts: tuple[str, ...] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Train until ``hours`` or ``steps`` runs out (whichever first), then write the checkpoint, the ONNX
    export, the dictionary and return the metrics (the card is ``cmd_train``'s). Ctrl-C ends training
    early and still exports what it has."""
    import torch
    started = start_run(hours, steps, threads=threads, seed=seed)
    out_dir = Path(out_dir)
    fonts = tuple(fonts or vietnamese_fonts())
    logger.info("sign-text: %d fonts: %s", len(fonts), ", ".join(Path(f).name for f in fonts))

    if init:
        model, previous = load_checkpoint(Path(init))
        config = model.config
        logger.info("sign-text: continuing from %s (%s lines seen)", init, previous.get("lines_seen"))
    else:
        model, previous = build_crnn(config), {}
    parameters = sum(p.numel() for p in model.parameters())
    bf16 = use_bf16(precision)
    # channels_last: oneDNN's bf16 convolutions run ~25% faster on it than on NCHW (measured).
    model = model.to(memory_format=torch.channels_last)
    logger.info("sign-text: training in %s", "bfloat16 autocast" if bf16 else "float32")
    val_images, val_truths = validation_set(val_lines, seed, fonts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    loader = torch.utils.data.DataLoader(
        _lines_dataset(seed, batch_size, fonts), batch_size=None, num_workers=workers,
        prefetch_factor=2 if workers else None, persistent_workers=False)
    budget_s = hours * 3600 if hours else math.inf
    history: list[dict[str, Any]] = []

    def validate(step: int, lines_seen: int) -> dict[str, Any]:
        nonlocal val_seconds
        began = time.perf_counter()
        model.eval()
        predicted = read_lines(lambda lines: predict(model, to_batch(lines)), val_images)
        model.train()
        metrics = score(predicted, val_truths)
        record = {"step": step, "lines_seen": lines_seen, "minutes": round((time.perf_counter() - train_started) / 60, 1),
                  **{k: metrics[k] for k in ("exact_match", "exact_match_no_tones", "cer")}}
        history.append(record)
        logger.info("sign-text: step %d: held-out phrases exact %.3f (no tones %.3f) CER %.3f", step,
                    metrics["exact_match"], metrics["exact_match_no_tones"], metrics["cer"])
        save_checkpoint(model, out_dir / CHECKPOINT, step=step, lines_seen=lines_seen, seed=seed)
        val_seconds += time.perf_counter() - began
        return metrics

    step, lines_seen, first_loss, running, window_lines = 0, int(previous.get("lines_seen", 0)), None, [], 0
    val_seconds = 0.0
    interrupted = False
    model.train()
    train_started = window_started = last_val = time.perf_counter()
    try:
        for x, targets, target_lengths in loader:
            elapsed = time.perf_counter() - train_started
            if (steps is not None and step >= steps) or elapsed >= budget_s:
                break
            done = max(step / steps if steps else 0.0, elapsed / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, step, done, warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x.to(memory_format=torch.channels_last))
            log_probs = logits.float().log_softmax(-1).permute(1, 0, 2)  # (T, N, classes), as CTCLoss wants
            input_lengths = torch.full((x.shape[0],), log_probs.shape[0], dtype=torch.long)
            loss = ctc(log_probs, targets, input_lengths, target_lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # LSTMs under CTC spike early on
            optimizer.step()
            step += 1
            lines_seen += x.shape[0]
            window_lines += x.shape[0]
            value = float(loss.item())
            first_loss = value if first_loss is None else first_loss
            running.append(value)
            if step % log_every == 0:
                now = time.perf_counter()
                logger.info("sign-text: step %d  loss %.3f  lr %.1e  %.1f lines/s  %.0f min", step,
                            sum(running) / len(running), optimizer.param_groups[0]["lr"],
                            window_lines / (now - window_started), (now - train_started) / 60)
                running, window_lines, window_started = [], 0, now
            if time.perf_counter() - last_val >= val_minutes * 60:
                validate(step, lines_seen)
                last_val = window_started = time.perf_counter()
                window_lines = 0
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("sign-text: interrupted at step %d: exporting what was learnt", step)
    training_seconds = time.perf_counter() - train_started
    # Lines trained per second, validation pauses excluded (rendering included: it shares the cores).
    lines_per_s = round(step * batch_size / max(1e-9, training_seconds - val_seconds), 2) if step else None
    final_loss = sum(running) / len(running) if running else None
    val = validate(step, lines_seen)  # saves the checkpoint
    model.eval()
    onnx_path, dict_path = cached_onnx(out_dir / CHECKPOINT), write_dictionary(out_dir)

    # The export read back through the reader that serves it: same lines, production preprocessing.
    from festival_serve.models.sign_reader.ppocr import rgb_to_bgr

    reader = production_reader(out_dir)
    served = score(read_lines(lambda lines: [text for text, _ in reader.recognize([rgb_to_bgr(line) for line in lines])],
                              val_images), val_truths)
    return {
        "out": str(out_dir), "onnx": str(onnx_path), "dictionary": str(dict_path), "checkpoint": str(out_dir / CHECKPOINT),
        "parameters": parameters, "config": asdict(config), "fonts": [Path(f).name for f in fonts],
        "steps": step, "lines_seen": lines_seen, "batch_size": batch_size, "lr": lr, "seed": seed,
        "workers": workers, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
        "interrupted": interrupted,
        "first_loss": first_loss, "final_loss": final_loss,
        "lines_per_s": lines_per_s,
        "val": {"lines": len(val_truths), **val}, "val_served": served, "history": history,
        "seconds": {"training": round(training_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }


# --------------------------------------------------------------------------------------------------
# The command

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/sign_reader"),
                        help=f"folder for {CHECKPOINT}, its ONNX export, {DICT_FILE} and {CARD}")
    parser.add_argument("--hours", type=float, default=6.0, help="training time budget (the schedule spans it)")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead, if sooner")
    parser.add_argument("--init", type=Path,
                        help=f"start from this {CHECKPOINT}'s weights and architecture (continue a run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes rendering lines beside training (0: render in the training process)")
    parser.add_argument("--channels", type=lambda v: tuple(int(c) for c in v.split(",")),
                        default=CRNNConfig.channels, help="the seven convolutions' channels, comma-separated")
    parser.add_argument("--hidden", type=int, default=CRNNConfig.hidden, help="LSTM units per direction")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic (auto: bfloat16 autocast where the CPU has native bf16); "
                             "the export is float32 either way")
    parser.add_argument("--val-lines", type=int, default=400, help="held-out phrase lines scored at each validation")
    parser.add_argument("--val-minutes", type=float, default=15.0, help="minutes between validations (and checkpoints)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Train, write the model files and ``MODEL_CARD.md``, print the result as JSON on stdout."""
    from festival_serve.training.cards import write_model_card

    result = train_sign_text(args.out, hours=args.hours, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, threads=args.threads,
                             workers=args.workers, init=args.init, val_lines=args.val_lines,
                             config=CRNNConfig(channels=args.channels, hidden=args.hidden),
                             val_minutes=args.val_minutes, log_every=args.log_every, precision=args.precision)
    held_out = (*phrases.phrases("val"), *phrases.places("val"))
    write_model_card(
        args.out / CARD,
        title="CRNN Vietnamese sign-text recognizer",
        model=(f"CRNN (Shi et al. 2015; conv {list(result['config']['channels'])}, 2x BiLSTM "
               f"{result['config']['hidden']}, CTC over {charset.NUM_CLASSES} classes), {result['parameters']:,} "
               f"parameters, {f'continued from {args.init}' if args.init else 'from scratch'}; PP-OCR recognizer I/O "
               f"(N, 3, {HEIGHT}, W) BGR [-1, 1] -> (N, W/{WIDTH_STRIDE}, classes) softmax; {CHECKPOINT} (exported to ONNX on first use) + {DICT_FILE}"),
        data=(f"{result['lines_seen']:,} text lines rendered on the fly (phrases.sample_text: phrases, places, "
              f"generated syllables, numbers and units, random dictionary characters) in {len(result['fonts'])} fonts "
              f"({', '.join(result['fonts'])}) on sign colours, with crop degradations. Validation: "
              f"{result['val']['lines']} lines of {len(held_out)} held-out phrases and places that no training line "
              f"contains: {', '.join(held_out)}"),
        seed=args.seed, command=command, seconds=result["seconds"]["total"],
        metrics={"val": {k: result["val"][k] for k in ("exact_match", "exact_match_no_tones", "cer", "cer_no_tones")},
                 "val_served": {k: result["val_served"][k] for k in ("exact_match", "exact_match_no_tones", "cer")},
                 "steps": result["steps"], "lines_seen": result["lines_seen"], "lines_per_s": result["lines_per_s"],
                 "first_loss": result["first_loss"], "final_loss": result["final_loss"],
                 "seconds": result["seconds"], "history": result["history"]},
        notes=(f"CTC loss, AdamW, warm-up then cosine learning rate over the time budget, gradients clipped at 5, "
               f"{result['precision']} arithmetic (bfloat16 autocast where the CPU has it natively; exported float32). "
               "val: the PyTorch model on the held-out lines; val_served: the ONNX export through the production "
               "reader's recognizer (festival_serve.models.sign_reader.reader, same lines). Exact match is with tone marks. "
               f"Serve it with `sign_reader: {{rec_model: sign_reader/{CHECKPOINT}, rec_dict: sign_reader/{DICT_FILE}}}` "
               "(the reader runs its ONNX export, made once beside it); "
               f"continue training with `--init {args.out / CHECKPOINT}`."),
    )
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from festival_serve.training import run_trainer

    sys.exit(run_trainer(sys.modules[__name__]))
