"""Lines of sign text as the sign reader sees them in a crop: drawn with PIL in a font of this machine that
covers the whole Vietnamese dictionary, on the colours of the world's signs, then degraded as a real crop is.

``render_line`` draws one line (perspective, the detector's loose or tight line boxes: margins, jitter, a
neighbouring line's edge, the sign's border and the scene behind it); ``degrade`` adds optical blur, the
shrink to the few pixels a sign line has in a frame, lighting, noise, partial occlusion at the edges and
JPEG. What the recognizer trains on (``festival_serve.training.sign_reader``) and what tests read back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from festival_serve.models.sign_reader import charset

from festival_serve.world import phrases
from festival_serve.world.synth import signs as sign_art
from festival_serve.world.synth.effects import lighting_lut



RENDER_PX = 64  # font size lines are drawn at before shrinking to the size a crop has


LINE_HEIGHTS = (12, 56)  # pixels: the text line as the detector cuts it from a sign crop (log-uniform)


DISC_P = 0.6  # share of bare-numeral lines drawn as a speed-limit disc (the rest: numerals on a plain plate)


_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")


#: Faces no sign is set in: slanted, hairline, or fonts of symbols.
_SKIP_FACES = ("italic", "oblique", "extralight", "thin", "hairline", "display", "lastresort", "symbol", "math")


def _font_dirs() -> list[Path]:
    dirs = [Path(sign_art.FONT_PATH).parent]
    try:
        import matplotlib

        dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    return dirs + [Path(d).expanduser() for d in _FONT_DIRS]


def covers(path: Path, characters: str) -> bool:
    """Whether the font at ``path`` has a glyph for every character."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - an unreadable font file is simply not used
        return False
    return all(ord(c) in cmap for c in characters)


@functools.lru_cache(maxsize=1)
def vietnamese_fonts() -> tuple[str, ...]:
    """Upright TrueType/OpenType fonts on this machine that cover the whole dictionary, one per file
    name (the bundled DejaVu Sans Bold first). DejaVu ships with matplotlib; Debian packages add more
    (``apt-get install fonts-liberation2 fonts-roboto-unhinted fonts-open-sans fonts-freefont-ttf``)."""
    needed = "".join(charset.DICTIONARY)
    found: dict[str, str] = {}
    for folder in _font_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            name = path.name.lower()
            if path.suffix.lower() not in (".ttf", ".otf") or name in found or any(s in name for s in _SKIP_FACES):
                continue
            if covers(path, needed):
                found[name] = str(path)
    if not found:
        raise FileNotFoundError("no font on this machine covers the Vietnamese dictionary (DejaVu ships with "
                                "matplotlib; or apt-get install fonts-dejavu-core)")
    return tuple(found.values())


@functools.lru_cache(maxsize=64)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Scheme:
    field: RGB
    ink: RGB
    border: RGB | None  # the inset line of information signs or the red band of prohibitions
    weight: float


#: The world's sign colours (``synth.signs``) and a few more that Vietnamese signs use.
SCHEMES: dict[str, Scheme] = {
    "white_on_blue": Scheme(sign_art.BLUE, sign_art.WHITE, sign_art.WHITE, 0.30),
    "white_on_green": Scheme(sign_art.GREEN, sign_art.WHITE, sign_art.WHITE, 0.18),
    "black_on_white_red": Scheme(sign_art.WHITE, sign_art.BLACK, sign_art.RED, 0.16),
    "black_on_yellow": Scheme(sign_art.YELLOW, sign_art.BLACK, sign_art.RED, 0.12),
    "black_on_white": Scheme(sign_art.WHITE, sign_art.BLACK, sign_art.BLACK, 0.08),
    "red_on_white": Scheme(sign_art.WHITE, sign_art.RED, sign_art.RED, 0.05),
    "white_on_red": Scheme(sign_art.RED, sign_art.WHITE, sign_art.WHITE, 0.04),
    "white_on_brown": Scheme((110, 62, 30), sign_art.WHITE, sign_art.WHITE, 0.04),
    "black_on_orange": Scheme((240, 130, 10), sign_art.BLACK, sign_art.BLACK, 0.03),
}


_SCHEME_NAMES = tuple(SCHEMES)


_SCHEME_P = np.array([s.weight for s in SCHEMES.values()]) / sum(s.weight for s in SCHEMES.values())


def _jitter(colour: RGB, rng: np.random.Generator, amount: float = 18) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def text_mask(text: str, font: ImageFont.FreeTypeFont, tracking: float = 0.0) -> np.ndarray:
    """``text`` as an (h, w) uint8 coverage mask cropped to its ink; ``tracking`` em added between letters."""
    size = font.size
    width = int(font.getlength(text) + abs(tracking) * size * len(text) + 2 * size)
    canvas = Image.new("L", (width, 3 * size), 0)
    draw = ImageDraw.Draw(canvas)
    if tracking:
        x = size / 2
        for ch in text:
            draw.text((x, 2 * size), ch, fill=255, font=font, anchor="ls")
            x += font.getlength(ch) + tracking * size
    else:
        draw.text((size / 2, 2 * size), text, fill=255, font=font, anchor="ls")
    mask = np.asarray(canvas)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return np.zeros((1, 1), np.uint8)
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _backdrop(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """What lies around a sign in a frame: a smooth random colour field (sky, foliage, walls)."""
    small = rng.uniform(40, 220, (3, 4, 3)) * rng.uniform(0.6, 1.0)
    return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _paste(canvas: np.ndarray, mask: np.ndarray, top: int, left: int, colour: np.ndarray,
           clip: tuple[int, int, int, int] | None = None) -> None:
    """Blend ``colour`` into ``canvas`` (float32 RGB) through ``mask``, optionally only inside ``clip``
    (y1, x1, y2, x2)."""
    h, w = mask.shape
    y1, x1, y2, x2 = clip or (0, 0, canvas.shape[0], canvas.shape[1])
    ty1, tx1, ty2, tx2 = max(top, y1), max(left, x1), min(top + h, y2), min(left + w, x2)
    if ty1 >= ty2 or tx1 >= tx2:
        return
    alpha = mask[ty1 - top:ty2 - top, tx1 - left:tx2 - left, None].astype(np.float32) / 255.0
    region = canvas[ty1:ty2, tx1:tx2]
    region[:] = region * (1 - alpha) + colour * alpha


def render_line(text: str, rng: np.random.Generator, fonts: tuple[str, ...] | None = None,
                neighbour: str | None = None) -> np.ndarray:
    """One line of ``text`` as the reader receives it from a sign crop: ``(h, w, 3) uint8 RGB`` with
    ``h`` in ``LINE_HEIGHTS`` (the reader resizes it to 48). ``neighbour``: a line of the same sign drawn
    above or below, whose edge a loose line box catches."""
    fonts = fonts or vietnamese_fonts()
    font = _font(str(rng.choice(fonts)), RENDER_PX)
    px = RENDER_PX
    scheme = SCHEMES[_SCHEME_NAMES[rng.choice(len(SCHEMES), p=_SCHEME_P)]]
    field, ink = _jitter(scheme.field, rng), _jitter(scheme.ink, rng)
    fade = rng.uniform(0, 0.3) if rng.random() < 0.3 else 0.0  # sun-faded paint drifts towards white
    field = field + (255 - field) * fade

    # A speed limit: numerals set tight (synth.signs._tight_text) on a white disc inside a red ring.
    disc = text.isdigit() and rng.random() < DISC_P
    if disc:
        field, ink = _jitter(sign_art.WHITE, rng), _jitter(sign_art.BLACK, rng)

    # The text, as signs set it: word gaps a space or an en space (the world's), letters sometimes tighter
    # or looser, faces sometimes condensed.
    shown = text.replace(" ", "\u2002") if rng.random() < 0.5 else text
    tracking = -0.06 if disc else float(rng.uniform(-0.06, 0.12)) if rng.random() < 0.25 else 0.0
    mask = text_mask(shown, font, tracking)
    stretch = float(rng.uniform(0.75, 1.2)) if rng.random() < 0.4 else 1.0
    if stretch != 1.0:
        mask = cv2.resize(mask, (max(1, round(mask.shape[1] * stretch)), mask.shape[0]), interpolation=cv2.INTER_AREA)
    th, tw = mask.shape
    band = max(th, int(0.72 * px))  # a line of lower-case letters still sits in a cap-height band

    # The sign face around it, with its border, inside a margin of scene.
    if disc:  # numerals span 0.55-0.75 of the disc's width (the world's "50": 0.64), cap height <= 0.4
        face_h = face_w = int(max(tw / rng.uniform(0.55, 0.75), th / 0.4))
        pad_x, pad_y = (face_w - tw) // 2, (face_h - band) // 2
    else:
        pad_x, pad_y = int(rng.uniform(0.3, 1.0) * px), int(rng.uniform(0.2, 0.7) * px)
        face_h, face_w = band + 2 * pad_y, tw + 2 * pad_x
    margin = px
    canvas = _backdrop(face_h + 2 * margin, face_w + 2 * margin, rng)
    fy1, fx1, fy2, fx2 = margin, margin, margin + face_h, margin + face_w
    border = scheme.border if rng.random() < 0.75 else None
    if disc:
        ring = int(0.11 * face_w)  # synth.signs.circle_sign's ring
        outer, inner = Image.new("L", (face_w, face_h), 0), Image.new("L", (face_w, face_h), 0)
        ImageDraw.Draw(outer).ellipse([0, 0, face_w - 1, face_h - 1], fill=255)
        ImageDraw.Draw(inner).ellipse([ring, ring, face_w - 1 - ring, face_h - 1 - ring], fill=255)
        _paste(canvas, np.asarray(outer), fy1, fx1, _jitter(sign_art.RED, rng))
        _paste(canvas, np.asarray(inner), fy1, fx1, field)
    else:
        canvas[fy1:fy2, fx1:fx2] = field
    if border is not None and not disc:
        face = Image.new("L", (face_w, face_h), 0)
        if border == sign_art.RED and scheme.field != sign_art.RED:  # a red band at the edge
            width = max(2, int(rng.uniform(0.08, 0.16) * px))
            ImageDraw.Draw(face).rounded_rectangle([0, 0, face_w - 1, face_h - 1], radius=int(0.2 * px),
                                                   outline=255, width=width)
        else:  # the inset line of information signs (synth.signs.info_sign)
            inset = int(rng.uniform(0.08, 0.2) * px)
            ImageDraw.Draw(face).rounded_rectangle([inset, inset, face_w - 1 - inset, face_h - 1 - inset],
                                                   radius=int(0.12 * px), outline=255, width=max(2, int(0.07 * px)))
        _paste(canvas, np.asarray(face), fy1, fx1, _jitter(border, rng))
    ty = fy1 + pad_y + (band - th) // 2 + int(rng.integers(-pad_y // 3, pad_y // 3 + 1))
    tx = fx1 + pad_x + int(rng.integers(-pad_x // 3, pad_x // 3 + 1))
    _paste(canvas, mask, ty, tx, ink)
    if neighbour and not disc:
        other = text_mask(neighbour.replace(" ", "\u2002"), font)
        above = rng.random() < 0.5
        ny = ty - int(1.3 * px) + (th - other.shape[0]) if above else ty + int(1.3 * px)
        _paste(canvas, other, ny, tx + int(rng.integers(-px, px + 1)), ink, clip=(fy1, fx1, fy2, fx2))

    # The box the reader cuts: the text's box with the detector's loose margins, or (single-line signs
    # read straight) the whole face with the ingress's crop padding. Corners jittered: perspective.
    if rng.random() < 0.15:
        pad = rng.uniform(0.0, 0.1)
        x1, y1 = fx1 - pad * face_w, fy1 - pad * face_h
        x2, y2 = fx2 + pad * face_w, fy2 + pad * face_h
    else:
        x1, x2 = tx - rng.uniform(0.05, 0.6) * px, tx + tw + rng.uniform(0.05, 0.6) * px
        y1, y2 = ty - rng.uniform(0.1, 0.45) * px, ty + th + rng.uniform(0.1, 0.45) * px
    if rng.random() < 0.12:  # an occluder (pole, branch, another sign) over one end of the box, never the text
        left = rng.random() < 0.5
        gap = (tx - x1) if left else (x2 - tx - tw)
        if gap > 2:
            cover = int(gap * rng.uniform(0.3, 1.0))
            xa = int(x1) if left else int(x2) - cover
            canvas[max(0, int(y1)):max(0, int(y2)), max(0, xa):max(0, xa + cover)] = rng.uniform(0, 255, 3)
    quad = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
    # The detector's box follows the text line, so the line turns little inside it: at most 0.06 em at its ends,
    # less than the smallest margin, so no tone mark is cut off. Corners jitter by as much (perspective).
    angle = rng.uniform(-1, 1) * min(math.radians(2.5), math.atan(0.06 * px / max(1.0, (x2 - x1) / 2)))
    centre = quad.mean(0)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], np.float32)
    quad = (quad - centre) @ rot.T + centre + rng.uniform(-0.04, 0.04, (4, 2)).astype(np.float32) * px
    out_w, out_h = max(2, round(x2 - x1)), max(2, round(y2 - y1))
    dst = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], np.float32)
    line = cv2.warpPerspective(canvas, cv2.getPerspectiveTransform(quad, dst), (out_w, out_h),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return degrade(line, rng)


def degrade(line: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sharp line drawn at ``RENDER_PX`` (float32 RGB) -> the ``(h, w, 3) uint8`` a camera frame gives."""
    lo, hi = LINE_HEIGHTS
    height = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    scale = height / line.shape[0]
    width = max(2, round(line.shape[1] * scale))
    if rng.random() < 0.5:  # optics and the frame's own resampling, in output pixels
        sigma = rng.uniform(0.2, 0.9) / scale
        line = cv2.GaussianBlur(line, (0, 0), sigma)
    if rng.random() < 0.1:  # motion: a short horizontal streak
        k = max(3, int(rng.uniform(1.0, 2.5) / scale) | 1)
        line = cv2.filter2D(line, -1, np.full((1, k), 1.0 / k, np.float32))
    small = cv2.resize(line, (width, height), interpolation=cv2.INTER_AREA)
    small = np.clip(small, 0, 255).astype(np.uint8)
    small = cv2.LUT(small, lighting_lut(rng))
    out = small.astype(np.float32)
    if rng.random() < 0.25:  # a shadow or glare across the sign
        ramp = np.linspace(*rng.uniform(0.45, 1.15, 2), width if rng.random() < 0.7 else height, dtype=np.float32)
        out *= ramp[None, :, None] if len(ramp) == width else ramp[:, None, None]
    if rng.random() < 0.5:
        out += rng.normal(0, rng.uniform(1, 7), out.shape).astype(np.float32)
    if rng.random() < 0.08:  # a wire or twig across the text
        y0, y1 = rng.uniform(0, height, 2)
        cv2.line(out, (0, int(y0)), (width - 1, int(y1)), tuple(float(c) for c in rng.uniform(0, 120, 3)), 1)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 96))])
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return out


def sample_lines(count: int, rng: np.random.Generator, split: str = "train",
                 fonts: tuple[str, ...] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """``count`` rendered lines (RGB) and their labels (NFC) from ``split``'s text."""
    images, labels = [], []
    for _ in range(count):
        text = phrases.sample_text(rng, split)
        neighbour = phrases.sample_text(rng, split) if rng.random() < 0.2 else None
        images.append(render_line(text, rng, fonts, neighbour))
        labels.append(text)
    return images, labels
