"""Draw an ``/v1/analyze`` answer onto its frame: sign boxes with their label and read text, hazard
cells (translucent fill + label), and the scene description in a banner along the bottom.

Vietnamese needs a font with its stacked diacritics (Ệ, Ỗ, Ư…): the generator's bundled TTF under
``data/synth/`` when present, else DejaVu Sans Bold, else PIL's default (with a warning, since it
may render tone marks as boxes).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from festival_serve import DATA_DIR
from festival_serve.serving.flow import degraded_line
from festival_serve.models.hazard_cells.yolic import CellLayout, load_layout

logger = logging.getLogger(__name__)

SYNTH_FONTS = DATA_DIR / "synth"
SYSTEM_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")

SIGN_COLOUR = (255, 220, 0)
TEXT_COLOUR = (255, 255, 255)
LABEL_BACKGROUND = (0, 0, 0, 190)
CELL_ALPHA = 70  # fill opacity of a flagged cell, 0–255
LAYOUT_ALPHA = 60  # outline opacity of the unflagged cells when a layout is given
#: One colour per YOLIC outdoor class (RGB), so a cell's colour tells its most likely hazard.
HAZARD_COLOURS = {
    "Bump": (255, 140, 0), "Column": (150, 150, 150), "Dent": (139, 69, 19), "Fence": (0, 160, 160),
    "Creature": (255, 0, 160), "Vehicle": (230, 30, 30), "Wall": (120, 90, 200), "Weed": (60, 200, 60),
    "ZebraCrossing": (255, 255, 255), "TrafficCone": (255, 100, 0), "TrafficSign": (0, 120, 255),
}
DEFAULT_HAZARD_COLOUR = (255, 0, 255)


@functools.lru_cache(maxsize=1)
def font_path() -> Path | None:
    """The TTF to draw with: the generator's bundled font, else DejaVu Sans Bold, else ``None``."""
    bundled = sorted(SYNTH_FONTS.glob("*.ttf")) + sorted(SYNTH_FONTS.glob("*.otf"))
    bold = [p for p in bundled if "bold" in p.name.lower()]
    for candidate in (*bold, *bundled, SYSTEM_FONT):
        if candidate.is_file():
            return candidate
    logger.warning("no TTF font found (looked in %s and %s): using PIL's default font, which may not draw "
                   "Vietnamese tone marks", SYNTH_FONTS, SYSTEM_FONT)
    return None


@functools.lru_cache(maxsize=16)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path()
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)


def annotate(image: np.ndarray, result: dict[str, Any], *, layout: CellLayout | str | None = None,
             banner: str | None = None) -> Image.Image:
    """``image`` (``(H, W, 3) uint8 RGB``, the frame that was analysed) with ``result`` (the
    ``/v1/analyze`` JSON, or a stream's frame message: signs then carry their ``track_id``) drawn on it; the
    same size as ``image``. With ``layout`` (a :class:`CellLayout` or a layout name) the unflagged cells are
    outlined faintly too. ``banner``: the bottom line's text instead of the description (a stream's events)."""
    base = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGBA")
    width, height = base.size
    scale = max(width, height) / 848  # text and lines sized for the frame, 1.0 at YOLIC's 848×480
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    if isinstance(layout, str):
        layout = load_layout(layout)
    hazards = result.get("hazards") or []
    if layout is not None:
        _draw_layout(draw, layout, (width, height), flagged={h["cell"] for h in hazards})
    for cell in hazards:
        _draw_cell(draw, cell, layout, (width, height), scale)
    for sign in result.get("signs") or []:
        _draw_sign(draw, sign, width, scale)
    _draw_banner(draw, banner if banner is not None else _banner_text(result), (width, height), scale)
    return Image.alpha_composite(base, overlay).convert("RGB")


def _banner_text(result: dict[str, Any]) -> str:
    if result.get("description"):
        return result["description"]
    reasons = [degraded_line(entry) for entry in result.get("degraded") or []]
    describer = [r for r in reasons if r.startswith("scene_describer")]
    if describer or reasons:
        return f"(no description: {'; '.join(describer or reasons)})"
    return "(no description: not requested)"


def _cell_box(cell: dict, layout: CellLayout | None, size: tuple[int, int]) -> tuple[float, ...] | None:
    if cell.get("box"):
        return tuple(cell["box"])
    if layout is not None and 0 <= cell["cell"] < layout.num_cells:
        return tuple(layout.boxes[cell["cell"]] * np.array([*size, *size]))
    return None


def _draw_layout(draw: ImageDraw.ImageDraw, layout: CellLayout, size: tuple[int, int], flagged: set[int]) -> None:
    for i, box in enumerate(layout.boxes * np.array([*size, *size])):
        if i not in flagged:
            draw.rectangle(tuple(box), outline=(255, 255, 255, LAYOUT_ALPHA), width=1)


def _draw_cell(draw: ImageDraw.ImageDraw, cell: dict, layout: CellLayout | None, size: tuple[int, int], scale: float) -> None:
    box = _cell_box(cell, layout, size)
    labels = cell.get("labels") or []
    if box is None or not labels:
        return
    colour = HAZARD_COLOURS.get(labels[0]["label"], DEFAULT_HAZARD_COLOUR)
    draw.rectangle(box, fill=(*colour, CELL_ALPHA), outline=(*colour, 200), width=max(1, round(scale)))
    font = load_font(max(9, round(11 * scale)))
    text = ", ".join(lab["label"] for lab in labels)
    x, y = box[0] + 2 * scale, box[1] + 1 * scale
    # Clip the label to its cell: the outdoor layout's cells are small, and labels must not pile up.
    text = _fit(draw, text, font, box[2] - box[0] - 4 * scale)
    if text:
        draw.text((x, y), text, font=font, fill=(255, 255, 255, 230), stroke_width=1, stroke_fill=(0, 0, 0, 230))


def _draw_sign(draw: ImageDraw.ImageDraw, sign: dict, frame_width: int, scale: float) -> None:
    x1, y1, x2, y2 = sign["box"]
    line = max(2, round(3 * scale))
    draw.rectangle((x1, y1, x2, y2), outline=(*SIGN_COLOUR, 255), width=line)
    font = load_font(max(12, round(16 * scale)))
    caption = sign.get("label", "sign")
    if sign.get("track_id") is not None:
        caption = f"#{sign['track_id']} {caption}"
    if sign.get("score") is not None:
        caption += f" {sign['score']:.2f}"
    if sign.get("text"):
        caption += f" · {sign['text']}"
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    pad = 3 * scale
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    tx = max(0.0, min(x1, frame_width - tw))  # inside the frame at the right edge
    ty = y1 - th if y1 - th >= 0 else y2  # above the box, or below it at the top edge
    draw.rectangle((tx, ty, tx + tw, ty + th), fill=LABEL_BACKGROUND)
    draw.text((tx + pad - left, ty + pad - top), caption, font=font, fill=(*SIGN_COLOUR, 255))


def _draw_banner(draw: ImageDraw.ImageDraw, text: str, size: tuple[int, int], scale: float) -> None:
    width, height = size
    font = load_font(max(12, round(15 * scale)))
    pad = round(8 * scale)
    lines = _wrap(draw, text, font, width - 2 * pad)[:4]  # at most 4 lines: the banner must not hide the road
    line_height = draw.textbbox((0, 0), "ĐẾỖg", font=font)[3] + round(4 * scale)
    top = height - len(lines) * line_height - 2 * pad
    draw.rectangle((0, top, width, height), fill=(0, 0, 0, 170))
    for i, line in enumerate(lines):
        draw.text((pad, top + pad + i * line_height), line, font=font, fill=(*TEXT_COLOUR, 255))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap measured in pixels with the real font."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            trial = f"{current} {word}".strip()
            if draw.textlength(trial, font=font) <= max_width or not current:
                current = trial
            else:
                lines.append(current)
                current = word
        lines.append(current)
    return [_fit(draw, line, font, max_width) for line in lines]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> str:
    """``text`` cut (with an ellipsis) to fit ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    for end in range(len(text) - 1, 0, -1):
        cut = text[:end] + "…"
        if draw.textlength(cut, font=font) <= max_width:
            return cut
    return ""

