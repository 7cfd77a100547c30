"""Road-plane geometry and a painter that draws every shape into the frame and its label map.

World coordinates, metres: ``X`` across the road from its left kerb (0) to its right kerb
(``road_width``), ``Z`` forward from the camera, ``h`` up from the road. A pinhole camera at
height ``cam_height`` looks along the road with a level horizon, so a ground point at depth ``Z``
lands at ``t = z_near / Z`` of the way from the horizon to the frame's bottom row, and an object
there is ``t * ground_px / cam_height`` pixels per metre (the same across and up: square pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Fixed-point bits for cv2's drawing functions: coordinates are sub-pixel (1/16 px), so thin
#: far-away shapes keep their size instead of snapping to whole pixels.
SHIFT = 4
_ONE = 1 << SHIFT


@dataclass(frozen=True)
class Camera:
    width: int  # frame, pixels
    height: int
    horizon: float  # y of the horizon, pixels
    vanish_x: float  # x of the road's vanishing point, pixels
    focal: float  # pixels
    cam_height: float  # metres above the road
    cam_x: float  # metres from the left kerb
    road_width: float  # metres, kerb to kerb

    @property
    def ground_px(self) -> float:
        """Pixels from the horizon to the bottom row."""
        return self.height - self.horizon

    @property
    def z_near(self) -> float:
        """Depth (m) of the ground seen at the frame's bottom row."""
        return self.focal * self.cam_height / self.ground_px

    def ppm(self, z):
        """Pixels per metre at depth ``z`` (m)."""
        return self.focal / np.asarray(z, dtype=np.float64)

    def depth(self, t: float) -> float:
        """Depth (m) of the ground row ``t`` of the way from the horizon (0) to the bottom row (1)."""
        return self.z_near / t

    def project(self, x, z, h=0.0) -> np.ndarray:
        """World points -> (N, 2) float64 pixels. Arguments broadcast against each other."""
        ppm = self.focal / np.asarray(z, dtype=np.float64)
        px = self.vanish_x + (np.asarray(x, dtype=np.float64) - self.cam_x) * ppm
        py = self.horizon + (self.cam_height - np.asarray(h, dtype=np.float64)) * ppm
        px, py = np.broadcast_arrays(px, py)
        return np.column_stack((px.ravel(), py.ravel()))

    def quad(self, x1: float, x2: float, z1: float, z2: float) -> np.ndarray:
        """A ground rectangle X in [x1, x2], Z in [z1, z2] -> its 4 pixel corners."""
        return self.project([x1, x2, x2, x1], [z1, z1, z2, z2])

    def facade(self, x: float, z1: float, z2: float, h1: float, h2: float) -> np.ndarray:
        """A vertical rectangle along the road (constant X) -> its 4 pixel corners."""
        return self.project([x, x, x, x], [z1, z2, z2, z1], [h1, h1, h2, h2])

    def frontal(self, x1: float, x2: float, z: float, h1: float, h2: float) -> np.ndarray:
        """A vertical rectangle facing the camera (constant Z) -> its 4 pixel corners."""
        return self.project([x1, x2, x2, x1], [z, z, z, z], [h1, h1, h2, h2])


def _fixed(points) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64).reshape(-1, 2) * _ONE).astype(np.int32)


class Painter:
    """Draws into ``image`` ((H, W, 3) uint8 RGB, anti-aliased) and ``labels`` ((H, W) uint8 object
    ids, hard edges) at once, so what a label map says is visible is exactly what was painted last.

    ``label=None`` paints the image only (texture and detail inside an object already labelled);
    ``label=0`` marks the pixels background (occluders: poles, foliage).
    """

    def __init__(self, image: np.ndarray, labels: np.ndarray) -> None:
        self.image = image
        self.labels = labels

    def poly(self, points, color, label: int | None = None) -> None:
        pts = [_fixed(points)]
        cv2.fillPoly(self.image, pts, color, cv2.LINE_AA, SHIFT)
        if label is not None:
            cv2.fillPoly(self.labels, pts, int(label), cv2.LINE_8, SHIFT)

    def polys(self, polygons, color, label: int | None = None) -> None:
        """Many polygons of one colour in one call (``polygons``: a list of (K, 2) or an (N, K, 2) array)."""
        pts = (
            list(np.round(np.asarray(polygons, np.float64) * _ONE).astype(np.int32))
            if isinstance(polygons, np.ndarray)
            else [_fixed(p) for p in polygons]
        )
        if not pts:
            return
        cv2.fillPoly(self.image, pts, color, cv2.LINE_AA, SHIFT)
        if label is not None:
            cv2.fillPoly(self.labels, pts, int(label), cv2.LINE_8, SHIFT)

    def mark(self, points, label: int) -> None:
        """Label a region without painting it (a zebra crossing is its stripes *and* the gaps)."""
        cv2.fillPoly(self.labels, [_fixed(points)], int(label), cv2.LINE_8, SHIFT)

    def mark_ellipse(self, centre, axes, label: int, angle: float = 0.0) -> None:
        c = tuple(int(round(v * _ONE)) for v in centre)
        a = tuple(max(1, int(round(v * _ONE))) for v in axes)
        cv2.ellipse(self.labels, c, a, angle, 0, 360, int(label), -1, cv2.LINE_8, SHIFT)

    def ellipse(self, centre, axes, color, label: int | None = None, angle: float = 0.0) -> None:
        c = tuple(int(round(v * _ONE)) for v in centre)
        a = tuple(max(1, int(round(v * _ONE))) for v in axes)
        cv2.ellipse(self.image, c, a, angle, 0, 360, color, -1, cv2.LINE_AA, SHIFT)
        if label is not None:
            cv2.ellipse(self.labels, c, a, angle, 0, 360, int(label), -1, cv2.LINE_8, SHIFT)

    def line(self, p1, p2, color, width: float, label: int | None = None) -> None:
        """A thick segment as a polygon (cv2.line's thickness is whole pixels only)."""
        p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
        d = p2 - p1
        n = np.hypot(*d)
        if n < 1e-6:
            return
        off = np.array([-d[1], d[0]]) / n * max(width, 0.8) / 2
        self.poly([p1 + off, p2 + off, p2 - off, p1 - off], color, label)

    def polyline(self, points, color, thickness: int = 1) -> None:
        cv2.polylines(self.image, [_fixed(points)], False, color, thickness, cv2.LINE_AA, SHIFT)


def bbox(points) -> tuple[float, float, float, float]:
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())
