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
from festival_serve.pipeline.settings import IngressSettings, PipelineArgs

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


def _scan_bomb(size: tuple[int, int] = (848, 480)) -> bytes:
    """A 140 KB progressive JPEG whose empty refinement scan repeats thousands of times
    (``festival_serve.measure.hostile``): at 848x480 (~11,000 scans) Pillow takes 3-7 s to decode it whole here,
    at 4032x3024 (~2,600 scans, ~10 ms each) 20-40 s."""
    from festival_serve.measure.hostile import scan_bomb

    return scan_bomb(140_000, size=size)


def quadrants(width: int, height: int) -> np.ndarray:
    """A ``width`` x ``height`` frame of four colours: RED top left, BLUE top right, GREEN and WHITE below."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:] = RED, BLUE, GREEN, WHITE
    return image


def assert_colours(pixels: np.ndarray, expected: dict, tolerance: int = 16) -> None:
    for (y, x), colour in expected.items():
        assert np.abs(pixels[y, x].astype(int) - colour).max() < tolerance, (y, x, pixels[y, x])


def test_the_scan_walk_finds_every_scan_and_no_marker_inside_data():
    from festival_serve.measure.hostile import jpeg_segments  # an independent walker

    noise = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)  # ~1 byte in 256 stuffed
    progressive = encode(Image.fromarray(noise), "JPEG", progressive=True, restart_marker_blocks=2)
    assert progressive.count(b"\xff\x00") and any(progressive.count(bytes([0xFF, rst])) for rst in range(0xD0, 0xD8))
    sos = [start for marker, start, _ in jpeg_segments(progressive) if marker == 0xDA]

    assert imaging.jpeg_scan_starts(progressive) == sos and 2 < len(sos) <= 64
    assert imaging.jpeg_scan_starts(progressive, stop_after=2) == sos[:3]  # stops one over the limit
    # A comment that quotes an SOS marker is skipped by its length, as libjpeg skips it.
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 4) + b"\xff\xda\x00\x08"
    assert len(imaging.jpeg_scan_starts(progressive[:2] + comment + progressive[2:])) == len(sos)
    assert imaging.jpeg_scan_starts(encode(Image.fromarray(noise), "PNG")) == []


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding_and_fast(monkeypatch):
    bomb = _scan_bomb()

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    decoder = Decoder(IngressSettings())  # max_jpeg_scans: 64
    try:
        started = time.perf_counter()
        with pytest.raises(InvalidImage, match="at least 65 scans, over the limit of 64"):
            asyncio.run(decoder.decode(bomb))
        with pytest.raises(InvalidImage, match="at least 65 scans, over the limit of 64"):
            imaging.decode_frame(bomb, max_pixels=40_000_000, max_jpeg_scans=64)
        assert time.perf_counter() - started < 0.2
        assert decoder.reserved_pixels == 0
    finally:
        decoder.close()


def test_a_normal_progressive_jpeg_is_accepted():
    data = encode(Image.fromarray(quadrants(640, 480)), "JPEG", progressive=True)
    assert 2 < len(imaging.jpeg_scan_starts(data)) <= 64

    frame = imaging.decode_frame(data, max_pixels=40_000_000, max_jpeg_scans=64, max_side=2048)

    assert frame.pixels.shape == (480, 640, 3) and frame.original_size == (640, 480) and frame.scale == 1.0
    assert_colours(frame.pixels, {(100, 100): RED, (100, 500): BLUE, (400, 100): GREEN, (400, 500): WHITE})


@pytest.mark.parametrize("size, decoded_at, shape", [
    ((6000, 4000), (3000, 2000), (1365, 2048, 3)),  # libjpeg at 1/2, then resized to the longer side 2048
    ((4032, 3024), (2016, 1512), (1512, 2016, 3)),  # at 1/2 already near 2048 (within 10%): not resized
])
def test_a_huge_jpeg_is_decoded_by_libjpeg_at_a_smaller_scale(monkeypatch, size, decoded_at, shape):
    from PIL import JpegImagePlugin

    loaded_at = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        loaded_at.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    width, height = size

    frame = imaging.decode_frame(encode(Image.fromarray(quadrants(width, height)), "JPEG"), max_pixels=40_000_000,
                                 max_side=2048)

    assert loaded_at[0] == decoded_at  # libjpeg decoded the smaller frame
    assert frame.pixels.shape == shape and frame.original_size == size
    assert frame.scale == pytest.approx(width / shape[1])
    h, w = shape[:2]
    assert_colours(frame.pixels, {(h // 4, w // 4): RED, (h // 4, 3 * w // 4): BLUE, (3 * h // 4, w // 4): GREEN,
                                  (3 * h // 4, 3 * w // 4): WHITE})


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_a_big_png_is_downscaled(mode):
    image = Image.fromarray(quadrants(3000, 2000)).convert(mode)

    frame = imaging.decode_frame(encode(image, "PNG"), max_pixels=40_000_000, max_side=1000)

    assert frame.pixels.shape == (667, 1000, 3) and frame.pixels.dtype == np.uint8
    assert frame.original_size == (3000, 2000) and frame.scale == pytest.approx(3.0)
    expected = np.asarray(image.convert("RGB"))[[500, 500, 1500, 1500], [750, 2250, 750, 2250]]
    assert_colours(frame.pixels, dict(zip([(167, 250), (167, 750), (500, 250), (500, 750)], expected.tolist())), 2)


def test_decode_image_downscales_only_when_asked():
    data = encode(Image.fromarray(quadrants(3000, 2000)), "PNG")
    assert decode_image(data, max_pixels=40_000_000).shape == (2000, 3000, 3)
    assert decode_image(data, max_pixels=40_000_000, max_side=1000).shape == (667, 1000, 3)


def test_an_exif_rotated_big_jpeg_comes_out_upright_with_its_upright_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns the stored image 90 degrees clockwise
    stored = quadrants(1600, 800)  # as the sensor wrote it: 1600 wide, 800 tall

    frame = imaging.decode_frame(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif),
                                 max_pixels=40_000_000, max_side=320)

    assert frame.pixels.shape == (320, 160, 3)  # drafted at 1/4 (400x200), resized to 320x160, then turned
    assert frame.original_size == (800, 1600) and frame.scale == pytest.approx(5.0)
    # Turned clockwise: the stored left half is now the top, the stored top row the right-hand column.
    assert_colours(frame.pixels, {(40, 120): RED, (40, 40): GREEN, (280, 120): BLUE, (280, 40): WHITE})


def test_a_decode_stops_within_a_read_once_cancelled_or_past_its_deadline():
    bomb = _scan_bomb()  # 3-7 s whole
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(imaging.DecodeCancelled, match="cancelled"):
        imaging.decode_frame(bomb, max_pixels=40_000_000, cancel=cancel)
    assert time.monotonic() - started < 1.5

    bomb = _scan_bomb((4032, 3024))  # 12 MP: each scan is ~10 ms of work over the whole frame
    started = time.monotonic()
    with pytest.raises(imaging.DecodeCancelled, match="deadline"):
        imaging.decode_frame(bomb, max_pixels=40_000_000, deadline=started + 0.2)
    assert time.monotonic() - started < 1.5


def test_the_decoders_reads_end_at_each_scan_and_check_for_a_cancel_first():
    # A 4 KiB read of a bomb holds ~100 of its scans (1.4-1.9 s of work at 12 MP, measured): read by read, libjpeg
    # gets one scan at most before the next check.
    feed = imaging._DecoderFeed(bytes(10_000))
    feed.scan_starts, feed.armed, feed.cancel = (100, 5000), True, threading.Event()

    assert [len(feed.read(4096)) for _ in range(5)] == [100, 4096, 804, 4096, 904]
    feed.seek(0)
    feed.cancel.set()
    with pytest.raises(imaging.DecodeCancelled):
        feed.read(4096)


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_decode_past_its_deadline_is_stopped_and_says_so():
    decoder = Decoder(IngressSettings(max_jpeg_scans=100_000))
    started = time.monotonic()
    try:
        with pytest.raises(imaging.DecodeTimedOut, match="did not decode within"):
            asyncio.run(decoder.decode(_scan_bomb(), deadline=started + 0.2))
        assert time.monotonic() - started < 1.5
        assert wait_until(lambda: decoder.reserved_pixels == 0, 1.5)  # the thread stopped too: its pixels are free
    finally:
        decoder.close()


def test_a_cancelled_caller_stops_its_decode_and_frees_its_pixels():
    decoder = Decoder(IngressSettings(max_jpeg_scans=100_000))

    async def cancelled_midway():
        task = asyncio.create_task(decoder.decode(_scan_bomb()))
        await asyncio.sleep(0.3)
        assert decoder.reserved_pixels == 848 * 480  # decoding
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancelled_midway())
        assert wait_until(lambda: decoder.reserved_pixels == 0, 1.5)  # stopped at its next read, seconds early
    finally:
        decoder.close()


def test_large_frames_decode_on_their_own_lane_and_pixels_are_admitted(monkeypatch):
    large, other_large = png_header_only(4000, 3000), png_header_only(4000, 2500)  # 12 and 10 MP, headers only
    small = encode(Image.fromarray(quadrants(64, 48)), "PNG")
    real_decode_frame = imaging.decode_frame
    large_started, release = threading.Event(), threading.Event()
    threads = {}

    def decode_frame(data, **limits):
        threads[data] = threading.current_thread().name
        if data == large:  # decodes until the test lets it finish
            large_started.set()
            assert release.wait(10)
            return imaging.DecodedFrame(np.zeros((1, 1, 3), np.uint8), (4000, 3000))
        return real_decode_frame(data, **limits)

    monkeypatch.setattr(imaging, "decode_frame", decode_frame)
    decoder = Decoder(IngressSettings(large_image_pixels=8_000_000, max_decoding_pixels=14_000_000))

    async def scenario():
        first = asyncio.create_task(decoder.decode(large))
        assert await asyncio.to_thread(large_started.wait, 10)
        assert decoder.reserved_pixels == 12_000_000

        started = time.monotonic()
        with pytest.raises(imaging.DecoderBusy) as busy:  # the large lane is taken: refused without waiting
            await decoder.decode(other_large)
        assert "one at a time" in busy.value.message and busy.value.retry_after_s > 0
        with pytest.raises(imaging.DecoderBusy) as busy:  # 12 + 4 MP over 14: refused by pixels
            await decoder.decode(png_header_only(2000, 2000))
        assert "would go over" in busy.value.message
        assert time.monotonic() - started < 0.5
        assert other_large not in threads

        frame = await asyncio.wait_for(decoder.decode(small), 5)  # not behind the large frame
        assert frame.pixels.shape == (48, 64, 3)
        with pytest.raises(InvalidImage):  # a header with no pixels behind it: fails in the decode
            await decoder.decode(png_header_only(100, 100))
        assert decoder.reserved_pixels == 12_000_000  # the small frames' pixels came back, error or not

        release.set()
        assert (await first).original_size == (4000, 3000)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        decoder.close()
    assert decoder.reserved_pixels == 0
    assert threads[large].startswith("decode-large") and threads[small].startswith("decode_")


def test_the_large_lane_rests_for_its_share_after_each_huge_frame_and_refuses_huge_frames_meanwhile():
    huge, camera = encode(Image.fromarray(quadrants(640, 480)), "PNG"), encode(Image.fromarray(quadrants(8, 8)), "PNG")
    decoder = Decoder(IngressSettings(large_image_pixels=1000, large_lane_share=0.2))  # 640x480 counts as huge

    async def scenario():
        began = time.monotonic()
        await decoder.decode(huge)
        spent = time.monotonic() - began
        rest = decoder.large_free_at - time.monotonic()
        assert 0 < rest <= spent * 4 + 0.05  # t x (1/0.2 - 1)
        with pytest.raises(imaging.DecoderBusy) as busy:
            await decoder.decode(huge)
        assert busy.value.retry_after_s >= rest - 0.05
        assert (await decoder.decode(camera)).pixels.shape == (8, 8, 3)  # the cameras' frames are not held
        await asyncio.sleep(max(0.0, decoder.large_free_at - time.monotonic()) + 0.01)
        assert (await decoder.decode(huge)).pixels.shape == (480, 640, 3)

    try:
        asyncio.run(scenario())
    finally:
        decoder.close()
    assert decoder.reserved_pixels == 0 and not decoder.large_busy


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
