"""The scene describer's contract: grounded prompts, a clear error without weights, batched greedy
generation that matches one-at-a-time generation, on a tiny random Idefics3 built like SmolVLM."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from festival_serve.pipeline.settings import SceneDescriberSettings
from festival_serve.models.scene_describer.describer import SceneDescriber, WeightsMissing, build_prompt, pull
from festival_serve.pipeline.types import Findings
from festival_serve.training.standins.scene_describer import IMAGE_SEQ_LEN, build_tiny_idefics3

FINDINGS = [
    Findings(signs=(("stop", "STOP"), ("speed_limit", "50"))),
    Findings(),
    Findings(hazards=(("Vehicle", 3), ("ZebraCrossing", 1))),
]


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("store") / "scene_describer" / "tiny-smolvlm", seed=0)


def make_describer(model: Path, **settings) -> SceneDescriber:
    return SceneDescriber(
        SceneDescriberSettings(model=str(model), device="cpu", max_new_tokens=12, **settings),
        model_store=Path("/nonexistent-store"),  # model is absolute: the store must not matter
    )


@pytest.fixture(scope="module")
def describer(tiny_model) -> SceneDescriber:
    return make_describer(tiny_model)


@pytest.fixture
def frames() -> list[np.ndarray]:
    """Three different-size (H, W, 3) uint8 RGB frames: a YOLIC 848×480 frame, a portrait crop, a tiny one."""
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(480, 848), (120, 72), (40, 40)]]


# --- build_prompt -------------------------------------------------------------------------------


def test_prompt_asks_for_a_short_driver_description():
    prompt = build_prompt(Findings())
    assert "one or two sentences" in prompt
    assert "driver" in prompt


def test_prompt_lists_signs_with_their_text_quoted():
    prompt = build_prompt(Findings(signs=(("stop", "STOP"), ("speed_limit", "50"), ("give_way", ""))))
    assert 'stop reading "STOP"' in prompt
    assert 'speed_limit reading "50"' in prompt
    assert "give_way" in prompt and 'give_way reading' not in prompt
    assert "No hazards were detected." in prompt


def test_prompt_lists_hazards_with_cell_counts():
    prompt = build_prompt(Findings(hazards=(("Vehicle", 3), ("ZebraCrossing", 1))))
    assert "Vehicle (3 cells)" in prompt
    assert "ZebraCrossing (1 cell)" in prompt
    assert "No traffic signs were detected." in prompt


def test_prompt_says_when_nothing_was_detected():
    prompt = build_prompt(Findings())
    assert "No traffic signs were detected." in prompt
    assert "No hazards were detected." in prompt


def test_prompt_is_deterministic_and_keeps_ocr_text_on_one_quoted_line():
    findings = Findings(signs=[["warning", 'ROAD\nWORKS "AHEAD"']], hazards=[["TrafficCone", 2]])
    assert findings == Findings(signs=(("warning", 'ROAD\nWORKS "AHEAD"'),), hazards=(("TrafficCone", 2),))
    assert build_prompt(findings) == build_prompt(findings)
    assert "warning reading \"ROAD WORKS 'AHEAD'\"" in build_prompt(findings)


# --- weights ------------------------------------------------------------------------------------


def test_empty_store_raises_weights_missing_naming_the_pull_command(tmp_path):
    with pytest.raises(WeightsMissing) as error:
        SceneDescriber(SceneDescriberSettings(), model_store=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "scene_describer" / "festival-describer") in message
    assert "festival-serve models pull" in message


def test_incomplete_directory_names_what_is_missing(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(WeightsMissing, match=r"missing weights .*model\.safetensors"):
        SceneDescriber(SceneDescriberSettings(model="model"), model_store=tmp_path)


def test_missing_weights_fail_before_importing_torch(tmp_path):
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from festival_serve.pipeline.settings import SceneDescriberSettings\n"
        "from festival_serve.models.scene_describer.describer import SceneDescriber, WeightsMissing\n"
        "try:\n    SceneDescriber(SceneDescriberSettings(), model_store=Path(sys.argv[1]))\n"
        "except WeightsMissing:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import before the check'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=Path(__file__).parents[1])


def test_pull_is_importable():
    assert callable(pull)


# --- the tiny model through the production loader -----------------------------------------------


def test_describe_returns_one_stripped_string_per_frame(describer, frames):
    texts = describer.describe(frames, FINDINGS)
    assert len(texts) == 3
    assert all(isinstance(text, str) and text == text.strip() for text in texts)


def test_batched_generation_matches_one_frame_at_a_time(describer, frames):
    # Prompts differ in length, so the batch really is left-padded; with correct padding, attention
    # masking and position ids, greedy decoding gives the same tokens as unpadded single-frame calls.
    # Compared as token ids (exact on CPU float32); texts follow from them.
    inputs = describer.prepare(frames, FINDINGS)
    assert (inputs["attention_mask"][:, 0] == 0).any(), "expected left padding in this batch"
    batched = describer.generate_ids(frames, FINDINGS)
    singles = [describer.generate_ids([frame], [findings])[0] for frame, findings in zip(frames, FINDINGS)]
    assert batched == singles
    assert any(batched), "the model generated nothing at all; the comparison would be vacuous"
    assert describer.describe(frames, FINDINGS) == [
        describer.describe([frame], [findings])[0] for frame, findings in zip(frames, FINDINGS)
    ]


def test_without_splitting_each_frame_costs_one_image_of_tokens(describer, frames, tiny_model):
    config = describer.model.config
    expected = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // config.scale_factor**2
    assert expected == IMAGE_SEQ_LEN
    inputs = describer.prepare(frames, FINDINGS)
    image_tokens = (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [expected] * len(frames)
    info = describer.model_info()
    assert {k: info[k] for k in ("weights", "device", "runtime_device", "dtype", "precision", "image_splitting",
                                 "image_tokens_per_image", "gpu_memory_cap_bytes")} == {
        "weights": str(tiny_model),
        "device": "cpu",
        "runtime_device": "cpu",  # read back from the parameters
        "dtype": "float32",
        "precision": "float32",
        "image_splitting": False,
        "image_tokens_per_image": expected,
        "gpu_memory_cap_bytes": None,
    }
    assert [n["name"] for n in info["networks"]] == ["scene_describer"] and info["threads"] >= 1


def test_splitting_turns_a_festival_frame_into_twelve_tiles_and_a_global_image(tiny_model, frames):
    splitting = make_describer(tiny_model, do_image_splitting=True)
    inputs = splitting.prepare(frames[:1], FINDINGS[:1])
    image_tokens = int((inputs["input_ids"] == splitting.model.config.image_token_id).sum())
    assert image_tokens == 13 * IMAGE_SEQ_LEN
    assert splitting.model_info()["image_tokens_per_image"] == 13 * IMAGE_SEQ_LEN


def test_read_only_frames_are_described_like_writable_ones(describer, frames):
    read_only = [frame.copy() for frame in frames]
    for frame in read_only:
        frame.flags.writeable = False
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not writable.*")
        texts = describer.describe(read_only, FINDINGS)
    assert texts == describer.describe(frames, FINDINGS)


def test_empty_batch_and_bad_inputs(describer, frames):
    assert describer.describe([], []) == []
    with pytest.raises(ValueError, match="0 images but 1 findings"):
        describer.describe([], FINDINGS[:1])
    with pytest.raises(ValueError, match="3 images but 2 findings"):
        describer.describe(frames, FINDINGS[:2])
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8"):
        describer.describe([frames[0], frames[1][..., 0]], FINDINGS[:2])
