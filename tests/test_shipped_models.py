"""The weights committed in ``models/`` load through the production loaders with the settings of
``serve_config.yaml`` and reach the accuracy targets on held-out synthetic scenes (a fixed sample
of the test split that no training run saw), scored by ``festival-serve eval``'s own code on the
HTTP API's answers (the single-process app: same flow and JSON as the graph, without Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from festival_serve import evaluate, synth
from festival_serve.baseline import build_app
from festival_serve.settings import PipelineArgs

ROOT = Path(__file__).resolve().parents[1]
SCENES = 40  # a few dozen: ~1 min on 2 cores
#: What the interim weights reach on these scenes, less a margin: a regression (a wrong image size, a
#: broken loader, a bad export) falls far below. Raise them as better weights ship.
FLOORS = {"signs.precision": 0.9, "signs.recall": 0.9, "ocr.exact_match_no_tones": 0.85, "hazards.f1": 0.5}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def shipped_args() -> PipelineArgs:
    raw = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    return PipelineArgs.model_validate({**raw, "model_store": str(ROOT / "models")})


@pytest.fixture(scope="module")
def report(shipped_args) -> dict:
    from festival_serve import ocr, signs, yolic

    store = Path(shipped_args.model_store)
    models = {  # the describer is not shipped (pull it); describe=false never calls it
        "sign_detector": signs.SignDetector(shipped_args.sign_detector, model_store=store),
        "hazard_cells": yolic.HazardCellClassifier(shipped_args.hazard_cells, model_store=store),
        "sign_reader": ocr.create_reader(shipped_args.sign_reader, model_store=store),
    }
    client = TestClient(build_app(shipped_args, models))
    layout = yolic.load_layout(shipped_args.hazard_cells.layout)
    seeds = synth.scene_seeds("test", SCENES)
    outcomes = [evaluate._post(client, "", truth, jpeg, layout.classes, describe=False)
                for truth, jpeg in evaluate._scenes(seeds, evaluate.DEFAULT_SIZES, quality=90)]
    assert [o.error for o in outcomes] == [None] * SCENES
    return evaluate.report(outcomes, sign_classes=list(synth.SIGN_CLASSES))


def test_shipped_weights_are_the_served_defaults(shipped_args):
    assert shipped_args.store_path(shipped_args.sign_detector.weights).is_file()
    assert shipped_args.store_path(shipped_args.hazard_cells.weights).is_file()
    sizes = [p.stat().st_size for p in (ROOT / "models").rglob("*") if p.suffix in (".pt", ".tar")]
    assert sum(sizes) < 20 * 1024**2  # the budget for the embedded defaults


def test_shipped_weights_score_at_least_their_model_cards(report):
    """Regression floors: the held-out levels the interim weights reach (model cards), less a margin for
    this smaller sample. The issue's targets (``evaluate.TARGETS``) are printed; the interim detectors
    do not meet them yet (README, "What the default local run serves")."""
    scores = {"signs.precision": report["signs"]["precision"], "signs.recall": report["signs"]["recall"],
              "ocr.exact_match_no_tones": report["ocr"]["exact_match_no_tones"], "hazards.f1": report["hazards"]["f1"]}
    print({k: {"value": v, "target": evaluate.TARGETS[k], "floor": FLOORS[k]} for k, v in scores.items()})
    assert report["ocr"]["evaluated"] >= 5
    for key, floor in FLOORS.items():
        assert scores[key] >= floor, (key, scores[key], report)


def test_the_reader_meets_its_target_on_detected_signs(report):
    assert report["ocr"]["exact_match_no_tones"] >= evaluate.TARGETS["ocr.exact_match_no_tones"], report["ocr"]
