"""Synthetic road clips: deterministic, with per-frame truth that follows the signs as they approach,
and the committed clips in festival_serve/data/clips/ are what their seeds generate."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from festival_serve.world.synth import INFO_TEXTS, SIGN_CLASSES, SPEED_LIMITS, SPLIT_STARTS, SPLIT_SPAN, TEXT_CLASSES
from festival_serve.world.synth.clips import (CLIP_OFFSET, CLIP_SPAN, CLIPS_DIR, COMMITTED, MIN_SIGN_PX, MIN_VISIBLE,
                                              clip_seeds, committed_clip, generate_clip, read_frames, read_truth,
                                              write_clip)

SEEDS = clip_seeds("val", 3)
FRAMES = 60
SIZE = (848, 480)


@pytest.fixture(scope="module")
def clips():
    return [generate_clip(seed, frames=FRAMES) for seed in SEEDS]


@pytest.fixture(scope="module")
def committed():
    return {name: committed_clip(name) for name in COMMITTED}


def truth_of(clip):
    return [(f.index, f.time_s, f.signs, f.cells.tobytes()) for f in clip.frames]


def test_same_seed_same_clip():
    a, b = generate_clip(SEEDS[0], frames=12), generate_clip(SEEDS[0], frames=12)
    assert truth_of(a) == truth_of(b)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.frames, b.frames))
    c = generate_clip(SEEDS[1], frames=12)
    assert not np.array_equal(a.frames[0].image, c.frames[0].image)


def test_frames_are_what_the_contract_says(clips, yolic_layout):
    for clip in clips:
        assert clip.size == SIZE and clip.fps == 10.0 and len(clip.frames) == FRAMES
        for i, frame in enumerate(clip.frames):
            assert frame.index == i and frame.time_s == i / clip.fps
            assert frame.image.shape == (SIZE[1], SIZE[0], 3) and frame.image.dtype == np.uint8
            assert frame.cells.shape == (yolic_layout.num_cells, len(yolic_layout.classes)) and frame.cells.dtype == bool
            assert len({s.identity for s in frame.signs}) == len(frame.signs)
            for sign in frame.signs:
                x1, y1, x2, y2 = sign.box
                assert 0 <= x1 < x2 <= SIZE[0] and 0 <= y1 < y2 <= SIZE[1]
                assert y2 - y1 >= MIN_SIGN_PX
                assert 0.0 <= sign.occluded <= 1 - MIN_VISIBLE + 1e-6
                assert sign.sign_class in SIGN_CLASSES
                if sign.sign_class == "speed_limit":
                    assert sign.text in SPEED_LIMITS
                elif sign.sign_class == "info":
                    assert sign.text in INFO_TEXTS
                else:
                    assert sign.text == ""


def tracks(clip) -> dict[int, list]:
    found: dict[int, list] = {}
    for frame in clip.frames:
        for sign in frame.signs:
            found.setdefault(sign.identity, []).append((frame.index, sign))
    return found


def test_each_sign_keeps_its_identity_class_and_text_and_grows_as_it_approaches(clips):
    width, height = SIZE
    for clip in clips:
        identities = clip.sign_identities()
        assert 2 <= len(identities) <= 5
        assert sorted(identities) == list(range(min(identities), max(identities) + 1))
        for identity, track in tracks(clip).items():
            assert {(s.sign_class, s.text) for _, s in track} == {identities[identity]}
            assert len(track) >= 5, "a sign is seen over many frames (it may hide behind something for a few)"
            # Heights grow while the face is whole in the frame (a face leaving the frame is cut at its edge).
            whole = [s.box[3] - s.box[1] for _, s in track
                     if s.box[0] > 0 and s.box[1] > 0 and s.box[2] < width and s.box[3] < height]
            assert all(b >= a - 1 for a, b in zip(whole, whole[1:])), (identity, whole)
            assert whole[-1] >= 1.5 * whole[0], (identity, whole)
        first = min(tracks(clip)[min(identities)], key=lambda item: item[0])[1]
        assert first.box[3] - first.box[1] <= 24, "the first sign starts far away"


def test_signs_leave_and_new_ones_appear(clips):
    spans = [(t[0][0], t[-1][0]) for clip in clips for t in tracks(clip).values()]
    for clip in clips:
        assert any(t[-1][0] < FRAMES - 1 for t in tracks(clip).values()), "some sign passes out of view"
    assert sum(start > 0 for start, _ in spans) >= 2, "signs come into view later in the clip"


def test_text_signs_are_frequent(clips):
    identities = [v for clip in clips for v in clip.sign_identities().values()]
    assert np.mean([c in TEXT_CLASSES for c, _ in identities]) >= 0.4


def test_hazards_come_and_go(clips):
    for clip in clips:
        cells = np.stack([f.cells for f in clip.frames])
        assert cells.any(), "hazard cells are flagged"
        assert not all(np.array_equal(cells[0], c) for c in cells[1:]), "the hazard cells change as the camera moves"


def test_forced_signs_are_shown_in_order():
    clip = generate_clip(SEEDS[0], frames=50, signs=[("speed_limit", "50"), ("info", "BẾN XE"), ("children", None)])
    identities = clip.sign_identities()
    assert [identities[k] for k in range(3)] == [("speed_limit", "50"), ("info", "BẾN XE"), ("children", "")]
    with pytest.raises(ValueError, match="sign class"):
        generate_clip(SEEDS[0], frames=2, signs=[("stop", None)])


def test_clip_seeds_are_disjoint_per_split_and_from_the_scenes_training_uses():
    splits = {split: clip_seeds(split, 1000) for split in SPLIT_STARTS}
    for a in splits:
        assert len(set(splits[a])) == 1000
        for b in splits:
            assert a == b or not set(splits[a]) & set(splits[b])
    for split, start in SPLIT_STARTS.items():
        seeds = clip_seeds(split, CLIP_SPAN, skip=0)
        assert start + CLIP_OFFSET == seeds[0] and seeds[-1] < start + SPLIT_SPAN  # inside the split's range
    assert min(clip_seeds("train", 1)) >= 1_000_000, "far beyond the scenes any training run draws"
    with pytest.raises(ValueError, match="splits"):
        clip_seeds("holdout", 1)


def test_write_and_read_back(tmp_path):
    clip = generate_clip(SEEDS[2], frames=8, size=(320, 192))
    path = write_clip(clip, tmp_path / "tiny.mp4")
    assert path.is_file() and path.with_suffix(".json").is_file()
    frames = read_frames(path)
    assert len(frames) == 8 and frames[0].shape == (192, 320, 3)
    assert np.abs(frames[3].astype(int) - clip.frames[3].image).mean() < 12, "the video shows the frames"
    back = read_truth(path.with_suffix(".json"))
    assert (back.seed, back.fps, back.size) == (clip.seed, clip.fps, clip.size)
    assert truth_of(back) == truth_of(clip)
    assert all(f.image is None for f in back.frames)
    assert back.sign_identities() == clip.sign_identities()


def test_committed_clips_are_what_their_seeds_generate(committed):
    for name, clip in committed.items():
        truth = read_truth(CLIPS_DIR / f"{name}.json")
        assert (truth.seed, truth.fps, truth.size) == (COMMITTED[name]["seed"], clip.fps, clip.size)
        assert truth.seed in clip_seeds("test", 1000, skip=0), "held out"
        assert truth.seed not in clip_seeds("test", 1000), "generated test clips are other worlds"
        assert truth_of(truth) == truth_of(clip), name


def test_committed_videos_read_back_frame_exact(committed):
    total = 0
    for name, clip in committed.items():
        path = CLIPS_DIR / f"{name}.mp4"
        capture = cv2.VideoCapture(str(path))
        count = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            assert image.shape == (clip.size[1], clip.size[0], 3)
            count += 1
        capture.release()
        assert count == len(clip.frames), name
        total += path.stat().st_size + path.with_suffix(".json").stat().st_size
    assert total <= 5_000_000


def test_a_committed_clip_shows_speed_limit_50_and_ben_xe(committed):
    shown = {v for clip in committed.values() for v in clip.sign_identities().values()}
    assert ("speed_limit", "50") in shown and ("info", "BẾN XE") in shown
