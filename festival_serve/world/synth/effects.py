"""Camera effects applied to the finished frame: lighting, blur, sensor noise, JPEG compression."""

from __future__ import annotations

import functools

import cv2
import numpy as np

_NOISE_SIGMA = 24.0  # grey levels of the stored noise; a frame scales it to its own strength
_NOISE_MARGIN = 64  # pixels of slack, so every frame takes its noise from a random offset


@functools.lru_cache(maxsize=4)
def _noise_bank(height: int, width: int) -> np.ndarray:
    """Gaussian noise centred on 128, (height + margin, width + margin, 3) uint8, made once per
    frame size: drawing 1.2 M normal samples per frame would cost more than drawing the scene."""
    rng = np.random.default_rng(0x5EED)
    shape = (height + _NOISE_MARGIN, width + _NOISE_MARGIN, 3)
    return np.clip(rng.normal(128.0, _NOISE_SIGMA, shape), 0, 255).astype(np.uint8)


def lighting_lut(rng: np.random.Generator) -> np.ndarray:
    """A (256, 1, 3) uint8 table: gamma, contrast about mid-grey, gain, and a per-channel cast."""
    x = np.arange(256, dtype=np.float64)[:, None] / 255.0
    gamma = rng.uniform(0.8, 1.25)
    contrast = rng.uniform(0.75, 1.15)
    gain = rng.uniform(0.7, 1.2)
    cast = rng.uniform(-14, 14, 3)[None, :]
    y = ((x**gamma - 0.5) * contrast + 0.5) * gain * 255.0 + cast
    return np.clip(y, 0, 255).astype(np.uint8)[:, None, :]


def apply_camera(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """(H, W, 3) uint8 RGB -> the frame as a camera and an encoder would deliver it, and the
    parameters drawn (for previews and debugging)."""
    h, w = image.shape[:2]
    out = cv2.LUT(image, lighting_lut(rng))
    blur = float(rng.uniform(0.0, 1.1)) if rng.random() < 0.7 else 0.0
    if rng.random() < 0.12:  # motion blur: a short horizontal or diagonal streak
        n = int(rng.integers(3, 7))
        kernel = np.zeros((n, n), np.float32)
        if rng.random() < 0.5:
            kernel[n // 2, :] = 1.0
        else:
            np.fill_diagonal(kernel, 1.0)
        out = cv2.filter2D(out, -1, kernel / kernel.sum())
    elif blur > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    noise = float(rng.uniform(1.0, 7.0))
    oy, ox = (int(v) for v in rng.integers(0, _NOISE_MARGIN, 2))
    bank = _noise_bank(h, w)[oy : oy + h, ox : ox + w]
    k = noise / _NOISE_SIGMA
    out = cv2.addWeighted(out, 1.0, bank, k, -128.0 * k)
    quality = int(rng.integers(40, 96))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    out = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out, {"blur": blur, "noise": noise, "jpeg_quality": quality}
