"""Image decoding and cropping shared by the ingress and the models.

Images travel as ``(H, W, 3) uint8 RGB`` numpy arrays; arrays that come out of Ray's object store
are read-only, so nothing here writes into its input.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from festival_serve.pipeline.settings import IngressSettings

logger = logging.getLogger(__name__)

#: Content types the ingress accepts as a raw body, and the PIL formats they may decode to.
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}

# Transparent pixels are composited onto white, as browsers and viewers show them: a PNG with alpha here is
# mostly a cut-out sign or overlay drawn for a light page, whose dark text and borders the reader and the
# detector then see with the contrast they were drawn with (black would merge them into the background, and
# dropping alpha reveals whatever colour the encoder left under transparent pixels, often black).
_ALPHA_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


#: The Pillow plugins that may open a request's bytes.
_FORMATS = list(IMAGE_CONTENT_TYPES.values())
#: What Pillow raises on bytes it cannot decode.
_UNDECODABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class InvalidImage(ValueError):
    """The bytes are not a decodable image, or the image is unusable (empty, too large, too many scans)."""


class DecoderBusy(Exception):
    """The frames decoding or waiting to decode already hold the decoder's pixels (``max_decoding_pixels``);
    the client should retry after ``retry_after_s`` (a 503 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class DecodeTimedOut(Exception):
    """The frame was not decoded by its deadline; its decode was stopped."""


class DecodeCancelled(Exception):
    """Raised from inside a decode, at the next read of the bytes, once its cancel event is set or its
    deadline has passed."""


#: Bytes handed to the decoder per read (Pillow's default is 64 KiB): the cancel event and the deadline are
#: checked between reads. 4 KiB of a PNG of zeros inflates to ~4 MB (40-80 ms of work at 40 MP, measured);
#: a JPEG read is less, and the decode as a whole no slower than with 64 KiB reads.
DECODE_BLOCK = 4 * 1024

# libjpeg decodes at 1/2, 1/4 or 1/8 scale only: a scale that lands the longer side up to 10% under
# ``max_side`` is taken (a 4032x3024 phone frame decodes at 2016x1512 for 2048: 56 ms here) rather than
# decoding 4x the pixels at full scale and resizing them away (137 ms).
_DRAFT_UNDERSHOOT = 0.9

# Anything after 0xFF is a marker except a stuffed 0x00, a restart marker 0xD0-0xD7 (both only occur in
# entropy-coded data) and another 0xFF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS, _JPEG_EOI, _JPEG_STANDALONE = 0xDA, 0xD9, {0xD8, 0x01}  # SOI and TEM carry no length
_ORIENTATION_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the frame by 90 degrees

# Seconds to decode a pixel, for ``Retry-After``: 25 MP/s is the slowest format's rate on one core here (a
# 40 MP WebP, 1.4 s); a 40 MP PNG of zeros takes 0.2-0.7 s, a 40 MP JPEG 0.2-0.5 s in full, 45 ms drafted.
_SECONDS_PER_PIXEL = 1 / 25e6


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded."""

    format: str  # Pillow's: JPEG, MPO (a camera JPEG with a second picture), PNG or WEBP
    size: tuple[int, int]  # (width, height) as stored, before the EXIF orientation
    scan_starts: tuple[int, ...] = ()  # JPEG: offset of each scan's SOS marker, up to one over the limit

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@dataclass(frozen=True, eq=False)
class DecodedFrame:
    """A decoded frame, upright, possibly smaller than the client's (``max_side``)."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    original_size: tuple[int, int]  # (width, height) of the client's frame, upright: what the answer's boxes use

    @property
    def scale(self) -> float:
        """The client's pixels per decoded pixel (1.0 when not downscaled)."""
        return self.original_size[0] / self.pixels.shape[1]


def _pil_open(stream, formats: list[str]):
    # ultralytics (when imported in this process) replaces Image.open with a wrapper that answers an
    # unknown format by trying to install and import a HEIF plugin; call PIL's own opener instead.
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(stream, formats=formats)


def jpeg_scan_starts(data: bytes, stop_after: int | None = None) -> list[int]:
    """Offsets of the SOS markers of the first image of JPEG ``data`` (up to its EOI), as libjpeg would find
    them: marker segments are skipped by their length, entropy-coded data up to its next marker. Stops once
    ``stop_after`` are exceeded. Not a validator: a malformed stream ends the walk, and Pillow judges it."""
    starts: list[int] = []
    if not data.startswith(b"\xff\xd8"):
        return starts
    pos = 2
    # The regex finds the next marker in C: 3.2 ms through an 11 MB JPEG, 0.2 ms to stop at 65 scans of a bomb.
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        marker, after = data[found.end() - 1], found.end()
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_STANDALONE:
            pos = after
            continue
        if marker == _JPEG_SOS:
            starts.append(found.start())
            if stop_after is not None and len(starts) > stop_after:
                break
        # The length counts its own two bytes; a bogus one (< 2) still moves on. After an SOS header the
        # search runs through the scan's entropy-coded data to the next marker.
        pos = after + max(2, int.from_bytes(data[after:after + 2], "big"))
    return starts


def probe_image(data: bytes, *, max_pixels: int, max_jpeg_scans: int | None = None) -> ImageHeader:
    """Format, size and (JPEG) scans from the header, without decoding a pixel; ``InvalidImage`` when the
    bytes are no JPEG/PNG/WebP, or the frame is over ``max_pixels`` or has over ``max_jpeg_scans`` scans."""
    if not data:
        raise InvalidImage("empty image")
    try:
        with _pil_open(io.BytesIO(data), formats=_FORMATS) as img:
            return _checked_header(img, data, max_pixels, max_jpeg_scans)
    except InvalidImage:
        raise
    except _UNDECODABLE as e:
        logger.debug("undecodable image (%d bytes): %s", len(data), e)
        raise InvalidImage("not a decodable JPEG, PNG or WebP image") from e


def _checked_header(img: Image.Image, data: bytes, max_pixels: int, max_jpeg_scans: int | None) -> ImageHeader:
    width, height = img.size
    # Checked before decoding pixels: a small file can declare a huge image (decompression bomb).
    if width * height > max_pixels:
        raise InvalidImage(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
    scan_starts = ()
    if img.format in ("JPEG", "MPO"):
        # Each scan of a progressive JPEG is decoded over the whole frame: one empty scan repeated a few
        # thousand times in 140 KB costs libjpeg 15-40 s of CPU at 12 MP (measured here).
        scan_starts = tuple(jpeg_scan_starts(data, stop_after=max_jpeg_scans))
        if max_jpeg_scans is not None and len(scan_starts) > max_jpeg_scans:
            raise InvalidImage(f"JPEG has at least {len(scan_starts)} scans, over the limit of {max_jpeg_scans} "
                               "(a progressive JPEG has about 10)")
    return ImageHeader(img.format, (width, height), scan_starts)


class _DecoderFeed(io.BytesIO):
    """The bytes as the file Pillow's decoder reads (in ``decodermaxblock`` chunks): once armed, each read
    first raises ``DecodeCancelled`` if the cancel event is set or the deadline has passed, and no read
    crosses the start of a JPEG scan, so libjpeg decodes at most one scan (one pass over the whole frame,
    ~20 ms at 12 MP) between two checks."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)  # shares ``data`` until written to (never)
        self.scan_starts: tuple[int, ...] = ()
        self.deadline: float | None = None  # time.monotonic()
        self.cancel: threading.Event | None = None
        self.armed = False

    def read(self, size: int | None = -1) -> bytes:
        if self.armed:
            if self.cancel is not None and self.cancel.is_set():
                raise DecodeCancelled("the decode was cancelled")
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise DecodeCancelled("the decode ran past its deadline")
            if self.scan_starts:
                pos = self.tell()
                i = bisect.bisect_right(self.scan_starts, pos)
                if i < len(self.scan_starts) and (size is None or size < 0 or pos + size > self.scan_starts[i]):
                    size = self.scan_starts[i] - pos
        return super().read(size)


def decode_frame(data: bytes, *, max_pixels: int, max_jpeg_scans: int | None = None, max_side: int | None = None,
                 deadline: float | None = None, cancel: threading.Event | None = None) -> DecodedFrame:
    """Decode JPEG/PNG/WebP bytes to an upright ``(H, W, 3) uint8 RGB`` frame (the camera's EXIF orientation
    applied) whose longer side is at most ``max_side`` (None: as sent), with the client's upright size.

    Raises ``InvalidImage`` (before decoding when the header is over ``max_pixels`` or ``max_jpeg_scans``),
    or ``DecodeCancelled`` once ``cancel`` is set or ``deadline`` (``time.monotonic()``) passes: JPEG and PNG
    stop within one read's work; a WebP decodes in one call and is not stopped."""
    if not data:
        raise InvalidImage("empty image")
    feed = _DecoderFeed(data)
    try:
        # Only the allowed formats' plugins may look at the bytes: a GIF, BMP or TIFF (or anything else
        # Pillow could parse) is refused before any of its parsers runs. Camera JPEGs that carry a second
        # picture open as MPO through the JPEG plugin, and are accepted.
        with _pil_open(feed, formats=_FORMATS) as img:
            header = _checked_header(img, data, max_pixels, max_jpeg_scans)
            feed.scan_starts, feed.deadline, feed.cancel, feed.armed = header.scan_starts, deadline, cancel, True
            img.decodermaxblock = DECODE_BLOCK
            if max_side is not None and max(header.size) > max_side:
                _draft(img, max_side)
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            ImageOps.exif_transpose(img, in_place=True)  # rotates only when EXIF says so
            if max_side is not None and max(img.size) > max_side and _resizes_cleanly(img):
                img = _fit(img, max_side)  # before the RGB conversion: a grey PNG resizes at a byte a pixel
            rgb = _rgb_image(img)
    except (InvalidImage, DecodeCancelled):
        raise
    except _UNDECODABLE as e:
        logger.debug("undecodable image (%d bytes): %s", len(data), e)
        raise InvalidImage("not a decodable JPEG, PNG or WebP image") from e
    if max_side is not None and max(rgb.size) > max_side:
        rgb = _fit(rgb, max_side)
    pixels = np.asarray(rgb)
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise InvalidImage("image has no pixels")
    width, height = header.size
    return DecodedFrame(pixels, (height, width) if orientation in _ORIENTATION_SWAPS_SIDES else (width, height))


def decode_image(data: bytes, *, max_pixels: int, max_side: int | None = None) -> np.ndarray:
    """``decode_frame``'s pixels: ``(H, W, 3) uint8 RGB``, upright; ``InvalidImage`` when not decodable."""
    return decode_frame(data, max_pixels=max_pixels, max_side=max_side).pixels


def _draft(img: Image.Image, max_side: int) -> None:
    """Have libjpeg decode at the smallest of 1/8, 1/4, 1/2 that keeps the longer side near ``max_side`` (other
    formats: no-op). Pillow's draft picks the scale min(w // tw, h // th), rounded down to 8, 4, 2 or 1, so
    the target is the frame at that scale: both sides agree and the aspect ratio is kept."""
    width, height = img.size
    longer = max(width, height)
    for scale in (8, 4, 2):
        if longer / scale >= max_side * _DRAFT_UNDERSHOOT:
            img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
            return


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` resized so its longer side is ``max_side``. BOX after an integer reduce (reducing_gap=1) is
    area averaging, so no aliasing, and the fastest of Pillow's filters: 83 ms for 40 MP (BILINEAR: 175 ms)."""
    width, height = img.size
    ratio = max_side / max(width, height)
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return img.resize(size, Image.Resampling.BOX, reducing_gap=1.0)


def _resizes_cleanly(img: Image.Image) -> bool:
    # Pillow resizes these modes as they are (RGBA and LA premultiplied by alpha); a palette has to become
    # colours first, and a transparent colour key would be blurred into colours that no longer match it.
    return img.mode in {"RGB", "L", "RGBA", "LA"} and "transparency" not in img.info


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any decoded PIL image as ``(H, W, 3) uint8 RGB``: 16-bit grey scaled to 8 bits, alpha composited."""
    return np.asarray(_rgb_image(img))


def _rgb_image(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        # 16-bit grey PNG ("I;16", "I;16B", or "I"): scale 0..65535 to 0..255, rounded (Pillow's own
        # convert clips at 255, which turns almost every pixel white). Its rare tRNS key is ignored.
        grey = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:  # palette/grey/RGB tRNS keys included
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _ALPHA_BACKGROUND)
        rgb.paste(rgba, mask=rgba)  # out = colour x alpha + background x (1 - alpha)
        return rgb
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr


class Decoder:
    """Decodes request frames off the event loop, within limits (``IngressSettings``: ``max_image_pixels``,
    ``max_jpeg_scans``, ``decode_max_side``, ``large_image_pixels``, ``max_decoding_pixels``).

    Pillow releases the GIL while it decodes, so a 40 MP frame does not stall every other request of the
    process for the length of its decode. Frames over ``large_image_pixels`` decode on a thread of their own
    (the large lane), the rest on ``decode_threads`` threads, so a sender of huge frames waits behind its own
    kind, not in front of the cameras' frames; and the pixels decoding or waiting to decode are capped
    (``max_decoding_pixels``): a frame that would go over is refused at once (``DecoderBusy``), which bounds
    the memory decoding holds and the wait in front of every frame.
    """

    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
        self.large_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-large")
        self._lock = threading.Lock()  # the reservations are released from the decode threads
        self.reserved_pixels = 0  # of the frames decoding or waiting to decode
        self._cancels: set[threading.Event] = set()  # one per frame decoding or waiting
        self.large_busy = False  # a huge frame holds the large lane (decoding, or waiting for its thread)
        self.large_free_at = 0.0  # time.monotonic() when the large lane's rest after its last decode ends

    async def decode(self, data: bytes, *, deadline: float | None = None) -> DecodedFrame:
        """The frame, decoded on the right lane; ``InvalidImage`` (before decoding when its header is over a
        limit), ``DecoderBusy``, or ``DecodeTimedOut`` once ``deadline`` (``time.monotonic()``) passes.
        A decode whose caller is cancelled or times out is stopped at its next read."""
        settings = self.settings
        if deadline is not None and time.monotonic() >= deadline:
            raise DecodeTimedOut("the request's budget was spent before its frame could decode")
        # The header alone, on the loop (1.6 ms for a 4.8 MB 12 MP JPEG, 3.2 ms for 11 MB, mostly the scan walk):
        # it tells the lane and the pixels to reserve before a thread is taken.
        header = probe_image(data, max_pixels=settings.max_image_pixels, max_jpeg_scans=settings.max_jpeg_scans)
        pixels = min(header.pixels, settings.max_decoding_pixels)  # a frame alone always fits
        large = header.pixels > settings.large_image_pixels
        if large:
            self._take_large_lane(header)
        cancel = threading.Event()
        try:
            self._reserve(pixels, cancel)
            job = self._decode_large if large else decode_frame
            future = (self.large_lane if large else self.pool).submit(
                job, data, max_pixels=settings.max_image_pixels, max_jpeg_scans=settings.max_jpeg_scans,
                max_side=settings.decode_max_side, deadline=deadline, cancel=cancel)
        except BaseException:
            self._release(pixels, cancel, large=large)
            raise
        # When the decode ends, fails or is cancelled before it started (in that thread, or this one).
        future.add_done_callback(lambda _: self._release(pixels, cancel, large=large))
        timeout = None if deadline is None else deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except (TimeoutError, DecodeCancelled) as e:
            if isinstance(e, DecodeCancelled) and (deadline is None or time.monotonic() < deadline):
                raise  # close() stopped it
            raise DecodeTimedOut(f"the {header.size[0]}x{header.size[1]} frame did not decode within the "
                                 "request's budget") from None
        finally:
            cancel.set()  # a decode still running (its caller cancelled, or timed out) stops at its next read

    def _take_large_lane(self, header: ImageHeader) -> None:
        """Refuse a huge frame while the large lane decodes another or rests after one (``large_lane_share``)."""
        waited = max(0.0, self.large_free_at - time.monotonic())
        if self.large_busy or waited > 0:
            retry_s = max(waited, header.pixels * _SECONDS_PER_PIXEL / self.settings.large_lane_share)
            raise DecoderBusy(f"frames over {self.settings.large_image_pixels / 1e6:g} MP decode one at a time, "
                              f"at most {self.settings.large_lane_share:.0%} of a core; this "
                              f"{header.size[0]}x{header.size[1]} frame must wait", retry_s)
        self.large_busy = True  # on the event loop: no other decode() runs between the check and this

    def _decode_large(self, data: bytes, **limits) -> DecodedFrame:
        """``decode_frame`` on the large lane's thread, which then rests for its share (``large_lane_share``)."""
        began = time.monotonic()
        try:
            return decode_frame(data, **limits)
        finally:
            spent = time.monotonic() - began
            self.large_free_at = time.monotonic() + spent * (1 / self.settings.large_lane_share - 1)

    def _reserve(self, pixels: int, cancel: threading.Event) -> None:
        limit = self.settings.max_decoding_pixels
        with self._lock:
            if self.reserved_pixels + pixels > limit:
                raise DecoderBusy(f"{self.reserved_pixels / 1e6:.1f} MP are decoding or waiting to decode; this "
                                  f"frame's {pixels / 1e6:.1f} MP would go over the {limit / 1e6:.1f} MP allowed",
                                  self.reserved_pixels * _SECONDS_PER_PIXEL)
            self.reserved_pixels += pixels
            self._cancels.add(cancel)

    def _release(self, pixels: int, cancel: threading.Event, *, large: bool = False) -> None:
        if large:
            self.large_busy = False  # after _decode_large set the rest (or the frame never started)
        with self._lock:
            if cancel in self._cancels:  # once per frame, whichever of submit's failure and done comes first
                self._cancels.discard(cancel)
                self.reserved_pixels -= pixels

    def close(self) -> None:
        with self._lock:
            for cancel in self._cancels:
                cancel.set()  # running decodes stop at their next read, so the threads end soon
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.large_lane.shutdown(wait=False, cancel_futures=True)


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
