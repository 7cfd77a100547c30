"""Where something is in a road frame, in the words descriptions use: which third of the width, how near.

One vocabulary for the findings the describer is given (hazards placed by their cells), the world's
generator facts (vehicles and people placed by their pixels) and the eval that reads descriptions back.
"""

from __future__ import annotations

import numpy as np

SIDES = ("left", "ahead", "right")  # a third of the frame's width each
DISTANCES = ("near", "far")

#: A hazard whose lowest flagged cell has its centre this far down the frame (normalised y) is near: the
#: outdoor layout's rows from 0.68 of the height down cover the road up to ~15 m ahead.
NEAR_ROW_Y = 0.68


def side_of(x: float) -> str:
    """Normalised x (0 = left edge, 1 = right edge) -> one of SIDES."""
    return SIDES[min(max(int(3 * x), 0), 2)]


def place_of(boxes: np.ndarray) -> str:
    """(N, 4) normalised x1, y1, x2, y2 boxes of the cells flagged with one hazard -> "side, distance"
    ("ahead, near"): the side of the cells' mean centre, near when the lowest reaches NEAR_ROW_Y."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if boxes.size == 0:
        return ""
    centre_x = float(((boxes[:, 0] + boxes[:, 2]) / 2).mean())
    lowest_y = float(((boxes[:, 1] + boxes[:, 3]) / 2).max())
    return f"{side_of(centre_x)}, {'near' if lowest_y >= NEAR_ROW_Y else 'far'}"


def hazard_places(cells, frame_size: tuple[int, int]) -> tuple[tuple[str, int, str], ...]:
    """``cells``: (labels, (x1, y1, x2, y2) pixel box) of each flagged cell in a frame of ``frame_size`` =
    (width, height) -> (label, cells flagged with it, place_of those cells) per label, sorted by label: the
    hazards the describer is told about (the ingress builds them from its cells, the eval from the answer's)."""
    width, height = frame_size
    scale = np.array([width, height, width, height], np.float64)
    boxes: dict[str, list[np.ndarray]] = {}
    for labels, box in cells:
        for label in labels:
            boxes.setdefault(label, []).append(np.asarray(box, np.float64) / scale)
    return tuple((label, len(boxes[label]), place_of(np.stack(boxes[label]))) for label in sorted(boxes))
