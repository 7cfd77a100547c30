"""``analyze_frame``, the one flow of a frame that both the Serve ingress and the baseline server run, driven
here by plain async stages (its contract: any ``callable(*args) -> awaitable``): what it reads, how it
degrades within a budget, and when it refuses."""

from __future__ import annotations

import asyncio

import numpy as np

import time

import pytest

from festival_serve.serving.admission import Admission, Budget
from festival_serve.serving.errors import ApiError
from festival_serve.serving.http import parse_budget
from festival_serve.serving.flow import Rejected, analyze_frame
from festival_serve.pipeline.types import SignText
from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.types import SignDetection


def sign(x: float, label: str, has_text: bool) -> SignDetection:
    return SignDetection(box=(x, 10.0, x + 20.0, 30.0), label=label, class_id=0, score=0.9, has_text=has_text)


class Reader:
    """Reads a crop as its mean pixel value, so each answer says which crop it came from."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def __call__(self, crops, ticket):
        self.calls.append(len(crops))
        return [SignText(str(int(c.mean())), 1.0, ()) for c in crops]


def analyze(found, settings: IngressSettings, reader: Reader) -> dict:
    image = np.zeros((40, 200, 3), np.uint8)
    for i in range(5):  # the sign at x = 40 i (20 px wide) sits on pixels of value 10 (i + 1)
        image[:, 40 * i: 40 * i + 30] = 10 * (i + 1)
    stages = {"sign_detector": lambda frame, ticket: asyncio.sleep(0, found), "hazard_cells": lambda frame, ticket: asyncio.sleep(0, []),
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
    assert answer["degraded"] == [{"stage": "sign_reader", "code": "partial", "message": "read 2 of 3 signs with text"}]


# -- budgets -----------------------------------------------------------------------------------------


def test_the_budget_header_is_honoured_clamped_and_checked():
    settings = IngressSettings(default_budget_s=5, max_budget_s=20)
    assert parse_budget(None, settings) == 5
    assert parse_budget("1.5", settings) == 1.5
    assert parse_budget("600", settings) == 20  # clamped: the ingress answers before the proxy's own timeout
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(ApiError) as raised:
            parse_budget(bad, settings)
        assert raised.value.status == 400 and raised.value.code == "invalid_budget"


def _run(stages: dict, *, budget_s: float = 5.0, describe: bool = False, admission: Admission | None = None):
    image = np.zeros((40, 200, 3), np.uint8)
    settings = IngressSettings(default_budget_s=budget_s, max_budget_s=max(budget_s, 30), answer_margin_s=0.01)
    return asyncio.run(analyze_frame(image, image, describe, stages, settings, {}, budget=Budget(budget_s),
                                     admission=admission))


async def _found(value, delay: float = 0.0):
    await asyncio.sleep(delay)
    return value


def test_a_stage_slower_than_the_budget_is_cut_off_and_the_answer_comes_in_time():
    stages = {"sign_detector": lambda frame, ticket: _found([], delay=5), "hazard_cells": lambda frame, ticket: _found([])}
    started = time.monotonic()
    answer = _run(stages, budget_s=0.3)
    assert time.monotonic() - started < 0.5
    assert answer["degraded"] == [{"stage": "sign_detector", "code": "timeout",
                                   "message": "no answer within the request's budget"}]


def test_neither_safety_stage_answering_is_a_503_not_an_empty_200():
    async def broken(frame, ticket):
        raise RuntimeError("/models/secret/path.pt is corrupt")

    with pytest.raises(Rejected) as raised:
        _run({"sign_detector": broken, "hazard_cells": broken})
    assert raised.value.status == 503 and raised.value.code == "safety_stages_unavailable"
    assert "/models" not in raised.value.message and raised.value.retry_after_s > 0


def test_one_safety_stage_failing_degrades_without_leaking_its_error():
    async def broken(frame, ticket):
        raise RuntimeError("/models/secret/path.pt is corrupt")

    answer = _run({"sign_detector": broken, "hazard_cells": lambda frame, ticket: _found([])})
    assert answer["degraded"] == [{"stage": "sign_detector", "code": "error", "message": "the stage failed on this frame"}]


class ActorDiedError(Exception):
    """Shaped like ``ray.exceptions.ActorDiedError``: the replica serving the call died (the flow reads its name)."""


def test_a_call_whose_replica_died_is_sent_again_once():
    calls = []

    async def dies_first(frame, ticket):
        calls.append(ticket)
        if len(calls) == 1:
            raise ActorDiedError("the actor died unexpectedly")
        return []

    answer = _run({"sign_detector": dies_first, "hazard_cells": lambda frame, ticket: _found([])})
    assert len(calls) == 2 and answer["degraded"] == []  # the retry answered: nothing lost

    calls.clear()

    async def always_dies(frame, ticket):
        calls.append(ticket)
        raise ActorDiedError("the actor died unexpectedly")

    answer = _run({"sign_detector": always_dies, "hazard_cells": lambda frame, ticket: _found([])})
    assert len(calls) == 2  # once more, not forever
    assert answer["degraded"] == [{"stage": "sign_detector", "code": "unavailable",
                                   "message": "no replica of the stage could take the frame"}]


class BackPressureError(Exception):
    """Shaped like ``ray.serve.exceptions.BackPressureError`` (the flow reads its name and retry_after_s)."""

    retry_after_s = 3.0


def test_a_full_safety_queue_reaches_the_client_as_its_status_with_retry_after():
    async def full(frame, ticket):
        raise BackPressureError()

    with pytest.raises(Rejected) as raised:
        _run({"sign_detector": full, "hazard_cells": lambda frame, ticket: _found([])})
    assert raised.value.status == 503 and raised.value.code == "overloaded" and raised.value.retry_after_s == 3.0


def test_over_budget_reader_reads_the_surest_signs_and_describer_is_skipped():
    found = [sign(0, "info", True), sign(40, "info", True), sign(80, "info", True)]
    found[2] = SignDetection(box=found[2].box, label="info", class_id=0, score=0.99, has_text=True)  # the surest
    admission = Admission()
    admission.loads["sign_reader"].item_seconds = 0.4  # one crop costs 0.4 s: a 1 s budget reads two at most
    admission.loads["scene_describer"].item_seconds = 5.0  # a description would take 5 s
    reader = Reader()
    stages = {"sign_detector": lambda frame, ticket: _found(found), "hazard_cells": lambda frame, ticket: _found([]),
              "sign_reader": reader, "scene_describer": lambda frame, findings, ticket: _found("never")}
    answer = _run(stages, budget_s=1.0, describe=True, admission=admission)
    assert reader.calls == [2]
    assert [s["text"] is not None for s in answer["signs"]] == [True, False, True]  # the 0.99 sign was read first
    assert answer["description"] is None
    assert {(d["stage"], d["code"]) for d in answer["degraded"]} == {("sign_reader", "partial"),
                                                                     ("scene_describer", "skipped_over_budget")}


class ReadEverything:
    """A stream's watcher (``flow.FrameWatcher``) that reads every sign and keeps what was read."""

    def choose_reads(self, image, found_signs):
        return list(range(len(found_signs)))

    def texts(self, found_signs, read):
        return [read.get(i) for i in range(len(found_signs))]

    def wants_description(self, hazards):
        return False


def test_a_stream_frames_tickets_say_so_and_an_images_do_not():
    tickets: dict[str, list] = {"sign_detector": [], "hazard_cells": []}

    def stage(name, answer):
        async def call(frame, ticket):
            tickets[name].append(ticket.stream)
            return answer
        return call

    image = np.zeros((40, 200, 3), np.uint8)
    stages = {"sign_detector": stage("sign_detector", [sign(40, "speed_limit", True)]),
              "hazard_cells": stage("hazard_cells", []), "sign_reader": Reader(), "scene_describer": None}
    asyncio.run(analyze_frame(image, image, False, stages, IngressSettings(), {}))
    streamed = asyncio.run(analyze_frame(image, image, False, stages, IngressSettings(), {}, watcher=ReadEverything()))
    # The detector letterboxes a stream frame at stream_image_size (the ticket is all it is told).
    assert tickets == {"sign_detector": [False, True], "hazard_cells": [False, True]}
    assert [s["text"] for s in streamed["signs"]] == ["0"]
