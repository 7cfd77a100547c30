"""``festival_serve.measure.stream_eval``: scoring a stream's messages against a clip's truth (no Ray, no
server: the messages are built from the truth)."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest

from festival_serve.measure import evaluate, stream_eval
from festival_serve.measure.stream_eval import aggregate, check_targets, score_clip
from festival_serve.world.synth.clips import ClipFrame, SignInClip

FRAMES = 20


def _truth() -> list[ClipFrame]:
    """Two signs approaching: 0 (speed_limit "50") grows from 20 to 58 px high over every frame, 1 (info
    "BẾN XE") is 30-48 px high from frame 5 on."""
    frames = []
    for i in range(FRAMES):
        signs = []
        h = 20 + 2 * i
        signs.append(SignInClip(0, (500.0 + 3 * i, 100.0, 500.0 + 3 * i + h, 100.0 + h), "speed_limit", "50", 0.0))
        if i >= 5:
            h1 = 30 + (i - 5)
            signs.append(SignInClip(1, (100.0 - 2 * i, 150.0, 100.0 - 2 * i + 3 * h1, 150.0 + h1), "info", "BẾN XE", 0.0))
        frames.append(ClipFrame(index=i, time_s=i / 10, image=None, signs=tuple(signs), cells=np.zeros((104, 11), bool)))
    return frames


def _perfect(truth: list[ClipFrame]) -> list[dict]:
    """What a perfect stream says: every sign boxed exactly as track 10 + identity, read, announced once."""
    messages, announced = [], set()
    for frame in truth:
        signs, events = [], []
        for s in frame.signs:
            track = 10 + s.identity
            signs.append({"box": list(s.box), "label": s.sign_class, "score": 0.9, "text": s.text, "text_score": 0.99,
                          "track_id": track})
            if track not in announced:
                announced.add(track)
                events.append({"type": "sign_appeared", "track_id": track, "label": s.sign_class, "text": s.text,
                               "frame": frame.index, "time_s": frame.time_s})
        messages.append({"type": "frame", "seq": frame.index + 1, "frame": frame.index, "id": frame.index,
                         "signs": signs, "hazards": [], "events": events, "dropped": 0})
    messages.append({"type": "summary", "tracks": [
        {"track_id": 10, "label": "speed_limit", "text": "50", "reads": 1, "first_frame": 0, "last_frame": 19},
        {"track_id": 11, "label": "info", "text": "BẾN XE", "reads": 2, "first_frame": 5, "last_frame": 19}],
        "reads": 3, "events": []})
    return messages


def test_perfect_predictions_score_perfectly():
    truth = _truth()
    result = score_clip(truth, _perfect(truth))
    t, x, e, r = result["tracking"], result["text"], result["events"], result["reads"]
    assert t["IDF1"] == pytest.approx(1.0) and t["HOTA"] == pytest.approx(1.0) and t["MOTA"] == pytest.approx(1.0)
    assert t["IDSW"] == 0 and t["idsw_per_100"] == 0.0
    # Sign 0 is under 24 px for its first 2 frames: distractors, their predictions removed, not false positives.
    assert t["gt_track_frames"] == (FRAMES - 2) + (FRAMES - 5) and t["false_positives"] == 0
    assert result["distractor_predictions_removed"] == 2
    assert x == {"signs": 2, "exact": 1.0, "exact_no_tones": 1.0, "without_track": 0}
    assert e["precision"] == 1.0 and e["recall"] == 1.0 and e["announced_more_than_once"] == 0
    assert r["median"] == 1.5 and r["max"] == 2
    assert all(v["met"] for v in check_targets(result).values())
    # At 0 px every truth box counts: the 2 small ones are hits too.
    assert score_clip(truth, _perfect(truth), min_height_px=0)["tracking"]["gt_track_frames"] == 2 * FRAMES - 5


def test_an_identity_switch_mid_track():
    truth = _truth()
    messages = _perfect(truth)
    for m in messages[10:FRAMES]:  # sign 0 becomes track 30 from frame 10 on
        for s in m["signs"]:
            if s["track_id"] == 10:
                s["track_id"] = 30
    result = score_clip(truth, messages)
    t = result["tracking"]
    assert t["IDSW"] == 1
    assert t["IDF1"] < 1.0 and t["AssA"] < 1.0
    assert t["idsw_per_100"] == pytest.approx(100 / t["gt_track_frames"], abs=1e-3)
    assert not check_targets(result)["tracking.idsw_per_100"]["met"]


def test_a_duplicate_announcement_is_a_false_positive():
    truth = _truth()
    messages = _perfect(truth)
    messages[15]["events"].append({"type": "sign_appeared", "track_id": 10, "label": "speed_limit", "text": "50"})
    e = score_clip(truth, messages)["events"]
    assert e["true_positives"] == 2 and e["duplicates"] == 1 and e["false_positives"] == 1
    assert e["precision"] == pytest.approx(2 / 3, abs=1e-3) and e["recall"] == 1.0
    assert e["announced_more_than_once"] == 1


def test_a_spurious_track_and_a_missed_sign():
    truth = _truth()
    messages = _perfect(truth)
    for m in messages[:FRAMES]:  # sign 1 is never announced ...
        m["events"] = [ev for ev in m["events"] if ev["track_id"] != 11]
    messages[8]["signs"].append({"box": [700, 300, 740, 340], "label": "no_entry", "score": 0.6, "text": None,
                                 "text_score": None, "track_id": 99})  # ... and a box of nothing is announced
    messages[8]["events"].append({"type": "sign_appeared", "track_id": 99, "label": "no_entry", "text": None})
    result = score_clip(truth, messages)
    e = result["events"]
    assert e["spurious"] == 1 and e["precision"] == 0.5 and e["recall"] == 0.5
    assert [s["identity"] for s in result["missed_signs"]] == [1]
    assert result["tracking"]["false_positives"] == 1


def test_a_missed_and_a_misread_text():
    truth = _truth()
    messages = _perfect(truth)
    summary = messages[-1]
    summary["tracks"][1]["text"] = "BEN XE"  # the tones lost
    x = score_clip(truth, messages)["text"]
    assert x["exact"] == 0.5 and x["exact_no_tones"] == 1.0
    summary["tracks"][1]["text"] = None  # never read
    x = score_clip(truth, messages)["text"]
    assert x["exact"] == 0.5 and x["exact_no_tones"] == 0.5
    # Without a summary a track's text is what the last frame carrying it said.
    for m in messages[:FRAMES]:
        for s in m["signs"]:
            if s["track_id"] == 11:
                s["text"] = "BẾN XE" if m["id"] == 19 else "BẾN"
    x = score_clip(truth, messages[:FRAMES])["text"]
    assert x["exact"] == 1.0


def test_unconfirmed_signs_and_missing_frames():
    truth = _truth()
    messages = _perfect(truth)
    for s in messages[3]["signs"]:
        s["track_id"] = None  # not a track yet: neither hit nor false positive
    messages[3]["signs"].append({"box": [1, 1, 40, 40], "label": "info", "score": 0.3, "text": None,
                                 "text_score": None, "track_id": None})
    del messages[12]  # frame 12 never answered: its signs are missed
    result = score_clip(truth, messages)
    t = result["tracking"]
    assert result["frames_answered"] == FRAMES - 1
    assert t["false_positives"] == 0 and t["false_negatives"] == 1 + 2  # frame 3's sign 0; frame 12's two signs
    assert t["IDSW"] == 0


def test_truth_json_frames_and_aggregation():
    truth = _truth()
    as_json = [{"index": f.index, "signs": [{"identity": s.identity, "box": list(s.box), "sign_class": s.sign_class,
                                             "text": s.text, "occluded": s.occluded} for s in f.signs]} for f in truth]
    perfect = score_clip(as_json, _perfect(truth))
    assert perfect["tracking"]["IDF1"] == pytest.approx(1.0)
    switched = _perfect(truth)
    for m in switched[10:FRAMES]:
        for s in m["signs"]:
            s["track_id"] = {10: 30, 11: 31}[s["track_id"]]
    other = score_clip(truth, copy.deepcopy(switched))
    overall = aggregate([perfect, other])
    raw = [perfect["raw"]["identity"], other["raw"]["identity"]]
    idtp = sum(r["IDTP"] for r in raw)
    idf1 = 2 * idtp / (2 * idtp + sum(r["IDFP"] + r["IDFN"] for r in raw))
    assert overall["tracking"]["IDF1"] == pytest.approx(idf1, abs=1e-4)
    assert overall["tracking"]["IDSW"] == 2
    assert overall["tracking"]["gt_track_frames"] == 2 * perfect["tracking"]["gt_track_frames"]
    assert overall["text"]["signs"] == 4 and overall["reads"]["text_tracks"] == 4
    assert overall["clips"] == 2


def test_eval_options_switch_to_clips():
    parser = evaluate.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--clips", "3", "--server", "http://example:9000"])
    assert stream_eval.wants_clips(args) and args.url == "http://example:9000" and args.clips == 3
    assert stream_eval.wants_clips(parser.parse_args(["--committed"]))
    plain = parser.parse_args(["--images", "5"])
    assert not stream_eval.wants_clips(plain) and plain.url == "http://127.0.0.1:8000"
