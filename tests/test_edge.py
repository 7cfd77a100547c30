"""The hostile edge without Ray (issue 29): bodies under a deadline and outside admission, clients that leave counted
as ``client_closed``, request ids capped, probes answered from background state at a limited rate, keys that follow
their file, and malformed stage results made degraded answers. The same paths through real Ray Serve are in
tests/test_graph.py; the decoder's limits in tests/test_input.py."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

import numpy as np
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from festival_serve.pipeline.settings import IngressSettings
from festival_serve.pipeline.types import HazardCell, HazardLabel, SignDetection, SignText, TextLine
from festival_serve.serving import auth, flow
from festival_serve.serving.admission import TokenBucket
from festival_serve.serving.http import ApiHandlers, build_http_app
from festival_serve.serving.probes import StageStates, readiness
from festival_serve.serving.uploads import read_image_bytes

from tests.test_http import ingress_app

JPEG_HEADERS = [(b"content-type", b"image/jpeg"), (b"content-length", b"1000")]


async def asgi_call(app, receive, *, path="/v1/analyze", headers=JPEG_HEADERS, method="POST") -> tuple[int, dict]:
    """Call an ASGI app with a ``receive`` of the test's own (a body that trickles, a client that leaves)."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"describe=false", "headers": headers, "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def trickle(first: bytes = b"\xff\xd8"):
    """A client that sends two bytes of its body and then nothing more (it never leaves)."""
    state = {"sent": False}

    async def receive():
        if not state["sent"]:
            state["sent"] = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.sleep(3600)

    return receive


def test_a_trickled_body_is_a_408_at_body_read_max_s_and_holds_no_admission_slot():
    settings = IngressSettings(body_read_max_s=0.3)
    app = ingress_app(settings)

    started = time.monotonic()
    status, body = asyncio.run(asgi_call(app, trickle()))
    elapsed = time.monotonic() - started

    assert status == 408 and body["error"]["code"] == "body_timeout", body
    assert 0.25 < elapsed < 2.0, elapsed


def test_a_trickled_body_is_cut_off_within_the_requests_own_budget_when_that_is_shorter():
    app = ingress_app(IngressSettings(body_read_max_s=30, answer_margin_s=0.1))
    headers = [*JPEG_HEADERS, (b"x-request-timeout-seconds", b"0.5")]

    started = time.monotonic()
    status, body = asyncio.run(asgi_call(app, trickle(), headers=headers))

    assert status == 408 and time.monotonic() - started < 1.5


def test_bodies_beyond_max_bodies_in_flight_are_refused_at_once_with_retry_after():
    app = ingress_app(IngressSettings(max_bodies_in_flight=2, body_read_max_s=2))

    async def scenario():
        slow = [asyncio.create_task(asgi_call(app, trickle())) for _ in range(2)]
        await asyncio.sleep(0.2)  # both are reading their bodies
        started = time.monotonic()
        refused = await asgi_call(app, trickle())
        took = time.monotonic() - started
        return refused, took, await asyncio.gather(*slow)

    (status, body), took, slow = asyncio.run(scenario())
    assert status == 503 and body["error"]["code"] == "overloaded" and took < 0.5
    assert [s for s, _ in slow] == [408, 408]


def test_bodies_over_max_body_bytes_buffered_are_refused_while_trickled_ones_hold_almost_nothing():
    app = ingress_app(IngressSettings(max_bodies_in_flight=100, max_body_bytes_buffered=2048, body_read_max_s=1))
    kilobyte = b"\xff\xd8" + b"x" * 998

    async def scenario():
        holding = [asyncio.create_task(asgi_call(app, trickle(kilobyte))) for _ in range(2)]
        tricklers = [asyncio.create_task(asgi_call(app, trickle())) for _ in range(20)]  # 2 bytes each: 40 in all
        await asyncio.sleep(0.2)
        refused = await asgi_call(app, trickle(b"\xff\xd8" + b"x" * 98))  # 100 more would go over 2048
        return refused, await asyncio.gather(*holding, *tricklers)

    (status, body), ended = asyncio.run(scenario())
    assert status == 503 and body["error"]["code"] == "overloaded" and "bytes" in body["error"]["message"], body
    assert {s for s, _ in ended} == {408}  # the 22 that fitted were read until body_read_max_s
    # Every byte is given back when its body ends: the same 100 bytes now fit, and are cut off at the deadline.
    assert asyncio.run(asgi_call(app, trickle(b"\xff\xd8" + b"x" * 98)))[0] == 408


def test_a_client_that_leaves_mid_body_is_client_closed_counted_not_an_error(caplog):
    heard: list[tuple[int, str]] = []

    async def analyze(request: Request) -> JSONResponse:
        await read_image_bytes(request, 1 << 20, within_s=5)
        raise AssertionError("the body never completes")

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = build_http_app(ApiHandlers(analyze=analyze, models=ok, healthz=ok, readyz=ok), keys=None,
                         on_analyze_refusal=lambda status, code: heard.append((status, code)))
    messages = iter([{"type": "http.request", "body": b"\xff\xd8", "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    with caplog.at_level(logging.DEBUG):
        status, body = asyncio.run(asgi_call(app, receive))

    assert status == 499 and body["error"]["code"] == "client_closed"
    assert heard == [(499, "client_closed")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a client's leaving is no server error"


def test_a_cancelled_handler_is_counted_as_client_closed_and_stays_cancelled():
    heard: list[tuple[int, str]] = []

    async def analyze(request: Request) -> JSONResponse:
        asyncio.current_task().cancel()  # what Serve's proxy does when the client disconnects
        await asyncio.sleep(1)

    app = build_http_app(ApiHandlers(analyze=analyze, models=analyze, healthz=analyze, readyz=analyze), keys=None,
                         on_analyze_refusal=lambda status, code: heard.append((status, code)))

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(asgi_call(app, receive))
    assert heard == [(499, "client_closed")]


@pytest.mark.parametrize("given, kept", [("frame-7.cam:2", True), ("x" * 128, True), ("x" * 129, False),
                                         ("a\nforged log line", False), ("id with spaces", False), ("", False)])
def test_a_request_id_is_kept_only_when_it_is_a_sane_id(given, kept):
    from starlette.testclient import TestClient

    from tests.test_http import app_raising

    reply = app_raising(flow.Rejected(503, "overloaded", "full", 1)).post("/v1/analyze",
                                                                           headers={"x-request-id": given})
    answered = reply.json()["request_id"]
    assert (answered == given) is kept
    if not kept:
        assert len(answered) == 32 and int(answered, 16) >= 0
    assert TestClient  # the module's client is the one app_raising uses


# -- probes -----------------------------------------------------------------------------------------------


def test_probes_are_answered_at_a_limited_rate_with_retry_after():
    from starlette.testclient import TestClient

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    client = TestClient(build_http_app(ApiHandlers(analyze=ok, models=ok, healthz=ok, readyz=ok), keys=None,
                                       probe_limit=TokenBucket(5)))
    statuses = [client.get(path).status_code for path in ("/healthz", "/readyz") * 10]

    assert statuses.count(200) in range(5, 8) and statuses.count(429) >= 12, statuses
    refused = client.get("/healthz")
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1
    time.sleep(0.5)
    assert client.get("/healthz").status_code == 200  # the bucket refills
    assert client.post("/v1/analyze").status_code == 200  # frames are never counted against it


def test_stage_states_ask_each_stage_once_per_refresh_however_often_they_are_read():
    asked = {"signs": 0, "hazards": 0}

    def call(name):
        async def info():
            asked[name] += 1
            return {"ready": True}
        return info

    async def scenario():
        states = StageStates({name: call(name) for name in asked}, refresh_s=0.2, timeout_s=1)
        for _ in range(200):  # a flood of probes over ~0.5 s
            infos = await states.current()
            await asyncio.sleep(0.0025)
        states.close()
        return infos, states.age_s()

    infos, age = asyncio.run(scenario())
    assert infos == {"signs": {"ready": True}, "hazards": {"ready": True}}
    assert all(1 <= n <= 5 for n in asked.values()), asked  # refreshes, not 200 probes
    assert age is not None and age < 1


def test_a_stage_that_raises_reads_not_ready_without_its_exception_text(caplog):
    async def broken():
        raise RuntimeError("ActorDiedError: pid=4242 ip=10.0.0.7 /srv/models/signs.pt")

    async def fine():
        return {"ready": True}

    async def scenario():
        states = StageStates({"sign_detector": broken, "hazard_cells": fine}, refresh_s=10, timeout_s=1)
        return await states.refresh()

    with caplog.at_level(logging.WARNING, logger="festival_serve.serving.probes"):
        infos = asyncio.run(scenario())
    ready, stages = readiness(infos, ["sign_detector", "hazard_cells"])

    assert not ready and stages["sign_detector"] == {"ready": False, "required": True, "reason": "no replica answered"}
    assert "10.0.0.7" not in json.dumps(infos) and "pid" not in json.dumps(infos)
    assert any("10.0.0.7" in r.getMessage() for r in caplog.records)  # the log keeps it for the operator


# -- keys that follow their file ---------------------------------------------------------------------------


def test_a_key_removed_from_the_file_stops_working_after_the_reload_interval(tmp_path):
    kept, revoked = auth.new_key(), auth.new_key()
    path = tmp_path / "keys"
    path.write_text(f"{auth.digest(kept)}\n{auth.digest(revoked)}\n")
    os.chmod(path, 0o600)
    keys = auth.KeyFile(path, reload_s=0.2)
    assert keys.allows(f"Bearer {revoked}") and keys.allows(f"Bearer {kept}")

    path.write_text(f"{auth.digest(kept)}\n")
    assert keys.allows(f"Bearer {revoked}")  # within reload_s the file is not looked at
    time.sleep(0.25)
    assert not keys.allows(f"Bearer {revoked}") and keys.allows(f"Bearer {kept}")


def test_a_botched_edit_keeps_the_last_good_keys_and_says_so(tmp_path, caplog):
    key = auth.new_key()
    path = tmp_path / "keys"
    path.write_text(auth.digest(key) + "\n")
    keys = auth.KeyFile(path, reload_s=0.01)

    path.write_text("not a digest\n")
    time.sleep(0.02)
    with caplog.at_level(logging.ERROR, logger="festival_serve.serving.auth"):
        assert keys.allows(f"Bearer {key}")
    assert any("line 1" in r.getMessage() for r in caplog.records)
    assert key not in caplog.text


def test_a_keys_file_others_may_write_is_warned_about(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(auth.digest(auth.new_key()) + "\n")
    os.chmod(path, 0o666)
    with caplog.at_level(logging.WARNING, logger="festival_serve.serving.auth"):
        auth.KeyFile(path, reload_s=1)
    assert any("writable by others" in r.getMessage() and "0666" in r.getMessage() for r in caplog.records)


# -- malformed stage results ---------------------------------------------------------------------------------


def detection(box, score=0.9) -> SignDetection:
    return SignDetection(box=box, label="speed_limit", class_id=0, score=score, has_text=False)


@pytest.mark.parametrize("result, bad", [
    ([detection((1.0, 2.0, 30.0, 40.0))], False),
    ([detection((math.nan, 2.0, 30.0, 40.0))], True),
    ([detection((1.0, 2.0, 30.0, 40.0), score=math.inf)], True),
    ([detection((30.0, 2.0, 1.0, 40.0))], True),  # x2 < x1
    ([HazardCell(cell=3, box=(0.0, 0.0, 10.0, 10.0), labels=(HazardLabel("Vehicle", float("nan")),))], True),
    ("a calm street", False),
    ([SignText("BẾN XE", 0.9, (TextLine("BẾN XE", 0.9, [[1.0, 2.0], [9.0, 2.0], [9.0, 8.0], [1.0, 8.0]]),))], False),
    ([SignText("BẾN XE", 0.9, (TextLine("BẾN XE", 0.9, [[1.0, 2.0], [math.nan, 2.0], [9.0, 8.0], [1.0, 8.0]]),))], True),
])
def test_malformed_finds_non_finite_numbers_and_impossible_boxes(result, bad):
    assert flow.malformed(result) is bad


def test_a_nan_box_from_a_stage_is_a_degraded_answer_not_a_500():
    async def nan_signs(frame, ticket):
        return [detection((math.nan, 0.0, 10.0, 10.0))]

    async def hazards(frame, ticket):
        return []

    image = np.zeros((48, 64, 3), np.uint8)
    answer = asyncio.run(flow.analyze_frame(image, image, False, {"sign_detector": nan_signs, "hazard_cells": hazards},
                                            IngressSettings(), {}))

    assert answer["signs"] == [] and answer["degraded"] == [
        {"stage": "sign_detector", "code": "malformed", "message": "the stage's answer for this frame was not well formed"}]
    json.dumps(answer, allow_nan=False)  # the answer is valid JSON


def test_boxes_are_answered_in_the_clients_pixels_when_the_frame_was_decoded_smaller():
    async def signs(frame, ticket):
        return [detection((10.0, 20.0, 30.0, 40.0))]

    async def hazards(frame, ticket):
        return []

    image = np.zeros((512, 1024, 3), np.uint8)  # the client sent 4096 x 2048
    answer = asyncio.run(flow.analyze_frame(image, image, False, {"sign_detector": signs, "hazard_cells": hazards},
                                            IngressSettings(), {}, original_size=(4096, 2048)))

    assert answer["image"] == {"width": 4096, "height": 2048}
    assert answer["signs"][0]["box"] == [40.0, 80.0, 120.0, 160.0]
