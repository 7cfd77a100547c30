"""Naming detected signs from their full-resolution crops with an ultralytics classification checkpoint.

The sign detector sees the whole frame letterboxed to a few hundred pixels, where a warning triangle is
15-40 px wide and its pictogram (children, pedestrian crossing, road works, slippery road) a handful of
pixels. It finds and boxes signs well but cannot tell those pictograms apart. The classifier looks at each
detected box cut out of the original frame instead, so every sign reaches it at ``image_size`` pixels,
and its top class replaces the detector's; a box it calls ``background`` is dropped (the detector's false
alarms: blue windows, red awnings). Detection score and box are kept.

- ``square_crop``: the box grown by ``context`` on its longer side into a square around its centre
  (``boxes.square_window``), padded with ultralytics' grey where it leaves the frame. The detector cuts its
  crops with it, and so does the trainer (``festival_serve.training.sign_classifier``) around jittered true boxes.
- ``preprocess_crops``: ultralytics' own evaluation transform (``classify_transforms``: resize, centre
  crop, [0, 1], mean 0 / std 1) in PIL and numpy, so served inputs match what its trainer validated on and an
  ONNX Runtime replica never loads torch for it.
- ``ClassifierCheckpoint``: the ``.pt`` as a ``NetworkSource``; ultralytics' exporter makes the cached ONNX.
- ``SignClassifier``: crops in, classes out; ``classify_on_device`` takes crops the detector cut on the GPU
  (``festival_serve.models.sign_detector.device_ops``) and resizes them there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from festival_serve.models.sign_detector.boxes import square_window
from festival_serve.models.sign_detector.ultralytics_io import PAD_VALUE, UltralyticsCheckpoint

#: The class for crops that hold no sign: a detection the classifier puts there is dropped.
BACKGROUND = "background"


def square_crop(image: np.ndarray, box: tuple[float, float, float, float], context: float) -> np.ndarray:
    """``(H, W, 3) uint8`` → the square around ``box``'s centre with side ``context`` x its longer side
    (``boxes.square_window``), grey where it leaves the frame."""
    window = square_window(box, context, *image.shape[:2])
    left, top, side = window.left, window.top, window.side
    out = np.full((side, side, 3), PAD_VALUE, dtype=np.uint8)
    if not window.empty:
        out[window.y1 - top : window.y2 - top, window.x1 - left : window.x2 - left] = \
            image[window.y1 : window.y2, window.x1 : window.x2]
    return out


def preprocess_crops(crops: list[np.ndarray], size: int) -> np.ndarray:
    """Square ``uint8`` RGB crops → ``(N, 3, size, size) float32`` in [0, 1], as ultralytics' classifier validation.

    ``classify_transforms(size)`` written out in PIL and numpy, with no torch: its ``Resize(size)`` is PIL's
    antialiased bilinear resize, to ``size x size`` on a square; ``CenterCrop(size)`` then cuts nothing,
    ``ToTensor`` divides by 255 in float32, and ``Normalize`` (mean 0, std 1) changes no value.
    """
    from PIL import Image

    for i, crop in enumerate(crops):
        if crop.ndim != 3 or crop.shape[0] != crop.shape[1] or crop.shape[2] != 3 or crop.dtype != np.uint8:
            raise ValueError(f"crop {i}: expected a square (S, S, 3) uint8 RGB crop, got {crop.shape} {crop.dtype}")
    resized = [np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR)) for crop in crops]
    return np.stack(resized).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


class ClassifierCheckpoint(UltralyticsCheckpoint):
    """An ultralytics classification checkpoint. Both forms output class probabilities ``(N, classes)``
    (the head ends in a softmax in eval and export)."""

    task, task_noun, kind, prefix = "classify", "classification", "sign classifier", "yolo-cls"
    missing_hint = (" (train them with `festival-serve train sign-classes`, or set sign_detector.classifier: null "
                    "to keep the detector's own classes)")


class SignClassifier:
    """Crops in, ``(class id, class name, probability)`` out, one forward pass per batch on a backend. It names
    the crops it is handed; the detector cuts them (``square_crop`` on the host, ``device_ops.square_crops``)."""

    def __init__(self, path: Path, *, image_size: int, backend: str, device: str, fp16: bool, threads: int | None,
                 expected_names: dict[int, str], placement=None) -> None:
        from festival_serve.runtime.backends import Placement, create_backend

        self.image_size = image_size
        self.checkpoint = ClassifierCheckpoint(path, image_size)
        self.names = self.checkpoint.names
        unknown = sorted(set(self.names.values()) - {*expected_names.values(), BACKGROUND})
        if unknown:
            raise ValueError(f"{path}: classes {unknown} are not sign detector classes {sorted(expected_names.values())}")
        self._class_ids = {**{name: i for i, name in expected_names.items()}, BACKGROUND: -1}
        self.backend = create_backend(backend, self.checkpoint, device=device, fp16=fp16, threads=threads,
                                      placement=placement or Placement())

    def classify(self, crops: list[np.ndarray]) -> list[tuple[int, str, float]]:
        """Per ``(S, S, 3) uint8`` RGB crop: ``(detector class id, class name, probability)`` of its top class
        (class id -1 for ``BACKGROUND``)."""
        if not crops:
            return []
        return self._named(np.asarray(self.backend.forward(preprocess_crops(crops, self.image_size))[0], np.float32))

    def classify_on_device(self, crops: list) -> list[tuple[int, str, float]]:
        """``classify`` for ``(3, S, S)`` uint8 crops on the backend's device (``device_ops.square_crops``): they are
        resized there, and only the ``(M, classes)`` probabilities come back."""
        if not crops:
            return []
        from festival_serve.models.sign_detector.device_ops import preprocess_crops_on_device

        return self._named(self.backend.forward_tensor(preprocess_crops_on_device(crops, self.image_size))[0].cpu().numpy())

    def _named(self, probs: np.ndarray) -> list[tuple[int, str, float]]:
        """``(M, classes) float32`` probabilities → per crop: its top class."""
        top = probs.argmax(axis=1)
        return [(self._class_ids[self.names[int(k)]], self.names[int(k)], float(probs[i, k])) for i, k in enumerate(top)]

    def model_info(self) -> dict:
        return {"classifier": str(self.checkpoint.path), "classifier_precision": self.backend.precision}
