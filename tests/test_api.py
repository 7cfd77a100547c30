"""``analyze_frame``, the one flow of a frame that both the Serve ingress and the baseline server run, driven
here by plain async stages (its contract: any ``callable(*args) -> awaitable``)."""

from __future__ import annotations

import asyncio

import numpy as np

from festival_serve.api import analyze_frame
from festival_serve.ocr import SignText
from festival_serve.settings import IngressSettings
from festival_serve.signs import SignDetection


def sign(x: float, label: str, has_text: bool) -> SignDetection:
    return SignDetection(box=(x, 10.0, x + 20.0, 30.0), label=label, class_id=0, score=0.9, has_text=has_text)


class Reader:
    """Reads a crop as its mean pixel value, so each answer says which crop it came from."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def __call__(self, crops):
        self.calls.append(len(crops))
        return [SignText(str(int(c.mean())), 1.0, ()) for c in crops]


def analyze(found, settings: IngressSettings, reader: Reader) -> dict:
    image = np.zeros((40, 200, 3), np.uint8)
    for i in range(5):  # the sign at x = 40 i (20 px wide) sits on pixels of value 10 (i + 1)
        image[:, 40 * i: 40 * i + 30] = 10 * (i + 1)
    stages = {"sign_detector": lambda frame: asyncio.sleep(0, found), "hazard_cells": lambda frame: asyncio.sleep(0, []),
              "sign_reader": reader, "scene_describer": None}
    return asyncio.run(analyze_frame(image, image, False, stages, settings, {}))


def test_only_signs_with_text_are_read_and_each_text_lands_on_its_sign():
    found = [sign(0, "children", False), sign(40, "speed_limit", True), sign(80, "no_entry", False),
             sign(120, "info", True)]
    reader = Reader()

    answer = analyze(found, IngressSettings(crop_padding=0), reader)

    assert reader.calls == [2]  # one call, the two signs with text
    assert [s["text"] for s in answer["signs"]] == [None, "20", None, "40"]
    assert answer["degraded"] == []


def test_a_frame_of_pictograms_never_calls_the_reader():
    reader = Reader()

    answer = analyze([sign(0, "children", False)], IngressSettings(), reader)

    assert reader.calls == [] and answer["signs"][0]["text"] is None and answer["degraded"] == []


def test_signs_with_text_beyond_the_cap_are_reported_as_unread():
    found = [sign(0, "children", False), sign(40, "info", True), sign(80, "info", True), sign(120, "info", True)]
    reader = Reader()

    answer = analyze(found, IngressSettings(crop_padding=0, max_signs_read=2), reader)

    assert reader.calls == [2]
    assert [s["text"] for s in answer["signs"]] == [None, "20", "30", None]
    assert answer["degraded"] == ["sign_reader: read the first 2 of 3 signs with text"]
