"""A synthetic festival road world: seeded road scenes with Vietnamese traffic signs and YOLIC
hazard objects, and their exact ground truth (sign boxes, classes and texts; per-cell hazard labels).

    scene = generate_scene(seed, size=(848, 480))
    scene.image   # (H, W, 3) uint8 RGB, after lighting, blur, noise and a JPEG round trip
    scene.signs   # SignTruth(box, sign_class, text, occluded) per sign
    scene.cells   # (104, 11) bool, YOLIC outdoor layout x hazard classes

Plain numpy/OpenCV/PIL, no Ray: training loops call it thousands of times (about 18 ms per
848x480 scene on one core, 30 ms at 1280x720).
The rules that decide the ground truth are documented in :mod:`festival_serve.world.synth.scene`.
"""

from __future__ import annotations

from festival_serve.world.synth.scene import generate_scene
from festival_serve.world.synth.truth import INFO_TEXTS, SIGN_CLASSES, SPEED_LIMITS, TEXT_CLASSES, Scene, SignTruth

#: First seed of each split. Splits are disjoint ranges of SPLIT_SPAN seeds: training draws from
#: "train" only, so no held-out "test" scene is ever seen in training.
SPLIT_STARTS = {"train": 0, "val": 5_000_000, "test": 10_000_000}
SPLIT_SPAN = 5_000_000


def scene_seeds(split: str, count: int, skip: int = 0) -> list[int]:
    """``count`` seeds of ``split`` ("train", "val" or "test") after its first ``skip`` (a continued training
    run skips the scenes the earlier run saw)."""
    if split not in SPLIT_STARTS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLIT_STARTS)}")
    if skip < 0 or count < 0 or skip + count > SPLIT_SPAN:
        raise ValueError(f"skip + count must be in [0, {SPLIT_SPAN}] (both >= 0), got skip={skip}, count={count}")
    start = SPLIT_STARTS[split] + skip
    return list(range(start, start + count))


def save_preview(path, seeds, *, size: tuple[int, int] = (848, 480), columns: int = 2) -> None:
    """A PNG grid of the scenes of ``seeds`` with their sign boxes, texts and hazard cells drawn."""
    from festival_serve.world.synth.preview import save_preview as _save

    _save(path, seeds, size=size, columns=columns)


__all__ = [
    "INFO_TEXTS",
    "SIGN_CLASSES",
    "SPEED_LIMITS",
    "SPLIT_STARTS",
    "TEXT_CLASSES",
    "Scene",
    "SignTruth",
    "generate_scene",
    "save_preview",
    "scene_seeds",
]
