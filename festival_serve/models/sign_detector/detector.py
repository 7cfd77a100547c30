"""Traffic-sign detection with an ultralytics YOLO checkpoint: letterbox → network → NMS → original pixels.

The network comes from an ultralytics ``.pt`` checkpoint and runs on any backend (PyTorch eager, ONNX
Runtime on an ONNX file exported by ultralytics' own exporter, TensorRT). Pre- and post-processing are
ultralytics' own arithmetic (``festival_serve.models.sign_detector.boxes`` holds the geometry), so boxes match
ultralytics' own predictor wherever its letterbox is the same square (for a square frame through the exported
ONNX they are identical):

- ``letterbox_batch``: ``LetterBox``'s aspect-preserving resize (cv2, ``INTER_LINEAR``), centred, padded with 114;
- ``postprocess``: ``non_max_suppression``'s class-aware NMS on ``(N, 4 + nc, anchors)`` predictions whose first
  four channels are ``cx, cy, w, h`` in letterboxed pixels, and ``scale_boxes`` back to the original image,
  clipped; in numpy, so a host replica (ONNX Runtime) never imports torch or ultralytics.

``SignDetector.detect`` orchestrates a batch: letterbox, network, NMS, boxes back, then it cuts each box's crop
and hands the crops to the classifier (``classifier.SignClassifier``), which names them. Where the stage runs on
CUDA with a backend that takes device tensors, the same steps run as torch ops on the GPU instead
(``festival_serve.models.sign_detector.device_ops``; ``SignDetectorSettings.preprocess`` chooses), each frame
uploaded once for the letterbox and the crops alike.

cv2, torch and ultralytics are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from festival_serve.runtime.devices import resolve_device, resolve_fp16, warn_cpu_beside_gpu
from festival_serve.pipeline.settings import SignDetectorSettings, in_store
from festival_serve.pipeline.types import SignDetection
from festival_serve.models.sign_detector.boxes import (CLASS_OFFSET, MAX_NMS_CANDIDATES, LetterboxMeta, NmsOptions,
                                                       letterbox_meta, nms, to_original)
from festival_serve.models.sign_detector.classifier import SignClassifier, square_crop
from festival_serve.models.sign_detector.ultralytics_io import PAD_VALUE, UltralyticsCheckpoint

logger = logging.getLogger(__name__)


def letterbox_batch(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[LetterboxMeta]]:
    """``(H, W, 3) uint8 RGB`` images (read-only is fine) → ``(N, 3, size, size) float32`` in [0, 1], RGB.

    Each image is resized to fit ``size`` keeping its aspect ratio (up or down), centred and padded with 114,
    exactly as ultralytics' predictor does (``LetterBox(auto=False)``, the square shape the exports take): the
    geometry of ``boxes.letterbox_meta`` and the same ``cv2.resize`` (``INTER_LINEAR``) call.
    """
    import cv2

    batch = np.full((len(images), size, size, 3), PAD_VALUE, dtype=np.uint8)
    metas = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        meta = letterbox_meta(*image.shape[:2], size)
        (new_h, new_w), (left, top) = meta.resized_shape, meta.pad
        if (new_h, new_w) != image.shape[:2]:  # LetterBox skips cv2.resize then too
            image = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        batch[i, top : top + new_h, left : left + new_w] = image  # the rest stays grey, as copyMakeBorder pads
        metas.append(meta)
    # HWC → CHW once for the whole batch; the divide matches ultralytics' ``im /= 255``.
    return batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, metas


def postprocess(raw: np.ndarray, metas: list[LetterboxMeta], names: dict[int, str],
                options: NmsOptions) -> list[list[SignDetection]]:
    """``(N, 4 + nc, anchors)`` raw predictions → per-image detections in original pixels, best first.

    ultralytics' ``non_max_suppression`` (best class per anchor, class-aware unless ``agnostic``) and
    ``scale_boxes``, in numpy float32 with the same operations, so a host replica never loads torch.
    """
    if raw.ndim != 3 or raw.shape[0] != len(metas) or raw.shape[1] != 4 + len(names):
        raise ValueError(
            f"expected raw predictions (N={len(metas)}, 4 + {len(names)} classes, anchors), got {tuple(raw.shape)}"
        )
    preds = np.asarray(raw, dtype=np.float32)  # an fp16 network's outputs: NMS in float32, as ultralytics casts
    return [_image_detections(pred, meta, names, options) for pred, meta in zip(preds, metas)]


def _image_detections(pred: np.ndarray, meta: LetterboxMeta, names: dict[int, str],
                      options: NmsOptions) -> list[SignDetection]:
    """One image's ``(4 + nc, anchors)`` predictions (``cx, cy, w, h`` in letterboxed pixels, then class scores)
    → its detections: anchors whose best class scores above ``options.confidence``, through NMS, in original
    pixels."""
    candidates = pred[:, pred[4:].max(axis=0) > options.confidence].T  # (n, 4 + nc), in anchor order
    class_ids = candidates[:, 4:].argmax(axis=1)  # the first of equal scores, as torch's max
    scores = candidates[np.arange(len(candidates)), 4 + class_ids]
    if len(candidates) > MAX_NMS_CANDIDATES:
        best = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
        candidates, class_ids, scores = candidates[best], class_ids[best], scores[best]
    centres, half = candidates[:, :2], candidates[:, 2:4] / 2
    corners = np.concatenate([centres - half, centres + half], axis=1)  # x1, y1, x2, y2 (xywh2xyxy)
    offsets = class_ids.astype(np.float32)[:, None] * np.float32(0 if options.agnostic else CLASS_OFFSET)
    kept = nms(corners + offsets, scores, options.iou, options.max_detections)
    found = to_original(corners[kept], meta).tolist()
    return [SignDetection(box=tuple(box), label=names[int(k)], class_id=int(k), score=score)
            for box, k, score in zip(found, class_ids[kept].tolist(), scores[kept].tolist())]


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


def _renamed(detections: list[list[SignDetection]], named: list[tuple[int, str, float]]) -> list[list[SignDetection]]:
    """Each detection under its classifier class (``SignClassifier.classify``'s answers, one per detection of
    all images in order), background dropped."""
    answers = iter(named)
    return [
        [replace(d, class_id=class_id, label=label)
         for d, (class_id, label, _) in zip(found, itertools.islice(answers, len(found))) if class_id >= 0]
        for found in detections
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
        # Camera-stream frames at their own letterbox size: the same weights exported (or engined) at that size too.
        self.stream_backend = self.backend if settings.stream_size == settings.image_size else \
            create_backend(settings.backend, YoloCheckpoint(self.weights, settings.stream_size), **run)
        self.classifier = None
        if settings.classifier:
            # The classifier runs where its detector runs, with the same settings ("auto" looks for its own engine).
            self.classifier = SignClassifier(
                in_store(settings.classifier, model_store),
                image_size=settings.classifier_image_size,
                backend=settings.backend,
                expected_names=self.names,
                **run,
            )
        self.text_classes = self._known_classes(settings.text_classes)
        networks = [self.backend, *([self.stream_backend] if self.stream_backend is not self.backend else []),
                    *([self.classifier.backend] if self.classifier else [])]
        self.preprocess = preprocess_path(settings.preprocess, networks)  # "host" | "device", fixed from here on
        # Warm-up through the whole path: the first batch would otherwise also pay for importing the
        # letterbox/NMS code (cv2 on the host, ultralytics and torch on the device, ~3 s on a small CPU).
        blank = np.zeros((64, 64, 3), dtype=np.uint8)
        self.detect([blank, blank], streams=[False, self.stream_backend is not self.backend])
        if self.classifier is not None:  # a blank frame has no signs, so warm the classifier on a box of it
            self._classify(self._frames([blank]), [[(0.0, 0.0, 32.0, 32.0)]])

    def detect(self, images: list[np.ndarray], streams: list[bool] | None = None) -> list[list[SignDetection]]:
        """``(H, W, 3) uint8 RGB`` frames → per frame, the signs found, best first: letterbox, one forward pass
        per letterbox size, NMS and boxes back in frame pixels, then (with a classifier) the boxes' crops named in
        one more. ``streams``: which frames are camera-stream frames (``stream_image_size``); none by default."""
        if not images:
            return []
        frames = self._frames(images)
        if streams is None or self.stream_backend is self.backend:
            streams = [False] * len(frames)  # one size for every frame
        detections: list = [None] * len(frames)
        for stream, backend, size in ((False, self.backend, self.settings.image_size),
                                      (True, self.stream_backend, self.settings.stream_size)):
            group = [i for i, is_stream in enumerate(streams) if is_stream == stream]
            if group:
                for i, found in zip(group, self._find([frames[i] for i in group], size, backend)):
                    detections[i] = found
        if self.classifier is not None:
            detections = _renamed(detections, self._classify(frames, [[d.box for d in found] for found in detections]))
        if self.text_classes is None:
            return detections
        return [[replace(d, has_text=d.label in self.text_classes) for d in found] for found in detections]

    def _frames(self, images: list[np.ndarray]) -> list:
        """Where the frames are worked on: the images themselves on the host; on the device path, each uploaded
        once (``(3, H, W)`` uint8), for the letterbox and the classifier's crops alike."""
        if self.preprocess != "device":
            return images
        from festival_serve.models.sign_detector.device_ops import upload_frames

        return upload_frames(images, self.backend.runtime_device())

    def _find(self, frames: list, size: int, backend) -> list[list[SignDetection]]:
        """Letterbox to ``size``, ``backend``'s network, NMS and boxes back in frame pixels, where the frames are:
        on the device path as tensor ops where the network runs, so only the kept boxes come back."""
        if self.preprocess != "device":
            batch, metas = letterbox_batch(frames, size)
            return postprocess(backend.forward(batch)[0], metas, self.names, self._nms_options())
        from festival_serve.models.sign_detector import device_ops

        batch, metas = device_ops.letterbox_frames(frames, size)
        raw = backend.forward_tensor(batch)[0]
        return device_ops.postprocess_on_device(raw, metas, self.names, self._nms_options())

    def _classify(self, frames: list, boxes: list[list[tuple[float, float, float, float]]]) -> list[tuple[int, str, float]]:
        """The classifier's answer for every box of every frame, in order: crops cut where the frames are."""
        context = self.settings.classifier_context
        if self.preprocess == "device":
            from festival_serve.models.sign_detector.device_ops import square_crops

            return self.classifier.classify_on_device(square_crops(frames, boxes, context))
        return self.classifier.classify([square_crop(frame, box, context)
                                         for frame, frame_boxes in zip(frames, boxes) for box in frame_boxes])

    def _nms_options(self) -> NmsOptions:
        settings = self.settings
        # With a classifier the detector's class is only a hint: one box per sign, whatever it guessed
        # (class-aware NMS keeps a triangle twice, as "children" and as "pedestrian_crossing").
        return NmsOptions(confidence=settings.confidence, iou=settings.iou, max_detections=settings.max_detections,
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
        # In the order of the stage's networks (festival_serve.pipeline.stages).
        networks = [{"name": "sign_detector", **self.backend.model_info()}]
        if self.stream_backend is not self.backend:
            networks.append({"name": "sign_detector_streams", **self.stream_backend.model_info()})
        if self.classifier is not None:
            networks.append({"name": "sign_classifier", **self.classifier.backend.model_info()})
        described = {**self.backend.model_info(), "weights": str(self.weights), "classes": len(self.names),
                     "image_size": self.settings.image_size, "stream_image_size": self.settings.stream_size,
                     "text_classes": sorted(self.text_classes) if self.text_classes is not None else None,
                     "cpu_beside_gpu": self.cpu_beside_gpu, "networks": networks, "preprocess": self.preprocess}
        return {**described, **self.classifier.model_info()} if self.classifier else described
