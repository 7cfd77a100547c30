"""Input hardening of the HTTP layer: what an uploaded frame becomes (``festival_serve.serving.imaging``) and how a
multipart upload is read (``festival_serve.serving.uploads``), without Ray.

Streamed uploads go through ``httpx.ASGITransport``, which hands the app one chunk per item of an async
generator body (sent chunked, with no content-length), so a test can count how much of the body the app
pulled before answering; Starlette's ``TestClient`` reads a generator body whole before the app sees it.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from festival_serve.serving import imaging
from festival_serve.serving.errors import ApiError, error_response
from festival_serve.serving.uploads import read_image_bytes
from festival_serve.measure.baseline import build_app
from festival_serve.serving.imaging import Decoder, InvalidImage, decode_image, encode_jpeg
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.settings import PipelineArgs

LIMIT = 64 * 1024  # bytes: the body limit every app here runs with
CHUNK = 16 * 1024  # bytes per chunk of a streamed upload
BOUNDARY = "festivalboundary"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit RGB pixels and carries none of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# -- what a frame becomes ------------------------------------------------------------------------------------


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def test_an_exif_rotated_jpeg_comes_out_upright():
    stored = np.zeros((32, 64, 3), np.uint8)  # as the sensor wrote it: 64 wide, 32 tall
    stored[:16, :32], stored[16:, :32], stored[:16, 32:], stored[16:, 32:] = RED, GREEN, BLUE, WHITE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns the stored image 90 degrees clockwise

    upright = decode_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif), max_pixels=10_000)

    assert upright.shape == (64, 32, 3) and upright.dtype == np.uint8
    # Turned clockwise: the stored left half is now the top, the stored top row the right-hand column.
    for (y, x), colour in {(8, 24): RED, (8, 8): GREEN, (56, 24): BLUE, (56, 8): WHITE}.items():
        assert np.abs(upright[y, x].astype(int) - colour).max() < 12, (y, x, upright[y, x])


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped():
    grey16 = np.array([[65535, 32768, 0, 255]], np.uint16)

    rgb = decode_image(encode(Image.fromarray(grey16), "PNG"), max_pixels=100)

    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [255, 128, 0, 1] and (rgb == rgb[:, :, :1]).all()


def test_alpha_is_composited_onto_white_not_dropped():
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)  # clear red, opaque blue, half black

    rgb = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=100)

    assert rgb[0, 0].tolist() == [255, 255, 255]  # the background, not the red hidden under alpha 0
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert np.abs(rgb[0, 2].astype(int) - 127).max() <= 1


def test_a_palette_image_with_a_transparent_entry_keeps_its_colours_and_composites_the_rest():
    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, *BLUE])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # entry 0 (red) is fully transparent

    rgb = decode_image(encode(palette, "PNG"), max_pixels=100)

    assert rgb.tolist() == [[list(WHITE), list(BLUE)]]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_a_format_outside_jpeg_png_webp_is_refused(fmt):
    with pytest.raises(InvalidImage, match="not a decodable JPEG, PNG or WebP image"):
        decode_image(encode(Image.new("RGB", (8, 8), RED), fmt), max_pixels=100)


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)

    with pytest.raises(InvalidImage, match="over the limit of 40000000 pixels"):
        decode_image(png_header_only(9000, 9000), max_pixels=40_000_000)


def test_frames_decode_on_the_decoders_own_threads_at_most_threads_at_a_time(monkeypatch):
    running, most, threads = 0, 0, set()
    lock = threading.Lock()

    def slow_decode(data, **limits):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running -= 1
        return imaging.DecodedFrame(np.zeros((1, 1, 3), np.uint8), (1, 1))

    monkeypatch.setattr(imaging, "decode_frame", slow_decode)
    decoder = Decoder(IngressSettings(decode_threads=2))
    frame = encode_jpeg(np.zeros((8, 8, 3), np.uint8))

    async def five_frames():
        return await asyncio.gather(*(decoder.decode(frame) for _ in range(5)))

    try:
        assert len(asyncio.run(five_frames())) == 5
    finally:
        decoder.close()
    assert most == 2 and all(name.startswith("decode") for name in threads)


def _scan_bomb(target_bytes: int = 140_000) -> bytes:
    from festival_serve.measure.hostile import scan_bomb

    return scan_bomb(target_bytes)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding_and_fast():
    bomb = _scan_bomb()
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="scans"):
        imaging.probe_image(bomb, max_pixels=40_000_000, max_jpeg_scans=64)
    assert time.perf_counter() - started < 0.2


def test_a_normal_progressive_jpeg_is_accepted():
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 120, 200)).save(buf, "JPEG", progressive=True)
    frame = imaging.decode_frame(buf.getvalue(), max_pixels=40_000_000, max_jpeg_scans=64)
    assert frame.pixels.shape == (480, 640, 3) and frame.original_size == (640, 480)


def test_a_huge_frame_is_decoded_smaller_and_remembers_the_clients_size():
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.new("RGB", (6000, 4000), (200, 30, 30)).save(buf, fmt)
        frame = imaging.decode_frame(buf.getvalue(), max_pixels=40_000_000, max_side=2048)
        assert max(frame.pixels.shape[:2]) <= 2048 and frame.original_size == (6000, 4000), fmt
        assert frame.scale == pytest.approx(6000 / frame.pixels.shape[1])


def test_a_decode_past_its_deadline_stops_and_says_so():
    bomb = _scan_bomb()
    decoder = Decoder(IngressSettings(max_jpeg_scans=100_000))

    async def decode():
        return await decoder.decode(bomb, deadline=time.monotonic() + 0.2)

    started = time.monotonic()
    try:
        with pytest.raises(imaging.DecodeTimedOut):
            asyncio.run(decode())
    finally:
        decoder.close()
    assert time.monotonic() - started < 1.5


def test_pixels_over_max_decoding_pixels_are_refused_at_once_and_released_after():
    decoder = Decoder(IngressSettings(max_decoding_pixels=1000, large_image_pixels=500))
    cancel = threading.Event()
    decoder._reserve(900, cancel)  # a large frame decoding now
    small = encode_jpeg(np.zeros((10, 20, 3), np.uint8))  # 200 px
    try:
        with pytest.raises(imaging.DecoderBusy) as busy:
            asyncio.run(decoder.decode(small))
        assert busy.value.retry_after_s >= 0
        decoder._release(900, cancel)
        assert asyncio.run(decoder.decode(small)).pixels.shape == (10, 20, 3)
        assert decoder.reserved_pixels == 0
    finally:
        decoder.close()


# -- how a multipart upload is read ------------------------------------------------------------------------


async def echo(request: Request) -> JSONResponse:
    """The parsing half of the analyze route: the image bytes it would decode, or its client error."""
    try:
        data = await read_image_bytes(request, LIMIT)
    except ApiError as e:
        return error_response(e.status, e.code, e.message)
    return JSONResponse({"bytes": len(data), "head": data[:8].hex()})


ECHO_APP = Starlette(routes=[Route("/", echo, methods=["POST"])])


def part(name: str, payload: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + payload + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


class Upload:
    """A body sent chunk by chunk (chunked transfer encoding); ``sent`` counts what the app pulled."""

    def __init__(self, body: bytes, chunk: int = CHUNK) -> None:
        self.body, self.chunk, self.sent = body, chunk, 0

    async def __aiter__(self):
        for start in range(0, len(self.body), self.chunk):
            piece = self.body[start:start + self.chunk]
            self.sent += len(piece)
            yield piece


def post(app, body: bytes | Upload, content_type: str = f"multipart/form-data; boundary={BOUNDARY}",
         path: str = "/") -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            content = body.__aiter__() if isinstance(body, Upload) else body
            return await client.post(path, content=content, headers={"content-type": content_type})

    return asyncio.run(send())


def error_code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_the_image_part_is_returned_and_other_fields_are_ignored():
    jpeg = encode(Image.new("RGB", (16, 16), RED), "JPEG")
    upload = Upload(form(part("camera", b"gate-3"), part("image", jpeg, "frame.jpg"), part("note", b"x" * 100)), 7)

    response = post(ECHO_APP, upload)

    assert response.status_code == 200
    assert response.json() == {"bytes": len(jpeg), "head": jpeg[:8].hex()}


def test_an_oversize_chunked_upload_is_refused_after_at_most_the_limit_plus_one_chunk():
    upload = Upload(form(part("image", b"\xff" * (16 * LIMIT), "frame.jpg")))

    response = post(ECHO_APP, upload)

    assert error_code(response) == (413, "payload_too_large")
    assert upload.sent <= LIMIT + CHUNK


def test_the_baseline_server_refuses_an_oversize_chunked_upload_while_it_streams():
    app = build_app(PipelineArgs(ingress=IngressSettings(max_body_bytes=LIMIT)), models={})
    upload = Upload(form(part("image", b"\xff" * (16 * LIMIT), "frame.jpg")))

    response = post(app, upload, path="/v1/analyze")

    assert error_code(response) == (413, "payload_too_large")
    assert upload.sent <= LIMIT + CHUNK


def test_the_baseline_server_refuses_a_gif_sent_as_a_jpeg():
    app = build_app(PipelineArgs(), models={})

    response = post(app, encode(Image.new("RGB", (8, 8), RED), "GIF"), "image/jpeg", path="/v1/analyze")

    assert error_code(response) == (400, "invalid_image")


@pytest.mark.parametrize("body, content_type", [
    (b"this is not a multipart body", f"multipart/form-data; boundary={BOUNDARY}"),
    (form(part("image", b"\xff\xd8", "frame.jpg")), "multipart/form-data"),  # no boundary
    (part("image", b"\xff\xd8\xff" * 10, "frame.jpg"), f"multipart/form-data; boundary={BOUNDARY}"),  # cut short
    (form(*[part(f"field{i}", b"1") for i in range(9)]), f"multipart/form-data; boundary={BOUNDARY}"),
    (form(part("image", b"a", "a.jpg"), part("image", b"b", "b.jpg")), f"multipart/form-data; boundary={BOUNDARY}"),
], ids=["garbage", "no-boundary", "truncated", "too-many-parts", "two-images"])
def test_a_malformed_multipart_body_is_a_400_invalid_form(body, content_type):
    assert error_code(post(ECHO_APP, Upload(body), content_type)) == (400, "invalid_form")


@pytest.mark.parametrize("body", [
    form(part("camera", b"gate-3")),
    form(part("image", b"\xff\xd8\xff")),  # a plain field, not a file
], ids=["no-image-field", "image-not-a-file"])
def test_a_form_without_an_image_file_is_a_400_missing_image(body):
    assert error_code(post(ECHO_APP, Upload(body))) == (400, "missing_image")


@pytest.mark.parametrize("body", [b"", form(part("image", b"", "frame.jpg"))], ids=["empty-body", "empty-image"])
def test_an_empty_upload_is_a_400_empty_body(body):
    assert error_code(post(ECHO_APP, Upload(body))) == (400, "empty_body")
