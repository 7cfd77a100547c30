"""The world behind the hazards and signs: sky, skyline, roadside houses or trees, pavements,
kerbs, the road and its markings. Nothing here is labelled: it is all background (label 0)."""

from __future__ import annotations

import cv2
import numpy as np

from festival_serve.world.synth.geometry import Camera, Painter

FAR = 400.0  # metres: "the horizon" for polygons that run away from the camera

# Vietnamese tube-house facades are painted in strong pastels.
_FACADES = [
    (232, 206, 120),
    (226, 160, 150),
    (150, 190, 220),
    (236, 232, 220),
    (160, 200, 150),
    (210, 180, 140),
    (190, 190, 200),
    (240, 220, 170),
    (200, 120, 100),
    (170, 170, 160),
]
_SHOP_BANDS = [(200, 30, 30), (20, 80, 170), (230, 190, 30), (30, 140, 70), (240, 240, 240), (120, 40, 120)]
_SKIES = {
    "clear": ((70, 130, 210), (185, 215, 240)),
    "hazy": ((150, 175, 205), (220, 225, 230)),
    "overcast": ((150, 155, 165), (205, 208, 212)),
    "dusk": ((70, 80, 140), (240, 170, 120)),
}


def random_camera(rng: np.random.Generator, width: int, height: int) -> Camera:
    road_width = float(rng.uniform(6.0, 11.0))
    return Camera(
        width=width,
        height=height,
        horizon=height * float(rng.uniform(0.37, 0.41)),
        vanish_x=width * float(rng.uniform(0.38, 0.62)),
        focal=width * float(rng.uniform(0.75, 1.0)),
        cam_height=float(rng.uniform(1.3, 3.0)),  # a dashboard, a bus, a camera on a festival mast
        cam_x=road_width * float(rng.uniform(0.3, 0.7)),
        road_width=road_width,
    )


def _jitter(rng: np.random.Generator, color, amount: float = 14) -> tuple[int, int, int]:
    r, g, b = rng.uniform(-amount, amount, 3)
    return (min(255, max(0, int(color[0] + r))), min(255, max(0, int(color[1] + g))), min(255, max(0, int(color[2] + b))))


def _grey(rng: np.random.Generator, level: float, spread: float, tint: float = 5) -> tuple[int, int, int]:
    """A grey around ``level`` with at most ``tint`` of colour: asphalt and concrete are not green."""
    v = level + rng.uniform(-spread, spread)
    return _jitter(rng, (v, v, v), tint)


def draw_backdrop(p: Painter, cam: Camera, rng: np.random.Generator) -> dict:
    """Paint the static scene; returns facts the placers need (pavement widths) and the describer's
    (the sky, the lanes the markings show: None without lane markings)."""
    h, w = p.image.shape[:2]
    horizon = int(round(cam.horizon))
    sky_kind = str(rng.choice(list(_SKIES), p=[0.45, 0.25, 0.2, 0.1]))
    top, bottom = _SKIES[sky_kind]
    ramp = np.linspace(0.0, 1.0, horizon + 1)[:, None]
    sky = (np.asarray(top) * (1 - ramp) + np.asarray(bottom) * ramp).astype(np.uint8)
    p.image[: horizon + 1] = sky[:, None, :]
    if rng.random() < 0.6:
        _clouds(p, cam, rng)
    _skyline(p, cam, rng)
    # Beyond the pavements: beaten earth, dry grass or paddy green where no house stands.
    ground = _jitter(rng, [(150, 145, 135), (150, 140, 100), (110, 130, 80)][int(rng.integers(3))], 12)
    p.image[horizon:] = ground
    left_walk, right_walk = float(rng.uniform(1.2, 4.0)), float(rng.uniform(1.2, 4.0))
    pavement = _grey(rng, 172, 20, 8)
    p.poly(cam.quad(-left_walk, 0, 0.5, FAR), pavement)
    p.poly(cam.quad(cam.road_width, cam.road_width + right_walk, 0.5, FAR), pavement)
    for side, x in (("left", -left_walk), ("right", cam.road_width + right_walk)):
        kind = rng.choice(["houses", "trees", "open"], p=[0.6, 0.25, 0.15])
        if kind == "houses":
            _houses(p, cam, rng, x)
        elif kind == "trees":
            _trees(p, cam, rng, x + (0.8 if side == "left" else -0.8))
    lanes = _road(p, cam, rng)
    if rng.random() < 0.45:
        _shadows(p, cam, rng, -left_walk, cam.road_width + right_walk)
    if rng.random() < 0.4:
        _power_lines(p, cam, rng, -left_walk, cam.road_width + right_walk)
    return {"left_walk": left_walk, "right_walk": right_walk, "sky": sky_kind, "lanes": lanes}


def _clouds(p: Painter, cam: Camera, rng: np.random.Generator) -> None:
    """Soft white cumulus: ellipses on a copy of the sky, blended back at partial opacity."""
    sky = p.image[: int(cam.horizon)]
    overlay = sky.copy()
    h, w = sky.shape[:2]
    for _ in range(int(rng.integers(2, 7))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.1, 0.8) * h, rng.uniform(0.04, 0.12) * w
        for _ in range(4):
            c = (int(cx + rng.uniform(-1.2, 1.2) * r), int(cy + rng.uniform(-0.3, 0.3) * r))
            cv2.ellipse(
                overlay,
                c,
                (int(r * rng.uniform(0.5, 1.0)), int(r * rng.uniform(0.25, 0.45))),
                0,
                0,
                360,
                (245, 245, 248),
                -1,
                cv2.LINE_AA,
            )
    alpha = float(rng.uniform(0.35, 0.75))
    cv2.addWeighted(sky, 1 - alpha, overlay, alpha, 0.0, dst=sky)


def _shadows(p: Painter, cam: Camera, rng: np.random.Generator, x_left: float, x_right: float) -> None:
    """Shadows of the roadside houses: bands across the ground from one side, darkening it."""
    polys = []
    z = cam.z_near * 0.5
    from_left = rng.random() < 0.5
    while z < 80:
        length = float(rng.uniform(3, 15))
        reach = float(rng.uniform(0.2, 0.9)) * (x_right - x_left)
        xa, xb = (x_left, x_left + reach) if from_left else (x_right - reach, x_right)
        if rng.random() < 0.7:
            polys.append(cam.quad(xa, xb, z, z + length))
        z += length + float(rng.uniform(1, 10))
    if not polys:
        return
    top = int(cam.horizon)
    mask = np.zeros(p.image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(q * 16).astype(np.int32) for q in polys], 255, cv2.LINE_AA, 4)
    strength = float(rng.uniform(0.25, 0.45))  # share of the light the shadow takes away
    factor = 255 - (mask[top:].astype(np.uint16) * int(strength * 255) // 255).astype(np.uint8)
    ground = p.image[top:]
    cv2.multiply(ground, cv2.merge([factor, factor, factor]), dst=ground, scale=1 / 255)


def _skyline(p: Painter, cam: Camera, rng: np.random.Generator) -> None:
    x = -rng.uniform(0, 40)
    base = cam.horizon + 1
    tone = rng.uniform(0.55, 0.85)
    while x < cam.width:
        bw = cam.width * rng.uniform(0.03, 0.12)
        bh = cam.height * rng.uniform(0.01, 0.12) * (rng.random() < 0.8)
        c = _jitter(rng, np.array([150, 160, 175]) * tone, 18)
        p.poly([(x, base), (x + bw, base), (x + bw, base - bh), (x, base - bh)], c)
        x += bw * rng.uniform(0.7, 1.1)


def _houses(p: Painter, cam: Camera, rng: np.random.Generator, x: float) -> None:
    """A row of tube houses along the pavement: one facade per 3.5-6.5 m plot, each with an open
    shopfront, a shop-sign band and a window per upper floor (near ones only)."""
    depths = rng.uniform(3.5, 6.5, 48)
    starts = cam.z_near * 0.35 + np.concatenate([[0.0], np.cumsum(depths)[:-1]])
    keep = starts < 140
    starts, depths = starts[keep], depths[keep]
    ends = starts + depths
    floors = rng.integers(2, 6, starts.size)
    n = starts.size
    colours = rng.integers(0, len(_FACADES), n)
    bands = rng.integers(0, len(_SHOP_BANDS), n)
    wall = cam.project(
        x, np.stack([starts, ends, ends, starts], 1), np.stack([np.zeros(n), np.zeros(n), floors * 3.2, floors * 3.2], 1)
    ).reshape(n, 4, 2)
    near = starts < 70
    for i in range(n):
        p.poly(wall[i], _jitter(rng, _FACADES[colours[i]], 16))
    a, b = starts[near] + 0.3, ends[near] - 0.3
    p.polys(_facades(cam, x, a, b, 0.2, 2.6), (55, 50, 48))
    for k in range(len(_SHOP_BANDS)):
        sel = near & (bands == k)
        p.polys(_facades(cam, x, starts[sel] + 0.1, ends[sel] - 0.1, 2.7, 3.4), _SHOP_BANDS[k])
    windows = []
    for f in range(1, 5):
        sel = near & (floors > f)
        windows.append(_facades(cam, x, starts[sel] + 0.8, ends[sel] - 0.8, f * 3.2 + 0.9, f * 3.2 + 2.4))
    p.polys(np.concatenate(windows), (60, 70, 80))
    p.poly(cam.facade(x, 140, FAR, 0, 10), _jitter(rng, (170, 165, 160), 20))


def _facades(cam: Camera, x: float, z1: np.ndarray, z2: np.ndarray, h1: float, h2: float) -> np.ndarray:
    """(N, 4, 2) pixel corners of N rectangles on the plane X = x."""
    zs = np.stack([z1, z2, z2, z1], 1)
    hs = np.broadcast_to(np.array([h1, h1, h2, h2]), zs.shape)
    return cam.project(x, zs, hs).reshape(-1, 4, 2)


def _trees(p: Painter, cam: Camera, rng: np.random.Generator, x: float) -> None:
    zs = np.cumsum(rng.uniform(5.0, 12.0, 14)) + cam.z_near * 0.5
    for z in zs[::-1]:
        ppm = float(cam.ppm(z))
        base = cam.project(x, z)[0]
        height = float(rng.uniform(3.0, 6.0))
        p.poly(cam.frontal(x - 0.15, x + 0.15, z, 0, height), (90, 70, 50))
        green = _jitter(rng, (60, 110, 50), 20)
        for _ in range(5):
            cx = base[0] + rng.uniform(-1.5, 1.5) * ppm
            cy = base[1] - (height + rng.uniform(-0.5, 1.5)) * ppm
            r = rng.uniform(1.0, 2.0) * ppm
            p.ellipse((cx, cy), (r, r * 0.8), _jitter(rng, green, 12))


def _road(p: Painter, cam: Camera, rng: np.random.Generator) -> int | None:
    """Asphalt, kerbs, edge lines and lane markings; returns the lanes the markings show (None: unmarked)."""
    asphalt = _grey(rng, 105, 25, 5)
    rw = cam.road_width
    p.poly(cam.quad(0, rw, 0.5, FAR), asphalt)
    kerb = (200, 200, 195) if rng.random() < 0.7 else (230, 200, 40)
    for x in (0.0, rw):
        p.poly(cam.project([x - 0.15, x + 0.15, x + 0.15, x - 0.15], [0.5, 0.5, FAR, FAR], [0.15, 0.15, 0.15, 0.15]), kerb)
        p.poly(cam.facade(x, 0.5, FAR, 0, 0.15), tuple(int(v * 0.7) for v in kerb))
    white = (235, 235, 230)
    if rng.random() < 0.8:
        for x in (0.25, rw - 0.25):
            p.poly(cam.quad(x - 0.07, x + 0.07, 0.5, FAR), white)
    lanes = int(rng.integers(2, 4))
    centre = rng.choice(["dashed", "double_yellow", "none"], p=[0.6, 0.25, 0.15])
    for k in range(1, lanes):
        x = rw * k / lanes
        if centre == "double_yellow" and k == lanes // 2:
            for dx in (-0.12, 0.12):
                p.poly(cam.quad(x + dx - 0.06, x + dx + 0.06, 0.5, FAR), (230, 190, 40))
        elif centre != "none":
            phase = rng.uniform(0, 9)
            starts = np.arange(0.5 - phase, 120, 9.0)
            p.polys([cam.quad(x - 0.07, x + 0.07, max(z, 0.5), z + 3.0) for z in starts if z + 3.0 > 0.5], white)
    return None if centre == "none" else lanes


def _power_lines(p: Painter, cam: Camera, rng: np.random.Generator, x_left: float, x_right: float) -> None:
    for _ in range(int(rng.integers(2, 6))):
        z = float(rng.uniform(cam.z_near * 1.5, 40))
        h0 = float(rng.uniform(6.5, 9.0))
        xs = np.linspace(x_left, x_right, 24)
        sag = 0.8 * (1 - ((xs - xs.mean()) / (xs[-1] - xs.mean())) ** 2)
        pts = cam.project(xs, z + np.linspace(0, rng.uniform(-6, 6), 24), h0 - sag)
        p.polyline(pts, (40, 40, 45), 1)
