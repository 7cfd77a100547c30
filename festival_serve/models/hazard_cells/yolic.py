"""YOLIC hazard cells (Su et al., "YOLIC: an efficient method for object localization and
classification on edge devices", 2024), the M2 variant.

The network is a MobileNetV2 whose classifier is ``Linear(1280, cells x (classes + 1))``: every cell
of interest gets an independent sigmoid per class, background last. Input: RGB resized to 224x224,
scaled to [0, 1], no mean/std normalisation. Checkpoints are state_dicts saved as ``.pth.tar``. The
cells themselves come from a layout file (``data/yolic_<name>.json``), not from code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from festival_serve import DATA_DIR
from festival_serve.runtime.cache import build_once, derived_name
from festival_serve.runtime.devices import resolve_device, resolve_fp16, warn_cpu_beside_gpu
from festival_serve.pipeline.settings import HazardCellsSettings, in_store
from festival_serve.pipeline.types import HazardCell, HazardLabel

logger = logging.getLogger(__name__)

INPUT_SIZE = 224  # the paper's input side, pixels
_LAYOUT_DIR = DATA_DIR


@dataclass(frozen=True)
class CellLayout:
    name: str
    classes: tuple[str, ...]  # hazard classes, without the trailing background
    boxes: np.ndarray  # (cells, 4) float32, normalised x1, y1, x2, y2

    @property
    def num_cells(self) -> int:
        return len(self.boxes)

    @property
    def outputs_per_cell(self) -> int:
        return len(self.classes) + 1  # + background


def load_layout(name_or_path: str) -> CellLayout:
    """A bundled layout by name (``outdoor``) or a layout JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _LAYOUT_DIR / f"yolic_{name_or_path}.json"
    if not path.is_file():
        bundled = sorted(p.stem.removeprefix("yolic_") for p in _LAYOUT_DIR.glob("yolic_*.json"))
        raise FileNotFoundError(f"no YOLIC cell layout {name_or_path!r}; bundled layouts: {', '.join(bundled)}")
    doc = json.loads(path.read_text())
    boxes = np.array([_cell_box(c) for c in doc["cells"]], dtype=np.float32)
    if boxes.size == 0 or (boxes[:, 2:] <= boxes[:, :2]).any() or (boxes < 0).any() or (boxes > 1).any():
        raise ValueError(f"{path}: every cell must be a non-empty box inside [0, 1]")
    return CellLayout(name=doc.get("name", path.stem), classes=tuple(doc["classes"]), boxes=boxes)


def _cell_box(cell: dict) -> list[float]:
    """A cell is a normalised box ``[x1, y1, x2, y2]`` or a polygon ``[[x, y], ...]`` (its bounds)."""
    if "box" in cell:
        return cell["box"]
    points = np.asarray(cell["polygon"], dtype=np.float32)
    return [*points.min(axis=0), *points.max(axis=0)]


def build_yolic_m2(layout: CellLayout):
    """A randomly initialised YOLIC-M2 for ``layout`` (torchvision's MobileNetV2 with a cells head)."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=layout.num_cells * layout.outputs_per_cell)


def load_yolic_checkpoint(path: Path, layout: CellLayout):
    """Load a YOLIC-M2 checkpoint: a bare state_dict, ``{"state_dict": ...}`` or ``{"model": ...}``,
    with or without DataParallel's ``module.`` prefixes. Anything else fails naming the keys."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"YOLIC checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    model = build_yolic_m2(layout)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a YOLIC-M2 checkpoint: missing keys {_sample(missing)}; unexpected keys {_sample(unexpected)}"
        )
    head = state["classifier.1.weight"].shape
    if tuple(head) != tuple(expected["classifier.1.weight"].shape):
        raise ValueError(
            f"{path}: head is {tuple(head)} but layout {layout.name!r} needs "
            f"({layout.num_cells} cells x {layout.outputs_per_cell} outputs, 1280)"
        )
    model.load_state_dict(state)
    return model.eval()


def _sample(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def preprocess_batch(images: list[np.ndarray]) -> np.ndarray:
    """``(H, W, 3) uint8 RGB`` images → ``(N, 3, 224, 224) float32`` in [0, 1] (the paper's input)."""
    batch = np.empty((len(images), 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, image in enumerate(images):
        resized = np.asarray(Image.fromarray(image).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR))
        batch[i] = resized.transpose(2, 0, 1)
    batch /= 255.0
    return batch


def cells_from_logits(
    logits: np.ndarray, layout: CellLayout, sizes: list[tuple[int, int]], threshold: float
) -> list[list[HazardCell]]:
    """``(N, cells x (classes + 1))`` logits → the flagged cells of each image, boxes in its pixels.

    ``sizes`` are the images' (width, height). A cell is flagged when any hazard class (background
    excluded) scores at least ``threshold``."""
    scores = 1.0 / (1.0 + np.exp(-logits.reshape(len(logits), layout.num_cells, layout.outputs_per_cell)))
    hazard_scores = scores[:, :, :-1]
    results = []
    for image_scores, (width, height) in zip(hazard_scores, sizes):
        boxes = layout.boxes * np.array([width, height, width, height], dtype=np.float32)
        cells = []
        for cell in np.flatnonzero((image_scores >= threshold).any(axis=1)):
            hits = np.flatnonzero(image_scores[cell] >= threshold)
            hits = hits[np.argsort(-image_scores[cell, hits])]
            labels = tuple(HazardLabel(layout.classes[k], float(image_scores[cell, k])) for k in hits)
            cells.append(HazardCell(int(cell), tuple(float(v) for v in boxes[cell]), labels))
        results.append(cells)
    return results


class YolicNetwork:
    """A YOLIC checkpoint as a ``NetworkSource``; its ONNX export is cached next to it by content hash."""

    def __init__(self, path: Path, layout: CellLayout) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"YOLIC checkpoint not found: {path}")
        self.path, self.layout = path, layout
        self.name = f"yolic-m2:{path.name}"
        self.onnx_target = path.with_name(derived_name(path, stem=path.name.split(".")[0]))  # .pth.tar: two suffixes
        # Validate the checkpoint up front, unless a cached export shows these exact bytes were loaded
        # before: then an ONNX Runtime replica never imports torch (~500 MB less resident memory).
        self._module = None if self.onnx_target.is_file() else load_yolic_checkpoint(path, layout)

    def torch_module(self):
        if self._module is None:
            self._module = load_yolic_checkpoint(self.path, self.layout)
        return self._module

    def onnx_file(self) -> Path:
        def export(tmp: Path) -> None:
            import torch

            logger.info("exporting %s to ONNX (%s)", self.path, self.onnx_target.name)
            dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
            torch.onnx.export(
                self.torch_module(), dummy, str(tmp), input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                dynamo=False,  # the TorchScript exporter needs no onnxscript and handles MobileNetV2 fully
            )

        return build_once(self.onnx_target, export)


class HazardCellClassifier:
    """YOLIC-M2 on a backend: images in, flagged cells out, one forward pass per batch."""

    def __init__(self, settings: HazardCellsSettings, *, model_store: Path, gpu_only: bool = False,
                 gpu_fraction: float | None = None) -> None:
        from festival_serve.runtime.backends import Placement, create_backend

        self.settings = settings
        self.layout = load_layout(settings.layout)
        self.weights = in_store(settings.weights, model_store)
        device = resolve_device(settings.device, gpu_only=gpu_only, model="hazard_cells")
        self.cpu_beside_gpu = warn_cpu_beside_gpu("hazard_cells", device)
        network = YolicNetwork(self.weights, self.layout)
        self.backend = create_backend(
            settings.backend, network, device=device, fp16=resolve_fp16(settings.fp16, device),
            threads=settings.threads,
            placement=Placement(gpu_only, gpu_fraction, settings.build_engines, settings.batch_slices or 1),
        )
        self.backend.forward(np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32))  # warm-up

    def classify(self, images: list[np.ndarray]) -> list[list[HazardCell]]:
        (logits,) = self.backend.forward(preprocess_batch(images))
        sizes = [(image.shape[1], image.shape[0]) for image in images]
        return cells_from_logits(logits, self.layout, sizes, self.settings.threshold)

    def model_info(self) -> dict:
        return {**self.backend.model_info(), "weights": str(self.weights), "layout": self.layout.name,
                "cells": self.layout.num_cells, "classes": len(self.layout.classes),
                "cpu_beside_gpu": self.cpu_beside_gpu, "networks": [{"name": "hazard_cells", **self.backend.model_info()}]}
