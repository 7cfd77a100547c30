"""A contact sheet of generated scenes with their ground truth drawn on, to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from festival_serve.world.synth.scene import cell_pixels, generate_scene, outdoor_layout
from festival_serve.world.synth.signs import font

_CLASS_COLOURS = [
    (255, 230, 0),
    (160, 160, 160),
    (120, 60, 20),
    (0, 200, 255),
    (255, 0, 200),
    (0, 120, 255),
    (200, 80, 40),
    (0, 220, 0),
    (255, 255, 255),
    (255, 120, 0),
    (255, 0, 0),
]

_TAGS = {"TrafficCone": "Cn", "TrafficSign": "Sg", "ZebraCrossing": "Zb", "Weed": "Wd", "Wall": "Wl"}


def annotate(scene) -> Image.Image:
    layout = outdoor_layout()
    img = Image.fromarray(scene.image).convert("RGB")
    d = ImageDraw.Draw(img, "RGBA")
    h, w = scene.image.shape[:2]
    small = font(max(9, h // 48))
    for (x1, y1, x2, y2), flags in zip(cell_pixels(layout, w, h), scene.cells):
        hits = np.flatnonzero(flags)
        if hits.size == 0:
            continue
        d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=_CLASS_COLOURS[hits[0]] + (200,), width=1)
        tag = "".join(_TAGS.get(layout.classes[i], layout.classes[i][:2]) for i in hits)
        d.text((x1 + 2, y1 + 1), tag, fill=_CLASS_COLOURS[hits[0]] + (255,), font=small)
    for sign in scene.signs:
        x1, y1, x2, y2 = sign.box
        d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 0, 255, 255), width=2)
        label = (
            sign.sign_class + (f" '{sign.text}'" if sign.text else "") + (f" occ={sign.occluded:.2f}" if sign.occluded else "")
        )
        d.text((x1, y2 + 2), label, fill=(255, 255, 255, 255), font=small, stroke_width=2, stroke_fill=(0, 0, 0, 255))
    d.text(
        (4, h - 4),
        f"seed {scene.seed}",
        fill=(255, 255, 255, 255),
        font=small,
        anchor="ld",
        stroke_width=2,
        stroke_fill=(0, 0, 0, 255),
    )
    return img


def save_preview(path, seeds, *, size: tuple[int, int] = (848, 480), columns: int = 2) -> None:
    tiles = [annotate(generate_scene(int(s), size=size)) for s in seeds]
    if not tiles:
        raise ValueError("no seeds to preview")
    w, h = size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * w, (i // columns) * h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
