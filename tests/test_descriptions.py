"""The describer's training targets say what is true of their scenes, and the faithfulness check reads
descriptions back: what they mention, what they invent, and whether the image-only facts are right."""

from __future__ import annotations

import numpy as np
import pytest

from festival_serve.world import descriptions
from festival_serve.world import synth
from festival_serve.pipeline.places import place_of
from festival_serve.world.synth.scene import outdoor_layout
from festival_serve.world.synth.truth import RoadUser, SceneFacts
from festival_serve.models.scene_describer.describer import build_prompt
from festival_serve.pipeline.types import Findings

LAYOUT = outdoor_layout()
SEEDS = synth.scene_seeds("test", 40)


def truth_of(scene):
    findings = descriptions.findings_from_truth(scene.signs, scene.cells, LAYOUT.classes, LAYOUT.boxes)
    hazards = [label for k, label in enumerate(LAYOUT.classes) if scene.cells[:, k].any()]
    return findings, {"truth_signs": [(s.sign_class, s.text) for s in scene.signs], "truth_hazards": hazards,
                      "facts": scene.facts}


@pytest.mark.parametrize("seed", SEEDS[:40:4])
def test_targets_are_true_of_their_scenes(seed):
    scene = synth.generate_scene(seed)
    findings, truth = truth_of(scene)
    for variant in range(3):  # several phrasings of the same content
        text = descriptions.target_description(findings, scene.facts, np.random.default_rng(variant))
        score = descriptions.faithfulness(text, findings, **truth)
        assert score.missed == () and score.hallucinated == (), (text, score)
        assert score.lighting_right and score.lanes_right and score.road_users_right, (text, score)


def test_targets_vary_phrasing_not_content():
    scene = next(s for s in map(synth.generate_scene, SEEDS) if len(s.signs) >= 2)
    findings, truth = truth_of(scene)
    texts = {descriptions.target_description(findings, scene.facts, np.random.default_rng(i)) for i in range(8)}
    assert len(texts) >= 4
    for text in texts:
        assert descriptions.faithfulness(text, findings, **truth).missed == ()


def test_scene_facts_are_the_generators_and_do_not_change_the_scene():
    scene = synth.generate_scene(SEEDS[0])
    again = synth.generate_scene(SEEDS[0])
    assert scene.facts == again.facts and np.array_equal(scene.image, again.image)
    facts = [synth.generate_scene(seed).facts for seed in SEEDS]
    assert {f.sky for f in facts} <= {"clear", "hazy", "overcast", "dusk"}
    assert {f.lanes for f in facts} <= {None, 2, 3} and None in {f.lanes for f in facts}
    users = [u for f in facts for u in f.road_users]
    assert users and {u.kind for u in users} <= {"Vehicle", "Creature"}


def test_place_of_cells():
    # Cells at the bottom middle are ahead and near; a cell high on the left is far on the left.
    assert place_of(np.array([[0.4, 0.85, 0.5, 1.0], [0.5, 0.85, 0.6, 1.0]])) == "ahead, near"
    assert place_of(np.array([[0.0, 0.4, 0.125, 0.5]])) == "left, far"
    assert place_of(np.zeros((0, 4))) == ""


def test_prompt_says_where_hazards_are():
    prompt = build_prompt(Findings(hazards=(("TrafficCone", 2, "right, near"), ("Vehicle", 1))))
    assert "TrafficCone (2 cells, right, near)" in prompt and "Vehicle (1 cell)" in prompt


FINDINGS = Findings(signs=(("speed_limit", "50"), ("info", "BẾN XE")), hazards=(("TrafficCone", 3, "ahead, near"),))
FACTS = SceneFacts(sky="dusk", lanes=2, road_users=(RoadUser("Vehicle", "left", "near"),))


def test_faithful_description_scores_perfectly():
    text = ('A speed limit of 50 km/h and a sign reading "BẾN XE". Watch for traffic cones ahead close and a car '
            "on the left nearby. At dusk on a two-lane road. Keep to 50.")
    score = descriptions.faithfulness(text, FINDINGS, facts=FACTS)
    assert score.given == ("sign:speed_limit:50", "sign:info:BẾN XE", "hazard:TrafficCone")
    assert score.mentioned == 3 and score.missed == () and score.hallucinated == ()
    assert score.lighting_right and score.lanes_right and score.road_users_right


def test_a_description_that_omits():
    text = "There is a speed limit sign. At dusk on a road with three lanes."  # no 50, no BẾN XE, no cones
    score = descriptions.faithfulness(text, FINDINGS, facts=FACTS)
    assert set(score.missed) == {"sign:speed_limit:50", "sign:info:BẾN XE", "hazard:TrafficCone"}
    assert score.mentioned == 0
    assert score.lighting_right and not score.lanes_right and not score.road_users_right


def test_a_description_that_invents():
    text = ('Speed limit 50, a sign reading "BẾN XE" and a no entry sign. Traffic cones ahead, a pothole and a '
            'person on the right. In clear daylight on a two-lane road, a car on the left, a sign reading "CHỢ".')
    score = descriptions.faithfulness(text, FINDINGS, truth_hazards=["Dent"], facts=FACTS)
    assert score.missed == ()
    # The pothole is in the scene (truth), so it is not invented; the rest is.
    assert set(score.hallucinated) == {"sign:no_entry", "hazard:Creature", "text:chợ"}
    assert not score.lighting_right and score.lanes_right and score.road_users_right


def test_tone_marks_count_in_sign_text():
    score = descriptions.faithfulness('A sign reading "BEN XE".', Findings(signs=(("info", "BẾN XE"),)))
    assert score.missed == ("sign:info:BẾN XE",) and score.hallucinated == ("text:ben xe",)


def test_summarize_counts_recall_hallucinations_and_facts():
    good = descriptions.faithfulness('Speed limit 50, a sign reading "BẾN XE", cones ahead. At dusk, two lanes, '
                                     "a car on the left.", FINDINGS, facts=FACTS)
    bad = descriptions.faithfulness("A no entry sign on an overcast day.", FINDINGS, facts=FACTS)
    summary = descriptions.summarize([good, bad])
    assert summary["mention_recall"] == 0.5 and summary["hallucinations_per_description"] == 0.5
    assert summary["lighting_accuracy"] == 0.5 and summary["lanes_accuracy"] == 0.5


def test_eval_rebuilds_the_describers_findings_and_scores_the_description():
    from festival_serve.measure import evaluate
    from festival_serve.world import scores

    body = {"image": {"width": 848, "height": 480},
            "signs": [{"label": "speed_limit", "text": "50", "box": [10, 10, 60, 60], "score": 0.9},
                      {"label": "no_entry", "text": None, "box": [70, 10, 120, 60], "score": 0.9}],
            "hazards": [{"cell": 99, "box": [339.2, 408.0, 424.0, 480.0],
                         "labels": [{"label": "TrafficCone", "score": 0.8}]}]}
    findings = evaluate.findings_from_answer(body)
    assert findings == Findings(signs=(("speed_limit", "50"), ("no_entry", "")),
                                hazards=(("TrafficCone", 1, "ahead, near"),))
    cells = np.zeros((LAYOUT.num_cells, len(LAYOUT.classes)), bool)
    outcome = evaluate.Outcome(1, (848, 480), [], cells, facts=FACTS, findings=findings,
                               description="Speed limit 50 and no entry. Cones ahead close, a car on the left. "
                                           "At dusk on a two-lane road, a wall ahead.")
    metrics = evaluate.description_metrics([outcome], LAYOUT.classes)
    assert metrics["mention_recall"] == 1.0 and metrics["hallucinations_per_description"] == 1.0
    assert metrics["hallucinated"] == {"hazard:Wall": 1} and metrics["without_description"] == 0
    assert scores.targets_for("world", describe=True)["descriptions.mention_recall"] == (0.90, "min")
