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
