"""Traffic-sign detection with an ultralytics YOLO checkpoint: letterbox → network → NMS → original pixels.

The network comes from an ultralytics ``.pt`` checkpoint and runs on any backend (PyTorch eager, ONNX
Runtime on an ONNX file exported by ultralytics' own exporter, TensorRT). Pre- and post-processing reuse
ultralytics' functions, so boxes match ultralytics' own predictor wherever its letterbox is the same square
(for a square frame through the exported ONNX they are identical):

- ``LetterBox`` (``ultralytics.data.augment``): aspect-preserving resize, centred, padded with 114;
- ``non_max_suppression`` (``ultralytics.utils.nms``): class-aware NMS on ``(N, 4 + nc, anchors)``
  predictions whose first four channels are ``cx, cy, w, h`` in letterboxed pixels;
- ``scale_boxes`` (``ultralytics.utils.ops``): letterboxed pixels back to the original image, clipped.

Where the stage runs on CUDA with a backend that takes device tensors, the same steps run as torch ops on the
GPU instead (``festival_serve.models.sign_detector.device_ops``; ``SignDetectorSettings.preprocess`` chooses).

ultralytics and torch are imported lazily, so importing this module (e.g. for ``SignDetection``) is cheap.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from festival_serve.runtime.devices import resolve_device, resolve_fp16, warn_cpu_beside_gpu
from festival_serve.pipeline.settings import SignDetectorSettings, in_store
from festival_serve.pipeline.types import SignDetection
from festival_serve.models.sign_detector.boxes import LetterboxMeta
from festival_serve.models.sign_detector.ultralytics_io import PAD_VALUE, UltralyticsCheckpoint, configure_ultralytics_offline

logger = logging.getLogger(__name__)


def letterbox_batch(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[LetterboxMeta]]:
    """``(H, W, 3) uint8 RGB`` images (read-only is fine) → ``(N, 3, size, size) float32`` in [0, 1], RGB.

    Each image is resized to fit ``size`` keeping its aspect ratio (up or down), centred and padded with 114,
    exactly as ultralytics' predictor does (``LetterBox(auto=False)``, the square shape the exports take).
    """
    configure_ultralytics_offline()
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
    """``(N, 4 + nc, anchors)`` raw predictions → per-image detections in original pixels, best first: the
    device path's NMS and mapping (``device_ops.postprocess_on_device``) on a CPU tensor."""
    import torch

    from festival_serve.models.sign_detector.device_ops import postprocess_on_device

    if raw.ndim != 3 or raw.shape[0] != len(metas):
        raise ValueError(f"expected raw predictions (N={len(metas)}, 4 + {len(names)} classes, anchors), got {raw.shape}")
    # Outputs may be read-only (Ray's object store); torch wants a writable buffer.
    preds = torch.from_numpy(np.array(raw, dtype=np.float32, copy=not raw.flags.writeable))
    return postprocess_on_device(preds, metas, names, confidence=confidence, iou=iou, max_detections=max_detections,
                                 agnostic=agnostic)


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


def preprocess_path(requested: str, backends: list) -> str:
    """Where a detector on ``backends`` pre- and post-processes: ``"device"`` or ``"host"``
    (``SignDetectorSettings.preprocess``; ``"device"`` on a backend that takes host arrays only is refused)."""
    from festival_serve.runtime.backends import BACKENDS

    takes_tensors = all(backend.takes_device_tensors for backend in backends)
    if requested == "device" and not takes_tensors:
        host_only = sorted({backend.name for backend in backends if not backend.takes_device_tensors})
        able = sorted(name for name, cls in BACKENDS.items() if cls.takes_device_tensors)
        raise ValueError(
            f"sign_detector.preprocess: device needs a backend that takes device tensors ({', '.join(able)}), "
            f"but {', '.join(host_only)} takes host arrays only; set preprocess to host or auto, or choose one of those"
        )
    if requested != "auto":
        return requested
    on_cuda = all(backend.runtime_device().startswith("cuda") for backend in backends)
    return "device" if takes_tensors and on_cuda else "host"


def _renamed(detections: list[list[SignDetection]], named) -> list[list[SignDetection]]:
    """Each detection under its classifier class (``SignClassifier.classify``'s answer), background dropped."""
    return [
        [replace(d, class_id=class_id, label=label) for d, (class_id, label, _) in zip(found, names) if class_id >= 0]
        for found, names in zip(detections, named)
    ]


class SignDetector:
    """YOLO sign detection on a backend: images in, detections out, one forward pass per batch."""

    def __init__(self, settings: SignDetectorSettings, *, model_store: Path, gpu_only: bool = False,
                 gpu_fraction: float | None = None) -> None:
        from festival_serve.runtime.backends import Placement, create_backend

        self.settings = settings
        self.weights = in_store(settings.weights, model_store)
        device = resolve_device(settings.device, gpu_only=gpu_only, model="sign_detector")
        self.cpu_beside_gpu = warn_cpu_beside_gpu("sign_detector", device)
        self.checkpoint = YoloCheckpoint(self.weights, settings.image_size)
        self.names = self.checkpoint.names
        run = dict(device=device, fp16=resolve_fp16(settings.fp16, device), threads=settings.threads,
                   placement=Placement(gpu_only, gpu_fraction, settings.build_engines, settings.batch_slices or 1))
        self.backend = create_backend(settings.backend, self.checkpoint, **run)
        self.classifier = None
        if settings.classifier:
            from festival_serve.models.sign_detector.classifier import SignClassifier

            # The classifier runs where its detector runs, with the same settings ("auto" looks for its own engine).
            self.classifier = SignClassifier(
                in_store(settings.classifier, model_store),
                image_size=settings.classifier_image_size,
                context=settings.classifier_context,
                backend=settings.backend,
                expected_names=self.names,
                **run,
            )
        self.text_classes = self._known_classes(settings.text_classes)
        networks = [self.backend, *([self.classifier.backend] if self.classifier else [])]
        self.preprocess = preprocess_path(settings.preprocess, networks)  # "host" | "device", fixed from here on
        # Warm-up through the whole path: the first batch would otherwise also pay for importing the
        # letterbox/NMS code (ultralytics and torch, ~3 s on a small CPU).
        blank = np.zeros((64, 64, 3), dtype=np.uint8)
        self.detect([blank])
        if self.classifier is not None:  # a blank frame has no signs, so warm the classifier on a box of it
            box = [[(0.0, 0.0, 32.0, 32.0)]]
            if self.preprocess == "device":
                from festival_serve.models.sign_detector.device_ops import upload_frames

                self.classifier.classify_on_device(upload_frames([blank], self.backend.runtime_device()), box)
            else:
                self.classifier.classify([blank], box)

    def detect(self, images: list[np.ndarray]) -> list[list[SignDetection]]:
        if not images:
            return []
        if self.preprocess == "device":
            detections = self._detect_on_device(images)
        else:
            batch, metas = letterbox_batch(images, self.settings.image_size)
            raw = self.backend.forward(batch)[0]
            detections = postprocess(raw, metas, self.names, **self._nms_options())
            if self.classifier is not None:
                named = self.classifier.classify(images, [[d.box for d in found] for found in detections])
                detections = _renamed(detections, named)
        if self.text_classes is None:
            return detections
        return [[replace(d, has_text=d.label in self.text_classes) for d in found] for found in detections]

    def _detect_on_device(self, images: list[np.ndarray]) -> list[list[SignDetection]]:
        """The same steps as tensor ops where the networks run: each frame is uploaded once (uint8), the
        classifier cuts its crops from those copies, and only boxes and class probabilities come back."""
        from festival_serve.models.sign_detector import device_ops

        frames = device_ops.upload_frames(images, self.backend.runtime_device())
        batch, metas = device_ops.letterbox_frames(frames, self.settings.image_size)
        raw = self.backend.forward_tensor(batch)[0]
        detections = device_ops.postprocess_on_device(raw, metas, self.names, **self._nms_options())
        if self.classifier is not None:
            named = self.classifier.classify_on_device(frames, [[d.box for d in found] for found in detections])
            detections = _renamed(detections, named)
        return detections

    def _nms_options(self) -> dict:
        settings = self.settings
        # With a classifier the detector's class is only a hint: one box per sign, whatever it guessed
        # (class-aware NMS keeps a triangle twice, as "children" and as "pedestrian_crossing").
        return dict(confidence=settings.confidence, iou=settings.iou, max_detections=settings.max_detections,
                    agnostic=self.classifier is not None)

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

    def model_info(self) -> dict:
        networks = [{"name": "sign_detector", **self.backend.model_info()}]
        if self.classifier is not None:
            networks.append({"name": "sign_classifier", **self.classifier.backend.model_info()})
        described = {**self.backend.model_info(), "weights": str(self.weights), "classes": len(self.names),
                     "text_classes": sorted(self.text_classes) if self.text_classes is not None else None,
                     "cpu_beside_gpu": self.cpu_beside_gpu, "networks": networks, "preprocess": self.preprocess}
        return {**described, **self.classifier.model_info()} if self.classifier else described
