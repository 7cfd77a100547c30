"""A stream's memory without models or Ray: tracks stay on their signs through a committed clip, each sign is
announced once and passes once, a track is read once when its text is sure, hazards come and go with hysteresis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from festival_serve import DATA_DIR
from festival_serve.pipeline.settings import StreamSettings
from festival_serve.pipeline.types import HazardCell, HazardLabel, SignDetection, SignText
from festival_serve.serving.tracking import StreamMemory, looming_box, sharpness
from festival_serve.world.synth.truth import TEXT_CLASSES

CLIPS = DATA_DIR / "clips"


def _truth(name: str) -> dict:
    return json.loads((CLIPS / f"{name}.json").read_text(encoding="utf-8"))


def _detections(frame: dict) -> list[SignDetection]:
    return [SignDetection(tuple(s["box"]), s["sign_class"], 0, 0.9, s["sign_class"] in TEXT_CLASSES)
            for s in frame["signs"]]


@pytest.mark.parametrize("clip", sorted(p.stem for p in CLIPS.glob("*.json")))
def test_tracks_follow_every_sign_of_a_clip_and_each_is_announced_once_and_passes_once(clip):
    truth, memory = _truth(clip), StreamMemory(StreamSettings(announce_wait_s=0.0))
    owner: dict[int, set[int]] = {}  # ground-truth identity -> track ids given to it
    events = []
    for frame in truth["frames"]:
        tracked = memory.track(frame["index"], frame["time_s"], _detections(frame))
        for sign, item in zip(frame["signs"], tracked):
            if item.track is not None:
                owner.setdefault(sign["identity"], set()).add(item.track.track_id)
        events += memory.events(frame["index"], frame["time_s"], None, tuple(truth["size"]))
    events += memory.close(len(truth["frames"]), truth["frames"][-1]["time_s"])
    identities = {s["identity"] for f in truth["frames"] for s in f["signs"]}
    assert set(owner) == identities  # every sign got a track ...
    assert all(len(ids) == 1 for ids in owner.values()), owner  # ... and kept it: no identity switch
    appeared = [e["track_id"] for e in events if e["type"] == "sign_appeared"]
    passed = [e["track_id"] for e in events if e["type"] == "sign_passed"]
    assert sorted(appeared) == sorted(passed) == sorted(i for ids in owner.values() for i in ids)
    assert len(set(appeared)) == len(appeared)  # once each


def _frame_with_sign(size: int, blur: int = 0) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A grey frame with a sharp black-on-white text-like patch of ``size`` px at (100, 100)."""
    image = np.full((480, 848, 3), 120, np.uint8)
    rng = np.random.default_rng(size)
    patch = np.where(rng.random((size, size)) > 0.5, 255, 0).astype(np.uint8)
    image[100:100 + size, 100:100 + size] = patch[..., None]
    if blur:
        import cv2

        image = cv2.blur(image, (blur, blur))
    return image, (100.0, 100.0, 100.0 + size, 100.0 + size)


def _observe(memory: StreamMemory, index: int, box) -> list:
    return memory.track(index, index / 10, [SignDetection(box, "info", 0, 0.9, True)])


def test_a_sign_is_read_once_it_is_large_and_sharp_and_not_again_once_a_sure_reading_is_final():
    settings = StreamSettings(read_min_side_px=24, read_confident_score=0.9, read_final_side_px=32,
                              max_reads_per_track=3)
    memory = StreamMemory(settings)
    reads = []
    for index, size in enumerate([16, 18, 20, 30, 34, 40, 60, 80]):
        image, box = _frame_with_sign(size)
        tracked = _observe(memory, index, box)
        chosen = memory.to_read(tracked, image, 0.05)
        for i in chosen:
            memory.record_text(tracked[i], SignText("BẾN XE", 0.97, ()))
        reads.append(len(chosen))
    # Frames 0-1 have no track yet (three detections confirm one); 16-20 px are too small; read at 30 px (sure, but
    # from under 32 px: not final), again at 40 px (1.5x the area), then never.
    assert reads == [0, 0, 0, 1, 0, 1, 0, 0]
    assert memory.tracks[0].text == "BẾN XE"


def test_an_unsure_text_is_read_again_only_as_the_sign_grows_and_at_most_max_reads():
    memory = StreamMemory(StreamSettings(read_min_side_px=24, read_growth=1.5, max_reads_per_track=2))
    reads = []
    for index, size in enumerate([24, 26, 28, 30, 36, 40, 60, 90]):
        image, box = _frame_with_sign(size)
        tracked = _observe(memory, index, box)
        chosen = memory.to_read(tracked, image, 0.05)
        for i in chosen:
            memory.record_text(tracked[i], SignText("BEN X", 0.5, ()))
        reads.append(len(chosen))
    # First read once confirmed (frame 2, 28 px, area 784); again once the area is 1.5x (34+ px: frame 4, 36 px);
    # then capped.
    assert reads == [0, 0, 1, 0, 1, 0, 0, 0]
    assert memory.tracks[0].reads == 2


def test_a_blurred_crop_waits_for_a_sharp_one():
    memory = StreamMemory(StreamSettings())
    blurred, box = _frame_with_sign(40, blur=21)  # a 21 px smear: 12, against ~4000 sharp
    sharp, _ = _frame_with_sign(40)
    assert sharpness(blurred[100:140, 100:140]) < memory.settings.read_min_sharpness < sharpness(sharp[100:140, 100:140])
    _observe(memory, 0, box)
    assert memory.to_read(_observe(memory, 1, box), blurred, 0.05) == []
    assert memory.to_read(_observe(memory, 2, box), sharp, 0.05) == [0]


def test_a_text_sign_is_announced_with_its_text_or_after_the_wait_and_then_its_reading_follows():
    memory = StreamMemory(StreamSettings(announce_wait_s=0.3))
    image, box = _frame_with_sign(20)  # too small to read
    events = []
    for index in range(6):
        _observe(memory, index, box)
        events += memory.events(index, index / 10, None, (848, 480))
    assert [(e["type"], e["text"]) for e in events] == [("sign_appeared", None)]  # at 0.4 s: waited 0.3 s from 0.1
    image, box = _frame_with_sign(40)
    tracked = _observe(memory, 6, box)
    for i in memory.to_read(tracked, image, 0.05):
        memory.record_text(tracked[i], SignText("BẾN XE", 0.95, ()))
    events = memory.events(6, 0.6, None, (848, 480))
    assert [(e["type"], e["text"]) for e in events] == [("sign_read", "BẾN XE")]


def test_a_text_sign_lost_before_its_wait_ends_is_not_announced_while_out_of_sight():
    memory = StreamMemory(StreamSettings(announce_wait_s=0.3))
    _, box = _frame_with_sign(20)
    events = []
    for index in range(3):  # confirmed at frame 2, unread
        _observe(memory, index, box)
        events += memory.events(index, index / 10, None, (848, 480))
    for index in range(3, 8):  # then unseen: a glimpse, not announced when the wait runs out
        memory.track(index, index / 10, [])
        events += memory.events(index, index / 10, None, (848, 480))
    assert events == [] and memory.tracks  # the tracker still holds it (lost, not yet ended)


def _looming(t: float) -> tuple[float, float, float, float]:
    """A 1 m sign 2 m right of and 1 m above the camera's axis, 30 m ahead at t = 0, the camera at 10 m/s (focal
    length 400 px, focus of expansion at (424, 240))."""
    z = 30.0 - 10.0 * t
    x, y, half = 424 + 400 * 2.0 / z, 240 - 400 * 1.0 / z, 400 * 0.5 / z
    return (x - half, y - half, x + half, y + half)


def test_a_looming_box_follows_a_sign_the_camera_drives_at_where_a_steady_velocity_lags():
    seen = [(0.0, _looming(0.0)), (0.3, _looming(0.3))]
    for t in (0.4, 0.5, 1.0):
        assert np.allclose(looming_box(seen, t), _looming(t), atol=1e-6)
    # 12 m ahead and nearing, two analysed frames 0.2 s apart, then 0.2 s predicted: a steady velocity is pixels off.
    velocity = (np.array(_looming(1.8)) - np.array(_looming(1.6))) / 0.2
    steady = np.array(_looming(1.8)) + velocity * 0.2
    looming = np.array(looming_box([(1.6, _looming(1.6)), (1.8, _looming(1.8))], 2.0))
    assert np.abs(steady - _looming(2.0)).max() > 3.0 and np.allclose(looming, _looming(2.0), atol=1e-6)
    assert looming_box(seen[:1], 0.5) is None


def test_frames_are_skipped_only_while_every_box_is_in_a_track_and_predicted_boxes_are_the_tracks_still_seen():
    memory = StreamMemory(StreamSettings(track_activation_score=0.25))
    for index in range(3):
        memory.track(index, index / 10, [SignDetection(_looming(index / 10), "no_entry", 0, 0.9, False)])
    assert memory.settled()  # a pictogram, confirmed: nothing to read
    faint = SignDetection((600.0, 300.0, 630.0, 330.0), "no_entry", 0, 0.2, False)  # too unsure to start a track
    memory.track(3, 0.3, [SignDetection(_looming(0.3), "no_entry", 0, 0.9, False), faint])
    assert not memory.settled()  # a sign may be on its way: look again
    memory.track(4, 0.4, [SignDetection(_looming(0.4), "no_entry", 0, 0.9, False)])
    assert memory.settled()
    watched = StreamMemory(StreamSettings(untracked_watch_s=0.5))  # a faint box that stays: a distractor
    settled = []
    for index in range(12):
        watched.track(index, index / 10, [SignDetection(_looming(index / 10), "no_entry", 0, 0.9, False), faint])
        settled.append(watched.settled())
    assert settled == [False] * 5 + [True] * 7  # watched from 0.0 s for 0.5 s
    predicted = memory.predict(5, 0.5)
    assert [track.track_id for track, _ in predicted] == [0]
    assert np.allclose(predicted[0][1], _looming(0.5), atol=1e-6)
    memory.track(6, 0.6, [])  # missed on an analysed frame: lost, so not drawn on the frames between
    assert memory.predict(7, 0.7) == []


def _cells(*labels: str) -> list[HazardCell]:
    return [HazardCell(90, (400.0, 400.0, 440.0, 440.0), tuple(HazardLabel(label, 0.9) for label in labels))]


def test_hazards_are_announced_after_they_persist_and_cleared_with_hysteresis():
    memory = StreamMemory(StreamSettings(hazard_on_frames=3, hazard_off_frames=3))
    seen = ["TrafficCone"] * 2 + [None] + ["TrafficCone"] * 4 + [None, "TrafficCone"] + [None] * 4
    kinds = []
    for index, label in enumerate(seen):
        kinds += [(index, e["type"]) for e in memory.events(index, index / 10, _cells(label) if label else [],
                                                           (848, 480))]
    # Two frames then a gap: not yet a hazard. Four in a row: announced at the third. One gap does not clear it;
    # three in a row do, once.
    assert kinds == [(5, "hazard_ahead"), (11, "hazard_cleared")]


def test_a_frame_whose_hazard_stage_gave_nothing_neither_clears_nor_counts():
    memory = StreamMemory(StreamSettings(hazard_on_frames=2, hazard_off_frames=2))
    sequence = [_cells("Vehicle"), _cells("Vehicle"), None, None, None, [], []]
    kinds = [e["type"] for i, cells in enumerate(sequence) for e in memory.events(i, i / 10, cells, (848, 480))]
    assert kinds == ["hazard_ahead", "hazard_cleared"]


def test_clip_truth_files_are_what_the_tests_expect():
    assert sorted(Path(p).stem for p in CLIPS.glob("*.mp4")) == sorted(p.stem for p in CLIPS.glob("*.json"))
