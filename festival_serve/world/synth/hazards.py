"""The YOLIC hazard objects, placed on the road plane and drawn in perspective.

Each class has a placer (where on the road, in metres) and a drawer (shapes at that place). Every
drawer labels the object's whole region with its id: a zebra crossing or a fence is its stripes or
rails *and* the gaps between them, as a person would outline it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from festival_serve.world.synth.geometry import Camera, Painter

_CAR_COLOURS = [(240, 240, 240), (30, 30, 35), (180, 20, 25), (150, 155, 160), (20, 60, 140), (200, 200, 200), (90, 60, 40)]
_CLOTHES = [(200, 40, 40), (40, 80, 170), (240, 240, 240), (30, 30, 30), (230, 180, 30), (60, 140, 70), (200, 100, 160)]
_SKIN = [(230, 190, 150), (200, 150, 110), (160, 110, 80)]


@dataclass(frozen=True)
class Placement:
    hazard: str  # YOLIC class
    x: float  # metres from the left kerb (the object's centre unless said otherwise)
    z: float  # metres from the camera
    flat: bool  # on the road surface: drawn before anything standing


def _c(rng: np.random.Generator, colours) -> tuple[int, int, int]:
    base = np.asarray(colours[int(rng.integers(len(colours)))], np.float64)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-12, 12, 3), 0, 255))


def _shade(color, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, v * k)) for v in color)


def place(hazard: str, cam: Camera, rng: np.random.Generator, walks: dict) -> Placement:
    """Where a hazard of this class stands: on the roadway, at its edges, or on the pavement."""
    rw = cam.road_width
    t = float(rng.uniform(0.14, 0.92))
    z = cam.depth(t)
    flat = hazard in ("ZebraCrossing", "Bump", "Dent")
    if hazard in ("ZebraCrossing", "Bump"):
        z = cam.depth(float(rng.uniform(0.3, 0.9)))  # farther, a marking is a line or two of pixels
        x = rw / 2
    elif hazard == "Vehicle":
        z = cam.depth(float(rng.uniform(0.12, 0.6)))
        x = float(rng.uniform(1.0, rw - 1.0))
    elif hazard == "Weed":
        edge = rng.random() < 0.5
        x = float(rng.uniform(-0.3, 0.4)) if edge else float(rng.uniform(rw - 0.4, rw + 0.3))
    elif hazard == "Column":
        x = float(
            rng.choice(
                [
                    rng.uniform(-walks["left_walk"], 0.6),
                    rng.uniform(0.6, rw - 0.6),
                    rng.uniform(rw - 0.6, rw + walks["right_walk"]),
                ]
            )
        )
    elif hazard in ("Wall", "Fence"):
        z = cam.depth(float(rng.uniform(0.14, 0.8)))
        x = float(rng.uniform(0.0, rw))
    else:
        x = float(rng.uniform(0.3, rw - 0.3))
    return Placement(hazard, x, z, flat)


def draw(p: Painter, cam: Camera, rng: np.random.Generator, spot: Placement, label: int) -> None:
    _DRAWERS[spot.hazard](p, cam, rng, spot.x, spot.z, label)


def _cone(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    h = float(rng.uniform(0.45, 0.8))
    b = 0.45 * h
    orange = _c(rng, [(245, 110, 20), (235, 80, 20), (250, 130, 30)])
    p.poly(cam.frontal(x - b / 2, x + b / 2, z, 0, 0.05 * h), (35, 35, 35), label)
    top, bottom = 0.06 * h, 0.32 * h
    body = cam.project([x - bottom, x + bottom, x + top, x - top], z, [0.05 * h, 0.05 * h, h, h])
    p.poly(body, orange, label)
    for lo, hi in ((0.45, 0.62),) if h < 0.6 else ((0.35, 0.47), (0.62, 0.72)):
        w_lo, w_hi = bottom - (bottom - top) * lo, bottom - (bottom - top) * hi
        p.poly(cam.project([x - w_lo, x + w_lo, x + w_hi, x - w_hi], z, [lo * h, lo * h, hi * h, hi * h]), (240, 240, 240))


def _zebra(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    depth = float(rng.uniform(2.5, 4.0))
    rw = cam.road_width
    p.mark(cam.quad(0.2, rw - 0.2, z, z + depth), label)
    white = (232, 232, 228)
    stripe = float(rng.uniform(0.4, 0.6))
    xs = np.arange(0.3, rw - 0.3 - stripe + 1e-6, 2 * stripe)
    p.polys([cam.quad(x0, x0 + stripe, z, z + depth) for x0 in xs], white)


def _bump(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    """A yellow/black speed hump, or a set of yellow rumble strips (gờ giảm tốc) labelled as one
    region from the first strip to the last."""
    rw = cam.road_width
    if rng.random() < 0.5:
        depth = float(rng.uniform(0.7, 1.4))
        p.poly(cam.quad(0.0, rw, z, z + depth), (30, 30, 30), label)
        seg = float(rng.uniform(0.4, 0.6))
        xs = np.arange(0.0, rw - 1e-6, 2 * seg)
        p.polys(
            [cam.project([x0, min(x0 + seg, rw), min(x0 + seg, rw), x0], [z, z, z + depth, z + depth], 0.05) for x0 in xs],
            (240, 200, 20),
        )
        return
    strips = int(rng.integers(3, 7))
    width, gap = float(rng.uniform(0.15, 0.3)), float(rng.uniform(0.25, 0.5))
    p.mark(cam.quad(0.0, rw, z, z + strips * (width + gap) - gap), label)
    starts = z + np.arange(strips) * (width + gap)
    p.polys([cam.quad(0.0, rw, z0, z0 + width) for z0 in starts], _c(rng, [(235, 195, 30), (240, 220, 120)]))


def _dent(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    r = float(rng.uniform(0.25, 0.7))
    ang = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    radius = r * rng.uniform(0.7, 1.15, ang.size)
    rim = cam.project(x + radius * np.cos(ang) * 1.1, z + radius * np.sin(ang) * 1.1)
    hole = cam.project(x + radius * np.cos(ang), z + radius * np.sin(ang))
    p.poly(rim, (125, 118, 108), label)
    p.poly(hole, _c(rng, [(45, 42, 40), (60, 55, 50)]))
    if rng.random() < 0.4:  # a puddle
        p.poly(cam.project(x + 0.6 * radius * np.cos(ang), z + 0.6 * radius * np.sin(ang)), (95, 110, 125))


def _weed(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    h = float(rng.uniform(0.25, 0.6))
    spread = float(rng.uniform(0.25, 0.6))
    n = int(rng.integers(7, 14))
    base_x = x + rng.uniform(-spread / 2, spread / 2, n)
    tip_x = base_x + rng.uniform(-0.2, 0.2, n) * h
    tip_h = h * rng.uniform(0.5, 1.0, n)
    hull = cam.project(
        np.r_[base_x.min(), base_x.max(), tip_x.max(), tip_x.min()], z, np.r_[0, 0, tip_h.max() * 0.8, tip_h.max() * 0.8]
    )
    p.mark(hull, label)
    green = _c(rng, [(70, 130, 40), (90, 150, 50), (60, 110, 40)])
    for bx, tx, th in zip(base_x, tip_x, tip_h):
        w = 0.025
        pts = cam.project([bx - w, bx + w, tx], z, [0, 0, th])
        p.poly(pts, _shade(green, float(rng.uniform(0.75, 1.2))), label)


def _creature(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    if rng.random() < 0.7:
        _pedestrian(p, cam, rng, x, z, label)
    else:
        _animal(p, cam, rng, x, z, label)


def _pedestrian(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    h = float(rng.uniform(1.45, 1.8))
    ppm = float(cam.ppm(z))
    shirt, trousers, skin = _c(rng, _CLOTHES), _c(rng, _CLOTHES), _c(rng, _SKIN)
    stride = float(rng.uniform(0.0, 0.18))
    for k in (-1, 1):
        p.poly(
            cam.project(
                [x + k * 0.05 - 0.07, x + k * 0.05 + 0.07, x + k * (0.05 + stride) + 0.06, x + k * (0.05 + stride) - 0.06],
                z,
                [0.47 * h, 0.47 * h, 0, 0],
            ),
            trousers,
            label,
        )
    p.poly(cam.project([x - 0.2, x + 0.2, x + 0.17, x - 0.17], z, [0.82 * h, 0.82 * h, 0.45 * h, 0.45 * h]), shirt, label)
    for k in (-1, 1):
        p.poly(
            cam.project([x + k * 0.2, x + k * 0.26, x + k * 0.25, x + k * 0.19], z, [0.81 * h, 0.8 * h, 0.5 * h, 0.5 * h]),
            shirt,
            label,
        )
    head = cam.project(x, z, 0.92 * h)[0]
    r = 0.1 * h * ppm * 0.6
    p.ellipse(head, (r, r * 1.2), skin, label)
    if rng.random() < 0.5:  # a conical hat (nón lá) or a helmet
        hat = (220, 200, 140) if rng.random() < 0.5 else _c(rng, _CLOTHES)
        top = cam.project(x, z, 1.02 * h)[0]
        p.poly(
            [(head[0] - 2.2 * r, head[1] - 0.2 * r), (head[0] + 2.2 * r, head[1] - 0.2 * r), (top[0], top[1] - 0.6 * r)],
            hat,
            label,
        )


def _animal(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    big = rng.random() < 0.4  # a buffalo or cow, else a dog
    h, length = (1.3, 2.0) if big else (0.5, 0.8)
    h *= float(rng.uniform(0.85, 1.15))
    color = _c(rng, [(60, 55, 55), (120, 90, 60), (180, 150, 110), (230, 220, 200)])
    ppm = float(cam.ppm(z))
    body = cam.project(x, z, 0.65 * h)[0]
    p.ellipse(body, (0.5 * length * ppm, 0.22 * h * ppm), color, label)
    for dx in (-0.38, -0.25, 0.25, 0.38):
        p.line(
            cam.project(x + dx * length, z, 0.55 * h)[0],
            cam.project(x + dx * length * 1.05, z, 0.0)[0],
            _shade(color, 0.8),
            0.06 * h * ppm,
            label,
        )
    k = 1 if rng.random() < 0.5 else -1
    head = cam.project(x + k * 0.55 * length, z, 0.85 * h)[0]
    p.ellipse(head, (0.14 * h * ppm * (1.6 if big else 1), 0.12 * h * ppm), color, label)
    p.line(
        cam.project(x - k * 0.5 * length, z, 0.75 * h)[0],
        cam.project(x - k * 0.62 * length, z, 0.4 * h)[0],
        color,
        0.03 * h * ppm,
        label,
    )


def _vehicle(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    kind = rng.choice(["car", "car_front", "truck", "motorbike", "side_car"], p=[0.3, 0.15, 0.15, 0.27, 0.13])
    color = _c(rng, _CAR_COLOURS)
    if kind == "motorbike":
        _motorbike(p, cam, rng, x, z, label, color)
        return
    if kind == "side_car":
        length, h = float(rng.uniform(3.8, 4.6)), float(rng.uniform(1.35, 1.6))
        ppm = float(cam.ppm(z))
        p.poly(
            cam.project([x - length / 2, x + length / 2, x + length / 2, x - length / 2], z, [0.3, 0.3, 0.85, 0.85]), color, label
        )
        p.poly(
            cam.project([x - 0.3 * length, x + 0.28 * length, x + 0.18 * length, x - 0.2 * length], z, [0.85, 0.85, h, h]),
            color,
            label,
        )
        p.poly(
            cam.project(
                [x - 0.26 * length, x + 0.24 * length, x + 0.16 * length, x - 0.18 * length], z, [0.88, 0.88, h - 0.08, h - 0.08]
            ),
            (50, 60, 75),
            label,
        )
        for dx in (-0.32, 0.32):
            c = cam.project(x + dx * length, z, 0.33)[0]
            p.ellipse(c, (0.33 * ppm, 0.33 * ppm), (25, 25, 25), label)
            p.ellipse(c, (0.16 * ppm, 0.16 * ppm), (160, 160, 165))
        return
    width, h = (
        (float(rng.uniform(1.7, 1.9)), float(rng.uniform(1.4, 1.65)))
        if kind != "truck"
        else (float(rng.uniform(2.3, 2.5)), float(rng.uniform(2.6, 3.3)))
    )
    x = float(np.clip(x, width / 2, cam.road_width - width / 2))
    hw = width / 2
    for dx in (-hw + 0.2, hw - 0.2):
        p.poly(cam.frontal(x + dx - 0.13, x + dx + 0.13, z, 0.0, 0.45), (25, 25, 25), label)
    if kind != "truck":
        p.poly(cam.frontal(x - hw, x + hw, z, 0.2, 0.95), color, label)
        p.poly(cam.project([x - hw, x + hw, x + hw * 0.78, x - hw * 0.78], z, [0.95, 0.95, h, h]), color, label)
        p.poly(
            cam.project([x - hw * 0.9, x + hw * 0.9, x + hw * 0.72, x - hw * 0.72], z, [1.0, 1.0, h - 0.08, h - 0.08]),
            (45, 55, 70),
        )
    else:
        p.poly(cam.frontal(x - hw, x + hw, z, 0.3, h), color, label)
        p.poly(cam.frontal(x - hw, x + hw, z, 0.3, 0.5), (60, 60, 60))
    if kind == "car_front":  # oncoming: headlights and a grille instead of tail lights
        for k in (-1, 1):
            p.poly(cam.frontal(x + k * (hw - 0.1) - 0.14, x + k * (hw - 0.1) + 0.14, z, 0.62, 0.75), (250, 250, 225))
        p.poly(cam.frontal(x - 0.45, x + 0.45, z, 0.5, 0.72), (40, 40, 45))
    else:
        for k in (-1, 1):
            p.poly(cam.frontal(x + k * (hw - 0.05) - 0.12, x + k * (hw - 0.05) + 0.12, z, 0.7, 0.85), (220, 30, 30))
    p.poly(cam.frontal(x - 0.26, x + 0.26, z, 0.3, 0.45), (235, 235, 225))


def _motorbike(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int, color) -> None:
    """A motorbike with its rider, seen from behind: labelled Vehicle as one object."""
    ppm = float(cam.ppm(z))
    p.poly(cam.frontal(x - 0.06, x + 0.06, z, 0.0, 0.5), (25, 25, 25), label)
    p.poly(cam.frontal(x - 0.18, x + 0.18, z, 0.4, 0.8), color, label)
    p.poly(cam.frontal(x - 0.1, x + 0.1, z, 0.55, 0.62), (220, 30, 30))
    shirt = _c(rng, _CLOTHES)
    p.poly(cam.project([x - 0.22, x + 0.22, x + 0.18, x - 0.18], z, [0.75, 0.75, 1.4, 1.4]), shirt, label)
    head = cam.project(x, z, 1.55)[0]
    p.ellipse(head, (0.14 * ppm, 0.15 * ppm), _c(rng, _CLOTHES + [(250, 250, 250)]), label)


def _fence(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    width = float(rng.uniform(2.0, 5.0))
    h = float(rng.uniform(0.9, 1.3))
    x1 = float(np.clip(x - width / 2, -1.0, cam.road_width + 1.0 - width))
    x2 = x1 + width
    p.mark(cam.frontal(x1, x2, z, 0, h), label)
    style = rng.choice(["metal", "plastic", "bamboo"])
    if style == "plastic":  # red/white festival barriers
        n = max(1, int(round(width / 1.2)))
        for k in range(n):
            a, b = x1 + k * width / n + 0.03, x1 + (k + 1) * width / n - 0.03
            p.poly(cam.frontal(a, b, z, 0.0, h), (215, 40, 40) if k % 2 == 0 else (240, 240, 240), label)
        return
    post = (170, 170, 175) if style == "metal" else (180, 150, 90)
    for px in np.linspace(x1, x2, max(2, int(width / 1.0) + 1)):
        p.poly(cam.frontal(px - 0.04, px + 0.04, z, 0, h), _shade(post, 0.8), label)
    for rh in (0.15 * h, 0.55 * h, 0.95 * h):
        p.poly(cam.frontal(x1, x2, z, rh - 0.04, rh + 0.04), post, label)
    if style == "metal":
        for bx in np.arange(x1 + 0.15, x2, 0.15):
            p.poly(cam.frontal(bx - 0.012, bx + 0.012, z, 0.15 * h, 0.95 * h), post)


def _column(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    if rng.random() < 0.35:  # a bollard
        w, h = float(rng.uniform(0.15, 0.3)), float(rng.uniform(0.6, 1.1))
    else:
        w, h = float(rng.uniform(0.35, 0.8)), float(rng.uniform(2.5, 5.0))
    base = _c(rng, [(170, 170, 165), (200, 195, 185), (140, 140, 140)])
    p.poly(cam.frontal(x - w / 2, x + w / 2, z, 0, h), base, label)
    p.poly(cam.frontal(x + w / 6, x + w / 2, z, 0, h), _shade(base, 0.75), label)
    if rng.random() < 0.5:
        for band in np.arange(0.2, h, 0.5)[::2]:
            p.poly(cam.frontal(x - w / 2, x + w / 2, z, band, band + 0.25), (230, 200, 30) if w < 0.3 else (30, 30, 30), label)


def _wall(p: Painter, cam: Camera, rng: np.random.Generator, x: float, z: float, label: int) -> None:
    width = float(rng.uniform(2.0, 6.0))
    h = float(rng.uniform(0.8, 2.4))
    x1 = float(np.clip(x - width / 2, -1.0, cam.road_width + 1.0 - width))
    x2 = x1 + width
    brick = rng.random() < 0.6
    color = _c(rng, [(170, 80, 60), (150, 70, 55)]) if brick else _c(rng, [(190, 190, 185), (160, 160, 155)])
    p.poly(cam.frontal(x1, x2, z, 0, h), color, label)
    p.poly(cam.frontal(x1 - 0.05, x2 + 0.05, z, h - 0.08, h), _shade(color, 1.2), label)
    if brick:
        mortar = (200, 190, 175)
        rows = np.arange(0.08, h - 0.08, 0.16)
        p.polys([cam.frontal(x1, x2, z, r - 0.01, r + 0.01) for r in rows], mortar)
        if float(cam.ppm(z)) > 40:  # vertical joints only where a brick is a few pixels wide
            joints = []
            for i, r in enumerate(rows[:-1]):
                off = 0.0 if i % 2 == 0 else 0.12
                joints += [cam.frontal(bx - 0.01, bx + 0.01, z, r, r + 0.16) for bx in np.arange(x1 + off, x2, 0.24)]
            p.polys(joints, mortar)


_DRAWERS = {
    "Bump": _bump,
    "Column": _column,
    "Dent": _dent,
    "Fence": _fence,
    "Creature": _creature,
    "Vehicle": _vehicle,
    "Wall": _wall,
    "Weed": _weed,
    "ZebraCrossing": _zebra,
    "TrafficCone": _cone,
}
HAZARDS = tuple(_DRAWERS)
