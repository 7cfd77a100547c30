"""The wire types: what travels between the ingress and the stages, and what each stage answers.

Plain frozen dataclasses with no model or HTTP code, so that ``serving`` (which routes them) and ``models``
(which produce them) share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SignDetection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels, clipped to the image
    label: str
    class_id: int
    score: float
    has_text: bool = True  # False: its class prints no text (settings.text_classes), so nobody reads it


@dataclass(frozen=True)
class HazardLabel:
    label: str
    score: float


@dataclass(frozen=True)
class HazardCell:
    cell: int
    box: tuple[float, float, float, float]  # image pixels
    labels: tuple[HazardLabel, ...]  # highest score first


@dataclass(frozen=True)
class TextLine:
    text: str
    score: float
    #: 4 (x, y) points, clockwise from top-left, in the crop's pixel coordinates.
    box: list[list[float]]


@dataclass(frozen=True)
class SignText:
    #: Lines joined by " " in reading order (top-to-bottom, then left-to-right); "" when no line.
    text: str
    #: Mean line score; 0.0 when no line.
    score: float
    lines: tuple[TextLine, ...]


@dataclass(frozen=True)
class Findings:
    """What the detectors found in one frame: the describer's grounding."""

    signs: tuple[tuple[str, str], ...] = ()  # (label, text read on it, "" if none)
    # (hazard label, number of cells flagged with it, where those cells are: places.place_of, "" if unknown);
    # (label, cells) pairs are taken as place unknown.
    hazards: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        # Callers may pass lists (e.g. from JSON); keep the dataclass hashable and immutable.
        object.__setattr__(self, "signs", tuple((str(label), str(text)) for label, text in self.signs))
        object.__setattr__(self, "hazards", tuple((str(h[0]), int(h[1]), str(h[2]) if len(h) > 2 else "")
                                                  for h in self.hazards))



DegradedCode = Literal["timeout", "skipped_over_budget", "shed", "unavailable", "error", "partial", "malformed"]


@dataclass(frozen=True)
class StageError:
    """Stands in for one item's result when the stage could not produce it (one per request, so a
    failure never takes the rest of the batch with it). ``reason`` is shown to clients: no paths."""

    stage: str
    reason: str
    code: DegradedCode = "error"


@dataclass(frozen=True)
class Ticket:
    """Travels with every item sent to a model: when it was sent and when its answer stops being of use
    (wall-clock seconds, comparable across the processes of one cluster). A model drops an item whose
    deadline passed while it queued, before computing it."""

    sent_at: float
    deadline: float
    # A camera-stream frame (WS /v1/streams): its signs are tracked from 24 px, so the detector looks at it closer
    # (``SignDetectorSettings.stream_image_size``).
    stream: bool = False

    def expired(self, now: float) -> bool:
        return now >= self.deadline
