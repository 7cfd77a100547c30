"""Reading ``POST /v1/analyze``'s image off the wire: the raw bytes of an image content type, or the file part
``image`` of a multipart form, parsed while the body streams in. The whole body is capped at the ingress's
``max_body_bytes`` as it arrives, so an oversize upload is refused before it is all read. What is wrong with a
body is an ``ApiError`` (413, 415 or 400; ``festival_serve.serving.errors``); decoding the image is
``festival_serve.serving.imaging``'s. No Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from festival_serve.serving.errors import ApiError
from festival_serve.serving.imaging import IMAGE_CONTENT_TYPES


async def read_image_bytes(request: Request, limit: int, *, within_s: float | None = None,
                           hold: Callable[[int], None] | None = None) -> bytes:
    """The image's bytes, from a raw body or a multipart form; ``limit``: the most bytes the body may have,
    ``within_s``: the most seconds it may take to arrive (None: no limit). A body still arriving then is a 408:
    a client trickling its upload holds a connection, never the service. ``hold(n)`` is called before each
    chunk of ``n`` bytes is kept (it raises to refuse it: the caller's memory cap)."""
    reading = _read_image_bytes(request, limit, hold or _keep)
    if within_s is None:
        return await reading
    try:
        return await asyncio.wait_for(reading, timeout=max(0.0, within_s))
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {within_s:.1f} s; "
                       "send the image at once, or with a larger x-request-timeout-seconds") from None


def _keep(n: int) -> None:
    pass


async def _read_image_bytes(request: Request, limit: int, hold: Callable[[int], None]) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"body is {declared} bytes; the limit is {limit}")
    if content_type in IMAGE_CONTENT_TYPES:
        return await _read_limited(request, limit, hold)
    if content_type == "multipart/form-data":
        return await _read_form_image(request, limit, hold)
    supported = ", ".join([*IMAGE_CONTENT_TYPES, "multipart/form-data"])
    raise ApiError(415, "unsupported_media_type",
                   f"content type {content_type or '(none)'!r} is not supported; send one of: {supported}")


async def _read_limited(request: Request, limit: int, hold: Callable[[int], None]) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        hold(len(chunk))
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"body is over the limit of {limit} bytes")
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send the image bytes")
    return bytes(body)


async def _read_form_image(request: Request, limit: int, hold: Callable[[int], None]) -> bytes:
    """The file part named ``image`` of a multipart body, parsed while the body streams in. As for a raw body,
    the whole body (so the image part too) is capped at ``limit`` bytes, counted per chunk before it is parsed:
    an oversize upload, chunked or not, is refused after at most ``limit`` + one chunk has been read."""
    form = _ImageForm(request.headers.get("content-type", ""))
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, "payload_too_large", f"body is over the limit of {limit} bytes")
        hold(len(chunk))  # the image part's bytes are kept: at most the chunk
        form.write(chunk)
    if not received:
        raise ApiError(400, "empty_body", "the request body is empty; send a multipart form with an 'image' file")
    return form.image()


_FORM_MAX_PARTS = 8  # the image and a few small fields; more parts are not a client of this API


class _ImageForm:
    """python-multipart's streaming parser, keeping the bytes of the file part named ``image`` only (the other
    parts are parsed and dropped; their number is bounded, their size by the body's limit)."""

    def __init__(self, content_type: str) -> None:
        boundary = parse_options_header(content_type)[1].get(b"boundary")
        if not boundary:
            raise ApiError(400, "invalid_form", "the multipart content type has no boundary")
        self.parts, self.ended = 0, False
        self.data: bytearray | None = None  # the image part's bytes, from when its headers name it
        self._in_image, self._header, self._disposition = False, b"", b""
        callbacks = {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }
        try:
            self.parser = MultipartParser(boundary, callbacks)
        except FormParserError as e:  # a boundary longer than multipart allows
            raise ApiError(400, "invalid_form", "the multipart boundary is invalid") from e

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)  # an ApiError from a callback below passes through as it is
        except FormParserError as e:
            raise ApiError(400, "invalid_form", "the multipart body is malformed") from e

    def image(self) -> bytes:
        self.parser.finalize()
        if not self.ended:
            raise ApiError(400, "invalid_form", "the multipart body ends before its closing boundary")
        if self.data is None:
            raise ApiError(400, "missing_image", "multipart body needs a file field named 'image'")
        if not self.data:
            raise ApiError(400, "empty_body", "the 'image' field is empty")
        return bytes(self.data)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > _FORM_MAX_PARTS:
            raise ApiError(400, "invalid_form", f"the multipart body has more than {_FORM_MAX_PARTS} parts")
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]  # the parser bounds a header's size and a part's number of headers

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition += data[start:end]

    def _header_end(self) -> None:
        self._header = b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._disposition)[1]
        if b"name" not in options:
            raise ApiError(400, "invalid_form", "a multipart part has no content-disposition name")
        self._in_image = options[b"name"] == b"image" and b"filename" in options
        if self._in_image:
            if self.data is not None:
                raise ApiError(400, "invalid_form", "the multipart body has more than one 'image' file")
            self.data = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_image:
            self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_image = False

    def _end(self) -> None:
        self.ended = True
