"""One scene: backdrop, hazards, signs on poles, occluders, cell ground truth, camera effects.

Every shape is painted into the frame and, with its object id, into a label map (painter's
algorithm), so the map holds exactly what is visible. Both kinds of ground truth come from it:

* a sign's box is the tight box of its face; ``occluded`` is the share of the face's pixels that
  something painted later (foliage, a lamp post) covers;
* cell rule: cell k gets hazard class c when the visible pixels of class c cover >= 20% of the cell,
  or when one object of class c has >= 30% of its visible pixels inside the cell (and that part is
  >= 2% of the cell). The first rule covers big objects spread over many cells (a wall, a zebra
  crossing); the second small ones (a distant cone, a far sign) wherever most of them lies.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from festival_serve.pipeline.places import side_of
from festival_serve.world.synth import hazards, signs
from festival_serve.world.synth.backdrop import draw_backdrop, random_camera
from festival_serve.world.synth.effects import apply_camera
from festival_serve.world.synth.geometry import Camera, Painter
from festival_serve.world.synth.truth import (
    INFO_TEXTS,
    SIGN_CLASSES,
    SPEED_LIMITS,
    TEXT_CLASSES,
    RoadUser,
    Scene,
    SceneFacts,
    SignTruth,
)
from festival_serve.models.hazard_cells.yolic import CellLayout, load_layout

REF_HEIGHT = 480  # sizes below are pixels at 848x480 and scale with the frame's height

CELL_SHARE = 0.20  # of the cell's area
OBJECT_SHARE = 0.30  # of the object's visible area ...
OBJECT_MIN_CELL_SHARE = 0.02  # ... when that part is at least this much of the cell

MAX_OCCLUSION = 0.30  # of a sign face
MAX_TEXT_OCCLUSION = 0.12  # signs with text: an occluder may clip the face, never the printed text
OCCLUDE_PROBABILITY = 0.15

SIGN_COUNT_WEIGHTS = (0.1, 0.3, 0.3, 0.2, 0.1)  # P(0..4 signs)
EMPTY_ROAD = 0.10  # P(no hazard object)

ROAD_USER_CLASSES = ("Vehicle", "Creature")
ROAD_USER_MIN_SHARE = 0.001  # of the frame's pixels: less is a speck no description should mention
NEAR_M = 15.0  # metres: a road user this close or closer is "near"
#: Text signs are drawn more often: they carry both the detector's and the OCR's ground truth.
SIGN_WEIGHTS = {c: 1.0 for c in SIGN_CLASSES} | {"speed_limit": 1.8, "info": 2.6}

_CIRCLES = ("speed_limit", "no_parking", "no_stopping", "no_entry", "no_turn", "mandatory")
_TRIANGLES = ("children", "pedestrian_crossing", "road_works", "slippery_road")


@functools.lru_cache(maxsize=1)
def outdoor_layout() -> CellLayout:
    return load_layout("outdoor")


@dataclass(frozen=True)
class Draft:
    """A scene with what it was made of: the label map its ground truth was computed from."""

    scene: Scene
    labels: np.ndarray  # (H, W) uint8 object ids (0 = background) of the frame before camera effects
    objects: tuple[str, ...]  # YOLIC class of object id k at index k - 1 (signs are "TrafficSign")


def generate_scene(seed: int, *, size: tuple[int, int] = (848, 480),
                   info_texts: Sequence[str] = INFO_TEXTS) -> Scene:
    """A road scene for ``seed`` at ``size`` = (width, height); the same seed gives the same scene.
    ``info_texts``: what the information signs say (the world's 28 phrases; the OCR eval swaps in
    phrases no recognizer trained on)."""
    return render_scene(seed, size=size, info_texts=info_texts).scene


def render_scene(seed: int, *, size: tuple[int, int] = (848, 480), info_texts: Sequence[str] = INFO_TEXTS) -> Draft:
    width, height = size
    if width < 64 or height < 64:
        raise ValueError(f"scene size {size} is too small (at least 64x64)")
    rng = np.random.default_rng(seed)
    layout = outdoor_layout()
    cam = random_camera(rng, width, height)
    image = np.empty((height, width, 3), np.uint8)
    labels = np.zeros((height, width), np.uint8)  # 0 = background, k = objects[k - 1]
    painter = Painter(image, labels)
    walks = draw_backdrop(painter, cam, rng)

    objects: list[str] = []
    spots = _hazard_spots(cam, rng, walks)
    for spot in spots:
        objects.append(spot.hazard)
        hazards.draw(painter, cam, rng, spot, len(objects))
    placed = _draw_signs(painter, cam, rng, objects, info_texts)
    cells = cell_truth(labels, objects, layout)
    truths = tuple(_sign_truth(labels, sign) for sign in placed)
    facts = SceneFacts(sky=walks["sky"], lanes=walks["lanes"], road_users=_road_users(labels, spots))
    image, _ = apply_camera(image, rng)
    return Draft(Scene(image=image, signs=truths, cells=cells, seed=int(seed), facts=facts), labels, tuple(objects))


def _road_users(labels: np.ndarray, spots: list[hazards.Placement]) -> tuple[RoadUser, ...]:
    """The vehicles and people a viewer can see (object id k + 1 is spots[k]), nearest first."""
    height, width = labels.shape
    min_pixels = ROAD_USER_MIN_SHARE * height * width
    users = []
    for k, spot in enumerate(spots):
        if spot.hazard not in ROAD_USER_CLASSES:
            continue
        _, xs = np.nonzero(labels == k + 1)
        if xs.size < min_pixels:
            continue
        distance = "near" if spot.z <= NEAR_M else "far"
        users.append((spot.z, RoadUser(spot.hazard, side_of(xs.mean() / width), distance)))
    return tuple(user for _, user in sorted(users, key=lambda item: item[0]))


def _hazard_spots(cam: Camera, rng: np.random.Generator, walks: dict) -> list[hazards.Placement]:
    count = 0 if rng.random() < EMPTY_ROAD else int(rng.integers(1, 6))
    kinds = rng.choice(hazards.HAZARDS, size=count)
    spots = [hazards.place(str(k), cam, rng, walks) for k in kinds]
    # Painted markings first (their labels cover the gaps between stripes), then potholes, then
    # standing things from far to near: the painter's algorithm.
    return sorted(spots, key=lambda s: (_LAYER[s.hazard], -s.z))


_LAYER = {name: 2 for name in hazards.HAZARDS} | {"ZebraCrossing": 0, "Bump": 0, "Dent": 1}


# --------------------------------------------------------------------------------------------------
# Signs


@dataclass
class _Placed:
    label: int  # object id in the label map
    sign_class: str
    text: str
    box: tuple[int, int, int, int]  # tight face box, pixels
    area: int  # face pixels before anything covered them
    keep_clear: tuple[int, int, int, int] | None  # the printed text, pixels: occluders stay off it


def _split_lines(text: str, rng: np.random.Generator) -> list[str]:
    """One line, or two balanced ones: always beyond 12 characters, sometimes below, never leaving
    a word of one or two letters alone on a line (a sign writer would not; a text detector misses it)."""
    words = text.split(" ")
    if len(words) == 1 or (len(text) <= 12 and rng.random() < 0.65):
        return [text]
    cut = min(range(1, len(words)), key=lambda i: max(len(" ".join(words[:i])), len(" ".join(words[i:]))))
    lines = [" ".join(words[:cut]), " ".join(words[cut:])]
    return lines if min(len(line) for line in lines) >= 3 or len(text) > 12 else [text]


def _render(sign_class: str, rng: np.random.Generator, k: float,
            info_texts: Sequence[str]) -> tuple[str, signs.Face, float]:
    """(text, face, face height in metres) of a random sign of ``sign_class``."""
    if sign_class == "speed_limit":
        text = str(rng.choice(SPEED_LIMITS))
        return text, signs.circle_sign(sign_class, int(round(rng.uniform(50, 112) * k)), rng, text), 0.7
    if sign_class in _CIRCLES:
        return "", signs.circle_sign(sign_class, int(round(rng.uniform(40, 110) * k)), rng), 0.7
    if sign_class in _TRIANGLES:
        return "", signs.triangle_sign(sign_class, int(round(rng.uniform(46, 120) * k))), 0.6
    text = str(info_texts[int(rng.integers(len(info_texts)))])
    lines = _split_lines(text, rng)
    colour = signs.BLUE if rng.random() < 0.6 else signs.GREEN
    face = signs.info_sign(lines, int(round(rng.uniform(23, 31) * k)), colour)
    return " ".join(lines), face, 0.35 + 0.35 * len(lines)


def _pose(face: signs.Face, rng: np.random.Generator, sign_class: str) -> signs.Face:
    """A face as mounted: turned a little away from the camera (narrower), tilted a degree or two
    on its post, faded by the sun."""
    rgb, alpha, text_box = face.rgb, face.alpha, face.text_box
    h, w = alpha.shape
    corners = (
        None
        if text_box is None
        else np.array(
            [[text_box[0], text_box[1]], [text_box[2], text_box[1]], [text_box[2], text_box[3]], [text_box[0], text_box[3]]]
        )
    )
    narrow = float(rng.uniform(0.8, 1.0)) if rng.random() < 0.5 else 1.0
    if narrow < 1.0:
        size = (max(8, int(round(w * narrow))), h)
        rgb, alpha = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
        if corners is not None:
            corners[:, 0] *= size[0] / w
        h, w = alpha.shape
    angle = float(rng.uniform(-3.0, 3.0)) * (0.5 if sign_class == "info" else 1.0)
    if abs(angle) > 0.5:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        cos, sin = abs(m[0, 0]), abs(m[0, 1])
        nw, nh = int(np.ceil(h * sin + w * cos)) + 2, int(np.ceil(h * cos + w * sin)) + 2
        m[0, 2] += nw / 2 - w / 2
        m[1, 2] += nh / 2 - h / 2
        rgb = cv2.warpAffine(rgb, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(alpha, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0)
        if corners is not None:
            corners = corners @ m[:, :2].T + m[:, 2]
    if rng.random() < 0.3:
        fade = float(rng.uniform(0.05, 0.18))
        rgb = cv2.addWeighted(rgb, 1 - fade, np.full_like(rgb, 235), fade, 0.0)
    if corners is not None:
        text_box = (*corners.min(axis=0), *corners.max(axis=0))
    return signs.Face(rgb, alpha, text_box)


def _draw_signs(p: Painter, cam: Camera, rng: np.random.Generator, objects: list[str],
                info_texts: Sequence[str]) -> list[_Placed]:
    h, w = p.labels.shape
    k = h / REF_HEIGHT
    count = int(rng.choice(len(SIGN_COUNT_WEIGHTS), p=SIGN_COUNT_WEIGHTS))
    weights = np.array([SIGN_WEIGHTS[c] for c in SIGN_CLASSES])
    faces = []
    taken: list[tuple[float, float, float, float]] = []
    for sign_class in rng.choice(SIGN_CLASSES, size=count, p=weights / weights.sum()):
        text, face, metres = _render(str(sign_class), rng, k, info_texts)
        face = _pose(face, rng, str(sign_class))
        fh, fw = face.alpha.shape
        if fw > w - 8 or fh > 0.4 * h:
            continue
        for _ in range(30):
            x = int(rng.integers(4, w - fw - 3))
            y = int(rng.integers(int(0.04 * h), max(int(0.04 * h) + 1, int(0.38 * h) - fh)))
            gap = 6 * k
            if all(x + fw + gap < a or b + gap < x or y + fh + gap < c or d + gap < y for a, c, b, d in taken):
                taken.append((x, y, x + fw, y + fh))
                faces.append((str(sign_class), text, face, x, y, metres))
                break
    for _, _, face, x, y, metres in faces:
        _pole(p, cam, rng, x, y, face.alpha.shape[1], face.alpha.shape[0], metres)
    placed = []
    for sign_class, text, face, x, y, _ in faces:
        objects.append("TrafficSign")
        label = len(objects)
        area = _paste(p, face.rgb, face.alpha, x, y, label)
        clear = None
        if face.text_box is not None:
            tx1, ty1, tx2, ty2 = face.text_box
            clear = (x + int(tx1) - 2, y + int(ty1) - 2, x + int(np.ceil(tx2)) + 2, y + int(np.ceil(ty2)) + 2)
        placed.append(_Placed(label, sign_class, text, _tight_box(face.alpha, x, y), area, clear))
    for sign in placed:
        if rng.random() < OCCLUDE_PROBABILITY:
            _occlude(p, cam, rng, sign, placed)
    return placed


def _pole(p: Painter, cam: Camera, rng: np.random.Generator, x: int, y: int, fw: int, fh: int, metres: float) -> None:
    """The post under a face, down to the ground at the depth its size implies. A face over the
    roadway hangs from a cantilever arm off a post beside the nearer kerb when that kerb is in view
    (else its post stands in a median)."""
    ppm_bottom = cam.ground_px / cam.cam_height
    t = float(np.clip(fh / (metres * ppm_bottom), 0.03, 1.0))
    ground = max(cam.horizon + t * cam.ground_px, y + fh + 10)
    t = (ground - cam.horizon) / cam.ground_px
    width = max(2.0, 0.08 * t * ppm_bottom)
    colour = (150, 150, 150) if rng.random() < 0.7 else (90, 90, 95)

    def post(cx: float, top: float) -> None:
        p.poly([(cx - width / 2, top), (cx + width / 2, top), (cx + width / 2, ground), (cx - width / 2, ground)], colour, 0)

    z = cam.depth(t)
    left, right = (float(v) for v in cam.project([-0.5, cam.road_width + 0.5], z)[:, 0])
    centre = x + fw / 2
    kerb = left if centre - left < right - centre else right
    if left < centre < right and -0.1 * cam.width < kerb < 1.1 * cam.width:
        arm_top = y + 0.25 * fh
        post(kerb, arm_top - width)
        for h in (arm_top, y + 0.75 * fh):
            p.poly([(kerb, h - width / 2), (centre, h - width / 2), (centre, h + width / 2), (kerb, h + width / 2)], colour, 0)
        return
    for cx in [centre] if fw < 2.2 * fh else [x + 0.2 * fw, x + 0.8 * fw]:
        post(cx, y + fh / 2)


def _paste(p: Painter, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int, label: int) -> int:
    fh, fw = alpha.shape
    region = p.image[y : y + fh, x : x + fw]
    a = alpha[..., None].astype(np.float32) / 255.0
    region[:] = (region * (1.0 - a) + rgb * a + 0.5).astype(np.uint8)
    face = alpha >= 128
    p.labels[y : y + fh, x : x + fw][face] = label
    return int(face.sum())


def _tight_box(alpha: np.ndarray, x: int, y: int) -> tuple[int, int, int, int]:
    rows = np.flatnonzero((alpha >= 128).any(axis=1))
    cols = np.flatnonzero((alpha >= 128).any(axis=0))
    return x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1


def _occlude(p: Painter, cam: Camera, rng: np.random.Generator, sign: _Placed, placed: list[_Placed]) -> None:
    """Foliage at a corner, or a lamp post in front (pictogram signs only), hiding at most
    MAX_OCCLUSION of any face (MAX_TEXT_OCCLUSION of a face with text)."""
    x1, y1, x2, y2 = sign.box
    fw, fh = x2 - x1, y2 - y1
    height, width = p.labels.shape
    post = sign.sign_class not in TEXT_CLASSES and rng.random() < 0.4
    corner = (x1 if rng.random() < 0.5 else x2, y1 if rng.random() < 0.5 else y2)
    for attempt in range(5):
        scale = 0.7**attempt
        shapes: list[tuple] = []
        if post:
            # A lamp post standing on the road behind the camera's side of the sign: ground to above it.
            cx, half = x1 + fw * rng.uniform(0.15, 0.85), max(1.5, fw * 0.09 * scale)
            top, ground = y1 - fh * rng.uniform(0.3, 1.0), cam.horizon + cam.ground_px * rng.uniform(0.3, 0.9)
            shapes.append(("poly", [(cx - half, top), (cx + half, top), (cx + half, ground), (cx - half, ground)]))
        else:
            for _ in range(int(rng.integers(3, 6))):
                r = fh * rng.uniform(0.12, 0.22) * scale
                c = (corner[0] + rng.uniform(-0.25, 0.25) * fw * scale, corner[1] + rng.uniform(-0.25, 0.25) * fh * scale)
                shapes.append(("ellipse", c, (r, 0.85 * r)))
        mask = np.zeros((height, width), np.uint8)
        _shapes(Painter(None, mask), shapes, None, 1)
        if all(_hidden(p.labels, mask, s) <= _limit(s) * s.area and not _covers_text(mask, s) for s in placed):
            colour = (110, 110, 115) if post else (40 + int(rng.integers(0, 30)), 90 + int(rng.integers(0, 40)), 35)
            _shapes(p, shapes, colour, 0)
            return


def _limit(sign: _Placed) -> float:
    return MAX_TEXT_OCCLUSION if sign.sign_class in TEXT_CLASSES else MAX_OCCLUSION


def _covers_text(mask: np.ndarray, sign: _Placed) -> bool:
    if sign.keep_clear is None:
        return False
    x1, y1, x2, y2 = sign.keep_clear
    return bool(mask[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)].any())


def _hidden(labels: np.ndarray, mask: np.ndarray, sign: _Placed) -> int:
    """Face pixels of ``sign`` hidden already plus those ``mask`` would hide."""
    x1, y1, x2, y2 = sign.box
    face = labels[y1:y2, x1:x2] == sign.label
    return sign.area - int(face.sum()) + int((face & (mask[y1:y2, x1:x2] > 0)).sum())


def _shapes(p: Painter, shapes: list[tuple], colour, label: int) -> None:
    for shape in shapes:
        if shape[0] == "poly":
            p.poly(shape[1], colour, label) if colour is not None else p.mark(shape[1], label)
        elif colour is not None:
            p.ellipse(shape[1], shape[2], colour, label)
        else:
            p.mark_ellipse(shape[1], shape[2], label)


def _sign_truth(labels: np.ndarray, sign: _Placed) -> SignTruth:
    x1, y1, x2, y2 = sign.box
    visible = int((labels[y1:y2, x1:x2] == sign.label).sum())
    occluded = round(max(0.0, 1.0 - visible / max(sign.area, 1)), 4)
    return SignTruth(
        box=(float(x1), float(y1), float(x2), float(y2)), sign_class=sign.sign_class, text=sign.text, occluded=occluded
    )


# --------------------------------------------------------------------------------------------------
# Cells


def cell_pixels(layout: CellLayout, width: int, height: int) -> np.ndarray:
    """(cells, 4) int: the layout's normalised boxes in pixels of a ``width`` x ``height`` frame."""
    scale = np.array([width, height, width, height], np.float64)
    return np.round(layout.boxes.astype(np.float64) * scale).astype(np.int64)


def cell_truth(labels: np.ndarray, objects: list[str], layout: CellLayout) -> np.ndarray:
    """(cells, classes) bool from a label map ((H, W) uint8 object ids) by the rule in the module doc."""
    height, width = labels.shape
    n = len(objects) + 1
    truth = np.zeros((layout.num_cells, len(layout.classes)), dtype=bool)
    if n == 1:
        return truth
    class_of = np.array([layout.classes.index(c) for c in objects], np.int64)
    total = np.bincount(labels.ravel(), minlength=n)[1:]  # visible pixels per object
    for i, (x1, y1, x2, y2) in enumerate(cell_pixels(layout, width, height)):
        counts = np.bincount(labels[y1:y2, x1:x2].ravel(), minlength=n)[1:]
        if not counts.any():
            continue
        area = max((x2 - x1) * (y2 - y1), 1)
        per_class = np.bincount(class_of, weights=counts, minlength=len(layout.classes))
        truth[i] |= per_class >= CELL_SHARE * area
        big = (counts >= OBJECT_SHARE * np.maximum(total, 1)) & (counts >= OBJECT_MIN_CELL_SHARE * area)
        truth[i, class_of[big]] = True
    return truth
