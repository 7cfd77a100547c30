"""Image decoding and cropping shared by the ingress and the models.

Images travel as ``(H, W, 3) uint8 RGB`` numpy arrays; arrays that come out of Ray's object store
are read-only, so nothing here writes into its input.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Content types the ingress accepts as a raw body, and the PIL formats they may decode to.
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}

# Transparent pixels are composited onto white, as browsers and viewers show them: a PNG with alpha here is
# mostly a cut-out sign or overlay drawn for a light page, whose dark text and borders the reader and the
# detector then see with the contrast they were drawn with (black would merge them into the background, and
# dropping alpha reveals whatever colour the encoder left under transparent pixels, often black).
_ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class InvalidImage(ValueError):
    """The bytes are not a decodable image, or the image is unusable (empty, too large)."""


def _pil_open(stream, formats: list[str]):
    # ultralytics (when imported in this process) replaces Image.open with a wrapper that answers an
    # unknown format by trying to install and import a HEIF plugin; call PIL's own opener instead.
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(stream, formats=formats)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to ``(H, W, 3) uint8 RGB``, upright as the camera's EXIF orientation says;
    raise ``InvalidImage`` otherwise."""
    if not data:
        raise InvalidImage("empty image")
    try:
        # Only the allowed formats' plugins may look at the bytes: a GIF, BMP or TIFF (or anything else
        # Pillow could parse) is refused before any of its parsers runs. Camera JPEGs that carry a second
        # picture open as MPO through the JPEG plugin, and are accepted.
        with _pil_open(io.BytesIO(data), formats=list(IMAGE_CONTENT_TYPES.values())) as img:
            width, height = img.size
            # Checked before decoding pixels: a small file can declare a huge image (decompression bomb).
            if width * height > max_pixels:
                raise InvalidImage(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
            ImageOps.exif_transpose(img, in_place=True)  # decodes; rotates only when EXIF says so
            rgb = to_rgb(img)
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        logger.debug("undecodable image (%d bytes): %s", len(data), e)
        raise InvalidImage("not a decodable JPEG, PNG or WebP image") from e
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidImage("image has no pixels")
    return rgb


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any decoded PIL image as ``(H, W, 3) uint8 RGB``: 16-bit grey scaled to 8 bits, alpha composited."""
    if img.mode.startswith("I"):
        # 16-bit grey PNG ("I;16", "I;16B", or "I"): scale 0..65535 to 0..255, rounded (Pillow's own
        # convert clips at 255, which turns almost every pixel white). Its rare tRNS key is ignored.
        grey = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:  # palette/grey/RGB tRNS keys included
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        rgb.paste(rgba, mask=rgba)  # out = colour x alpha + background x (1 - alpha)
        return np.asarray(rgb)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # L, 1, P, CMYK, YCbCr


class Decoder:
    """Decodes request images off the event loop, on a pool of ``threads`` threads of its own.

    Pillow releases the GIL while it decodes, so a 40 MP frame no longer stalls every other request of
    the process for the length of its decode; the pool's size bounds how many frames decode at once (each
    holds up to ``max_pixels`` x 3 bytes) and how many cores decoding takes from the event loop.
    """

    def __init__(self, threads: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    async def decode(self, data: bytes) -> np.ndarray:
        """``decode_image`` on the pool: ``(H, W, 3) uint8 RGB``, or ``InvalidImage``."""
        work = functools.partial(decode_image, data, max_pixels=self.max_pixels)
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


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
