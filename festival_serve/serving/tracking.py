"""One camera's memory, without Ray or HTTP: its signs tracked across frames, each read once, each thing
announced once.

    detections ─→ ByteTrack (trackers) ─→ sign tracks ─→ which to read now ─→ texts ─→ events
    hazard cells ─→ per-label persistence with hysteresis ─→ hazard_ahead / hazard_cleared

The tracker is Roboflow's ``trackers.ByteTrackTracker`` fed the detector's boxes with their capture times
(frames dropped on a live source leave irregular gaps; the Kalman step follows the clock, not a frame count).
A track's label is the vote of its detections; its text is the surest reading so far. A track is read when
its box is first large and sharp enough (``StreamSettings.read_min_side_px``, ``read_min_sharpness``), and
again only while its text is unsure and its box has grown (``read_growth``), at most ``max_reads_per_track``
times: every frame carries the track's best text, the reader sees a few crops per sign instead of one a frame.

Events, each said once per stream:

* ``sign_appeared``: a confirmed track (``track_min_frames``); a text sign waits for its text up to
  ``announce_wait_s``, then is announced without it and ``sign_read`` follows when it is read;
* ``sign_passed``: a track announced earlier that the tracker has dropped (unseen for ``track_lost_s``);
* ``hazard_ahead`` / ``hazard_cleared``: a hazard label in the cells for ``hazard_on_frames`` processed
  frames in a row, and then gone for ``hazard_off_frames`` in a row.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from festival_serve.pipeline.places import hazard_places
from festival_serve.pipeline.settings import StreamSettings
from festival_serve.pipeline.types import HazardCell, SignDetection, SignText

#: ByteTrack counts its lost-track buffer in frames of a 30 fps video (trackers' convention).
_TRACKER_REFERENCE_FPS = 30.0

EVENT_KINDS = ("sign_appeared", "sign_read", "sign_passed", "hazard_ahead", "hazard_cleared")


@dataclass
class SignTrack:
    """What a stream knows of one physical sign."""

    track_id: int
    first_frame: int
    first_time_s: float
    last_frame: int
    has_text: bool
    labels: Counter = field(default_factory=Counter)  # label -> detections voting for it
    text: str | None = None
    text_score: float = 0.0
    reads: int = 0
    read_area: float = 0.0  # box area (px²) at the last read
    read_side: float = 0.0  # the box's shorter side (px) at the last read
    text_side: float = 0.0  # shorter side (px) of the box the kept text was read from
    announced: bool = False
    text_announced: bool = False
    # The last two analysed boxes, (capture time s, (x1, y1, x2, y2) px): what ``looming_box`` extrapolates from.
    seen: deque = field(default_factory=lambda: deque(maxlen=2))
    seen_frame: int = -1  # the last analysed frame that detected it

    @property
    def label(self) -> str:
        return self.labels.most_common(1)[0][0]

    def summary(self) -> dict:
        return {"track_id": self.track_id, "label": self.label, "text": self.text, "reads": self.reads,
                "first_frame": self.first_frame, "last_frame": self.last_frame}


@dataclass(frozen=True)
class TrackedSign:
    """One detection of a frame with the track it belongs to (``None`` while unconfirmed)."""

    detection: SignDetection
    track: SignTrack | None


def sharpness(pixels: np.ndarray) -> float:
    """The variance of the Laplacian of a crop's grey pixels: low for a blurred or flat crop."""
    if pixels.size == 0:
        return 0.0
    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def settings_growth_side(settings: StreamSettings) -> float:
    """How much a box's side must have grown for its reading to replace a surer one (read_growth is by area)."""
    return settings.read_growth ** 0.5


#: Most a predicted box may grow past its last analysed one (a sign about to pass the camera, or a noisy pair).
_MAX_PREDICTED_GROWTH = 2.0


def looming_box(seen: Sequence[tuple[float, Sequence[float]]], time_s: float) -> tuple[float, float, float, float] | None:
    """A static sign's box at ``time_s`` seen from a camera moving straight on, from its last two analysed boxes;
    ``None`` without two of them at different times.

    Its image is a scaling about the focus of expansion: its size ``s`` goes as 1 / distance (so ``1 / s`` is
    linear in time at a steady speed) and its centre moves along the line from that focus, ``c = c2 + r·(s −
    s2)``. A constant-velocity Kalman step (ByteTrack's) lags a sign that grows faster as it nears, and at
    24-40 px a few pixels' lag is a box below IoU 0.5."""
    if len(seen) < 2:
        return None
    (t1, b1), (t2, b2) = seen[-2], seen[-1]
    if t2 <= t1:
        return None
    size1, size2 = _area(b1) ** 0.5, _area(b2) ** 0.5
    if size1 <= 0 or size2 <= 0:
        return None
    c1 = np.array([(b1[0] + b1[2]) / 2, (b1[1] + b1[3]) / 2])
    c2 = np.array([(b2[0] + b2[2]) / 2, (b2[1] + b2[3]) / 2])
    inverse_rate = (1 / size2 - 1 / size1) / (t2 - t1)
    inverse = max(1 / size2 + inverse_rate * (time_s - t2), 1 / (size2 * _MAX_PREDICTED_GROWTH))
    size = 1 / inverse
    if abs(size2 - size1) > 0.5:  # px: growing or shrinking enough to place the focus of expansion
        centre = c2 + (c2 - c1) / (size2 - size1) * (size - size2)
    else:  # about the same size: moving across the view, at its last speed
        centre = c2 + (c2 - c1) / (t2 - t1) * (time_s - t2)
    half_w, half_h = (b2[2] - b2[0]) * size / size2 / 2, (b2[3] - b2[1]) * size / size2 / 2
    return (float(centre[0] - half_w), float(centre[1] - half_h), float(centre[0] + half_w), float(centre[1] + half_h))


def _side(box: Sequence[float]) -> float:
    """A box's shorter side, px."""
    return min(box[2] - box[0], box[3] - box[1])


def _area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


class StreamMemory:
    """The tracks, texts and events of one stream. Feed it each processed frame in capture order:
    ``track`` (the detections), then ``to_read`` / ``record_text`` for the crops the stream reads, then
    ``events`` (with the frame's hazard cells); ``close`` at the end of the stream."""

    def __init__(self, settings: StreamSettings) -> None:
        from trackers import ByteTrackTracker  # numpy/scipy; imported here so the HTTP app alone never needs it

        self.settings = settings
        self.tracker = ByteTrackTracker(
            lost_track_buffer=max(1, round(settings.track_lost_s * _TRACKER_REFERENCE_FPS)),
            frame_rate=_TRACKER_REFERENCE_FPS,
            track_activation_threshold=settings.track_activation_score,
            minimum_consecutive_frames=settings.track_min_frames,
            minimum_iou_threshold=settings.track_match_iou,
            high_conf_det_threshold=settings.track_high_score,
        )
        self.tracks: dict[int, SignTrack] = {}
        self.ended: list[SignTrack] = []
        self.hazards_on: dict[str, dict] = {}  # label -> what hazard_ahead said
        self._hazard_seen: Counter = Counter()  # label -> processed frames in a row with it
        self._hazard_gone: Counter = Counter()  # label (announced) -> processed frames in a row without it
        self._pending: list[dict] = []  # events of this frame not yet handed out
        self.events_total: Counter = Counter()
        self._analysed_frame = -1
        # Since when the analysed frames have had a box in no track (not yet, or too unsure to start one), seconds.
        self._untracked_since = float("inf")
        self._last_time_s = 0.0

    # -- signs --------------------------------------------------------------------------------------

    def track(self, frame_index: int, time_s: float, detections: Sequence[SignDetection]) -> list[TrackedSign]:
        """The frame's detections, each with its track (a new one, an old one, or ``None`` while unconfirmed)."""
        import supervision as sv

        boxes = np.array([d.box for d in detections], np.float64).reshape(-1, 4)
        given = sv.Detections(xyxy=boxes, confidence=np.array([d.score for d in detections], np.float64),
                              class_id=np.arange(len(detections)))  # class_id carries the index back
        matched = self.tracker.update(given, timestamp=time_s)
        out: list[TrackedSign] = [TrackedSign(d, None) for d in detections]
        for index, track_id in zip(matched.class_id, matched.tracker_id):
            detection = detections[int(index)]
            if track_id < 0:
                continue
            track = self.tracks.get(int(track_id))
            if track is None:
                track = self.tracks[int(track_id)] = SignTrack(int(track_id), frame_index, time_s, frame_index,
                                                              has_text=detection.has_text)
            track.last_frame = frame_index
            track.seen.append((time_s, tuple(detection.box)))
            track.seen_frame = frame_index
            track.labels[detection.label] += 1
            track.has_text = track.has_text or detection.has_text
            out[int(index)] = TrackedSign(detection, track)
        if any(item.track is None for item in out):
            self._untracked_since = min(self._untracked_since, time_s)
        else:
            self._untracked_since = float("inf")
        self._analysed_frame, self._last_time_s = frame_index, time_s
        self._end_lost_tracks(frame_index, time_s)
        return out

    def settled(self) -> bool:
        """Whether nothing needs the models' eyes now: every track confirmed with its text final (read surely, or
        read as often as allowed, or a pictogram), and no box of the last analysed frame outside a track (a sign on
        its way to becoming one, or seen too unsurely yet: skipping frames would announce it late or never) unless
        boxes have been outside tracks for ``untracked_watch_s`` (a distractor)."""
        watching = 0 <= self._last_time_s - self._untracked_since < self.settings.untracked_watch_s
        if watching or any(t.tracker_id < 0 for t in self.tracker.tracks):
            return False
        return all(not t.has_text or self.text_final(t) or t.reads >= self.settings.max_reads_per_track
                   for t in self.tracks.values())

    def text_final(self, track: SignTrack) -> bool:
        """A sure reading from a box large enough (``read_confident_score``, ``read_final_side_px``)."""
        return (track.text_score >= self.settings.read_confident_score
                and track.text_side >= self.settings.read_final_side_px)

    def predict(self, frame_index: int, time_s: float) -> list[tuple[SignTrack, tuple[float, float, float, float]]]:
        """A frame not analysed: every track the last analysed frame saw, moved on to ``time_s``, with its box:
        ``looming_box`` from its last two analysed boxes, else the tracker's Kalman step. A track that frame missed
        is not drawn (it is lost, or leaving the view)."""
        import supervision as sv

        self.tracker.update(sv.Detections.empty(), timestamp=time_s)  # Kalman predict; a skipped frame is no miss
        out = []
        for tracklet in self.tracker.tracks:
            track = self.tracks.get(int(tracklet.tracker_id))
            if track is not None and track.seen_frame == self._analysed_frame:
                track.last_frame = frame_index
                box = looming_box(track.seen, time_s) or tuple(float(v) for v in tracklet.get_state_bbox())
                out.append((track, box))
        self._end_lost_tracks(frame_index, time_s)
        return out

    def to_read(self, tracked: Sequence[TrackedSign], image: np.ndarray, crop_padding: float) -> list[int]:
        """Indices into ``tracked`` whose crops the reader should read now (see the module's read rule)."""
        from festival_serve.serving.imaging import crop

        settings, wanted = self.settings, []
        height, width = image.shape[:2]
        margin = settings.read_edge_margin_px
        for i, item in enumerate(tracked):
            track, box = item.track, item.detection.box
            if track is None or not track.has_text or track.reads >= settings.max_reads_per_track:
                continue
            side = _side(box)
            if side < settings.read_min_side_px:
                continue
            if box[0] < margin or box[1] < margin or box[2] > width - margin or box[3] > height - margin:
                continue  # cut off by the frame's edge: part of its text is not in view
            if track.reads and (self.text_final(track) or _area(box) < settings.read_growth * track.read_area
                                or max(track.read_side, side) < settings.read_final_side_px):
                continue  # read again only once it has grown, and to a size whose sure reading is final
            if sharpness(crop(image, box, crop_padding)) < settings.read_min_sharpness:
                continue
            wanted.append(i)
        return wanted

    def record_text(self, item: TrackedSign, text: SignText | None) -> None:
        """A read of ``item``'s crop: the track keeps its surest text."""
        track = item.track
        track.reads += 1
        box = item.detection.box
        track.read_area, track.read_side = _area(box), _side(box)
        side = track.read_side
        # A reading from a larger box wins over a surer one from a smaller: letters grow as the sign nears.
        if text is not None and text.text and (side >= track.text_side * settings_growth_side(self.settings)
                                                or text.score > track.text_score):
            track.text, track.text_score, track.text_side = text.text, float(text.score), side

    def _end_lost_tracks(self, frame_index: int, time_s: float) -> None:
        alive = {int(t.tracker_id) for t in self.tracker.tracks if t.tracker_id >= 0}
        for track_id in [k for k in self.tracks if k not in alive]:
            track = self.tracks.pop(track_id)
            self.ended.append(track)
            if track.announced:
                self._emit("sign_passed", frame_index, time_s, track_id=track_id, label=track.label, text=track.text)

    # -- events -------------------------------------------------------------------------------------

    def events(self, frame_index: int, time_s: float, cells: Sequence[HazardCell] | None,
               frame_size: tuple[int, int]) -> list[dict]:
        """This frame's events: signs to announce (or whose text came), hazards that came or went, and the
        ``sign_passed`` of tracks ended while tracking it. ``cells=None``: the hazard stage gave nothing for this
        frame (degraded), which says nothing about the hazards either way."""
        for track in self.tracks.values():
            if not track.announced:
                waited = time_s - track.first_time_s
                # A text sign unread after announce_wait_s is announced without its text, if still in view (a
                # track the last analysed frame missed may be a glimpse that never comes back).
                if (not track.has_text or track.text is not None
                        or (waited >= self.settings.announce_wait_s and track.seen_frame == self._analysed_frame)):
                    track.announced, track.text_announced = True, track.text is not None
                    self._emit("sign_appeared", frame_index, time_s, **self._sign_fields(track))
            elif track.has_text and not track.text_announced and track.text is not None:
                track.text_announced = True
                self._emit("sign_read", frame_index, time_s, track_id=track.track_id, label=track.label,
                           text=track.text)
        if cells is not None:
            self._hazard_events(frame_index, time_s, cells, frame_size)
        events, self._pending = self._pending, []
        return events

    def _hazard_events(self, frame_index: int, time_s: float, cells: Sequence[HazardCell],
                       frame_size: tuple[int, int]) -> None:
        places = {label: (count, place) for label, count, place in
                  hazard_places((((lab.label for lab in cell.labels), cell.box) for cell in cells), frame_size)}
        for label in set(self._hazard_seen) | set(places) | set(self.hazards_on):
            if label in places:
                self._hazard_seen[label] += 1
                self._hazard_gone.pop(label, None)
                if label not in self.hazards_on and self._hazard_seen[label] >= self.settings.hazard_on_frames:
                    count, place = places[label]
                    self.hazards_on[label] = {"label": label, "cells": count, "place": place}
                    self._emit("hazard_ahead", frame_index, time_s, **self.hazards_on[label])
            else:
                self._hazard_seen.pop(label, None)
                if label in self.hazards_on:
                    self._hazard_gone[label] += 1
                    if self._hazard_gone[label] >= self.settings.hazard_off_frames:
                        self._hazard_gone.pop(label)
                        self.hazards_on.pop(label)
                        self._emit("hazard_cleared", frame_index, time_s, label=label)

    def close(self, frame_index: int, time_s: float) -> list[dict]:
        """The stream ended: every announced track still alive has passed."""
        for track_id, track in list(self.tracks.items()):
            self.tracks.pop(track_id)
            self.ended.append(track)
            if track.announced:
                self._emit("sign_passed", frame_index, time_s, track_id=track_id, label=track.label, text=track.text)
        events, self._pending = self._pending, []
        return events

    def summary(self) -> dict[str, Any]:
        """Every track the stream saw (confirmed ones), with its text and how often it was read."""
        every = self.ended + list(self.tracks.values())
        return {"tracks": [t.summary() for t in sorted(every, key=lambda t: t.track_id)],
                "reads": sum(t.reads for t in every), "event_counts": dict(self.events_total)}

    @staticmethod
    def _sign_fields(track: SignTrack) -> dict:
        return {"track_id": track.track_id, "label": track.label, "text": track.text,
                "first_frame": track.first_frame, "first_time_s": round(track.first_time_s, 3)}

    def _emit(self, kind: str, frame_index: int, time_s: float, **fields) -> None:
        self.events_total[kind] += 1
        self._pending.append({"type": kind, "frame": frame_index, "time_s": round(time_s, 3), **fields})
