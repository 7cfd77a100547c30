"""Box geometry of the sign detector, in numpy and plain Python: where an image goes in its letterboxed square,
which square around a sign box the classifier sees, which overlapping boxes NMS keeps, and how kept boxes map
back to frame pixels. The detector's host path (``detector``) and its device path (``device_ops``) both take
their geometry from here, so the two cannot drift apart; nothing here imports torch.

The arithmetic is ultralytics' own, operation for operation in float32 (``LetterBox.get_params``,
``non_max_suppression`` over torchvision's NMS kernel, ``scale_boxes``), so a host replica answers exactly as
ultralytics' predictor would without loading torch (``tests/test_signs.py`` holds the two side by side).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: ultralytics' ``max_wh``: class-aware NMS shifts each class's boxes this many pixels apart, so boxes of two
#: classes never overlap.
CLASS_OFFSET = 7680
#: ultralytics' ``max_nms``: at most this many best-scoring candidates of one image go into NMS.
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True)
class LetterboxMeta:
    """Where one image went inside its letterboxed square, enough to map boxes back exactly."""

    orig_shape: tuple[int, int]  # (height, width) of the original image
    input_shape: tuple[int, int]  # (height, width) of the letterboxed network input
    resized_shape: tuple[int, int]  # (height, width) of the image inside the square, after resizing
    pad: tuple[int, int]  # (left, top) padding in pixels

    @property
    def gain(self) -> tuple[float, float]:
        """``(y, x)`` resized / original; the two differ by under a pixel's worth from rounding each side."""
        return self.resized_shape[0] / self.orig_shape[0], self.resized_shape[1] / self.orig_shape[1]

    @property
    def ratio_pad(self) -> tuple[tuple[float, float], tuple[int, int]]:
        """In the form ``ultralytics.utils.ops.scale_boxes`` takes: ``((gain_y, gain_x), (pad_x, pad_y))``."""
        return self.gain, self.pad


@dataclass(frozen=True)
class NmsOptions:
    """Which boxes non-maximum suppression keeps, for the host and the device path alike."""

    confidence: float  # a box whose best class scores this or less is dropped first
    iou: float  # a box overlapping a better-scoring one by more than this IoU is suppressed
    max_detections: int  # most boxes kept per image, best first
    agnostic: bool = False  # suppress across classes (one box per place) rather than within each class


def letterbox_meta(height: int, width: int, size: int) -> LetterboxMeta:
    """Where a ``height x width`` image goes in a ``size`` square: resized to fit keeping its aspect ratio (up or
    down, each side at least 1 px), centred; ultralytics' ``LetterBox(auto=False, scaleup=True, center=True)``."""
    ratio = min(size / height, size / width)
    new_w, new_h = max(round(width * ratio), 1), max(round(height * ratio), 1)
    # An odd padding puts the extra pixel at the bottom and right: LetterBox's round(half - 0.1).
    left, top = round((size - new_w) / 2 - 0.1), round((size - new_h) / 2 - 0.1)
    return LetterboxMeta(orig_shape=(height, width), input_shape=(size, size), resized_shape=(new_h, new_w),
                         pad=(left, top))


def to_original(boxes: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
    """``(K, 4) float32`` x1, y1, x2, y2 in letterboxed pixels → in original pixels, clipped to the image, in place
    (``scale_boxes`` with ``ratio_pad``: the same subtractions and float32 divisions, then ``clip_boxes``)."""
    (gain_y, gain_x), (pad_x, pad_y) = meta.ratio_pad
    height, width = meta.orig_shape
    for coords, pad, gain, side in ((boxes[:, 0::2], pad_x, gain_x, width), (boxes[:, 1::2], pad_y, gain_y, height)):
        coords -= pad  # views: x1 and x2, then y1 and y2
        coords /= gain
        np.clip(coords, 0, side, out=coords)
    return boxes


class SquareWindow(NamedTuple):
    """The square a classifier crop covers, in frame pixels, and the part of it inside the frame."""

    left: int  # the square's left edge; may lie outside the frame, where the crop is grey
    top: int
    side: int
    x1: int  # the part inside the frame, x1 <= x < x2 and y1 <= y < y2; empty where x2 <= x1 or y2 <= y1
    y1: int
    x2: int
    y2: int

    @property
    def empty(self) -> bool:
        """Wholly outside the frame: the crop is all grey."""
        return self.x2 <= self.x1 or self.y2 <= self.y1


def square_window(box: tuple[float, float, float, float], context: float, height: int, width: int) -> SquareWindow:
    """The square around ``box``'s centre (x1, y1, x2, y2 in pixels of a ``height x width`` frame) with side
    ``context`` x its longer side (at least 2 px), rounded to whole pixels, and its part inside the frame."""
    x1, y1, x2, y2 = box
    side = max(2, int(round(max(x2 - x1, y2 - y1) * context)))
    left = int(round((x1 + x2) / 2 - side / 2))
    top = int(round((y1 + y2) / 2 - side / 2))
    return SquareWindow(left, top, side, max(0, left), max(0, top), min(width, left + side), min(height, top + side))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, best first, at most ``limit``: ``(K,) int64``.

    ``boxes``: ``(n, 4) float32`` x1, y1, x2, y2; ``scores``: ``(n,) float32``. torchvision's CPU kernel step for
    step: a stable sort by score (ties keep anchor order), float32 areas and overlaps, and a box is suppressed by
    an IoU above ``iou`` compared in float64 (a box pair of zero area, IoU 0/0, suppresses nothing).
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in np.argsort(-scores, kind="stable"):
            if suppressed[i]:
                continue
            keep.append(i)
            if len(keep) == limit:
                break
            width = np.maximum(np.float32(0), np.minimum(x2[i], x2) - np.maximum(x1[i], x1))
            height = np.maximum(np.float32(0), np.minimum(y2[i], y2) - np.maximum(y1[i], y1))
            inter = width * height
            overlap = inter / (areas[i] + areas - inter)
            suppressed |= overlap.astype(np.float64) > iou  # marks i itself too, which is already kept
    return np.asarray(keep, dtype=np.int64)
