"""Short video clips of the festival road world, with exact per-frame ground truth.

A vehicle drives down the road at 8-14 m/s. The world is the one single scenes are made of (the
same sky, houses, trees, road and markings of :mod:`~festival_serve.world.synth.backdrop`, the same
hazard drawers of :mod:`~festival_serve.world.synth.hazards`, the same sign faces and mounting of
:mod:`~festival_serve.world.synth.scene`), laid out along the road in world metres once per clip
and drawn through the scene's perspective :class:`~festival_serve.world.synth.geometry.Camera` from
the camera's position in every frame: signs start far (10-20 px) and grow as they approach, then
leave the frame at its side or top; hazards come and go (vehicles drive on, people walk); the light
drifts from one lighting table to another; the camera shakes (harder over a speed bump or pothole)
and a frame taken while the camera shakes (a rough stretch, a jolt, a steering correction) is
motion-blurred along the shake.

    clip = generate_clip(seed, frames=70, fps=10.0, size=(848, 480))
    clip.frames[i].image   # (H, W, 3) uint8 RGB
    clip.frames[i].signs   # SignInClip(identity, box, sign_class, text, occluded) per listed sign
    clip.frames[i].cells   # (104, 11) bool, YOLIC outdoor cells x hazard classes, as Scene.cells
    write_clip(clip, "road.mp4")   # road.mp4 + road.json (the truth)
    read_truth("road.json")        # the Clip again, images None

Ground truth comes from the label map, as for scenes (:mod:`~festival_serve.world.synth.scene`):

* ``identity``: the physical sign, numbered 0, 1, 2, ... in the order the signs stand along the road;
  its class and text never change within a clip;
* ``box``: the tight box of the sign's face, clipped to the frame (a face leaving the frame is
  cut at its edge);
* ``occluded``: the share of the face's pixels not visible in the frame: covered by something
  nearer (a truck, another sign's post) *or outside the frame*;
* a sign is listed in a frame while its face box is at least ``MIN_SIGN_PX`` high and at least
  ``MIN_VISIBLE`` of its face is visible; it is drawn whenever it is a few pixels big;
* ``cells``: the scene's cell rule (:func:`~festival_serve.world.synth.scene.cell_truth`) on
  the frame's label map.

Seeds: :func:`clip_seeds` gives per-split seeds disjoint from each other and from the scene seeds
that training draws (``SPLIT_STARTS[split] + CLIP_OFFSET + i``). The clips committed in
``festival_serve/data/clips/`` are :data:`COMMITTED` (held-out "test" seeds); regenerate them with
``python -m festival_serve.world.synth.clips --out festival_serve/data/clips``.

Detection: the shipped sign detector (320 px letterbox) finds clip signs about as it finds scene signs of
the same size: nearly all from ~32 px high at 848x480, about two in three at 24-32 px (scene signs shrunk to
24-32 px: 0.58), almost none below. A sign's text is best read from ~25 px up.

Plain numpy/OpenCV/PIL, no Ray, no torch: about 12-20 ms a frame at 848x480 on one core.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from festival_serve import DATA_DIR
from festival_serve.world.synth import backdrop, hazards, signs
from festival_serve.world.synth.backdrop import FAR, random_camera
from festival_serve.world.synth.effects import _NOISE_MARGIN, _NOISE_SIGMA, _noise_bank, lighting_lut
from festival_serve.world.synth.geometry import Camera, Painter
from festival_serve.world.synth.scene import _pose, _split_lines, cell_truth, outdoor_layout
from festival_serve.world.synth.truth import INFO_TEXTS, SIGN_CLASSES, SPEED_LIMITS, TEXT_CLASSES

#: Clip seeds of a split start this far into the split's scene-seed range (training draws its
#: scenes from the start of "train", a few thousand at most).
CLIP_OFFSET = 4_000_000
CLIP_SPAN = 1_000_000
#: The first seeds of the "test" split are the committed clips' (COMMITTED).
COMMITTED_SEEDS = 3
_SALT = 0xC11B  # clip worlds are drawn from (seed, _SALT): never the stream of the scene of the same seed

MIN_SIGN_PX = 10  # a face box lower than this is drawn but not listed
MIN_VISIBLE = 0.5  # of the face's pixels (in the frame, not covered) for a sign to be listed
DRAW_MIN_PX = 3  # faces smaller than this are not drawn at all

SPEED_MPS = (8.0, 14.0)
NEAR_M = 1.0  # the near clipping plane: a world point nearer than this is drawn at this depth
SIGN_COUNT = (2, 5)  # signs per clip, both ends included (forced signs may make more)
SIGN_GAP_M = 11.0  # at least this far apart along the road
FIRST_SIGN_PX = (12.0, 20.0)  # the first sign's face height in the first frame
#: Text signs drawn more often than in scenes: a stream reads each sign's text once.
CLIP_SIGN_WEIGHTS = {c: 1.0 for c in SIGN_CLASSES} | {"speed_limit": 3.0, "info": 4.5}
OVERHEAD = 0.12  # P(a sign hangs over the roadway from a cantilever arm)
#: Faces are 1-1.3x the scene's nominal size in metres (a 70-90 cm disc; direction signs up to 1.4x):
#: roadside signs on a wide road leave the frame at 50-110 px, the sizes the detector was trained on.
SIGN_SCALE = (1.0, 1.3)
INFO_SCALE = (1.0, 1.4)
ROADSIDE_MIN_M = 2.5  # a roadside face's lower edge: this high or more (clear of the shop signs), and ...
ROADSIDE_ABOVE_CAMERA_M = (1.0, 2.2)  # ... this much above the camera: the scenes' sign band, above the horizon
NEAR_SIDE = 0.6  # P(a roadside sign stands on the kerb nearer the camera)
HAZARDS_PER_100M = (3.0, 9.0)
LANE_CLEAR_M = 1.3  # standing hazards keep this far (laterally) from the camera's path
SHAKE_BLUR_MIN_PX = 3.0  # frames whose shake moves the image this much during the exposure are blurred
MAX_BLUR_PX = 7  # scenes' motion blur is 3-6 px
ROUGH = 0.6  # P(a clip has rough stretches of road)

_CIRCLES = ("speed_limit", "no_parking", "no_stopping", "no_entry", "no_turn", "mandatory")
_TRIANGLES = ("children", "pedestrian_crossing", "road_works", "slippery_road")
_FLAT = ("ZebraCrossing", "Bump", "Dent")
_JOLTS = ("Bump", "Dent")  # the camera jolts when it drives over one


# --------------------------------------------------------------------------------------------------
# The public contract


@dataclass(frozen=True)
class SignInClip:
    """One sign visible in one frame."""

    identity: int  # the physical sign within the clip: 0, 1, 2, ... along the road
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 px: tight face box, clipped to the frame
    sign_class: str  # one of truth.SIGN_CLASSES
    text: str  # exact printed text ("" for pictograms), as SignTruth.text
    occluded: float  # share of the face not visible: covered, or outside the frame


@dataclass(frozen=True)
class ClipFrame:
    index: int
    time_s: float  # index / fps
    image: np.ndarray | None  # (H, W, 3) uint8 RGB; None when read from a truth file
    signs: tuple[SignInClip, ...]
    cells: np.ndarray  # (104, 11) bool YOLIC cell truth, as Scene.cells


@dataclass(frozen=True)
class Clip:
    seed: int
    fps: float
    size: tuple[int, int]  # (width, height)
    frames: tuple[ClipFrame, ...]
    #: What made it: generate_clip's keyword arguments (frames, fps, size, signs), for regenerating.
    args: dict = field(default_factory=dict, compare=False)

    def sign_identities(self) -> dict[int, tuple[str, str]]:
        """identity -> (sign_class, text) of every sign listed in some frame."""
        found: dict[int, tuple[str, str]] = {}
        for frame in self.frames:
            for sign in frame.signs:
                found.setdefault(sign.identity, (sign.sign_class, sign.text))
        return dict(sorted(found.items()))


def clip_seeds(split: str, count: int, skip: int | None = None) -> list[int]:
    """``count`` clip seeds of ``split`` ("train", "val" or "test"): disjoint across splits and from
    the scene seeds training uses (``SPLIT_STARTS[split] + CLIP_OFFSET + skip + i``). ``skip`` defaults to the
    committed clips' seeds on "test" (an eval of generated clips should not score the committed ones again)."""
    from festival_serve.world.synth import SPLIT_STARTS

    if split not in SPLIT_STARTS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_STARTS)}")
    if skip is None:
        skip = COMMITTED_SEEDS if split == "test" else 0
    if not 0 <= count + skip <= CLIP_SPAN or skip < 0:
        raise ValueError(f"skip + count must be in [0, {CLIP_SPAN}], got skip={skip}, count={count}")
    start = SPLIT_STARTS[split] + CLIP_OFFSET + skip
    return list(range(start, start + count))


def generate_clip(seed: int, *, frames: int = 60, fps: float = 10.0, size: tuple[int, int] = (848, 480),
                  signs: Sequence[tuple[str, str | None]] = (), info_texts: Sequence[str] = INFO_TEXTS) -> Clip:
    """A clip of ``frames`` frames at ``fps`` and ``size`` = (width, height); the same arguments give the
    same clip. ``signs``: (sign_class, text) pairs the clip must show, in this order along the road, first
    (text None: drawn at random; pictograms take ""); the clip adds random signs up to its drawn count."""
    world = _World(seed, frames=frames, fps=fps, size=size, forced=signs, info_texts=info_texts)
    rendered = tuple(world.frame(i) for i in range(frames))
    args = {"frames": int(frames), "fps": float(fps), "size": [int(size[0]), int(size[1])],
            "signs": [[c, t] for c, t in signs]}
    return Clip(seed=int(seed), fps=float(fps), size=(int(size[0]), int(size[1])), frames=rendered, args=args)


# --------------------------------------------------------------------------------------------------
# The world along the road


@dataclass(frozen=True)
class _Travelling(Camera):
    """The scene's camera, ``z0`` metres down the road: world depths are measured from the clip's start,
    and a point nearer than NEAR_M is drawn at NEAR_M (exact clipping for the ground-plane rectangles and
    facades along the road: their clipped corners land far outside the frame)."""

    z0: float = 0.0

    def ppm(self, z):
        return self.focal / np.maximum(np.asarray(z, dtype=np.float64) - self.z0, NEAR_M)

    def project(self, x, z, h=0.0) -> np.ndarray:
        ppm = self.ppm(z)
        px = self.vanish_x + (np.asarray(x, dtype=np.float64) - self.cam_x) * ppm
        py = self.horizon + (self.cam_height - np.asarray(h, dtype=np.float64)) * ppm
        px, py = np.broadcast_arrays(px, py)
        return np.column_stack((px.ravel(), py.ravel()))


@dataclass
class _Sign:
    identity: int
    sign_class: str
    text: str
    x: float  # face centre, world metres
    z: float
    h: float
    metres: float  # nominal face height
    width_m: float  # face width as mounted
    overhead: bool
    kerb: float  # x of an overhead sign's post
    pole: tuple[int, int, int]
    pre: np.ndarray  # (h, w, 4) float32 premultiplied RGB + alpha of the posed face, reference size
    nominal_px: float  # the reference face's unposed height: metres at this many pixels


@dataclass
class _Hazard:
    kind: str
    x: float  # at the clip's start, world metres
    z: float
    vx: float  # m/s
    vz: float
    seed: int  # the drawer's own stream: the same shapes and colours in every frame
    flat: bool


class _World:
    def __init__(self, seed: int, *, frames: int, fps: float, size: tuple[int, int],
                 forced: Sequence[tuple[str, str | None]], info_texts: Sequence[str]) -> None:
        width, height = (int(v) for v in size)
        if width < 64 or height < 64:
            raise ValueError(f"clip size {size} is too small (at least 64x64)")
        if frames < 1 or fps <= 0:
            raise ValueError(f"need frames >= 1 and fps > 0, got frames={frames}, fps={fps}")
        for sign_class, text in forced:
            if sign_class not in SIGN_CLASSES:
                raise ValueError(f"unknown sign class {sign_class!r}; classes: {', '.join(SIGN_CLASSES)}")
            if text and sign_class not in TEXT_CLASSES:
                raise ValueError(f"{sign_class} signs print no text, got {text!r}")
        rng = np.random.default_rng([int(seed), _SALT])
        self.size, self.fps, self.frames = (width, height), float(fps), int(frames)
        self.layout = outdoor_layout()
        self.margin = max(4, int(math.ceil(0.03 * height)))  # shake room: the canvas is this much bigger all round
        m = self.margin
        cam = random_camera(rng, width, height)
        self.cam = replace(cam, width=width + 2 * m, height=height + 2 * m, horizon=cam.horizon + m,
                           vanish_x=cam.vanish_x + m)
        self.speed = float(rng.uniform(*SPEED_MPS))
        self.duration = frames / fps
        self.travel = self.speed * self.duration
        self._plan_backdrop(rng)
        self.signs = self._plan_signs(rng, forced, info_texts)
        self.hazards = self._plan_hazards(rng)
        self._plan_camera(rng)

    # ---- the backdrop: backdrop.draw_backdrop's world, laid out along the whole drive

    def _plan_backdrop(self, rng: np.random.Generator) -> None:
        cam = self.cam
        h, w = cam.height, cam.width
        horizon = int(round(cam.horizon))
        base = np.empty((h, w, 3), np.uint8)
        p = Painter(base, np.zeros((h, w), np.uint8))
        self.sky = str(rng.choice(list(backdrop._SKIES), p=[0.45, 0.25, 0.2, 0.1]))
        top, bottom = backdrop._SKIES[self.sky]
        ramp = np.linspace(0.0, 1.0, horizon + 1)[:, None]
        base[: horizon + 1] = (np.asarray(top) * (1 - ramp) + np.asarray(bottom) * ramp).astype(np.uint8)[:, None, :]
        if rng.random() < 0.6:
            backdrop._clouds(p, cam, rng)
        backdrop._skyline(p, cam, rng)  # at the horizon: it does not move
        base[horizon:] = backdrop._jitter(rng, [(150, 145, 135), (150, 140, 100), (110, 130, 80)][int(rng.integers(3))], 12)
        self.base = base
        self.walks = {"left_walk": float(rng.uniform(1.2, 4.0)), "right_walk": float(rng.uniform(1.2, 4.0))}
        self.pavement = backdrop._grey(rng, 172, 20, 8)
        end = self.travel + 260.0  # houses and trees this far down the road: the last frame sees 250 m of them
        self.sides = []
        for side, x in (("left", -self.walks["left_walk"]), ("right", cam.road_width + self.walks["right_walk"])):
            kind = str(rng.choice(["houses", "trees", "open"], p=[0.6, 0.25, 0.15]))
            if kind == "houses":
                depths = rng.uniform(3.5, 6.5, int(end / 3.5) + 2)
                starts = -8.0 + np.concatenate([[0.0], np.cumsum(depths)[:-1]])
                keep = starts < end
                starts, depths = starts[keep], depths[keep]
                n = starts.size
                self.sides.append(("houses", x, {
                    "starts": starts, "ends": starts + depths, "floors": rng.integers(2, 6, n),
                    "colours": [backdrop._jitter(rng, backdrop._FACADES[int(c)], 16)
                                for c in rng.integers(0, len(backdrop._FACADES), n)],
                    "bands": rng.integers(0, len(backdrop._SHOP_BANDS), n),
                    "far": backdrop._jitter(rng, (170, 165, 160), 20), "end": float(starts[-1] + depths[-1]),
                }))
            elif kind == "trees":
                x_tree = x + (0.8 if side == "left" else -0.8)
                zs = -4.0 + np.cumsum(rng.uniform(5.0, 12.0, int(end / 5.0) + 2))
                trees = []
                for z in zs[zs < end]:
                    height_m = float(rng.uniform(3.0, 6.0))
                    green = backdrop._jitter(rng, (60, 110, 50), 20)
                    blobs = [(float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-0.5, 1.5)), float(rng.uniform(1.0, 2.0)),
                              backdrop._jitter(rng, green, 12)) for _ in range(5)]
                    trees.append((float(z), height_m, blobs))
                self.sides.append(("trees", x_tree, trees))
        self._plan_road(rng)
        x_left, x_right = -self.walks["left_walk"], cam.road_width + self.walks["right_walk"]
        self.shadows = None
        if rng.random() < 0.45:
            bands = []
            z, from_left = -5.0, rng.random() < 0.5
            while z < self.travel + 90:
                length = float(rng.uniform(3, 15))
                reach = float(rng.uniform(0.2, 0.9)) * (x_right - x_left)
                xa, xb = (x_left, x_left + reach) if from_left else (x_right - reach, x_right)
                if rng.random() < 0.7:
                    bands.append((xa, xb, z, z + length))
                z += length + float(rng.uniform(1, 10))
            self.shadows = (bands, float(rng.uniform(0.25, 0.45)))
        self.wires = []
        if rng.random() < 0.4:
            xs = np.linspace(x_left, x_right, 24)
            sag = 0.8 * (1 - ((xs - xs.mean()) / (xs[-1] - xs.mean())) ** 2)
            z = float(rng.uniform(2, 12))
            while z < self.travel + 60:
                self.wires.append((xs, z + np.linspace(0, rng.uniform(-6, 6), 24), float(rng.uniform(6.5, 9.0)) - sag))
                z += float(rng.uniform(6, 16))

    def _plan_road(self, rng: np.random.Generator) -> None:
        rw = self.cam.road_width
        self.asphalt = backdrop._grey(rng, 105, 25, 5)
        self.kerb = (200, 200, 195) if rng.random() < 0.7 else (230, 200, 40)
        self.edge_lines = rng.random() < 0.8
        lanes = int(rng.integers(2, 4))
        centre = str(rng.choice(["dashed", "double_yellow", "none"], p=[0.6, 0.25, 0.15]))
        self.solid, self.dashes = [], []
        for k in range(1, lanes):
            x = rw * k / lanes
            if centre == "double_yellow" and k == lanes // 2:
                self.solid += [(x + dx - 0.06, x + dx + 0.06) for dx in (-0.12, 0.12)]
            elif centre != "none":
                self.dashes.append((x, float(rng.uniform(0, 9))))
        self.lanes = None if centre == "none" else lanes

    def _draw_backdrop(self, p: Painter, cam: _Travelling) -> None:
        z0, rw = cam.z0, cam.road_width
        near, far = z0 + NEAR_M, z0 + FAR
        p.poly(cam.quad(-self.walks["left_walk"], 0, near, far), self.pavement)
        p.poly(cam.quad(rw, rw + self.walks["right_walk"], near, far), self.pavement)
        for kind, x, plan in self.sides:
            if kind == "houses":
                self._draw_houses(p, cam, x, plan)
            else:
                for z, height_m, blobs in reversed(plan):
                    if not z0 + 2.0 < z < z0 + 150:
                        continue
                    ppm = float(cam.ppm(z))
                    base = cam.project(x, z)[0]
                    p.poly(cam.frontal(x - 0.15, x + 0.15, z, 0, height_m), (90, 70, 50))
                    for dx, dh, r, colour in blobs:
                        p.ellipse((base[0] + dx * ppm, base[1] - (height_m + dh) * ppm), (r * ppm, r * ppm * 0.8), colour)
        p.poly(cam.quad(0, rw, near, far), self.asphalt)
        for x in (0.0, rw):
            p.poly(cam.project([x - 0.15, x + 0.15, x + 0.15, x - 0.15], [near, near, far, far], [0.15] * 4), self.kerb)
            p.poly(cam.facade(x, near, far, 0, 0.15), tuple(int(v * 0.7) for v in self.kerb))
        white = (235, 235, 230)
        if self.edge_lines:
            for x in (0.25, rw - 0.25):
                p.poly(cam.quad(x - 0.07, x + 0.07, near, far), white)
        for x1, x2 in self.solid:
            p.poly(cam.quad(x1, x2, near, far), (230, 190, 40))
        for x, phase in self.dashes:
            first = -phase + 9.0 * (math.floor((z0 + phase) / 9.0) - 1)  # dashes at world z = -phase + 9 k
            starts = np.arange(first, z0 + 120, 9.0)
            p.polys([cam.quad(x - 0.07, x + 0.07, max(z, near), z + 3.0) for z in starts if z + 3.0 > near], white)
        if self.shadows is not None:
            self._draw_shadows(p, cam)
        for xs, zs, hs in self.wires:
            if zs.min() > z0 + 2.0:
                p.polyline(cam.project(xs, zs, hs), (40, 40, 45), 1)

    def _draw_houses(self, p: Painter, cam: _Travelling, x: float, plan: dict) -> None:
        """backdrop._houses at the camera's place: a facade per plot, shopfronts, shop-sign bands and windows
        on the near ones, a plain block beyond the last plot."""
        z0 = cam.z0
        starts, ends = plan["starts"], plan["ends"]
        seen = (ends > z0 + NEAR_M) & (starts < z0 + 250.0)
        idx = np.flatnonzero(seen)
        if plan["end"] < z0 + FAR:
            p.poly(cam.facade(x, max(plan["end"], z0 + NEAR_M), z0 + FAR, 0, 10), plan["far"])
        if idx.size == 0:
            return
        a, b = starts[idx], ends[idx]
        floors = plan["floors"][idx]
        n = idx.size
        walls = cam.project(x, np.stack([a, b, b, a], 1),
                            np.stack([np.zeros(n), np.zeros(n), floors * 3.2, floors * 3.2], 1)).reshape(n, 4, 2)
        for i in range(n - 1, -1, -1):  # far first (backdrop draws near first: its facades never overlap)
            p.poly(walls[i], plan["colours"][idx[i]])
        near = a < z0 + 70
        p.polys(backdrop._facades(cam, x, a[near] + 0.3, b[near] - 0.3, 0.2, 2.6), (55, 50, 48))
        bands = plan["bands"][idx]
        for k in range(len(backdrop._SHOP_BANDS)):
            sel = near & (bands == k)
            p.polys(backdrop._facades(cam, x, a[sel] + 0.1, b[sel] - 0.1, 2.7, 3.4), backdrop._SHOP_BANDS[k])
        windows = [backdrop._facades(cam, x, a[near & (floors > f)] + 0.8, b[near & (floors > f)] - 0.8,
                                     f * 3.2 + 0.9, f * 3.2 + 2.4) for f in range(1, 5)]
        p.polys(np.concatenate(windows), (60, 70, 80))

    def _draw_shadows(self, p: Painter, cam: _Travelling) -> None:
        bands, strength = self.shadows
        z0 = cam.z0
        polys = [cam.quad(xa, xb, max(za, z0 + NEAR_M), zb) for xa, xb, za, zb in bands
                 if zb > z0 + NEAR_M and za < z0 + 80]
        if not polys:
            return
        top = int(cam.horizon)
        mask = np.zeros(p.image.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.round(q * 16).astype(np.int32) for q in polys], 255, cv2.LINE_AA, 4)
        factor = 255 - (mask[top:].astype(np.uint16) * int(strength * 255) // 255).astype(np.uint8)
        ground = p.image[top:]
        cv2.multiply(ground, cv2.merge([factor, factor, factor]), dst=ground, scale=1 / 255)

    # ---- signs

    def _plan_signs(self, rng: np.random.Generator, forced: Sequence[tuple[str, str | None]],
                    info_texts: Sequence[str]) -> list[_Sign]:
        cam, k = self.cam, self.size[1] / 480
        count = max(len(forced), int(rng.integers(SIGN_COUNT[0], SIGN_COUNT[1] + 1)))
        weights = np.array([CLIP_SIGN_WEIGHTS[c] for c in SIGN_CLASSES])
        drawn = [str(c) for c in rng.choice(SIGN_CLASSES, size=count, p=weights / weights.sum())]
        wanted = [(c, t) for c, t in forced] + [(c, None) for c in drawn[len(forced):]]
        planned = [self._plan_sign(identity, sign_class, text, np.random.default_rng(rng.integers(2**63)), k, info_texts)
                   for identity, (sign_class, text) in enumerate(wanted)]
        # Along the road: the first sign is FIRST_SIGN_PX high in the first frame, the last passes the camera
        # before the clip ends (about 8 m before it), the rest between, SIGN_GAP_M apart or more. A short clip
        # drops drawn signs that do not fit, then packs the forced ones closer.
        first = planned[0].metres * cam.focal / float(rng.uniform(*FIRST_SIGN_PX))
        last = max(first, self.travel + 8.0)
        fits = int((last - first) / SIGN_GAP_M) + 1
        planned = planned[: max(len(forced), min(len(planned), fits), 1)]
        gap = min(SIGN_GAP_M, (last - first) / max(len(planned) - 1, 1))
        room = max(0.0, last - first - gap * (len(planned) - 1))
        spare = np.sort(rng.uniform(0, room, len(planned) - 1))
        zs = first + np.concatenate([[0.0], spare + gap * np.arange(1, len(planned))])
        for sign, z in zip(planned, zs):
            sign.z = float(z)
        return planned

    def _plan_sign(self, identity: int, sign_class: str, text: str | None, rng: np.random.Generator,
                   k: float, info_texts: Sequence[str]) -> _Sign:
        """A sign's face, size and place across the road (its place along the road: _plan_signs)."""
        cam = self.cam
        rw = cam.road_width
        reference = int(round(140 * k))  # rendered once this big (nominal height), shrunk per frame
        if sign_class == "speed_limit":
            text = str(text) if text else str(rng.choice(SPEED_LIMITS))
            face, metres, nominal = signs.circle_sign(sign_class, reference, rng, text), 0.7, reference
        elif sign_class in _CIRCLES:
            text = ""
            face, metres, nominal = signs.circle_sign(sign_class, reference, rng), 0.7, reference
        elif sign_class in _TRIANGLES:
            text = ""
            side = int(round(reference / 0.88))
            face, metres, nominal = signs.triangle_sign(sign_class, side), 0.6, int(round(side * 0.88))
        else:
            text = str(text) if text else str(info_texts[int(rng.integers(len(info_texts)))])
            lines = _split_lines(text, rng)
            colour = signs.BLUE if rng.random() < 0.6 else signs.GREEN
            face = signs.info_sign(lines, int(round(reference / (1.0 + 0.9 * len(lines)))), colour)
            text, metres, nominal = " ".join(lines), 0.35 + 0.35 * len(lines), face.alpha.shape[0]
        face = _pose(face, rng, sign_class)
        metres *= float(rng.uniform(*(INFO_SCALE if sign_class == "info" else SIGN_SCALE)))
        fh, fw = face.alpha.shape
        width_m = fw * metres / nominal
        overhead = rng.random() < OVERHEAD and width_m < 0.8 * rw
        near = "left" if cam.cam_x < rw / 2 else "right"
        side = near if rng.random() < NEAR_SIDE else ("right" if near == "left" else "left")
        if overhead:
            x = float(rng.uniform(0.3, 0.7)) * rw
            h = max(4.5, cam.cam_height + 1.5) + float(rng.uniform(0.0, 0.6)) + metres / 2
            kerb = -0.3 if side == "left" else rw + 0.3
        else:
            walk = self.walks["left_walk" if side == "left" else "right_walk"]
            # On the pavement, clear of the kerb and of the house fronts behind it where there is room.
            offset = float(rng.uniform(0.4, max(0.5, min(walk, 2.0 + width_m / 2) - 0.15 - width_m / 2))) + width_m / 2
            x = -offset if side == "left" else rw + offset
            h = max(ROADSIDE_MIN_M, cam.cam_height + float(rng.uniform(*ROADSIDE_ABOVE_CAMERA_M))) + metres / 2
            kerb = x
        pole = (150, 150, 150) if rng.random() < 0.7 else (90, 90, 95)
        a = face.alpha[..., None].astype(np.float32)
        pre = np.concatenate([face.rgb.astype(np.float32) * (a / 255.0), a], axis=2)
        return _Sign(identity, sign_class, text, x, 0.0, h, metres, width_m, overhead, kerb, pole, pre, float(nominal))

    def _draw_sign(self, p: Painter, cam: _Travelling, sign: _Sign, label: int) -> tuple | None:
        """Pole and face of ``sign`` (far ones: face only, no post drawn thinner than a pixel matters);
        returns (face box on the canvas, face pixels) or None when it is too small or behind."""
        zr = sign.z - cam.z0
        if zr < NEAR_M * 2:
            return None
        ppm = float(cam.focal / zr)
        scale = sign.metres * ppm / sign.nominal_px
        fh, fw = sign.pre.shape[:2]
        w, h = int(round(fw * scale)), int(round(fh * scale))
        if h < DRAW_MIN_PX or w < 2:
            return None
        cx, cy = cam.project(sign.x, sign.z, sign.h)[0]
        x, y = int(round(cx - w / 2)), int(round(cy - h / 2))
        ch, cw = p.labels.shape
        if x >= cw or y >= ch or x + w <= 0 or y + h <= 0:
            return None
        self._draw_pole(p, cam, sign, ppm)
        small = cv2.resize(sign.pre, (w, h), interpolation=cv2.INTER_AREA)
        alpha = small[..., 3]
        rgb = small[..., :3] / np.maximum(alpha[..., None] / 255.0, 1e-3)
        face = alpha >= 128
        rows, cols = np.flatnonzero(face.any(axis=1)), np.flatnonzero(face.any(axis=0))
        if rows.size == 0:
            return None
        # Paste the part inside the canvas.
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
        sub = (slice(y1 - y, y2 - y), slice(x1 - x, x2 - x))
        a = alpha[sub][..., None] / 255.0
        region = p.image[y1:y2, x1:x2]
        region[:] = np.clip(region * (1.0 - a) + rgb[sub] * a + 0.5, 0, 255).astype(np.uint8)
        p.labels[y1:y2, x1:x2][face[sub]] = label
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        return box, int(face.sum())

    def _draw_pole(self, p: Painter, cam: _Travelling, sign: _Sign, ppm: float) -> None:
        """scene._pole in world metres: a post under the face (two under a wide one), or a post beside the
        kerb with a cantilever arm for a face over the roadway."""
        width = max(2.0 / ppm, 0.08)

        def post(x: float, to: float) -> None:
            p.poly(cam.frontal(x - width / 2, x + width / 2, sign.z, 0.0, to), sign.pole, 0)

        if sign.overhead:
            arm = sign.h + 0.25 * sign.metres
            post(sign.kerb, arm + width)
            for level in (arm, sign.h - 0.25 * sign.metres):
                a, b = sorted((sign.kerb, sign.x))
                p.poly(cam.frontal(a, b, sign.z, level - width / 2, level + width / 2), sign.pole, 0)
            return
        if sign.width_m < 2.2 * sign.metres:
            post(sign.x, sign.h)
        else:
            for f in (-0.3, 0.3):
                post(sign.x + f * sign.width_m, sign.h)

    # ---- hazards

    def _plan_hazards(self, rng: np.random.Generator) -> list[_Hazard]:
        cam0 = self.cam  # a plain Camera for hazards.place: depths from the clip's start
        rw, cx = cam0.road_width, cam0.cam_x
        length = self.travel + 60.0
        count = int(rng.poisson(rng.uniform(*HAZARDS_PER_100M) * length / 100.0))
        planned = []
        for kind in rng.choice(hazards.HAZARDS, size=count):
            kind = str(kind)
            spot = hazards.place(kind, cam0, rng, self.walks)
            z = float(rng.uniform(6.0, length))
            x, vx, vz = spot.x, 0.0, 0.0
            seed = int(rng.integers(2**63))
            if kind == "Vehicle":
                x, z, vx, vz = self._drive(_vehicle_kind(seed), x, z, rng)
            elif kind == "Creature":
                vx = float(rng.uniform(-0.9, 0.9)) if rng.random() < 0.6 else 0.0
                x = self._clear_of_lane(x, rng, rw)
                end = x + vx * self.duration
                if min(x, end) < cx + LANE_CLEAR_M and max(x, end) > cx - LANE_CLEAR_M:
                    vx = 0.0  # would walk into the camera's path: stands
            elif kind in ("Wall", "Fence"):
                width = float(np.random.default_rng(seed).uniform(2.0, 6.0))  # the drawer's first draw
                left, right = cx - LANE_CLEAR_M - width / 2, cx + LANE_CLEAR_M + width / 2
                x = float(rng.uniform(-1.0, left)) if (rng.random() < 0.5 and left > -1.0 + width / 2) else \
                    float(rng.uniform(right, right + 2.0))
                x1 = float(np.clip(x - width / 2, -1.0, rw + 1.0 - width))
                if x1 < cx + LANE_CLEAR_M and x1 + width > cx - LANE_CLEAR_M:
                    continue  # no room beside the camera's path on this road
            elif kind not in _FLAT:
                x = self._clear_of_lane(x, rng, rw)
            planned.append(_Hazard(kind, float(x), z, vx, vz, seed, kind in _FLAT))
        return planned

    def _drive(self, kind: str, x: float, z: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """(x, z, vx, vz) of a vehicle the drawer shows as ``kind``: seen from behind it drives on ahead
        (as fast as the camera or faster in the camera's lane), seen from the front it comes the other way
        in a far lane, seen from the side it crosses the road well ahead of the camera."""
        rw, cx = self.cam.road_width, self.cam.cam_x
        if kind == "side_car":
            vx = float(rng.uniform(3.0, 5.0)) * (1 if rng.random() < 0.5 else -1)
            x0 = -2.5 if vx > 0 else rw + 2.5
            t_out = float(rng.uniform(0.0, self.duration))  # the time it has left the roadway
            t_in = t_out - (rw + 5.0) / abs(vx)
            return x0 - vx * t_in, self.speed * t_out + float(rng.uniform(14.0, 35.0)), vx, 0.0
        if kind == "car_front":
            far = [v for v in (rw * 0.25, rw * 0.75) if abs(v - cx) >= 2.0] or [0.8 if cx > rw / 2 else rw - 0.8]
            return float(rng.choice(far)), z + 0.5 * self.travel, 0.0, -self.speed * float(rng.uniform(0.4, 1.0))
        if abs(x - cx) < 2.3:  # too near the camera's path to be overtaken: keeps its distance or pulls away
            return x, float(rng.uniform(10.0, 45.0)), 0.0, self.speed * float(rng.uniform(1.0, 1.2))
        return x, z, 0.0, self.speed * float(rng.uniform(0.3, 1.1))

    def _clear_of_lane(self, x: float, rng: np.random.Generator, rw: float) -> float:
        cx = self.cam.cam_x
        for _ in range(10):
            if abs(x - cx) >= LANE_CLEAR_M:
                return x
            x = float(rng.uniform(-0.5, rw + 0.5))
        return cx - LANE_CLEAR_M if cx - LANE_CLEAR_M > -0.5 else cx + LANE_CLEAR_M

    # ---- camera motion, light and effects

    def _plan_camera(self, rng: np.random.Generator) -> None:
        self.shake = float(rng.uniform(0.3, 2.5))  # px, the road's roughness
        self.shake_f = (float(rng.uniform(0.4, 1.4)), float(rng.uniform(1.5, 3.0)))
        self.shake_phase = rng.uniform(0, 2 * np.pi, 4)
        self.sway = (float(rng.uniform(0.0, 0.25)), float(rng.uniform(0.08, 0.25)), float(rng.uniform(0, 2 * np.pi)))
        self.jolts = [(h.z / self.speed, float(rng.uniform(5.0, 10.0))) for h in self.hazards if h.kind in _JOLTS]
        self.swerves = [(float(rng.uniform(0, self.duration)), float(rng.choice([-1.0, 1.0])) * float(rng.uniform(4, 8)))
                        for _ in range(int(rng.integers(0, 3)))]
        # Rough stretches of road: the camera vibrates (5-8 Hz) for a second or so, and blurs.
        self.rough = [(float(rng.uniform(0, self.duration)), float(rng.uniform(0.5, 1.5)), float(rng.uniform(2.5, 4.5)),
                       float(rng.uniform(5.0, 8.0)), float(rng.uniform(0, 2 * np.pi)))
                      for _ in range(int(rng.integers(1, 3)) if rng.random() < ROUGH else 0)]
        self.exposure = float(rng.uniform(0.4, 0.9))  # of the frame interval
        self.luts = (lighting_lut(rng).astype(np.float32), lighting_lut(rng).astype(np.float32))
        self.blur = float(rng.uniform(0.0, 1.0)) if rng.random() < 0.6 else 0.0
        self.noise = float(rng.uniform(0.5, 3.0))  # less than a scene's (1-7): a video encoder smooths it away
        self.jpeg = int(rng.integers(60, 96))
        self.noise_offsets = rng.integers(0, _NOISE_MARGIN, (self.frames, 2))

    def _offset(self, t: float) -> tuple[float, float]:
        """Where the frame sits in the canvas at time ``t``: (dx, dy) px from the centre."""
        f1, f2 = self.shake_f
        ph = self.shake_phase
        dy = self.shake * (math.sin(2 * math.pi * f1 * t + ph[0]) + 0.5 * math.sin(2 * math.pi * f2 * t + ph[1]))
        dx = 0.4 * self.shake * math.sin(2 * math.pi * 0.7 * f1 * t + ph[2])
        for t0, strength in self.jolts:
            if t >= t0:
                s = t - t0
                dy += strength * math.exp(-s / 0.3) * math.sin(2 * math.pi * 2.5 * s)
        for t0, length, strength, freq, phase in self.rough:
            if t0 <= t <= t0 + length:
                dy += strength * math.sin(math.pi * (t - t0) / length) * math.sin(2 * math.pi * freq * t + phase)
        for t0, strength in self.swerves:  # a quick steering correction: the view slews sideways and back
            s = (t - t0) / 0.35
            dx += strength * math.exp(-s * s)
        limit = self.margin - 1
        return float(np.clip(dx, -limit, limit)), float(np.clip(dy, -limit, limit))

    def _effects(self, image: np.ndarray, index: int) -> np.ndarray:
        t = index / self.fps
        a = 0.5 - 0.5 * math.cos(math.pi * min(1.0, t / max(self.duration, 1e-6)))  # smooth, start to end
        lut = np.clip((1 - a) * self.luts[0] + a * self.luts[1] + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(image, lut)
        # Motion blur: how far the shake moves the image during the exposure.
        dt = self.exposure / self.fps
        (x0, y0), (x1, y1) = self._offset(t - dt / 2), self._offset(t + dt / 2)
        mx, my = abs(x1 - x0), abs(y1 - y0)
        streak = max(mx, my)
        if streak >= SHAKE_BLUR_MIN_PX:
            n = min(MAX_BLUR_PX, int(round(streak)))
            n += 1 - n % 2
            kernel = np.zeros((n, n), np.float32)
            if my >= mx:
                kernel[:, n // 2] = 1.0
            else:
                kernel[n // 2, :] = 1.0
            out = cv2.filter2D(out, -1, kernel / kernel.sum())
        elif self.blur > 0.3:
            out = cv2.GaussianBlur(out, (0, 0), self.blur)
        h, w = out.shape[:2]
        oy, ox = (int(v) for v in self.noise_offsets[index])
        bank = _noise_bank(h, w)[oy : oy + h, ox : ox + w]
        k = self.noise / _NOISE_SIGMA
        out = cv2.addWeighted(out, 1.0, bank, k, -128.0 * k)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    # ---- one frame

    def frame(self, index: int) -> ClipFrame:
        t = index / self.fps
        amp, freq, phase = self.sway
        cam = _Travelling(**{f: getattr(self.cam, f) for f in Camera.__dataclass_fields__},
                          z0=self.speed * t)
        cam = replace(cam, cam_x=cam.cam_x + amp * math.sin(2 * math.pi * freq * t + phase))
        ch, cw = cam.height, cam.width
        image = self.base.copy()
        labels = np.zeros((ch, cw), np.uint8)
        p = Painter(image, labels)
        self._draw_backdrop(p, cam)

        objects: list[str] = []
        standing = []  # (depth, kind, thing)
        flats = []
        for hz in self.hazards:
            x, z = hz.x + hz.vx * t, hz.z + hz.vz * t
            if hz.kind == "Creature":  # walks to the edge of the pavement and stops there
                x = float(np.clip(x, 0.3 - self.walks["left_walk"], cam.road_width + self.walks["right_walk"] - 0.3))
            zr = z - cam.z0
            if zr > 110 or (hz.flat and zr < -8) or (not hz.flat and zr < 2.0):
                continue
            if hz.vx and not -2.5 <= x <= cam.road_width + 2.5:  # a crossing car still (or again) off the street
                continue
            (flats if hz.flat else standing).append((zr, "hazard", (hz, x, z)))
        for sign in self.signs:
            zr = sign.z - cam.z0
            if 2.0 <= zr <= 200:
                standing.append((zr, "sign", sign))
        flats.sort(key=lambda item: ({"ZebraCrossing": 0, "Bump": 0, "Dent": 1}[item[2][0].kind], -item[0]))
        standing.sort(key=lambda item: -item[0])
        drawn_signs = []
        for _, kind, thing in flats + standing:
            if kind == "hazard":
                hz, x, z = thing
                objects.append(hz.kind)
                hazards.draw(p, cam, np.random.default_rng(hz.seed), hazards.Placement(hz.kind, x, z, hz.flat), len(objects))
            else:
                objects.append("TrafficSign")
                placed = self._draw_sign(p, cam, thing, len(objects))
                if placed is not None:
                    drawn_signs.append((thing, len(objects), *placed))

        dx, dy = self._offset(t)
        m = self.margin
        ox, oy = m + int(round(dx)), m + int(round(dy))
        width, height = self.size
        frame_labels = labels[oy : oy + height, ox : ox + width]
        cells = cell_truth(frame_labels, objects, self.layout)
        listed = []
        for sign, label, box, area in drawn_signs:
            x1, y1, x2, y2 = box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
            if x2 - x1 < 2 or y2 - y1 < MIN_SIGN_PX:
                continue
            visible = int((frame_labels[y1:y2, x1:x2] == label).sum())
            if visible < MIN_VISIBLE * area:
                continue
            occluded = round(max(0.0, 1.0 - visible / max(area, 1)), 4)
            listed.append(SignInClip(sign.identity, (float(x1), float(y1), float(x2), float(y2)),
                                     sign.sign_class, sign.text, occluded))
        listed.sort(key=lambda s: s.identity)
        picture = self._effects(np.ascontiguousarray(image[oy : oy + height, ox : ox + width]), index)
        return ClipFrame(index=index, time_s=index / self.fps, image=picture, signs=tuple(listed), cells=cells)


def _vehicle_kind(seed: int) -> str:
    """What hazards._vehicle draws from the stream ``seed`` (its first draw)."""
    return str(np.random.default_rng(seed).choice(["car", "car_front", "truck", "motorbike", "side_car"],
                                                  p=[0.3, 0.15, 0.15, 0.27, 0.13]))


# --------------------------------------------------------------------------------------------------
# Files


def truth_json(clip: Clip) -> dict:
    """The clip's ground truth as JSON-ready data (no images): cells as [cell, class_index] pairs."""
    layout = outdoor_layout()
    return {
        "seed": clip.seed,
        "fps": clip.fps,
        "size": list(clip.size),
        "args": clip.args,
        "cell_classes": list(layout.classes),
        "cells_shape": list(clip.frames[0].cells.shape) if clip.frames else [layout.num_cells, len(layout.classes)],
        "frames": [
            {
                "index": f.index,
                "time_s": f.time_s,
                "signs": [{"identity": s.identity, "box": list(s.box), "sign_class": s.sign_class, "text": s.text,
                           "occluded": s.occluded} for s in f.signs],
                "cells": np.argwhere(f.cells).tolist(),
            }
            for f in clip.frames
        ],
    }


def write_clip(clip: Clip, video_path) -> Path:
    """The clip as an MPEG-4 video (OpenCV's 'mp4v') at ``video_path`` and its truth beside it (same stem,
    .json); the video is read back and must hold every frame at the clip's size. Returns the video's path."""
    path = Path(video_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = clip.size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), clip.fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an mp4v video to {path}")
    try:
        for frame in clip.frames:
            writer.write(cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    count, shape = _count_frames(path)
    if count != len(clip.frames) or (count and shape != (height, width)):
        raise RuntimeError(f"{path}: read back {count} frames of {shape}, wrote {len(clip.frames)} of {(height, width)}")
    path.with_suffix(".json").write_text(json.dumps(truth_json(clip), ensure_ascii=False, separators=(",", ":")) + "\n",
                                         encoding="utf-8")
    return path


def _count_frames(path: Path) -> tuple[int, tuple[int, int] | None]:
    capture = cv2.VideoCapture(str(path))
    count, shape = 0, None
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            count, shape = count + 1, image.shape[:2]
    finally:
        capture.release()
    return count, shape


def read_frames(video_path) -> list[np.ndarray]:
    """The video's frames, (H, W, 3) uint8 RGB."""
    capture = cv2.VideoCapture(str(video_path))
    frames = []
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return frames


def read_truth(json_path) -> Clip:
    """A truth file written by :func:`write_clip` -> its Clip, every frame's image None."""
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    shape = tuple(data["cells_shape"])
    frames = []
    for f in data["frames"]:
        cells = np.zeros(shape, bool)
        if f["cells"]:
            pairs = np.asarray(f["cells"], np.int64)
            cells[pairs[:, 0], pairs[:, 1]] = True
        signs_ = tuple(SignInClip(int(s["identity"]), tuple(float(v) for v in s["box"]), str(s["sign_class"]),
                                  str(s["text"]), float(s["occluded"])) for s in f["signs"])
        frames.append(ClipFrame(index=int(f["index"]), time_s=float(f["time_s"]), image=None, signs=signs_, cells=cells))
    return Clip(seed=int(data["seed"]), fps=float(data["fps"]), size=(int(data["size"][0]), int(data["size"][1])),
                frames=tuple(frames), args=dict(data.get("args", {})))


# --------------------------------------------------------------------------------------------------
# The committed clips

CLIPS_DIR = DATA_DIR / "clips"

#: The clips in festival_serve/data/clips/: name -> generate_clip arguments. Held-out seeds:
#: clip_seeds("test", 3) = 14_000_000, 14_000_001, 14_000_002; 70 frames (7 s) at 10 fps, 848x480.
COMMITTED: dict[str, dict] = {
    "road_a": {"seed": 14_000_000, "frames": 70, "fps": 10.0, "size": (848, 480),
               "signs": (("speed_limit", "50"), ("info", "BẾN XE"))},
    "road_b": {"seed": 14_000_001, "frames": 70, "fps": 10.0, "size": (848, 480), "signs": ()},
    "road_c": {"seed": 14_000_002, "frames": 70, "fps": 10.0, "size": (848, 480), "signs": ()},
}


def committed_clip(name: str) -> Clip:
    """The committed clip ``name`` (a key of COMMITTED), generated afresh."""
    args = dict(COMMITTED[name])
    return generate_clip(args.pop("seed"), **args)


def write_committed(out=CLIPS_DIR) -> list[Path]:
    """Regenerate every committed clip into ``out`` (NAME.mp4 + NAME.json); deterministic."""
    return [write_clip(committed_clip(name), Path(out) / f"{name}.mp4") for name in COMMITTED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the committed synthetic road clips (video + truth JSON).")
    parser.add_argument("--out", type=Path, default=CLIPS_DIR, help=f"folder (default {CLIPS_DIR})")
    args = parser.parse_args(argv)
    for path in write_committed(args.out):
        print(f"{path} ({path.stat().st_size / 1e6:.2f} MB) + {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
