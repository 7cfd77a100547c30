"""Box geometry of the sign detector: where an image went in its letterboxed square, shared by the
detector's host path and its device path (``device_ops``) so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


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
