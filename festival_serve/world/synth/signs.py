"""Vietnamese road signs (QCVN 41 families) rendered as small RGBA patches.

Every sign is drawn with PIL at twice its final size and shrunk with area interpolation, which
anti-aliases the rings, pictograms and text. Text uses the bundled DejaVu Sans Bold, which has
every precomposed Vietnamese letter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from festival_serve import DATA_DIR

FONT_PATH = DATA_DIR / "synth" / "DejaVuSans-Bold.ttf"
_SS = 2  # supersampling factor

RED = (200, 20, 30)
BLUE = (20, 75, 170)
GREEN = (0, 115, 65)
YELLOW = (250, 200, 0)
WHITE = (245, 245, 245)
BLACK = (20, 20, 20)


@dataclass(frozen=True)
class Face:
    rgb: np.ndarray  # (h, w, 3) uint8
    alpha: np.ndarray  # (h, w) uint8 coverage: the face is alpha >= 128
    text_box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 of the printed text, pixels


@functools.lru_cache(maxsize=128)
def font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), px)


def _canvas(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, size: tuple[int, int], text_box=None) -> Face:
    """Supersampled RGBA (and the text's box in its pixels) -> a Face of ``size`` (w, h)."""
    rgba = np.asarray(img)
    # Premultiplied so transparent pixels' (black) colour does not bleed into the edges.
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    pre = np.concatenate([rgba[..., :3] * a, a * 255.0], axis=2)
    small = cv2.resize(pre, size, interpolation=cv2.INTER_AREA)
    alpha = small[..., 3]
    rgb = small[..., :3] / np.maximum(alpha[..., None] / 255.0, 1e-3)
    if text_box is not None:
        sx, sy = size[0] / img.width, size[1] / img.height
        text_box = (text_box[0] * sx, text_box[1] * sy, text_box[2] * sx, text_box[3] * sy)
    return Face(np.clip(rgb, 0, 255).astype(np.uint8), np.clip(alpha, 0, 255).astype(np.uint8), text_box)


def _disc(d: ImageDraw.ImageDraw, c: float, r: float, fill) -> None:
    d.ellipse([c - r, c - r, c + r, c + r], fill=fill)


def _slash(d: ImageDraw.ImageDraw, c: float, r: float, width: float, angle_deg: float = 45) -> None:
    a = math.radians(angle_deg)
    dx, dy = r * math.cos(a), r * math.sin(a)
    d.line([(c - dx, c - dy), (c + dx, c + dy)], fill=RED, width=int(width))


def _arrow(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], width: float, head: float, fill) -> None:
    """A polyline shaft with a triangular head at its last point."""
    d.line(pts, fill=fill, width=int(width), joint="curve")
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    ang = math.atan2(y1 - y0, x1 - x0)
    tip = (x1 + math.cos(ang) * head * 0.9, y1 + math.sin(ang) * head * 0.9)
    left = (x1 + math.cos(ang + 2.2) * head, y1 + math.sin(ang + 2.2) * head)
    right = (x1 + math.cos(ang - 2.2) * head, y1 + math.sin(ang - 2.2) * head)
    d.polygon([tip, left, right], fill=fill)


def circle_sign(kind: str, diameter: int, rng: np.random.Generator, text: str = "") -> Face:
    s = diameter * _SS
    img, d = _canvas(s, s)
    c, r = s / 2, s / 2 - 0.5
    ring = 0.11 * s
    text_box = None
    if kind in ("speed_limit", "no_turn"):
        _disc(d, c, r, RED)
        _disc(d, c, r - ring, WHITE)
    elif kind in ("no_parking", "no_stopping"):
        _disc(d, c, r, RED)
        _disc(d, c, r - ring, BLUE)
    elif kind == "no_entry":
        _disc(d, c, r, RED)
        d.rectangle([c - 0.36 * s, c - 0.09 * s, c + 0.36 * s, c + 0.09 * s], fill=WHITE)
    elif kind == "mandatory":
        _disc(d, c, r, BLUE)
        _disc(d, c, r - 0.03 * s, BLUE)
        _mandatory_arrow(d, c, s, str(rng.choice(["up", "left", "right", "keep_right", "keep_left"])))
    if kind == "speed_limit":
        text_box = _tight_text(d, c, c, text, font(int(0.5 * s)), tracking=-0.06)
    elif kind == "no_parking":
        _slash(d, c, r - ring, 0.09 * s)
    elif kind == "no_stopping":
        _slash(d, c, r - ring, 0.09 * s, 45)
        _slash(d, c, r - ring, 0.09 * s, 135)
    elif kind == "no_turn":
        sign = 1 if rng.random() < 0.5 else -1  # no left turn (1) or no right turn (-1)
        stem = c + sign * 0.1 * s
        _arrow(d, [(stem, c + 0.28 * s), (stem, c - 0.02 * s), (c - sign * 0.12 * s, c - 0.02 * s)], 0.09 * s, 0.15 * s, BLACK)
        _slash(d, c, r - ring, 0.08 * s, 45 if sign > 0 else 135)
    return _finish(img, (diameter, diameter), text_box)


def _tight_text(d: ImageDraw.ImageDraw, cx: float, cy: float, text: str, f: ImageFont.FreeTypeFont, tracking: float) -> tuple:
    """``text`` centred on (cx, cy) with its letters ``tracking`` em closer than the font sets them:
    speed-limit numerals are narrow and close, and a recogniser reads "7 0" across DejaVu's wide gap."""
    advances = [f.getlength(ch) + tracking * f.size for ch in text]
    x = left = cx - (sum(advances) - tracking * f.size) / 2
    top, bottom = f.getbbox(text, anchor="lm")[1::2]
    for ch, adv in zip(text, advances):
        d.text((x, cy), ch, fill=BLACK, font=f, anchor="lm")
        x += adv
    return left, cy + top, x - tracking * f.size, cy + bottom


def _mandatory_arrow(d: ImageDraw.ImageDraw, c: float, s: float, kind: str) -> None:
    w, head = 0.1 * s, 0.16 * s
    if kind == "up":
        _arrow(d, [(c, c + 0.3 * s), (c, c - 0.14 * s)], w, head, WHITE)
    elif kind in ("left", "right"):
        k = -1 if kind == "left" else 1
        _arrow(
            d,
            [(c - k * 0.08 * s, c + 0.3 * s), (c - k * 0.08 * s, c - 0.04 * s), (c + k * 0.16 * s, c - 0.04 * s)],
            w,
            head,
            WHITE,
        )
    else:
        k = 1 if kind == "keep_right" else -1
        _arrow(d, [(c - k * 0.18 * s, c - 0.18 * s), (c + k * 0.1 * s, c + 0.1 * s)], w, head, WHITE)


def triangle_sign(kind: str, side: int) -> Face:
    """An equilateral warning triangle: red border, yellow field, black pictogram (QCVN 41)."""
    w = side * _SS
    h = int(round(w * 0.88))
    img, d = _canvas(w, h)
    outer = [(w / 2, 0.5), (w - 0.5, h - 0.5), (0.5, h - 0.5)]
    d.polygon(outer, fill=RED)
    b = 0.1 * w
    inner = [(w / 2, 1.9 * b), (w - 1.15 * b, h - 0.6 * b), (1.15 * b, h - 0.6 * b)]
    d.polygon(inner, fill=YELLOW)
    _pictogram(d, kind, w, h)
    return _finish(img, (side, int(round(side * 0.88))))


def _figure(d: ImageDraw.ImageDraw, x: float, foot: float, height: float, lw: float, stride: float = 0.2) -> None:
    """A walking stick figure standing at (x, foot)."""
    head = height * 0.13
    hip = foot - height * 0.45
    neck = foot - height * 0.8
    d.ellipse([x - head, neck - 2 * head, x + head, neck], fill=BLACK)
    d.line([(x, neck), (x, hip)], fill=BLACK, width=int(lw * 1.3))
    d.line([(x - stride * height, foot), (x, hip), (x + stride * height, foot)], fill=BLACK, width=int(lw), joint="curve")
    d.line(
        [(x - 0.2 * height, hip - 0.05 * height), (x, neck + 0.05 * height), (x + 0.2 * height, hip)],
        fill=BLACK,
        width=int(lw * 0.8),
        joint="curve",
    )


def _pictogram(d: ImageDraw.ImageDraw, kind: str, w: float, h: float) -> None:
    cx, foot, lw = w / 2, h * 0.84, w * 0.035
    if kind == "children":
        _figure(d, cx - 0.09 * w, foot, 0.42 * h, lw)
        _figure(d, cx + 0.11 * w, foot, 0.32 * h, lw)
    elif kind == "pedestrian_crossing":
        for k in range(4):
            x = cx - 0.24 * w + k * 0.14 * w
            d.rectangle([x, foot - 0.03 * h, x + 0.08 * w, foot + 0.02 * h], fill=BLACK)
        _figure(d, cx, foot - 0.06 * h, 0.4 * h, lw)
    elif kind == "road_works":
        _figure(d, cx - 0.04 * w, foot, 0.42 * h, lw, stride=0.25)
        d.line([(cx + 0.04 * w, foot - 0.28 * h), (cx + 0.16 * w, foot - 0.02 * h)], fill=BLACK, width=int(lw))
        d.pieslice([cx + 0.08 * w, foot - 0.12 * h, cx + 0.3 * w, foot + 0.1 * h], 180, 360, fill=BLACK)
    elif kind == "slippery_road":
        d.rounded_rectangle([cx - 0.14 * w, foot - 0.42 * h, cx + 0.14 * w, foot - 0.2 * h], radius=0.03 * w, fill=BLACK)
        d.rectangle([cx - 0.16 * w, foot - 0.24 * h, cx - 0.1 * w, foot - 0.17 * h], fill=BLACK)
        d.rectangle([cx + 0.1 * w, foot - 0.24 * h, cx + 0.16 * w, foot - 0.17 * h], fill=BLACK)
        for k in (-1, 1):
            x0 = cx + k * 0.07 * w
            pts = [(x0 + 0.04 * w * math.sin(i / 3.0 * math.pi) * k, foot - 0.15 * h + i * 0.025 * h) for i in range(7)]
            d.line(pts, fill=BLACK, width=int(lw * 0.8), joint="curve")


def info_sign(lines: list[str], font_px: int, color) -> Face:
    """A rectangular information sign: coloured field, white inset border, white centred lines."""
    fs = font_px * _SS
    f = font(fs)
    # Words set an en space apart (DejaVu's space is a third of an em): sign lettering is spaced
    # generously, and a recogniser reads "NGÃTU" across a narrow gap.
    lines = [line.replace(" ", "\u2002") for line in lines]
    pitch = 1.3 * fs
    boxes = [f.getbbox(line, anchor="ls") for line in lines]
    top = min(b[1] + i * pitch for i, b in enumerate(boxes))
    bottom = max(b[3] + i * pitch for i, b in enumerate(boxes))
    width = max(b[2] - b[0] for b in boxes)
    mx, my = 0.55 * fs, 0.42 * fs
    w, h = int(math.ceil(width + 2 * mx)), int(math.ceil(bottom - top + 2 * my))
    w, h = w + w % 2, h + h % 2
    img, d = _canvas(w, h)
    d.rounded_rectangle([0, 0, w - 1, h - 1], radius=0.18 * fs, fill=color)
    inset = 0.14 * fs
    d.rounded_rectangle(
        [inset, inset, w - 1 - inset, h - 1 - inset], radius=0.12 * fs, outline=WHITE, width=max(2, int(0.07 * fs))
    )
    for i, (line, b) in enumerate(zip(lines, boxes)):
        x = (w - (b[2] - b[0])) / 2 - b[0]
        d.text((x, my - top + i * pitch), line, fill=WHITE, font=f, anchor="ls")
    text_box = ((w - width) / 2, my, (w + width) / 2, h - my)
    return _finish(img, (w // _SS, h // _SS), text_box)
