"""Admission control's arithmetic: per-stage waits predicted from what one ingress sees, and the
decisions taken from them (turn away with a drain-time Retry-After, read fewer signs, skip the describer)."""

from __future__ import annotations

import math
import time

import pytest

from festival_serve.serving.admission import Admission, Budget, StageLoad
from festival_serve.serving.errors import error_response
from festival_serve.serving.flow import Rejected, admit
from festival_serve.pipeline.settings import IngressSettings


def test_nothing_known_means_no_wait_predicted():
    assert StageLoad().predicted_wait(4) == 0.0
    assert Admission().admit(0.001) is None  # a fresh ingress admits: it has nothing to go on yet


def test_one_item_costs_the_call_time_over_the_items_it_waited_behind():
    load = StageLoad()
    ahead = load.begin(1)
    load.end(1, ahead, 0.2, completed=True)  # alone: 0.2 s per item
    assert load.item_seconds == pytest.approx(0.2)
    for _ in range(9):
        load.begin(1)  # nine more in flight
    ahead = load.begin(1)
    assert ahead == 9
    load.end(1, ahead, 1.0, completed=True)  # waited behind nine: 1.0 s / 10 items = 0.1 s per item
    assert load.item_seconds == pytest.approx(0.8 * 0.2 + 0.2 * 0.1)
    assert load.predicted_wait(1) == pytest.approx((9 + 1) * load.item_seconds)


def test_failed_calls_leave_the_cost_alone_but_leave_the_queue():
    load = StageLoad(in_flight=0, item_seconds=0.5)
    ahead = load.begin(3)
    load.end(3, ahead, 30.0, completed=False)
    assert load.item_seconds == 0.5 and load.in_flight == 0


def test_admission_turns_away_what_the_safety_queues_cannot_answer_in_time():
    admission = Admission()
    admission.loads["sign_detector"] = StageLoad(in_flight=39, item_seconds=0.1)  # 4 s to answer a new frame
    admission.loads["hazard_cells"] = StageLoad(in_flight=0, item_seconds=0.05)
    assert admission.safety_wait() == pytest.approx(4.0)
    assert admission.admit(5.0) is None
    assert admission.admit(2.0) == 2.0  # the queue needs ~2 s more to drain to where a 2 s budget fits
    assert admission.admit(3.9) == 1.0  # never less than a second: Retry-After is whole seconds


def test_reader_reads_what_fits_and_the_describer_is_asked_only_if_it_fits():
    admission = Admission()
    admission.loads["sign_reader"] = StageLoad(in_flight=2, item_seconds=0.25)
    assert admission.reader_items(8, 2.0) == 6  # 2 s buys 8 crops, 2 are already queued
    assert admission.reader_items(8, 0.4) == 0
    assert admission.reader_items(3, 60.0) == 3
    admission.loads["scene_describer"] = StageLoad(in_flight=1, item_seconds=2.0)
    assert admission.describer_fits(4.0) and not admission.describer_fits(3.9)


def test_rejection_before_decoding_says_when_to_retry():
    admission = Admission()
    admission.loads["hazard_cells"] = StageLoad(in_flight=100, item_seconds=0.1)
    settings = IngressSettings(default_budget_s=2, answer_margin_s=0.05, admit_wait_fraction=0.5)
    with pytest.raises(Rejected) as raised:
        admit(admission, Budget(2.0), settings)
    rejected = raised.value
    assert rejected.status == 503 and rejected.code == "overloaded"
    response = error_response(rejected.status, rejected.code, rejected.message, "r1", rejected.retry_after_s)
    assert response.status_code == 503
    # Retry when the queue has drained to what half the budget allows: 10.1 s predicted, 0.975 s allowed.
    assert int(response.headers["retry-after"]) == math.ceil(10.1 - (2.0 - 0.05) * 0.5)


def test_admission_keeps_headroom_inside_the_budget():
    """A wait that would fit the whole budget but not admit_wait_fraction of it is turned away: under a surge
    the estimate lags, and an answer admitted at the edge of its budget comes back late or degraded."""
    settings = IngressSettings(default_budget_s=2, answer_margin_s=0.0, admit_wait_fraction=0.5)
    admission = Admission()
    admission.loads["sign_detector"] = StageLoad(in_flight=14, item_seconds=0.1)  # 1.5 s: inside 2 s, over 1 s
    with pytest.raises(Rejected):
        admit(admission, Budget(2.0), settings)
    admission.loads["sign_detector"] = StageLoad(in_flight=8, item_seconds=0.1)  # 0.9 s
    admit(admission, Budget(2.0), settings)


def test_a_stale_estimate_with_nothing_in_flight_is_forgotten(monkeypatch):
    """A stage that timed out (its node died) leaves a huge cost behind; once nothing is in flight and nothing has
    confirmed it for STALE_AFTER_S, a request is let through to learn the cost again, instead of every request
    being refused forever."""
    from festival_serve.serving import admission as admission_module

    now = [1000.0]
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: now[0])
    load = StageLoad()
    ahead = load.begin(1)
    load.end(1, ahead, 1.8, completed=True)  # a call cut off at the budget: 1.8 s per item
    assert load.predicted_wait(1) == pytest.approx(1.8)
    now[0] += admission_module.STALE_AFTER_S + 0.1
    assert load.predicted_wait(1) == 0.0 and load.cost() is None  # forgotten: admit, and learn again
    load.begin(1)
    assert load.predicted_wait(1) == pytest.approx(2 * 1.8)  # something in flight: the estimate stands


def test_frames_admitted_but_not_yet_sent_count_as_ahead(monkeypatch):
    """While admitted frames are read and decoded they have not reached any stage, yet they are ahead of the
    next frame; and they keep a stale estimate alive (else a burst would find the gate wide open)."""
    from festival_serve.serving import admission as admission_module
    from festival_serve.serving.flow import admitted

    settings = IngressSettings(default_budget_s=2, answer_margin_s=0.0, admit_wait_fraction=0.5)
    admission = Admission()
    admission.loads["sign_detector"] = StageLoad(item_seconds=0.4)
    with admitted(admission, Budget(2.0), settings):
        assert admission.waiting == 1
        with admitted(admission, Budget(2.0), settings):  # 0.8 s with the first one ahead: inside half of 2 s
            assert admission.safety_wait() == pytest.approx(3 * 0.4)
            with pytest.raises(Rejected):  # two ahead + itself: 1.2 s, over half the budget
                with admitted(admission, Budget(2.0), settings):
                    pass
            assert admission.waiting == 2  # a refused frame never counted
    assert admission.waiting == 0
    now = time.monotonic() + admission_module.STALE_AFTER_S + 1
    monkeypatch.setattr(admission_module.time, "monotonic", lambda: now)
    admission.waiting = 2
    assert admission.safety_wait() == pytest.approx(3 * 0.4)  # stale, but frames are waiting: not forgotten
