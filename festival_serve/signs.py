"""Traffic-sign detection with an ultralytics YOLO checkpoint: letterbox → network → NMS → original pixels.

The network comes from an ultralytics ``.pt`` checkpoint and runs on any backend (PyTorch eager, ONNX
Runtime on an ONNX file exported by ultralytics' own exporter, TensorRT). Pre- and post-processing reuse
ultralytics' functions, so boxes match ultralytics' own predictor wherever its letterbox is the same square
(for a square frame through the exported ONNX they are identical):

- ``LetterBox`` (``ultralytics.data.augment``): aspect-preserving resize, centred, padded with 114;
- ``non_max_suppression`` (``ultralytics.utils.nms``): class-aware NMS on ``(N, 4 + nc, anchors)``
  predictions whose first four channels are ``cx, cy, w, h`` in letterboxed pixels;
- ``scale_boxes`` (``ultralytics.utils.ops``): letterboxed pixels back to the original image, clipped.

ultralytics and torch are imported lazily, so importing this module (e.g. for ``SignDetection``) is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from festival_serve.cache import build_once, file_sha256
from festival_serve.devices import resolve_backend, resolve_device, resolve_fp16
from festival_serve.settings import SignDetectorSettings, in_store

logger = logging.getLogger(__name__)

#: Grey that ultralytics pads letterboxed images with; the network was trained on it.
PAD_VALUE = 114

#: Read by ``ultralytics.utils`` at import time. YOLO_OFFLINE skips the DNS probe at import and every
#: download attempt (assets, fonts, weights by bare name); YOLO_AUTOINSTALL=0 stops ``check_requirements``
#: from pip-installing a missing package (the exporter asks for onnx/onnxslim/onnxruntime) — it warns instead.
_ULTRALYTICS_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}


def configure_ultralytics_offline() -> None:
    """Keep ultralytics off the network and away from pip, whether or not it is imported yet.

    Sets the environment switches it reads at import; if some other module imported ultralytics first, also
    overrides the module constants that were computed from them (``ONLINE``, ``AUTOINSTALL`` and the analytics
    ``events.enabled`` flag), since those are captured by value at import.
    """
    os.environ.update(_ULTRALYTICS_ENV)
    utils = sys.modules.get("ultralytics.utils")
    if utils is None:
        return
    utils.ONLINE = False
    utils.AUTOINSTALL = False
    if (checks := sys.modules.get("ultralytics.utils.checks")) is not None:
        checks.ONLINE = False
        checks.AUTOINSTALL = False
    if (events := sys.modules.get("ultralytics.utils.events")) is not None:
        events.events.enabled = False


configure_ultralytics_offline()


@dataclass(frozen=True)
class SignDetection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels, clipped to the image
    label: str
    class_id: int
    score: float
    has_text: bool = True  # False: its class prints no text (settings.text_classes), so nobody reads it


@dataclass(frozen=True)
class LetterboxMeta:
    """Where one image went inside its letterboxed square, enough to map boxes back exactly."""

    orig_shape: tuple[int, int]  # (height, width) of the original image
    input_shape: tuple[int, int]  # (height, width) of the letterboxed network input
    gain: tuple[float, float]  # (y, x) resized / original; differs by under a pixel's worth from rounding
    pad: tuple[int, int]  # (left, top) padding in pixels

    @property
    def ratio_pad(self) -> tuple[tuple[float, float], tuple[int, int]]:
        """In the form ``ultralytics.utils.ops.scale_boxes`` takes: ``((gain_y, gain_x), (pad_x, pad_y))``."""
        return self.gain, self.pad


def letterbox_batch(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[LetterboxMeta]]:
    """``(H, W, 3) uint8 RGB`` images (read-only is fine) → ``(N, 3, size, size) float32`` in [0, 1], RGB.

    Each image is resized to fit ``size`` keeping its aspect ratio (up or down), centred and padded with 114,
    exactly as ultralytics' predictor does (``LetterBox(auto=False)``, the square shape the exports take).
    """
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(new_shape=(size, size), auto=False, scaleup=True, center=True, padding_value=PAD_VALUE)
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    metas = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        labels = {"img": np.ascontiguousarray(image)}  # cv2 needs C order; never writes into its input
        params = letterbox.get_params(labels)
        batch[i] = letterbox.apply_image(labels, params)["img"]
        new_w, new_h = params["new_unpad"]
        height, width = image.shape[:2]
        metas.append(
            LetterboxMeta(
                orig_shape=(height, width),
                input_shape=(size, size),
                gain=(new_h / height, new_w / width),
                pad=(params["left"], params["top"]),
            )
        )
    # HWC → CHW once for the whole batch; the divide matches ultralytics' ``im /= 255``.
    return batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, metas


def postprocess(
    raw: np.ndarray,
    metas: list[LetterboxMeta],
    names: dict[int, str],
    *,
    confidence: float,
    iou: float,
    max_detections: int,
    agnostic: bool = False,
) -> list[list[SignDetection]]:
    """``(N, 4 + nc, anchors)`` raw predictions → per-image detections in original pixels, best first."""
    import torch
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    if raw.ndim != 3 or raw.shape[0] != len(metas) or raw.shape[1] != 4 + len(names):
        raise ValueError(
            f"expected raw predictions (N={len(metas)}, 4 + {len(names)} classes, anchors), got {raw.shape}"
        )
    if raw.shape[2] == 6:
        # ultralytics' NMS takes a last axis of 6 for an end-to-end (N, boxes, 6) output; one more anchor that
        # scores 0 (never kept) keeps a 6-anchor input from being misread.
        raw = np.concatenate([raw, np.zeros_like(raw[:, :, :1])], axis=2)
    # Outputs may be read-only (Ray's object store); torch wants a writable buffer.
    preds = torch.from_numpy(np.array(raw, dtype=np.float32, copy=not raw.flags.writeable))
    per_image = non_max_suppression(
        preds,
        conf_thres=confidence,
        iou_thres=iou,
        max_det=max_detections,
        nc=len(names),
        agnostic=agnostic,
        # Its default time budget (2 s + 50 ms/image) drops the remaining images' boxes with only a warning
        # once exceeded; on a CPU replica under festival load that is a silent wrong answer, so never stop early.
        max_time_img=math.inf,
    )
    results = []
    for det, meta in zip(per_image, metas):
        boxes = scale_boxes(meta.input_shape, det[:, :4].clone(), meta.orig_shape, ratio_pad=meta.ratio_pad)
        results.append(
            [
                SignDetection(box=tuple(box), label=names[int(cls)], class_id=int(cls), score=score)
                for box, score, cls in zip(boxes.tolist(), det[:, 4].tolist(), det[:, 5].tolist())
            ]
        )
    return results


class UltralyticsCheckpoint:
    """An ultralytics ``.pt`` checkpoint of one ``task`` as a ``NetworkSource``; its ONNX export (made by
    ultralytics' own exporter, input pinned to ``image_size``) is cached next to it by content hash."""

    task: str  # ultralytics' task name the checkpoint must carry ("detect", "classify")
    task_noun: str  # the same in words, for messages
    kind: str  # what it is, for messages
    prefix: str  # of ``name``, which logs and derived-file names use
    missing_hint = ""  # appended to the error for a missing file

    def __init__(self, path: Path, image_size: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.kind} weights not found: {self.path}{self.missing_hint}")
        self.image_size = image_size
        self.name = f"{self.prefix}:{self.path.name}"
        self.sha256 = file_sha256(self.path)
        cached = self._onnx_target()
        # A cached export was made from these exact bytes (and validated then): take the class names from
        # it and leave torch unimported, which keeps an ONNX Runtime replica ~500 MB smaller.
        self.names: dict[int, str] = onnx_class_names(cached) if cached.is_file() else self._read_names()

    def _read_names(self) -> dict[int, str]:
        from ultralytics.nn.autobackend import check_class_names

        model = self._load_network()
        names = check_class_names(model.names)  # older checkpoints hold a list, or str keys
        self._check_head(model, names)
        return names

    def _check_head(self, model, names: dict[int, str]) -> None:
        """Refuse a checkpoint whose head does not fit its class names (where the head says)."""

    def _load_network(self):
        """The checkpoint's model through ultralytics' own loader (fp32, eval, CPU, unfused)."""
        configure_ultralytics_offline()
        from ultralytics.nn.tasks import load_checkpoint

        model, _ = load_checkpoint(self.path, device="cpu", fuse=False)
        if getattr(model, "task", None) != self.task:
            raise ValueError(f"{self.path}: expected a YOLO {self.task_noun} checkpoint, got task {model.task!r}")
        return model

    def _export_head(self, model):
        """Prepare the loaded network's head as the ONNX export has it (before fusing)."""
        return model

    def torch_module(self):
        model = self._export_head(self._load_network()).fuse(verbose=False)  # Conv+BN folded, as in the export
        model.model[-1].export = True  # the head returns its output tensor alone, as the ONNX graph does
        for p in model.parameters():
            p.requires_grad_(False)
        return model.float().eval()

    def _onnx_target(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.{self.sha256[:12]}.{self.image_size}.onnx")

    def onnx_file(self) -> Path:
        return build_once(self._onnx_target(), self._export_onnx)

    def _export_onnx(self, tmp: Path) -> None:
        """Export with ultralytics' exporter into a private folder, then move the file to ``tmp``.

        The exporter always writes ``<checkpoint stem>.onnx`` beside the checkpoint it loaded; staging a link to
        the checkpoint in a folder of its own keeps replicas that export at once from writing the same file.
        """
        configure_ultralytics_offline()
        from ultralytics import YOLO

        logger.info("%s: exporting to ONNX at %d px (%s)", self.name, self.image_size, tmp.parent)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f".{self.path.stem}.export-", dir=self.path.parent) as folder:
            staged = Path(folder) / self.path.name
            try:
                os.link(self.path, staged)
            except OSError:  # filesystem without hard links
                shutil.copyfile(self.path, staged)
            exported = YOLO(staged, task=self.task).export(
                format="onnx",
                imgsz=self.image_size,
                dynamic=True,  # batch, height and width axes; the only way ultralytics makes the batch dynamic
                simplify=True,  # onnxslim; ultralytics logs and keeps the raw graph if slimming fails
                device="cpu",
            )
            pin_input_size(Path(exported), tmp, self.image_size)
        logger.info("%s: ONNX export took %.1f s", self.name, time.perf_counter() - started)


class YoloCheckpoint(UltralyticsCheckpoint):
    """An ultralytics detection checkpoint.

    Both forms output the raw predictions ``(N, 4 + nc, anchors)`` of the one-to-many head (what ultralytics
    exports by default, ``nms=None``), so the same ``postprocess`` serves every backend.
    """

    task, task_noun, kind, prefix = "detect", "detection", "sign detector", "yolo"

    def _check_head(self, model, names: dict[int, str]) -> None:
        if len(names) != model.model[-1].nc:
            raise ValueError(f"{self.path}: {len(names)} class names for a head of {model.model[-1].nc} classes")

    def _export_head(self, model):
        # YOLO26/YOLOv10 heads also have an NMS-free branch; ultralytics' ONNX export (nms=None) turns it off
        # and keeps the one-to-many predictions, so do the same before fusing drops the unused branch.
        if getattr(model, "end2end", False):
            model.end2end = False
        return model


def onnx_class_names(path: Path) -> dict[int, str]:
    """The class names ultralytics' exporter writes into the ONNX metadata (``names``: a dict literal)."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if "names" not in meta:
        raise ValueError(f"{path}: no class names in the ONNX metadata (not exported by ultralytics?)")
    return {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}


def pin_input_size(exported: Path, target: Path, size: int) -> None:
    """Write ``exported`` to ``target`` with its input fixed at ``(batch, 3, size, size)``.

    Every batch is letterboxed to ``size``, and TensorRT optimisation profiles (``festival_serve.engines``)
    accept a dynamic batch axis only; the anchors output axis follows from the input once it is fixed.
    """
    import onnx

    model = onnx.load(str(exported))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size  # replaces the symbolic "height"/"width"
    onnx.save(model, str(target))


class SignDetector:
    """YOLO sign detection on a backend: images in, detections out, one forward pass per batch."""

    def __init__(self, settings: SignDetectorSettings, *, model_store: Path, gpu_only: bool = False) -> None:
        from festival_serve.backends import create_backend

        self.settings = settings
        self.weights = in_store(settings.weights, model_store)
        device = resolve_device(settings.device, gpu_only=gpu_only, model="sign_detector")
        self.checkpoint = YoloCheckpoint(self.weights, settings.image_size)
        self.names = self.checkpoint.names
        self.backend = create_backend(
            resolve_backend(settings.backend, device),
            self.checkpoint,
            device=device,
            fp16=resolve_fp16(settings.fp16, device),
            threads=settings.threads,
        )
        self.classifier = None
        if settings.classifier:
            from festival_serve.sign_classes import SignClassifier

            self.classifier = SignClassifier(
                in_store(settings.classifier, model_store),
                image_size=settings.classifier_image_size,
                context=settings.classifier_context,
                backend=resolve_backend(settings.backend, device),
                device=device,
                fp16=resolve_fp16(settings.fp16, device),
                threads=settings.threads,
                expected_names=self.names,
            )
        self.text_classes = self._known_classes(settings.text_classes)
        # Warm-up through the whole path: the first batch would otherwise also pay for importing the
        # letterbox/NMS code (ultralytics and torch, ~3 s on a small CPU).
        blank = np.zeros((64, 64, 3), dtype=np.uint8)
        self.detect([blank])
        if self.classifier is not None:  # a blank frame has no signs, so warm the classifier on a box of it
            self.classifier.classify([blank], [[(0.0, 0.0, 32.0, 32.0)]])

    def detect(self, images: list[np.ndarray]) -> list[list[SignDetection]]:
        if not images:
            return []
        batch, metas = letterbox_batch(images, self.settings.image_size)
        raw = self.backend.forward(batch)[0]
        detections = postprocess(
            raw,
            metas,
            self.names,
            confidence=self.settings.confidence,
            iou=self.settings.iou,
            max_detections=self.settings.max_detections,
            # With a classifier the detector's class is only a hint: one box per sign, whatever it guessed
            # (class-aware NMS keeps a triangle twice, as "children" and as "pedestrian_crossing").
            agnostic=self.classifier is not None,
        )
        if self.classifier is not None:
            named = self.classifier.classify(images, [[d.box for d in found] for found in detections])
            detections = [
                [replace(d, class_id=class_id, label=label) for d, (class_id, label, _) in zip(found, names)
                 if class_id >= 0]
                for found, names in zip(detections, named)
            ]
        if self.text_classes is None:
            return detections
        return [[replace(d, has_text=d.label in self.text_classes) for d in found] for found in detections]

    def _known_classes(self, text_classes: list[str] | None) -> frozenset[str] | None:
        """``text_classes`` as a set, refusing a name the detector cannot output (which would silently
        stop those signs from being read)."""
        if text_classes is None:
            return None
        unknown = sorted(set(text_classes) - set(self.names.values()))
        if unknown:
            raise ValueError(
                f"sign_detector.text_classes names {unknown}, which {self.weights.name} does not detect; "
                f"its classes are {sorted(self.names.values())} (null reads every sign)"
            )
        return frozenset(text_classes)

    def describe(self) -> dict:
        described = {**self.backend.describe(), "weights": str(self.weights), "classes": len(self.names),
                     "text_classes": sorted(self.text_classes) if self.text_classes is not None else None}
        return {**described, **self.classifier.describe()} if self.classifier else described
