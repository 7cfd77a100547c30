"""Train the scene describer: a small Idefics3 (SmolVLM's architecture) on the festival world's scenes.

Each training example is a generated scene's frame, the prompt the served describer builds from a frame's
findings (here the scene's true signs and hazard cells, `descriptions.findings_from_truth`) and a target
description (`descriptions.target_description`, new phrasing every time the scene is drawn). The model is
SmolVLM's: a SigLIP vision tower, pixel shuffle, a Llama text model, SmolVLM's processor conventions and chat
template, with a byte-level BPE trained here on the world's prompts and descriptions; only smaller
(``DESCRIBER``). It is saved as a transformers model directory, so `festival_serve.models.scene_describer.describer.SceneDescriber` loads
it exactly as it loads SmolVLM-256M-Instruct.

Validation generates with that production describer on held-out scenes (the "val" seed split) and reads the
descriptions back with `descriptions.faithfulness`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from festival_serve.world import descriptions
from festival_serve.world import synth
from festival_serve.world import phrases
from festival_serve.pipeline.settings import SceneDescriberSettings
from festival_serve.training.standins.scene_describer import VlmSize, build_idefics3, build_tokenizer
from festival_serve.world.synth.scene import outdoor_layout
from festival_serve.training.schedule import learning_rate, start_run, use_bf16
from festival_serve.models.scene_describer.describer import TRAINED_ON_KEY, SceneDescriber, build_prompt, image_processor_kwargs, prepare_inputs
from festival_serve.pipeline.types import Findings

logger = logging.getLogger(__name__)

#: SmolVLM-256M's shape, shrunk: 192 px image, patch 16, pixel shuffle 3 -> 16 image tokens; a 4-layer
#: 128-wide vision tower, a 4-layer 256-wide Llama (4 heads, 2 KV heads). ~5 M parameters, ~20 MB.
DESCRIBER = VlmSize("festival-describer", 192, 16, 3, 128, 512, 4, 4, 256, 768, 4, 4, 2, vocab_size=None)
BPE_SIZE = 2048  # tokens: the world's prompts and descriptions, Vietnamese sign text in pieces
MODEL_DIR = Path("models/scene_describer/festival-describer")
CARD = "MODEL_CARD.md"
FRAME = (848, 480)  # the world's frame size (width, height)
CORPUS_SCENES = 1500  # scenes whose prompts and descriptions the tokenizer is trained on
TRAINED_ON = "the festival synthetic road world (demo weights; `festival-serve models pull` fetches the real SmolVLM)"


@dataclass
class Example:
    prompt_ids: list[int]  # the chat prompt with its image tokens expanded, as the describer sends it
    pixel_values: Any  # (1, 3, S, S) float16 tensor
    pixel_attention_mask: Any  # (1, S, S) bool tensor
    findings: Findings
    facts: synth.truth.SceneFacts


def _scene_findings(scene) -> Findings:
    layout = outdoor_layout()
    return descriptions.findings_from_truth(scene.signs, scene.cells, layout.classes, layout.boxes)


def corpus(seeds: list[int]) -> list[str]:
    """Lines the tokenizer learns from: prompts and descriptions of ``seeds``' scenes, and every Vietnamese
    phrase and place of the world and of the text generator (unseen sign text still tokenizes into pieces)."""
    rng = np.random.default_rng(0)
    lines = []
    for seed in seeds:
        draft = synth.scene.render_scene(seed, size=FRAME)
        findings = _scene_findings(draft.scene)
        lines += [build_prompt(findings), descriptions.target_description(findings, draft.scene.facts, rng)]
    lines += list(synth.INFO_TEXTS) + [phrases.sample_text(rng) for _ in range(2000)]
    return lines


def build_examples(processor, seeds: list[int], settings: SceneDescriberSettings, *, what: str) -> list[Example]:
    """Render ``seeds``' scenes and run each through the describer's own input path (`vlm.prepare_inputs`)."""
    kwargs = image_processor_kwargs(settings)
    examples, started = [], time.perf_counter()
    for i, seed in enumerate(seeds):
        scene = synth.generate_scene(seed, size=FRAME)
        findings = _scene_findings(scene)
        inputs = prepare_inputs(processor, [scene.image], [findings], kwargs)
        examples.append(Example(inputs["input_ids"][0].tolist(), inputs["pixel_values"][0].half(),
                                inputs["pixel_attention_mask"][0], findings, scene.facts))
        if (i + 1) % 500 == 0 or i + 1 == len(seeds):
            logger.info("describer: %s scenes %d/%d (%.0f s)", what, i + 1, len(seeds), time.perf_counter() - started)
    return examples


def collate(examples: list[Example], tokenizer, rng: np.random.Generator, fact_weight: float = 1.0) -> dict[str, Any]:
    """Prompt + a freshly phrased target per example, right-padded; loss only on the target and its end, each
    target token weighted 1 except those that state the sky or the lanes (``fact_weight``)."""
    import torch

    rows, labels, weights = [], [], []
    for ex in examples:
        target = " " + descriptions.target_description(ex.findings, ex.facts, rng) + "<end_of_utterance>"
        encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        answer = encoded["input_ids"]
        facts = descriptions.image_fact_spans(target)
        rows.append(ex.prompt_ids + answer)
        labels.append([-100] * len(ex.prompt_ids) + answer)
        weights.append([0.0] * len(ex.prompt_ids) + [
            fact_weight if any(start < end_ and end > start_ for start_, end_ in facts) else 1.0
            for start, end in encoded["offset_mapping"]])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        "loss_weights": torch.tensor([w + [0.0] * (width - len(w)) for w in weights]),
        "pixel_values": torch.stack([ex.pixel_values for ex in examples]).float(),
        "pixel_attention_mask": torch.stack([ex.pixel_attention_mask for ex in examples]),
        "fact_labels": torch.tensor([fact_classes(ex.facts) for ex in examples]),
    }


#: Lane counts the probe tells apart: index = lanes (0 = no lane markings); the world draws 2 or 3.
LANE_CLASSES = 6
NOT_MODEL_INPUTS = ("labels", "loss_weights", "fact_labels")


def fact_classes(facts: synth.truth.SceneFacts) -> tuple[int, int]:
    """(sky index in SKIES, lane class) of a scene: the image-only facts the probe is trained on."""
    return synth.truth.SKIES.index(facts.sky), min(facts.lanes or 0, LANE_CLASSES - 1)


class ImageFactProbe:
    """A training-only linear probe on the image tokens the text model reads (the connector's output, mean over
    a frame's tokens): it predicts the sky and the lane count, so the vision tower gets a gradient for them on
    every example rather than from two or three words of a ~50-token description. Not saved with the model."""

    def __init__(self, model, hidden: int):
        import torch

        self.heads = torch.nn.ModuleDict({"sky": torch.nn.Linear(hidden, len(synth.truth.SKIES)),
                                          "lanes": torch.nn.Linear(hidden, LANE_CLASSES)})
        for head in self.heads.values():  # zero: the probe starts at chance, not with a burst of gradient
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self._tokens = None  # (frames, image tokens, hidden) of the last forward pass
        model.model.connector.register_forward_hook(lambda _module, _inputs, output: setattr(self, "_tokens", output))

    def parameters(self):
        return self.heads.parameters()

    def loss(self, fact_labels):
        """Cross-entropy of sky + lanes over the last forward pass's frames (one frame an example)."""
        import torch.nn.functional as F

        pooled = self._tokens.float().mean(dim=1)
        pooled = F.layer_norm(pooled, pooled.shape[-1:])  # the image tokens' scale is the text model's, not ours
        return (F.cross_entropy(self.heads["sky"](pooled), fact_labels[:, 0])
                + F.cross_entropy(self.heads["lanes"](pooled), fact_labels[:, 1]))


def weighted_loss(model, batch: dict[str, Any]):
    """Next-token cross-entropy over the target tokens, each weighted by ``loss_weights`` (all 1: the mean that
    transformers' own ``labels`` loss gives)."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
    logits = model(**inputs).logits[:, :-1].float()  # (batch, tokens - 1, vocabulary): predicts token t + 1
    labels, weights = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                reduction="none").view_as(weights)
    return (per_token * weights).sum() / weights.sum()


def evaluate_describer(model_dir: Path, seeds: list[int], *, batch: int = 8,
                       max_new_tokens: int = 96) -> dict[str, Any]:
    """Describe ``seeds``' scenes with the production describer loaded from ``model_dir``; faithfulness,
    tokens generated and seconds per batch."""
    settings = SceneDescriberSettings(model=str(model_dir.resolve()), device="cpu", max_new_tokens=max_new_tokens)
    describer = SceneDescriber(settings, model_store=model_dir.parent)
    layout = outdoor_layout()
    scores, tokens, seconds, samples = [], [], [], []
    for start in range(0, len(seeds), batch):
        scenes = [synth.generate_scene(seed, size=FRAME) for seed in seeds[start:start + batch]]
        findings = [_scene_findings(scene) for scene in scenes]
        began = time.perf_counter()
        ids = describer.generate_ids([s.image for s in scenes], findings)
        seconds.append(time.perf_counter() - began)
        texts = [t.strip() for t in describer.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        for scene, found, text, row in zip(scenes, findings, texts, ids):
            hazards = [label for k, label in enumerate(layout.classes) if scene.cells[:, k].any()]
            scores.append(descriptions.faithfulness(text, found, truth_signs=[(s.sign_class, s.text) for s in scene.signs],
                                                    truth_hazards=hazards, facts=scene.facts))
            tokens.append(len(row))
            if len(samples) < 4:
                samples.append({"seed": scene.seed, "description": text})
    return {**descriptions.summarize(scores), "tokens_p50": float(np.median(tokens)), "tokens_max": int(max(tokens)),
            "seconds_per_batch_p50": round(float(np.median(seconds)), 3), "batch": batch, "samples": samples}


def train_describer(
    out_dir: Path,
    *,
    hours: float | None = None,
    steps: int | None = None,
    train_scenes: int = 4000,
    train_skip: int = 0,
    batch_size: int = 24,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    warmup: int = 200,
    seed: int = 0,
    threads: int | None = None,
    init: Path | None = None,
    val_scenes: int = 48,
    val_minutes: float = 15.0,
    corpus_scenes: int = CORPUS_SCENES,
    vision_lr_scale: float = 1.0,
    fact_weight: float = 1.0,
    probe_weight: float = 0.0,
    log_every: int = 25,
    precision: str = "auto",
) -> dict[str, Any]:
    """Train until ``hours`` or ``steps`` runs out, saving the model directory at each validation and at the
    end; Ctrl-C ends early and still saves. Returns the metrics (the card is ``cmd_train``'s)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    started = start_run(hours, steps, threads=threads, seed=seed)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    if init is None:
        logger.info("describer: training the tokenizer on %d scenes' prompts and descriptions", corpus_scenes)
        tokenizer = build_tokenizer(corpus=corpus(synth.scene_seeds("train", corpus_scenes)), bpe_size=BPE_SIZE)
        build_idefics3(out_dir, DESCRIBER, seed=seed, tokenizer=tokenizer)
        init = out_dir
    else:
        init = Path(init)
    processor = AutoProcessor.from_pretrained(init, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32, local_files_only=True)
    setattr(model.config, TRAINED_ON_KEY, TRAINED_ON)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("describer: %s, %.1f M parameters, from %s", DESCRIBER.name, parameters / 1e6,
                "scratch" if init == out_dir else init)
    settings = SceneDescriberSettings(model=str(out_dir))
    examples = build_examples(processor, synth.scene_seeds("train", train_scenes, skip=train_skip), settings,
                              what="training")
    val_seeds = synth.scene_seeds("val", val_scenes)
    bf16 = use_bf16(precision)
    # The vision tower and connector may learn faster than the text model: it finds the findings' words in the
    # prompt within minutes, while what only the image shows (sky, lanes) is a few tokens a description.
    vision = [p for n, p in model.named_parameters() if n.startswith(("model.vision_model", "model.connector"))]
    text = [p for n, p in model.named_parameters() if not n.startswith(("model.vision_model", "model.connector"))]
    groups = [{"params": text, "lr_scale": 1.0}, {"params": vision, "lr_scale": vision_lr_scale}]
    probe = ImageFactProbe(model, model.config.text_config.hidden_size) if probe_weight > 0 else None
    if probe is not None:
        groups.append({"params": list(probe.parameters()), "lr_scale": vision_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    budget_s = hours * 3600 if hours else math.inf
    history: list[dict[str, Any]] = []

    def save() -> None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    def validate(step: int) -> dict[str, Any]:
        nonlocal val_seconds
        began = time.perf_counter()
        save()
        metrics = evaluate_describer(out_dir, val_seeds)
        history.append({"step": step, "minutes": round((time.perf_counter() - train_started) / 60, 1),
                        **{k: v for k, v in metrics.items() if k != "samples"}})
        logger.info("describer: step %d: mention recall %.3f, hallucinations %.3f a description, lighting %.3f, "
                    "lanes %.3f, road users %.3f; e.g. %r", step, metrics["mention_recall"],
                    metrics["hallucinations_per_description"], metrics["lighting_accuracy"],
                    metrics["lanes_accuracy"], metrics["road_users_accuracy"], metrics["samples"][0]["description"])
        val_seconds += time.perf_counter() - began
        return metrics

    step, first_loss, running, probe_running, val_seconds, interrupted = 0, None, [], [], 0.0, False
    model.train()
    train_started = window_started = last_val = time.perf_counter()
    try:
        while True:
            elapsed = time.perf_counter() - train_started
            if (steps is not None and step >= steps) or elapsed >= budget_s:
                break
            done = max(step / steps if steps else 0.0, elapsed / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, step, done, warmup) * group["lr_scale"]
            batch = collate([examples[i] for i in rng.integers(len(examples), size=batch_size)],
                            processor.tokenizer, rng, fact_weight)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = weighted_loss(model, batch)
                if probe is not None:
                    probe_loss = probe.loss(batch["fact_labels"])
                    probe_running.append(float(probe_loss.item()))
                    loss = loss + probe_weight * probe_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            value = float(loss.item())
            first_loss = value if first_loss is None else first_loss
            running.append(value)
            if step % log_every == 0:
                now = time.perf_counter()
                logger.info("describer: step %d  loss %.3f%s  lr %.1e  %.1f scenes/s  %.0f min", step,
                            sum(running) / len(running),
                            f"  probe {sum(probe_running) / len(probe_running):.3f}" if probe_running else "",
                            optimizer.param_groups[0]["lr"], log_every * batch_size / (now - window_started),
                            (now - train_started) / 60)
                running, probe_running, window_started = [], [], now
            if time.perf_counter() - last_val >= val_minutes * 60:
                validate(step)
                model.train()
                last_val = window_started = time.perf_counter()
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("describer: interrupted at step %d: saving what was learnt", step)
    training_seconds = time.perf_counter() - train_started
    final_loss = sum(running) / len(running) if running else None
    model.eval()
    val = validate(step)  # saves the model directory
    return {
        "out": str(out_dir), "parameters": parameters, "size": asdict(DESCRIBER), "vocabulary": len(processor.tokenizer),
        "steps": step, "examples_seen": step * batch_size, "train_scenes": train_scenes, "train_skip": train_skip,
        "batch_size": batch_size, "lr": lr, "vision_lr_scale": vision_lr_scale, "fact_weight": fact_weight,
        "probe_weight": probe_weight, "seed": seed, "threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32", "interrupted": interrupted,
        "first_loss": first_loss, "final_loss": final_loss,
        "val": {"scenes": len(val_seeds), **val}, "history": history,
        "seconds": {"training": round(training_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }


# --------------------------------------------------------------------------------------------------
# The command

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help=f"the model directory (and its {CARD})")
    parser.add_argument("--hours", type=float, default=2.0, help="training time budget (the schedule spans it)")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead, if sooner")
    parser.add_argument("--init", type=Path, help="continue from this model directory (architecture and tokenizer too)")
    parser.add_argument("--train-scenes", type=int, default=4000, help="generated training scenes (held in memory)")
    parser.add_argument("--train-skip", type=int, default=0, help="skip the split's first N scenes (fresh ones)")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="the vision tower's and connector's learning rate, as a multiple of --lr")
    parser.add_argument("--fact-weight", type=float, default=1.0,
                        help="loss weight of the tokens that state the sky and the lanes (what only the image shows; "
                             "a few tokens of each ~50-token description)")
    parser.add_argument("--probe-weight", type=float, default=0.0,
                        help="weight of a training-only linear probe's loss (sky and lane count from the image "
                             "tokens), added to the description loss; 0: no probe")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic (auto: bfloat16 autocast where the CPU has native bf16)")
    parser.add_argument("--val-scenes", type=int, default=48, help="held-out scenes described at each validation")
    parser.add_argument("--val-minutes", type=float, default=15.0, help="minutes between validations (and saves)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between progress lines")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Train, write the model directory and ``MODEL_CARD.md``, print the result as JSON on stdout."""
    from festival_serve.training.cards import write_model_card

    result = train_describer(args.out, hours=args.hours, steps=args.steps, train_scenes=args.train_scenes,
                             train_skip=args.train_skip, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, threads=args.threads,
                             init=args.init, val_scenes=args.val_scenes, val_minutes=args.val_minutes,
                             log_every=args.log_every, precision=args.precision,
                             vision_lr_scale=args.vision_lr_scale, fact_weight=args.fact_weight,
                             probe_weight=args.probe_weight)
    size = result["size"]
    write_model_card(
        args.out / CARD,
        title="festival scene describer (a small Idefics3, SmolVLM's architecture)",
        model=(f"Idefics3ForConditionalGeneration: SigLIP vision {size['vision_layers']}x{size['vision_hidden']} on "
               f"{size['vision_image_size']} px (patch {size['patch_size']}, pixel shuffle {size['scale_factor']} -> "
               f"{DESCRIBER.image_seq_len} image tokens), Llama {size['text_layers']}x{size['text_hidden']} "
               f"({size['text_heads']} heads, {size['text_kv_heads']} KV heads), byte-level BPE of "
               f"{result['vocabulary']} tokens with SmolVLM's special tokens and chat template; "
               f"{result['parameters']:,} parameters, {f'continued from {args.init}' if args.init else 'from scratch'}"),
        data=(f"{result['train_scenes']:,} generated scenes of the world's train split (after the first "
              f"{result['train_skip']:,}), {result['examples_seen']:,} (scene, description) examples drawn with a "
              "new phrasing each time: the frame, the describer's prompt built from the scene's true signs and "
              "hazard cells, and a description of its signs, hazards (where), vehicles and people (where), sky and "
              f"lanes (festival_serve.world.descriptions). Validation: {result['val']['scenes']} scenes of the val split, "
              "described by the production describer (festival_serve.models.scene_describer.describer) and read back by "
              "descriptions.faithfulness"),
        seed=args.seed, command=command, seconds=result["seconds"]["total"],
        metrics={"val": {k: v for k, v in result["val"].items() if k != "samples"}, "steps": result["steps"],
                 "first_loss": result["first_loss"], "final_loss": result["final_loss"],
                 "seconds": result["seconds"], "history": result["history"]},
        notes=("Cross-entropy on the description tokens only (sky and lane tokens weighted "
               f"{result['fact_weight']:g}; plus {result['probe_weight']:g} x a training-only linear probe's "
               "sky and lane-count loss on the image tokens), AdamW, warm-up then cosine learning rate over the time "
               f"budget, gradients clipped at 1, {result['precision']} arithmetic. Samples: "
               + json.dumps(result["val"]["samples"], ensure_ascii=False)
               + f". Serve it with `scene_describer: {{model: scene_describer/{args.out.name}}}`; continue training "
               f"with `--init {args.out}`."),
    )
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    from festival_serve.training import run_trainer

    sys.exit(run_trainer(sys.modules[__name__]))
