"""Train a Vietnamese sign-text recognizer (CRNN) that the PP-OCR reader serves as its ``rec_model``.

- **Lines.** ``render_line`` draws one line of sign text (``vietnamese.sample_text``) with PIL in one of
  the fonts on this machine that cover the whole dictionary (``vietnamese_fonts``), on the colours of the
  world's signs (white on blue/green, black on white/yellow, red borders), then degrades it as a real crop
  is degraded: perspective and the detector's loose or tight line boxes (margins, jitter, a neighbouring
  line's edge, the sign's border and the scene behind it), optical blur, shrinking to the few pixels a
  sign line has in a frame, lighting, noise, partial occlusion at the edges, JPEG. Whole single-line
  signs with the crop padding are drawn too, for reading sign crops straight.
- **Model.** ``CRNN`` (Shi, Bai & Yao, "An End-to-End Trainable Neural Network for Image-based Sequence
  Recognition", 2015): a VGG-style convolution stack that pools the 48-pixel height to 1 and the width
  by 4, a two-layer bidirectional LSTM, and a per-step linear layer over the CTC classes, narrowed to
  ~1.3 M parameters for two CPU cores.
- **I/O of PP-OCR's recognizer** (what ``festival_serve.models.sign_reader.reader`` feeds and decodes): input ``(N, 3, 48, W)``
  float32 BGR in [-1, 1], right-padded with 0 to the batch's widest line (``ocr.rec_batch``, used here for
  training too); output ``(N, W // 4, classes)`` softmax, class 0 the CTC blank, then
  ``vietnamese.DICTIONARY``, then the space. The ONNX export embeds the dictionary in its metadata
  (``character``) and ``vi_dict.txt`` beside it serves as ``rec_dict``.
- **Training.** CTC loss, AdamW, a warm-up then cosine learning rate over the time budget (``--hours``)
  or ``--steps``, in bfloat16 autocast where the CPU has native bf16 (``--precision``); lines are
  rendered on the fly (``--workers`` processes; seeded per worker, so a run
  is reproducible for a given worker count). Every ``--val-minutes`` the held-out phrases (phrases and
  places never in a training line, ``vietnamese.split_of``) are read and scored with the evaluator's
  ``ocr_metrics`` (exact match with tones, without, CER), and the checkpoint is saved. At the end the
  model is exported, read back through the production reader, scored again, and the model card written.

Run it: ``festival-serve train sign-text --hours 6`` (or ``python -m festival_serve.training.sign_reader``).
Serve it: ``sign_reader: {rec_model: sign_reader/vi_rec.pt, rec_dict: sign_reader/vi_dict.txt}``: the reader
runs the checkpoint's ONNX export (``cached_onnx``: made once beside it, keyed by the checkpoint's hash).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from festival_serve.models.sign_reader import charset
from festival_serve.runtime.cache import build_once, file_sha256
from festival_serve.world.synth import signs as sign_art
from festival_serve.world.synth.effects import lighting_lut
from festival_serve.training.schedule import learning_rate, use_bf16

logger = logging.getLogger(__name__)

HEIGHT = 48  # the recognizer's input height (SignReaderSettings.rec_height)
RENDER_PX = 64  # font size lines are drawn at before shrinking to the size a crop has
LINE_HEIGHTS = (12, 56)  # pixels: the text line as the detector cuts it from a sign crop (log-uniform)
WIDTH_STRIDE = 4  # input columns per output step
DISC_P = 0.6  # share of bare-numeral lines drawn as a speed-limit disc (the rest: numerals on a plain plate)
CHECKPOINT, DICT_FILE, CARD = "vi_rec.pt", "vi_dict.txt", "MODEL_CARD.md"
FORMAT = "festival-serve/sign-text-crnn/1"

# --------------------------------------------------------------------------------------------------
# Fonts

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


# --------------------------------------------------------------------------------------------------
# Rendering one line

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
        text = charset.sample_text(rng, split)
        neighbour = charset.sample_text(rng, split) if rng.random() < 0.2 else None
        images.append(render_line(text, rng, fonts, neighbour))
        labels.append(text)
    return images, labels


# --------------------------------------------------------------------------------------------------
# The model

def _torch():
    import torch

    return torch


@dataclass(frozen=True)
class CRNNConfig:
    #: Channels of the seven convolutions (CRNN's VGG stack: 64-128-256-256-512-512-512, narrowed).
    channels: tuple[int, ...] = (32, 48, 96, 96, 128, 128, 192)
    hidden: int = 128  # LSTM units per direction
    num_classes: int = charset.NUM_CLASSES


def build_crnn(config: CRNNConfig = CRNNConfig()):
    """CRNN for ``(N, 3, 48, W)`` inputs -> ``(N, W // 4, num_classes)`` logits."""
    torch = _torch()
    nn = torch.nn

    def conv(cin: int, cout: int, kernel=3, padding=1):
        return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class CRNN(nn.Module):
        def __init__(self, cfg: CRNNConfig) -> None:
            super().__init__()
            c = cfg.channels
            self.config = cfg
            # Height 48 -> 24 -> 12 -> 6 -> 3 -> 1; width / 4 (the 2x1 pools keep the width, as CRNN's do,
            # so narrow letters keep steps of their own).
            self.features = nn.Sequential(
                *conv(3, c[0]), nn.MaxPool2d(2, 2),
                *conv(c[0], c[1]), nn.MaxPool2d(2, 2),
                *conv(c[1], c[2]), *conv(c[2], c[3]), nn.MaxPool2d((2, 1), (2, 1)),
                *conv(c[3], c[4]), *conv(c[4], c[5]), nn.MaxPool2d((2, 1), (2, 1)),
                *conv(c[5], c[6], kernel=(3, 1), padding=0),
            )
            self.rnn = nn.LSTM(c[6], cfg.hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(2 * cfg.hidden, cfg.num_classes)

        def forward(self, x):  # (N, 3, 48, W) -> (N, T, classes) logits
            f = self.features(x).squeeze(2).permute(0, 2, 1)  # (N, T, C)
            return self.head(self.rnn(f)[0])

    return CRNN(config)


def build_recognizer(crnn):
    """The exported network: CRNN logits -> per-step probabilities, as PP-OCR's recognizer outputs."""
    torch = _torch()

    class PPOCRRecognizer(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):  # (N, 3, 48, W) float32 BGR in [-1, 1] -> (N, W // 4, classes) softmax
            return torch.softmax(self.model(x), dim=-1)

    return PPOCRRecognizer(crnn).eval()


def save_checkpoint(model, path: Path, **extra: Any) -> Path:
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "config": asdict(model.config), "dictionary": list(charset.DICTIONARY),
                "model": model.state_dict(), **extra}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: Path):
    """A ``save_checkpoint`` file -> (CRNN in eval mode, the checkpoint dict); refuses another dictionary."""
    torch = _torch()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sign-text checkpoint (format {ckpt.get('format')!r})")
    if tuple(ckpt["dictionary"]) != charset.DICTIONARY:
        raise ValueError(f"{path}: trained over another dictionary ({len(ckpt['dictionary'])} characters, "
                         f"this one has {len(charset.DICTIONARY)})")
    config = CRNNConfig(**{**ckpt["config"], "channels": tuple(ckpt["config"]["channels"])})
    model = build_crnn(config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def write_onnx(model, path: Path) -> None:
    """The recognizer as ONNX at ``path``: dynamic batch and width, the dictionary in its ``character``
    metadata (what ``festival_serve.models.sign_reader.reader`` reads when no ``rec_dict`` is set)."""
    import warnings

    import onnx

    torch = _torch()
    recognizer = build_recognizer(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and LSTM batch notes
        # dynamo=False: the dynamo exporter needs onnxscript (not installed); the TorchScript one exports
        # the LSTM with dynamic batch and sequence axes.
        torch.onnx.export(recognizer, (torch.zeros(1, 3, HEIGHT, 320),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["softmax"],
                          dynamic_axes={"x": {0: "batch", 3: "width"}, "softmax": {0: "batch", 1: "steps"}})
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "character", "\n".join(charset.DICTIONARY)
    onnx.save(proto, str(path))


def onnx_export_path(checkpoint: Path) -> Path:
    """Where ``checkpoint``'s export is cached: beside it, keyed by its bytes (``vi_rec.<sha12>.onnx``), so a
    retrained checkpoint never serves a stale export."""
    return checkpoint.with_name(f"{checkpoint.stem}.{file_sha256(checkpoint)[:12]}.onnx")


def cached_onnx(checkpoint: Path) -> Path:
    """``checkpoint``'s ONNX export, made once (``festival-serve up`` makes it before the replicas start, so
    an ONNX Runtime replica reading a cached export never imports torch)."""
    target = onnx_export_path(Path(checkpoint))
    if target.is_file():
        return target
    model, _ = load_checkpoint(Path(checkpoint))
    logger.info("exporting %s to ONNX (%s)", checkpoint, target.name)
    return build_once(target, lambda tmp: write_onnx(model, tmp))


def write_dictionary(out_dir: Path) -> Path:
    """``vi_dict.txt``: one character per line, as ``rec_dict`` reads it."""
    path = Path(out_dir) / DICT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(charset.DICTIONARY) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Data and scoring

def to_batch(lines_rgb: list[np.ndarray]) -> np.ndarray:
    """RGB lines -> the recognizer's ``(N, 3, 48, W)`` input, exactly as the production reader builds it."""
    from festival_serve.models.sign_reader.reader import rec_batch, rgb_to_bgr

    return rec_batch([rgb_to_bgr(line) for line in lines_rgb], HEIGHT)


#: Lines rendered together and cut into this many batches of similar width: a batch is padded to its widest
#: line, so grouping by width saves ~25% of the convolution work at batch 32 (measured).
BUCKETS = 4
#: Share of batches padded wider still, as the reader pads a sign's short line beside a long one.
EXTRA_PAD_P = 0.25


def _batches(images: list[np.ndarray], labels: list[str], size: int, rng: np.random.Generator):
    """``(x, targets, target_lengths)`` tensors for CTC, lines grouped by aspect ratio into batches of ``size``."""
    torch = _torch()
    order = sorted(range(len(images)), key=lambda i: images[i].shape[1] / images[i].shape[0])
    groups = [order[k:k + size] for k in range(0, len(order), size)]
    for g in rng.permutation(len(groups)):
        chunk = groups[g]
        x = to_batch([images[i] for i in chunk])
        if rng.random() < EXTRA_PAD_P:  # right padding is 0 in normalised space, as rec_batch pads
            x = np.pad(x, ((0, 0), (0, 0), (0, 0), (0, int(x.shape[3] * rng.uniform(0.1, 0.8)))))
        codes = [charset.encode(labels[i]) for i in chunk]
        yield (torch.from_numpy(x), torch.tensor([c for code in codes for c in code]),
               torch.tensor([len(code) for code in codes]))


def _lines_dataset(seed: int, batch_size: int, fonts: tuple[str, ...]):
    torch = _torch()

    class Lines(torch.utils.data.IterableDataset):
        """An endless stream of training batches ``(x, targets, target_lengths)``; each worker its own seed."""

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([seed, info.id if info else 0])
            while True:
                images, labels = sample_lines(batch_size * BUCKETS, rng, "train", fonts)
                yield from _batches(images, labels, batch_size, rng)

    return Lines()


def predict(model, batch: np.ndarray) -> list[str]:
    """Greedy CTC decoding of one ``(N, 3, 48, W)`` batch."""
    torch = _torch()
    with torch.inference_mode():
        steps = model(torch.from_numpy(batch)).argmax(-1).numpy()
    return [charset.decode(row) for row in steps]


def read_lines(recognize, lines_rgb: list[np.ndarray], batch: int = 64) -> list[str]:
    """``recognize(batch) -> texts`` over many lines, batched by similar width (as little padding as
    serving sees); texts in the order of ``lines_rgb``."""
    order = sorted(range(len(lines_rgb)), key=lambda i: lines_rgb[i].shape[1] / lines_rgb[i].shape[0])
    texts: list[str] = [""] * len(lines_rgb)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, text in zip(chunk, recognize([lines_rgb[i] for i in chunk])):
            texts[i] = text
    return texts


def score(predicted: list[str], truths: list[str]) -> dict[str, Any]:
    """The evaluator's OCR metrics (``festival_serve.world.scores.ocr_metrics``), confusions cut to five."""
    from festival_serve.world.scores import ocr_metrics

    metrics = ocr_metrics(list(zip(predicted, truths)))
    metrics["unreadable_characters"] = metrics["unreadable_characters"][:5]
    return metrics


def validation_set(count: int, seed: int, fonts: tuple[str, ...]) -> tuple[list[np.ndarray], list[str]]:
    """``count`` lines of the held-out phrases and places, the same for every run with ``seed``."""
    return sample_lines(count, np.random.default_rng([seed, 0x7A1]), "val", fonts)


def production_reader(out_dir: Path):
    """The served reader (bundled PP-OCRv6 detector) with this checkpoint as ``rec_model`` (through its
    cached export, as serving reads it) and the dictionary as ``rec_dict``."""
    from festival_serve.models.sign_reader.reader import PPOCROnnxReader
    from festival_serve.pipeline.settings import SignReaderSettings

    settings = SignReaderSettings(device="cpu", rec_model=str((out_dir / CHECKPOINT).resolve()),
                                  rec_dict=str((out_dir / DICT_FILE).resolve()))
    return PPOCROnnxReader(settings, model_store=out_dir)


# --------------------------------------------------------------------------------------------------
# Training

def train_sign_text(
    out_dir: Path,
    *,
    hours: float | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    warmup: int = 300,
    seed: int = 0,
    threads: int | None = None,
    workers: int = 1,
    init: Path | None = None,
    config: CRNNConfig = CRNNConfig(),
    val_lines: int = 400,
    val_minutes: float = 10.0,
    log_every: int = 50,
    fonts: tuple[str, ...] | None = None,
    precision: str = "auto",
) -> dict[str, Any]:
    """Train until ``hours`` or ``steps`` runs out (whichever first), then write the checkpoint, the ONNX
    export, the dictionary and return the metrics (the card is ``cmd_train``'s). Ctrl-C ends training
    early and still exports what it has."""
    torch = _torch()
    if hours is None and steps is None:
        raise ValueError("give a budget: hours or steps")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fonts = tuple(fonts or vietnamese_fonts())
    logger.info("sign-text: %d fonts: %s", len(fonts), ", ".join(Path(f).name for f in fonts))

    if init:
        model, previous = load_checkpoint(Path(init))
        config = model.config
        logger.info("sign-text: continuing from %s (%s lines seen)", init, previous.get("lines_seen"))
    else:
        model, previous = build_crnn(config), {}
    parameters = sum(p.numel() for p in model.parameters())
    bf16 = use_bf16(precision)
    # channels_last: oneDNN's bf16 convolutions run ~25% faster on it than on NCHW (measured).
    model = model.to(memory_format=torch.channels_last)
    logger.info("sign-text: training in %s", "bfloat16 autocast" if bf16 else "float32")
    val_images, val_truths = validation_set(val_lines, seed, fonts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    loader = torch.utils.data.DataLoader(
        _lines_dataset(seed, batch_size, fonts), batch_size=None, num_workers=workers,
        prefetch_factor=2 if workers else None, persistent_workers=False)
    budget_s = hours * 3600 if hours else math.inf
    history: list[dict[str, Any]] = []

    def validate(step: int, lines_seen: int) -> dict[str, Any]:
        nonlocal val_seconds
        began = time.perf_counter()
        model.eval()
        predicted = read_lines(lambda lines: predict(model, to_batch(lines)), val_images)
        model.train()
        metrics = score(predicted, val_truths)
        record = {"step": step, "lines_seen": lines_seen, "minutes": round((time.perf_counter() - train_started) / 60, 1),
                  **{k: metrics[k] for k in ("exact_match", "exact_match_no_tones", "cer")}}
        history.append(record)
        logger.info("sign-text: step %d: held-out phrases exact %.3f (no tones %.3f) CER %.3f", step,
                    metrics["exact_match"], metrics["exact_match_no_tones"], metrics["cer"])
        save_checkpoint(model, out_dir / CHECKPOINT, step=step, lines_seen=lines_seen, seed=seed)
        val_seconds += time.perf_counter() - began
        return metrics

    step, lines_seen, first_loss, running, window_lines = 0, int(previous.get("lines_seen", 0)), None, [], 0
    val_seconds = 0.0
    interrupted = False
    model.train()
    train_started = window_started = last_val = time.perf_counter()
    try:
        for x, targets, target_lengths in loader:
            elapsed = time.perf_counter() - train_started
            if (steps is not None and step >= steps) or elapsed >= budget_s:
                break
            done = max(step / steps if steps else 0.0, elapsed / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, step, done, warmup)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x.to(memory_format=torch.channels_last))
            log_probs = logits.float().log_softmax(-1).permute(1, 0, 2)  # (T, N, classes), as CTCLoss wants
            input_lengths = torch.full((x.shape[0],), log_probs.shape[0], dtype=torch.long)
            loss = ctc(log_probs, targets, input_lengths, target_lengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)  # LSTMs under CTC spike early on
            optimizer.step()
            step += 1
            lines_seen += x.shape[0]
            window_lines += x.shape[0]
            value = float(loss.item())
            first_loss = value if first_loss is None else first_loss
            running.append(value)
            if step % log_every == 0:
                now = time.perf_counter()
                logger.info("sign-text: step %d  loss %.3f  lr %.1e  %.1f lines/s  %.0f min", step,
                            sum(running) / len(running), optimizer.param_groups[0]["lr"],
                            window_lines / (now - window_started), (now - train_started) / 60)
                running, window_lines, window_started = [], 0, now
            if time.perf_counter() - last_val >= val_minutes * 60:
                validate(step, lines_seen)
                last_val = window_started = time.perf_counter()
                window_lines = 0
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("sign-text: interrupted at step %d: exporting what was learnt", step)
    training_seconds = time.perf_counter() - train_started
    # Lines trained per second, validation pauses excluded (rendering included: it shares the cores).
    lines_per_s = round(step * batch_size / max(1e-9, training_seconds - val_seconds), 2) if step else None
    final_loss = sum(running) / len(running) if running else None
    val = validate(step, lines_seen)  # saves the checkpoint
    model.eval()
    onnx_path, dict_path = cached_onnx(out_dir / CHECKPOINT), write_dictionary(out_dir)

    # The export read back through the reader that serves it: same lines, production preprocessing.
    from festival_serve.models.sign_reader.reader import rgb_to_bgr

    reader = production_reader(out_dir)
    served = score(read_lines(lambda lines: [text for text, _ in reader.recognize([rgb_to_bgr(line) for line in lines])],
                              val_images), val_truths)
    return {
        "out": str(out_dir), "onnx": str(onnx_path), "dictionary": str(dict_path), "checkpoint": str(out_dir / CHECKPOINT),
        "parameters": parameters, "config": asdict(config), "fonts": [Path(f).name for f in fonts],
        "steps": step, "lines_seen": lines_seen, "batch_size": batch_size, "lr": lr, "seed": seed,
        "workers": workers, "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
        "interrupted": interrupted,
        "first_loss": first_loss, "final_loss": final_loss,
        "lines_per_s": lines_per_s,
        "val": {"lines": len(val_truths), **val}, "val_served": served, "history": history,
        "seconds": {"training": round(training_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }


# --------------------------------------------------------------------------------------------------
# The command

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("models/sign_reader"),
                        help=f"folder for {CHECKPOINT}, its ONNX export, {DICT_FILE} and {CARD}")
    parser.add_argument("--hours", type=float, default=6.0, help="training time budget (the schedule spans it)")
    parser.add_argument("--steps", type=int, help="stop after this many steps instead, if sooner")
    parser.add_argument("--init", type=Path,
                        help=f"start from this {CHECKPOINT}'s weights and architecture (continue a run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes rendering lines beside training (0: render in the training process)")
    parser.add_argument("--channels", type=lambda v: tuple(int(c) for c in v.split(",")),
                        default=CRNNConfig.channels, help="the seven convolutions' channels, comma-separated")
    parser.add_argument("--hidden", type=int, default=CRNNConfig.hidden, help="LSTM units per direction")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic (auto: bfloat16 autocast where the CPU has native bf16); "
                             "the export is float32 either way")
    parser.add_argument("--val-lines", type=int, default=400, help="held-out phrase lines scored at each validation")
    parser.add_argument("--val-minutes", type=float, default=15.0, help="minutes between validations (and checkpoints)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    return parser


def cmd_train(args: argparse.Namespace, command: str) -> int:
    """Train, write the model files and ``MODEL_CARD.md``, print the result as JSON on stdout."""
    from festival_serve.training.cards import write_model_card

    result = train_sign_text(args.out, hours=args.hours, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, threads=args.threads,
                             workers=args.workers, init=args.init, val_lines=args.val_lines,
                             config=CRNNConfig(channels=args.channels, hidden=args.hidden),
                             val_minutes=args.val_minutes, log_every=args.log_every, precision=args.precision)
    held_out = (*charset.phrases("val"), *charset.places("val"))
    write_model_card(
        args.out / CARD,
        title="CRNN Vietnamese sign-text recognizer",
        model=(f"CRNN (Shi et al. 2015; conv {list(result['config']['channels'])}, 2x BiLSTM "
               f"{result['config']['hidden']}, CTC over {charset.NUM_CLASSES} classes), {result['parameters']:,} "
               f"parameters, {f'continued from {args.init}' if args.init else 'from scratch'}; PP-OCR recognizer I/O "
               f"(N, 3, {HEIGHT}, W) BGR [-1, 1] -> (N, W/{WIDTH_STRIDE}, classes) softmax; {CHECKPOINT} (exported to ONNX on first use) + {DICT_FILE}"),
        data=(f"{result['lines_seen']:,} text lines rendered on the fly (vietnamese.sample_text: phrases, places, "
              f"generated syllables, numbers and units, random dictionary characters) in {len(result['fonts'])} fonts "
              f"({', '.join(result['fonts'])}) on sign colours, with crop degradations. Validation: "
              f"{result['val']['lines']} lines of {len(held_out)} held-out phrases and places that no training line "
              f"contains: {', '.join(held_out)}"),
        seed=args.seed, command=command, seconds=result["seconds"]["total"],
        metrics={"val": {k: result["val"][k] for k in ("exact_match", "exact_match_no_tones", "cer", "cer_no_tones")},
                 "val_served": {k: result["val_served"][k] for k in ("exact_match", "exact_match_no_tones", "cer")},
                 "steps": result["steps"], "lines_seen": result["lines_seen"], "lines_per_s": result["lines_per_s"],
                 "first_loss": result["first_loss"], "final_loss": result["final_loss"],
                 "seconds": result["seconds"], "history": result["history"]},
        notes=(f"CTC loss, AdamW, warm-up then cosine learning rate over the time budget, gradients clipped at 5, "
               f"{result['precision']} arithmetic (bfloat16 autocast where the CPU has it natively; exported float32). "
               "val: the PyTorch model on the held-out lines; val_served: the ONNX export through the production "
               "reader's recognizer (festival_serve.models.sign_reader.reader, same lines). Exact match is with tone marks. "
               f"Serve it with `sign_reader: {{rec_model: sign_reader/{CHECKPOINT}, rec_dict: sign_reader/{DICT_FILE}}}` "
               "(the reader runs its ONNX export, made once beside it); "
               f"continue training with `--init {args.out / CHECKPOINT}`."),
    )
    print(json.dumps(result, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    from festival_serve.training import run_trainer

    return run_trainer(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
