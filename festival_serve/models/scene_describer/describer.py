"""Scene description with SmolVLM-256M-Instruct (an Idefics3 model), grounded on the detectors' findings.

Plain model logic, no Ray: the prompt builder, the weights check, and ``SceneDescriber``, which
loads the model directory once and describes a whole batch of frames in one ``generate`` call.

Token budget per frame (SmolVLM-256M: 512 px tiles, patch 16, pixel-shuffle scale 4 → 64 tokens a
tile): one unsplit frame costs 64 image tokens; with ``do_image_splitting`` an 848×480 frame becomes
12 tiles + 1 global image = 832 tokens, ~13× the prefill. Splitting is therefore off by default.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from festival_serve.pipeline.settings import SceneDescriberSettings, in_store
from festival_serve.pipeline.types import Findings

if TYPE_CHECKING:
    from transformers import BatchFeature

logger = logging.getLogger(__name__)

MODEL_NAME = "scene_describer"
# Frame size (height, width) of the YOLIC outdoor layout, used to report the image-token cost of a
# typical frame in ``model_info`` (with splitting on, the cost depends on the frame's shape).
REFERENCE_FRAME = (480, 848)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


#: The config.json key the describer trained here carries (what it was trained on); /v1/models shows it.
TRAINED_ON_KEY = "festival_serve_trained_on"


class WeightsMissing(RuntimeError):
    """The scene describer's model directory is absent or incomplete."""


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace('"', "'")


def _sign_phrase(label: str, text: str) -> str:
    text = _one_line(text)
    return f'{_one_line(label)} reading "{text}"' if text else _one_line(label)


def _hazard_phrase(label: str, cells: int, place: str) -> str:
    return f"{_one_line(label)} ({cells} cell{'' if cells == 1 else 's'}{', ' + place if place else ''})"


def build_prompt(findings: Findings) -> str:
    """The user turn for one frame: the task, then the detected signs and hazards (or that there were none)."""
    signs = "; ".join(_sign_phrase(label, text) for label, text in findings.signs)
    hazards = "; ".join(_hazard_phrase(label, cells, place) for label, cells, place in findings.hazards if cells > 0)
    return "\n".join(
        (
            "You are a road-safety assistant for a driver. In one or two sentences, describe what in this "
            "image matters for driving safely and what the driver should do.",
            f"Traffic signs detected: {signs}." if signs else "No traffic signs were detected.",
            f"Hazards detected: {hazards}." if hazards else "No hazards were detected.",
        )
    )


def model_dir(settings: SceneDescriberSettings, *, model_store: Path) -> Path:
    return in_store(settings.model, model_store)


def check_weights(path: Path) -> None:
    """Raise ``WeightsMissing`` naming what is absent; cheap, imports nothing heavy."""
    hint = ("the describer trained here ships in the project's models/scene_describer/festival-describer "
            "(`festival-serve train describer` remakes it); for SmolVLM-256M-Instruct run `festival-serve models "
            "pull` (needs internet access to the Hugging Face hub) and set scene_describer.model to its pull_into")
    if not path.is_dir():
        raise WeightsMissing(f"{MODEL_NAME}: model directory {path} does not exist; {hint}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer (" + " or ".join(_TOKENIZER_FILES) + ")")
    if not any((path / name).is_file() for name in _PROCESSOR_FILES):
        missing.append("image processor (" + " or ".join(_PROCESSOR_FILES) + ")")
    if missing:
        raise WeightsMissing(f"{MODEL_NAME}: {path} is incomplete, missing {', '.join(missing)}; {hint}")


def resolve_dtype(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return "float16" if device.startswith("cuda") else "float32"


def _as_rgb(image: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")
    # torch.from_numpy (inside the processor) warns on read-only arrays, and Ray hands us read-only ones.
    return image if image.flags.writeable else image.copy()


class SceneDescriber:
    """SmolVLM loaded once; ``describe`` turns a batch of frames + findings into one sentence or two each."""

    def __init__(self, settings: SceneDescriberSettings, *, model_store: Path, gpu_only: bool = False,
                 gpu_fraction: float | None = None) -> None:
        self.settings = settings
        self.path = model_dir(settings, model_store=model_store)
        check_weights(self.path)  # before importing torch/transformers: a missing model fails in ms

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from festival_serve.runtime import gpu_share
        from festival_serve.runtime.devices import check_tensors, resolve_device, warn_cpu_beside_gpu

        self.device = resolve_device(settings.device, gpu_only=gpu_only, model=MODEL_NAME)
        self.cpu_beside_gpu = warn_cpu_beside_gpu(MODEL_NAME, self.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.memory_cap_bytes = gpu_share.cap_torch(self.device, gpu_fraction) if self.device != "cpu" else None
        if settings.threads:
            torch.set_num_threads(settings.threads)

        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        # Batched decoder-only generation appends new tokens on the right: pad prompts on the left.
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=getattr(torch, self.dtype), local_files_only=True
        )
        self.model.to(self.device).eval()
        if gpu_only:
            check_tensors([*self.model.named_parameters(), *self.model.named_buffers()], device=self.device,
                          dtype=getattr(torch, self.dtype), where=f"{MODEL_NAME} after loading")
        self._image_kwargs = image_processor_kwargs(settings)
        # Warm-up: one short generation so the first request does not pay for lazy initialisation
        # (and, in GPU-only mode, proves its inputs land on the device).
        if gpu_only:
            warm_up = self.prepare([np.zeros((64, 64, 3), np.uint8)], [Findings()])
            check_tensors([(k, v) for k, v in warm_up.items() if hasattr(v, "device")], device=self.device,
                          where=f"{MODEL_NAME} warm-up inputs")
        self.generate_ids([np.zeros((64, 64, 3), np.uint8)], [Findings()], max_new_tokens=1)
        logger.info(
            "%s: loaded %s on %s (%s), image splitting %s, %d image tokens per frame",
            MODEL_NAME,
            self.path,
            self.device,
            self.dtype,
            "on" if settings.do_image_splitting else "off",
            self.image_tokens_per_image(),
        )

    def image_tokens_per_image(self, height: int = REFERENCE_FRAME[0], width: int = REFERENCE_FRAME[1]) -> int:
        """``<image>`` tokens one frame of this size costs: 1 image without splitting, tiles + 1 with it."""
        patches, _, _ = self.processor.image_processor.get_number_of_image_patches(
            height, width, dict(self._image_kwargs)
        )
        return self.processor.image_seq_len * max(patches, 1)

    def prepare(self, images: list[np.ndarray], findings: list[Findings]) -> BatchFeature:
        """Chat prompts + pixel values for a non-empty batch, left-padded, on the model's device."""
        return prepare_inputs(self.processor, images, findings, self._image_kwargs).to(self.device)

    def generate_ids(
        self, images: list[np.ndarray], findings: list[Findings], max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """New token ids per item (prompt and padding removed, stopped at end-of-sequence), one generate call."""
        import torch

        if len(images) != len(findings):
            raise ValueError(f"{len(images)} images but {len(findings)} findings")
        if not images:
            return []
        inputs = self.prepare(images, findings)
        tokenizer = self.processor.tokenizer
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens or self.settings.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        # Finished rows are filled with pad after their end-of-sequence token; cut them there.
        stop = set(np.atleast_1d(self.model.generation_config.eos_token_id or []).tolist())
        return [_until_stop(row, stop) for row in new]

    def describe(self, images: list[np.ndarray], findings: list[Findings]) -> list[str]:
        """``images`` (H, W, 3) uint8 RGB, one ``Findings`` each → one stripped description each."""
        ids = self.generate_ids(images, findings)
        if not ids:
            return []  # batch_decode([]) gives [""]
        texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def model_info(self) -> dict[str, Any]:
        import torch

        parameter = next(self.model.parameters())
        network = {
            "backend": "torch",  # transformers' generate on torch
            "device": self.device,
            "runtime_device": str(parameter.device),
            "precision": str(parameter.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads() if self.device == "cpu" else None,
            "gpu_memory_cap_bytes": self.memory_cap_bytes,
        }
        if self.device != "cpu":
            network["gpu_memory_used_bytes"] = torch.cuda.memory_reserved(parameter.device)
        return {
            **network,
            "weights": str(self.path),
            # The small describer trained here says so in its config (`train describer`); anything else is as given.
            "trained_on": getattr(self.model.config, TRAINED_ON_KEY, None),
            "pull": {"hub_id": self.settings.hub_id, "into": self.settings.pull_into},
            "dtype": self.dtype,
            "image_splitting": self.settings.do_image_splitting,
            "image_tokens_per_image": self.image_tokens_per_image(),
            "cpu_beside_gpu": self.cpu_beside_gpu,
            "networks": [{"name": MODEL_NAME, **network}],
        }


def prepare_inputs(processor, images: list[np.ndarray], findings: list[Findings],
                   image_kwargs: dict[str, Any]) -> BatchFeature:
    """The model's inputs for frames + findings: SmolVLM's chat template around the grounded prompt, one image
    each, padded on the processor tokenizer's side. The describer serves with it and the trainer trains on it."""
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(f)}]}]
        for f in findings
    ]
    prompts = processor.apply_chat_template(conversations, add_generation_prompt=True)
    return processor(
        text=prompts,
        images=[[_as_rgb(image, i)] for i, image in enumerate(images)],
        return_tensors="pt",
        padding=True,
        **image_kwargs,
    )


def image_processor_kwargs(settings: SceneDescriberSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "do_image_splitting": settings.do_image_splitting,
        # (H, W, 3) arrays: say so, or a 3-pixel-wide frame would be read as channels-first.
        "input_data_format": "channels_last",
    }
    if settings.longest_edge is not None:
        kwargs["size"] = {"longest_edge": settings.longest_edge}
    return kwargs


def _until_stop(row: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[:i]
    return row


def pull(settings: SceneDescriberSettings, *, model_store: Path) -> Path:
    """Download ``settings.hub_id`` into ``settings.pull_into`` (needs internet); return the directory."""
    from huggingface_hub import snapshot_download

    path = in_store(settings.pull_into, model_store)
    path.mkdir(parents=True, exist_ok=True)
    logger.info("%s: downloading %s into %s", MODEL_NAME, settings.hub_id, path)
    snapshot_download(repo_id=settings.hub_id, local_dir=path)
    check_weights(path)
    return path
