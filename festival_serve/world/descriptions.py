"""Driver-facing scene descriptions: the trained describer's targets, and the eval's faithfulness check.

Plain Python (no Ray, no torch). ``target_description`` words what a frame's findings (the signs and hazards
the describer's prompt lists) and the world's generator facts (what only the image shows: the sky, the lanes,
where vehicles and people are) say, with several phrasings per fact in shuffled order, so a model trained on
them learns content rather than one sentence. ``faithfulness`` reads any description back: which findings it
mentions, which signs or hazards it states that neither the findings nor the scene hold, and whether the
image-only facts it states are right. Both read the same vocabulary tables below, so what the targets say is
what the check can read.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from festival_serve.pipeline.places import DISTANCES, SIDES, place_of
from festival_serve.world.synth.truth import SKIES, RoadUser, SceneFacts
from festival_serve.pipeline.types import Findings

# -- the findings a perfect detector would give -------------------------------------------------


def findings_from_truth(signs: Iterable, cells: np.ndarray, classes: Sequence[str],
                        boxes: np.ndarray) -> Findings:
    """The findings a perfect detector, reader and hazard classifier would report for a scene: its signs
    (class, printed text) and, per hazard class flagged in any cell, the cell count and where they are.
    ``cells``: (cells, classes) bool; ``boxes``: the layout's (cells, 4) normalised boxes."""
    # Every class the ingress reports, TrafficSign cells included (the prompt lists them; descriptions say
    # the signs themselves instead), sorted by label as the ingress sorts them.
    hazards = []
    for k, label in sorted(enumerate(classes), key=lambda item: item[1]):
        flagged = np.flatnonzero(cells[:, k])
        if flagged.size:
            hazards.append((label, int(flagged.size), place_of(boxes[flagged])))
    return Findings(signs=tuple((s.sign_class, s.text) for s in signs), hazards=tuple(hazards))


# -- vocabulary: how each finding is said, and the words that say it ---------------------------

#: Sign class -> (phrases, with {text} where the sign's text goes; the pattern that says the class).
SIGN_WORDS: dict[str, tuple[tuple[str, ...], str]] = {
    "speed_limit": (("a speed limit of {text} km/h", "a {text} km/h speed limit", "speed limit {text}"),
                    r"speed limit|km/h"),
    "no_parking": (("a no parking sign", "no parking"), r"no parking"),
    "no_stopping": (("a no stopping sign", "no stopping"), r"no stopping"),
    "no_entry": (("a no entry sign", "no entry"), r"no entry"),
    "no_turn": (("a no turning sign", "no turning"), r"no turning"),
    "children": (("a children crossing sign", "a school zone sign"), r"children|school zone"),
    "pedestrian_crossing": (("a pedestrian crossing sign",), r"pedestrian crossing"),
    "road_works": (("a road works sign", "road works"), r"road works"),
    "slippery_road": (("a slippery road sign", "a slippery road warning"), r"slippery"),
    "mandatory": (("a mandatory direction sign", "a keep-direction sign"), r"mandatory|keep-direction"),
    "info": (('a sign reading "{text}"', 'an information sign saying "{text}"'), r"information sign|sign reading"),
}
#: How a sign whose text the reader could not read is said.
SIGN_WORDS_UNREAD = {"speed_limit": ("a speed limit sign",), "info": ("an information sign",)}

#: YOLIC hazard class -> (phrases; the pattern that says it). TrafficSign cells are the signs, said above.
HAZARD_WORDS: dict[str, tuple[tuple[str, ...], str]] = {
    "Bump": (("a speed bump", "a bump in the road"), r"\bbump"),
    "Column": (("a pole", "a post"), r"\b(pole|post)s?\b"),
    "Dent": (("a pothole", "a dent in the road"), r"pothole|\bdent\b"),
    "Fence": (("a fence", "a fence by the road"), r"\bfences?\b"),
    "Creature": (("a person", "someone on foot"), r"\b(person|people|someone on foot)\b"),
    "Vehicle": (("a vehicle", "a car"), r"\b(vehicles?|cars?)\b"),
    "Wall": (("a wall", "a wall by the road"), r"\bwalls?\b"),
    "Weed": (("weeds", "overgrown weeds"), r"\bweeds?\b"),
    "ZebraCrossing": (("a zebra crossing", "zebra stripes"), r"\bzebra\b"),
    "TrafficCone": (("traffic cones", "a traffic cone"), r"\bcones?\b"),
}
SIDE_WORDS = {"left": ("on the left",), "ahead": ("ahead", "straight ahead"), "right": ("on the right",)}
SIDE_PATTERN = {"left": r"\bleft\b", "ahead": r"\bahead\b", "right": r"\bright\b"}
DISTANCE_WORDS = {"near": ("close", "nearby"), "far": ("further off", "in the distance")}
SKY_PATTERN = {"clear": r"\bclear (daylight|day)\b", "hazy": r"\bhazy\b", "overcast": r"\bovercast\b",
               "dusk": r"\bdusk\b"}
SKY_WORDS = {
    "clear": ("in clear daylight", "on a clear day"),
    "hazy": ("under a hazy sky", "in hazy light"),
    "overcast": ("under an overcast sky", "on an overcast day"),
    "dusk": ("at dusk", "in the dusk light"),
}
LANE_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
NO_LANES = ("the road has no lane markings", "an unmarked road")
#: Any lane statement: "a two-lane road", "a road with three lanes", "no lane markings", "unmarked".
LANES_PATTERN = r"\b\w+[- ]lanes?\b|no lane markings|\bunmarked\b"

assert set(SKY_WORDS) == set(SKY_PATTERN) == set(SKIES) and set(SIDE_WORDS) == set(SIDES) and set(DISTANCE_WORDS) == set(DISTANCES)


def image_fact_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that state what only the image shows: the sky and the lanes."""
    patterns = [*SKY_PATTERN.values(), LANES_PATTERN]
    return [m.span() for pattern in patterns for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sign_phrase(label: str, text: str, rng: np.random.Generator) -> str:
    if label not in SIGN_WORDS:
        return label.replace("_", " ") + (f' reading "{text}"' if text else "")
    if not text and label in SIGN_WORDS_UNREAD:
        return _pick(rng, SIGN_WORDS_UNREAD[label])
    return _pick(rng, SIGN_WORDS[label][0]).format(text=text)


def _place_phrase(place: str, rng: np.random.Generator) -> str:
    side, _, distance = (part.strip() for part in place.partition(","))
    words = [_pick(rng, SIDE_WORDS[side])] if side in SIDE_WORDS else []
    if distance in DISTANCE_WORDS:
        words.append(_pick(rng, DISTANCE_WORDS[distance]))
    return " ".join(words)


def _hazard_phrase(label: str, place: str, rng: np.random.Generator) -> str:
    return f"{_pick(rng, HAZARD_WORDS[label][0])} {_place_phrase(place, rng)}".strip()


def _road_user_phrase(user: RoadUser, rng: np.random.Generator) -> str:
    return _hazard_phrase(user.kind, f"{user.side}, {user.distance}", rng)


def _scene_phrase(facts: SceneFacts, rng: np.random.Generator) -> str:
    sky = _pick(rng, SKY_WORDS[facts.sky])
    if facts.lanes is None:
        road = _pick(rng, NO_LANES)
        return f"{sky[0].upper()}{sky[1:]}, {road}." if rng.random() < 0.5 else f"{road[0].upper()}{road[1:]}, {sky}."
    lanes = LANE_NUMBERS.get(facts.lanes, str(facts.lanes))
    road = _pick(rng, (f"a {lanes}-lane road", f"a road with {lanes} lanes"))
    return _pick(rng, (f"{sky[0].upper()}{sky[1:]} on {road}.", f"Driving on {road} {sky}."))


def _advice(findings: Findings) -> str:
    """What the driver should do: one sentence that names no sign or hazard (the check reads those)."""
    labels = {label for label, _ in findings.signs} | {label for label, _, _ in findings.hazards}
    limits = [text for label, text in findings.signs if label == "speed_limit" and text]
    if labels & {"children", "pedestrian_crossing", "Creature", "ZebraCrossing"}:
        return "Slow down and be ready to stop."
    if limits:
        return f"Keep to {limits[0]}."
    if labels & {"road_works", "TrafficCone", "Dent", "Bump", "slippery_road"}:
        return "Reduce speed and steer carefully."
    if labels & {"no_entry", "no_turn", "mandatory"}:
        return "Follow the direction the signs allow."
    return "Drive on with care."


def target_description(findings: Findings, facts: SceneFacts, rng: np.random.Generator) -> str:
    """A short description of one frame: its signs (with text and meaning), its hazards with where they are,
    the vehicles and people the image shows, the sky and the lanes, then what to do. Phrasing and order vary
    with ``rng``; the content does not."""
    sentences = []
    signs = [_sign_phrase(label, text, rng) for label, text in findings.signs]
    if signs:
        order = rng.permutation(len(signs))
        listed = _join([signs[i] for i in order])
        sentences.append(_pick(rng, (f"Signs show {listed}.", f"There is {listed}.", f"Ahead: {listed}.")))
    # Vehicles and people are said where the image shows them; other hazards where their cells are.
    users = list(facts.road_users)
    said_by_users = {user.kind for user in users}
    hazards = [_hazard_phrase(label, place, rng) for label, _, place in findings.hazards
               if label in HAZARD_WORDS and label not in said_by_users]
    hazards += [_road_user_phrase(user, rng) for user in users]
    if hazards:
        order = rng.permutation(len(hazards))
        listed = _join([hazards[i] for i in order])
        sentences.append(_pick(rng, (f"Watch for {listed}.", f"Hazards: {listed}.", f"Be careful of {listed}.")))
    if not signs and not hazards:
        sentences.append(_pick(rng, ("No signs or hazards are in view.", "Nothing on the road needs attention.")))
    scene = _scene_phrase(facts, rng)
    sentences.insert(int(rng.integers(len(sentences) + 1)), scene)
    sentences.append(_advice(findings))
    return " ".join(sentences)


# -- faithfulness -------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().casefold()


@dataclass(frozen=True)
class Faithfulness:
    """One description read back against what the describer was given and what the scene holds."""

    given: tuple[str, ...]  # the findings it had to mention: "sign:<class>[:<text>]", "hazard:<class>"
    missed: tuple[str, ...]  # of those, the ones it does not mention
    hallucinated: tuple[str, ...]  # signs or hazards it states that neither the findings nor the scene hold
    lighting_right: bool | None  # None: the scene's facts are unknown
    lanes_right: bool | None
    road_users_right: bool | None  # every visible vehicle and person is said, on its side of the road

    @property
    def mentioned(self) -> int:
        return len(self.given) - len(self.missed)


def _says(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


def _quoted(text: str) -> list[str]:
    return [_norm(q) for q in re.findall(r'"([^"]*)"', text)]


def faithfulness(description: str, findings: Findings, *, truth_signs: Iterable[tuple[str, str]] = (),
                 truth_hazards: Iterable[str] = (), facts: SceneFacts | None = None) -> Faithfulness:
    """Score ``description`` against the ``findings`` it was given and the scene's truth (its signs as
    (class, text), the hazard classes of its cells, its generator facts).

    A sign is mentioned when its class's words appear and, when it carries text, the text too (a number as a
    word, a phrase verbatim, case- and whitespace-insensitive); a hazard when its class's words appear. A
    sign class, hazard class or quoted sign text the description states that is in neither the findings nor
    the truth is a hallucination."""
    said = _norm(description)
    given, missed = [], []
    for label, text in findings.signs:
        key = f"sign:{label}" + (f":{text}" if text else "")
        given.append(key)
        pattern = SIGN_WORDS.get(label, ((), re.escape(label.replace("_", " "))))[1]
        text_said = not text or _says(rf"(?<!\w){re.escape(_norm(text))}(?!\w)", said)
        # An information sign is mentioned by its text; any other sign by its meaning (and its text, if read).
        if not (text_said and (bool(text) and label == "info" or _says(pattern, said))):
            missed.append(key)
    for label, _, _ in findings.hazards:
        if label in HAZARD_WORDS:
            given.append(f"hazard:{label}")
            if not _says(HAZARD_WORDS[label][1], said):
                missed.append(f"hazard:{label}")

    truth_signs = list(truth_signs)
    known_signs = {label for label, _ in findings.signs} | {label for label, _ in truth_signs}
    known_texts = {_norm(text) for _, text in [*findings.signs, *truth_signs] if text}
    known_hazards = {label for label, _, _ in findings.hazards} | set(truth_hazards)
    if facts is not None:
        known_hazards |= {user.kind for user in facts.road_users}
    hallucinated = [f"sign:{label}" for label, (_, pattern) in SIGN_WORDS.items()
                    if label != "info" and label not in known_signs and _says(pattern, said)]
    hallucinated += [f"text:{quote}" for quote in _quoted(description) if quote and quote not in known_texts]
    hallucinated += [f"hazard:{label}" for label, (_, pattern) in HAZARD_WORDS.items()
                     if label not in known_hazards and _says(pattern, said)]

    lighting = lanes = users = None
    if facts is not None:
        skies = [sky for sky in SKIES if _says(SKY_PATTERN[sky], said)]
        lighting = skies == [facts.sky]
        if facts.lanes is None:
            lanes = _says(r"no lane markings|unmarked", said)
        else:
            number = LANE_NUMBERS.get(facts.lanes, str(facts.lanes))
            lanes = _says(rf"\b{number}[- ]lane|\b{number} lanes\b", said)
        # Extra vehicles or people are either findings (a hazard flagged in cells the image shows too little
        # of to count here) or hallucinations, counted above.
        placed = collections.Counter(_road_users_said(said))
        users = not collections.Counter((u.kind, u.side) for u in facts.road_users) - placed
    return Faithfulness(tuple(given), tuple(missed), tuple(hallucinated), lighting, lanes, users)


def _road_users_said(said: str) -> list[tuple[str, str]]:
    """(kind, side) of every vehicle or person the description places: each phrase up to the next comma,
    "and" or full stop."""
    found = []
    for clause in re.split(r",| and |\.|;|:", said):
        for kind in ("Vehicle", "Creature"):
            if _says(HAZARD_WORDS[kind][1], clause):
                sides = [side for side, pattern in SIDE_PATTERN.items() if _says(pattern, clause)]
                found.append((kind, sides[0] if len(sides) == 1 else "?"))
    return sorted(found)


def summarize(scores: Sequence[Faithfulness]) -> dict[str, float | int | None]:
    """The eval's figures over many descriptions: mention recall of the findings given, hallucinated signs or
    hazards per description, and the share of descriptions that state each image-only fact right."""

    def share(values: list[bool | None]) -> float | None:
        known = [v for v in values if v is not None]
        return round(sum(known) / len(known), 4) if known else None

    given = sum(len(s.given) for s in scores)
    return {
        "descriptions": len(scores),
        "mention_recall": round(sum(s.mentioned for s in scores) / given, 4) if given else None,
        "hallucinations_per_description": round(sum(len(s.hallucinated) for s in scores) / len(scores), 4)
        if scores else None,
        "lighting_accuracy": share([s.lighting_right for s in scores]),
        "lanes_accuracy": share([s.lanes_right for s in scores]),
        "road_users_accuracy": share([s.road_users_right for s in scores]),
    }
