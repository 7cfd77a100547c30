"""What the generator promises: the sign vocabulary and the ground truth of one scene."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Sign detector classes; a detector's class id is the index here.
SIGN_CLASSES: tuple[str, ...] = (
    "speed_limit",
    "no_parking",
    "no_stopping",
    "no_entry",
    "no_turn",
    "children",
    "pedestrian_crossing",
    "road_works",
    "slippery_road",
    "mandatory",
    "info",
)

#: Information-sign texts, as printed: Vietnamese with tone marks, and (as many real signs are)
#: without them. Short, so that one or two lines fit a sign at a readable size.
INFO_TEXTS: tuple[str, ...] = (
    "ĐƯỜNG CAO TỐC",
    "TRƯỜNG HỌC",
    "BẾN XE",
    "CAM DO XE",
    "HẾT HẠN CHẾ TỐC ĐỘ",
    "KHU DAN CU",
    "KHU DÂN CƯ",
    "CHỢ",
    "BỆNH VIỆN",
    "NGÃ TƯ",
    "LOI RA",
    "TRẠM XĂNG",
    "BÃI ĐỖ XE",
    "LỐI VÀO",
    "SÂN BAY",
    "NHA GA",
    "CẦU",
    "TRUNG TAM",
    "LỄ HỘI",
    "SAN KHAU",
    "LOI THOAT HIEM",
    "ĐƯỜNG CỤT",
    "DI CHAM",
    "TRẠM Y TẾ",
    "HA NOI",
    "ĐÀ NẴNG",
    "BEN PHA",
    "CÔNG VIÊN",
)

SPEED_LIMITS: tuple[str, ...] = ("30", "40", "50", "60", "70", "80")

#: Classes whose sign carries text that OCR should read.
TEXT_CLASSES = frozenset({"speed_limit", "info"})


@dataclass(frozen=True)
class SignTruth:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 pixels, inside the frame, tight around the face
    sign_class: str  # one of SIGN_CLASSES
    text: str  # exact printed text: the number for speed_limit, lines joined by " " for info, else ""
    occluded: float  # fraction of the face hidden, 0..1


#: What only the image shows, as the scene describer words it.
SKIES = ("clear", "hazy", "overcast", "dusk")


@dataclass(frozen=True)
class RoadUser:
    kind: str  # YOLIC class: "Vehicle" or "Creature" (a person)
    side: str  # places.SIDES: which third of the frame holds the centre of its visible pixels
    distance: str  # places.DISTANCES: scene.NEAR_M metres from the camera or closer is near


@dataclass(frozen=True)
class SceneFacts:
    """Generator parameters a description may state that no detector reports."""

    sky: str  # one of SKIES
    lanes: int | None  # lanes the road markings divide the road into; None when it has no lane markings
    road_users: tuple[RoadUser, ...]  # visible vehicles and people, near first


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    signs: tuple[SignTruth, ...]
    cells: np.ndarray  # (104, 11) bool: YOLIC outdoor-layout cells x hazard classes (layout order)
    seed: int
    facts: SceneFacts | None = None
