"""Image decoding and cropping shared by the ingress and the models.

Images travel as ``(H, W, 3) uint8 RGB`` numpy arrays; arrays that come out of Ray's object store
are read-only, so nothing here writes into its input.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Content types the ingress accepts as a raw body, and the PIL formats they may decode to.
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


class InvalidImage(ValueError):
    """The bytes are not a decodable image, or the image is unusable (empty, too large)."""


def _pil_open(stream):
    # ultralytics (when imported in this process) replaces Image.open with a wrapper that answers an
    # unknown format by trying to install and import a HEIF plugin; call PIL's own opener instead.
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(stream)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to ``(H, W, 3) uint8 RGB``; raise ``InvalidImage`` otherwise."""
    if not data:
        raise InvalidImage("empty image")
    try:
        with _pil_open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_CONTENT_TYPES.values():
                raise InvalidImage(f"unsupported image format {img.format!r}; send JPEG, PNG or WebP")
            width, height = img.size
            # Checked before decoding pixels: a small file can declare a huge image (decompression bomb).
            if width * height > max_pixels:
                raise InvalidImage(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
            rgb = np.asarray(img.convert("RGB"))
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"not a decodable image: {e}") from e
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidImage("image has no pixels")
    return rgb


def crop(image: np.ndarray, box: tuple[float, float, float, float], padding: float = 0.0) -> np.ndarray:
    """The pixels of ``box`` (x1, y1, x2, y2), grown by ``padding`` x its size per side, clipped to the image."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    pad_x, pad_y = (x2 - x1) * padding, (y2 - y1) * padding
    left, top = max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y))
    right, bottom = min(width, int(round(x2 + pad_x))), min(height, int(round(y2 + pad_y)))
    return image[top:bottom, left:right]


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
