"""Naming detected signs from their full-resolution crops with an ultralytics classification checkpoint.

The sign detector sees the whole frame letterboxed to a few hundred pixels, where a warning triangle is
15-40 px wide and its pictogram (children, pedestrian crossing, road works, slippery road) a handful of
pixels. It finds and boxes signs well but cannot tell those pictograms apart. The classifier looks at each
detected box cut out of the original frame instead, so every sign reaches it at ``image_size`` pixels,
and its top class replaces the detector's; a box it calls ``background`` is dropped (the detector's false
alarms: blue windows, red awnings). Detection score and box are kept.

- ``square_crop``: the box grown by ``context`` on its longer side into a square around its centre, padded
  with ultralytics' grey where it leaves the frame. The trainer (``festival_serve.training.sign_classifier``)
  cuts its crops with the same function around jittered true boxes.
- ``preprocess_crops``: ultralytics' own evaluation transform (``classify_transforms``: resize, centre
  crop, [0, 1], mean 0 / std 1), so served inputs match what its trainer validated on.
- ``ClassifierCheckpoint``: the ``.pt`` as a ``NetworkSource``; ultralytics' exporter makes the cached ONNX.
- ``SignClassifier.classify_on_device``: the same crop and transform as tensor ops on the GPU
  (``festival_serve.models.sign_detector.device_ops``), cut from the frames the detector already uploaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from festival_serve.models.sign_detector.ultralytics_io import PAD_VALUE, UltralyticsCheckpoint, configure_ultralytics_offline

#: The class for crops that hold no sign: a detection the classifier puts there is dropped.
BACKGROUND = "background"


def square_crop(image: np.ndarray, box: tuple[float, float, float, float], context: float) -> np.ndarray:
    """``(H, W, 3) uint8`` → the square around ``box``'s centre with side ``context`` x its longer side."""
    x1, y1, x2, y2 = box
    side = max(2, int(round(max(x2 - x1, y2 - y1) * context)))
    left = int(round((x1 + x2) / 2 - side / 2))
    top = int(round((y1 + y2) / 2 - side / 2))
    height, width = image.shape[:2]
    out = np.full((side, side, 3), PAD_VALUE, dtype=np.uint8)
    sx1, sy1 = max(0, left), max(0, top)
    sx2, sy2 = min(width, left + side), min(height, top + side)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - top : sy2 - top, sx1 - left : sx2 - left] = image[sy1:sy2, sx1:sx2]
    return out


@functools.lru_cache(maxsize=4)
def _transform(size: int):
    configure_ultralytics_offline()
    from ultralytics.data.augment import classify_transforms

    return classify_transforms(size)


def preprocess_crops(crops: list[np.ndarray], size: int) -> np.ndarray:
    """Square ``uint8`` RGB crops → ``(N, 3, size, size) float32``, as ultralytics' classifier validation."""
    from PIL import Image

    transform = _transform(size)  # built once, not per batch
    return np.stack([transform(Image.fromarray(crop)).numpy() for crop in crops]).astype(np.float32)


class ClassifierCheckpoint(UltralyticsCheckpoint):
    """An ultralytics classification checkpoint. Both forms output class probabilities ``(N, classes)``
    (the head ends in a softmax in eval and export)."""

    task, task_noun, kind, prefix = "classify", "classification", "sign classifier", "yolo-cls"
    missing_hint = (" (train them with `festival-serve train sign-classes`, or set sign_detector.classifier: null "
                    "to keep the detector's own classes)")


class SignClassifier:
    """Crops in, ``(class name, probability)`` out, one forward pass per batch on a backend."""

    def __init__(self, path: Path, *, image_size: int, context: float, backend: str, device: str, fp16: bool,
                 threads: int | None, expected_names: dict[int, str], placement=None) -> None:
        from festival_serve.runtime.backends import Placement, create_backend

        self.image_size = image_size
        self.context = context
        self.checkpoint = ClassifierCheckpoint(path, image_size)
        self.names = self.checkpoint.names
        unknown = sorted(set(self.names.values()) - {*expected_names.values(), BACKGROUND})
        if unknown:
            raise ValueError(f"{path}: classes {unknown} are not sign detector classes {sorted(expected_names.values())}")
        self._class_ids = {**{name: i for i, name in expected_names.items()}, BACKGROUND: -1}
        self.backend = create_backend(backend, self.checkpoint, device=device, fp16=fp16, threads=threads,
                                      placement=placement or Placement())

    def classify(self, images: list[np.ndarray], boxes: list[list[tuple[float, float, float, float]]]):
        """Per image, per box: ``(detector class id, class name, probability)`` of the crop's top class
        (class id -1 for ``BACKGROUND``)."""
        crops = [square_crop(image, box, self.context) for image, image_boxes in zip(images, boxes) for box in image_boxes]
        if not crops:
            return [[] for _ in images]
        probs = np.asarray(self.backend.forward(preprocess_crops(crops, self.image_size))[0], dtype=np.float32)
        return self._named(probs, boxes)

    def classify_on_device(self, frames: list, boxes: list[list[tuple[float, float, float, float]]]):
        """``classify`` for frames already on the backend's device (``(3, H, W)`` uint8 tensors, as the detector
        uploaded them): crops are cut and resized there, and only the ``(M, classes)`` probabilities come back."""
        if not any(boxes):
            return [[] for _ in frames]
        from festival_serve.models.sign_detector.device_ops import crops_on_device

        crops = crops_on_device(frames, boxes, self.context, self.image_size)
        return self._named(self.backend.forward_tensor(crops)[0].cpu().numpy(), boxes)

    def _named(self, probs: np.ndarray, boxes: list[list]) -> list[list[tuple[int, str, float]]]:
        """``(M, classes) float32`` probabilities of every box, in order → per image, per box: its top class."""
        top = probs.argmax(axis=1)
        flat = [(self._class_ids[self.names[int(k)]], self.names[int(k)], float(probs[i, k])) for i, k in enumerate(top)]
        out, start = [], 0
        for image_boxes in boxes:
            out.append(flat[start : start + len(image_boxes)])
            start += len(image_boxes)
        return out

    def model_info(self) -> dict:
        return {"classifier": str(self.checkpoint.path), "classifier_precision": self.backend.precision}
