"""Training commands on tiny generated data: the artefacts they write load through the production loaders."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from festival_serve.world import synth
from festival_serve.training.cards import write_model_card
from festival_serve.training.hazard_cells import cell_metrics, cell_targets, mirror_permutation, train_yolic
from festival_serve.training.sign_detector import narrow_yolov8, train_signs, write_yolo_dataset, yolo_labels
from festival_serve.models.hazard_cells.yolic import CellLayout, load_yolic_checkpoint


# -- YOLIC ------------------------------------------------------------------------------------------

def test_cell_metrics_count_every_scene_cell_and_class():
    truth = np.zeros((2, 3, 2), bool)
    pred = np.zeros((2, 3, 2), bool)
    truth[0, 0, 0] = truth[0, 1, 1] = truth[1, 2, 0] = True
    pred[0, 0, 0] = pred[1, 2, 0] = True  # two hits
    pred[1, 0, 1] = True  # one false alarm; truth[0, 1, 1] missed
    m = cell_metrics(pred, truth)
    assert (m["true_positives"], m["false_positives"], m["false_negatives"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-4) and m["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert cell_metrics(truth, truth)["f1"] == 1.0


def test_targets_put_background_last_where_a_cell_is_empty():
    cells = np.zeros((1, 2, 3), bool)
    cells[0, 0, 1] = True
    targets = cell_targets(cells)
    assert targets.shape == (1, 2 * 4) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets.reshape(2, 4), [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_mirror_permutation_maps_each_cell_onto_its_mirror_image(yolic_layout):
    permutation = mirror_permutation(yolic_layout)
    assert permutation is not None
    np.testing.assert_array_equal(permutation[permutation], np.arange(yolic_layout.num_cells))  # an involution
    boxes = yolic_layout.boxes
    np.testing.assert_allclose(boxes[permutation][:, [0, 2]], 1 - boxes[:, [2, 0]], atol=1e-4)
    np.testing.assert_allclose(boxes[permutation][:, [1, 3]], boxes[:, [1, 3]])


def test_an_asymmetric_layout_is_not_mirrored():
    layout = CellLayout("lopsided", ("Cone",), np.array([[0, 0, 0.6, 1], [0.6, 0, 1, 1]], np.float32))
    assert mirror_permutation(layout) is None


def test_one_epoch_of_yolic_writes_a_checkpoint_the_server_loads(tmp_path, yolic_layout):
    out = tmp_path / "hazard_cells" / "yolic_m2.pth.tar"
    result = train_yolic(out, train_scenes=12, val_scenes=4, epochs=1, batch_size=6, progress=False, workers=1)
    model = load_yolic_checkpoint(out, yolic_layout)
    assert not model.training
    assert np.isfinite(result["first_loss"]) and np.isfinite(result["history"][0]["loss"])
    assert result["best_epoch"] == 1 and len(result["history"]) == 1
    assert set(result["val_per_class"]) == set(yolic_layout.classes)
    assert 0 <= result["val"]["f1"] <= 1 and result["seconds"]["per_epoch"] > 0
    saved = torch.load(out, weights_only=True)
    assert saved["classifier.1.weight"].dtype == torch.float16  # half the bytes; the loader casts to fp32


def test_a_time_budget_replans_the_epochs_and_init_continues_a_checkpoint(tmp_path, yolic_layout):
    from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint

    start = build_yolic_checkpoint(tmp_path / "start.pth.tar", yolic_layout, seed=1)
    out = tmp_path / "continued.pth.tar"
    result = train_yolic(out, train_scenes=4, val_scenes=2, epochs=50, batch_size=4, hours=1e-6, init=start,
                         train_skip=12_000, progress=False, workers=1)
    assert result["epochs"] == 1 and len(result["history"]) == 1 and result["train_skip"] == 12_000
    head = load_yolic_checkpoint(out, yolic_layout).classifier[1].bias
    assert not torch.allclose(head, torch.full_like(head, -3.0))  # trained, from the builder's -3 logits
    assert torch.allclose(head, torch.full_like(head, -3.0), atol=0.1)  # ... by a few Adam steps, not from scratch


# -- signs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sign_dataset(tmp_path_factory):
    return write_yolo_dataset(tmp_path_factory.mktemp("signs") / "dataset", train=4, val=2, progress=False, workers=1)


def test_yolo_labels_are_normalised_and_clipped_to_the_frame():
    sign = synth.SignTruth(box=(-10, 20, 90, 70), sign_class="info", text="CHỢ", occluded=0.0)
    (line,) = yolo_labels([sign], 200, 100)
    class_id, cx, cy, w, h = line.split()
    assert int(class_id) == synth.SIGN_CLASSES.index("info")
    np.testing.assert_allclose([float(v) for v in (cx, cy, w, h)], [0.225, 0.45, 0.45, 0.5])


def test_yolo_dataset_labels_every_sign_of_its_scenes(sign_dataset):
    root = sign_dataset.parent
    for split, count in (("train", 4), ("val", 2)):
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        for image, label in zip(images, labels):
            scene = synth.generate_scene(int(image.stem), size=Image.open(image).size)
            rows = [line.split() for line in label.read_text().splitlines()]
            assert len(rows) == len(scene.signs)
            for class_id, *coords in rows:
                assert 0 <= int(class_id) < len(synth.SIGN_CLASSES)
                assert all(0 < float(v) <= 1 for v in coords)


def test_data_yaml_passes_ultralytics_dataset_check_offline(sign_dataset):
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(sign_dataset), autodownload=False)
    assert data["nc"] == len(synth.SIGN_CLASSES)
    assert data["names"] == dict(enumerate(synth.SIGN_CLASSES))


def test_narrow_yolov8_is_the_v8_graph_at_another_width():
    config = narrow_yolov8(0.125)
    assert config["width_multiple"] == 0.125 and "scales" not in config
    assert config["head"][-1][2] == "Detect"


def test_one_epoch_of_signs_writes_a_checkpoint_the_server_loads(tmp_path, sign_dataset):
    from festival_serve.models.sign_detector.detector import YoloCheckpoint

    out = tmp_path / "sign_detector" / "signs.pt"
    result = train_signs(out, data_yaml=sign_dataset, epochs=1, imgsz=160, model=narrow_yolov8(0.125), batch=4)
    checkpoint = YoloCheckpoint(out, 160)
    assert list(checkpoint.names.values()) == list(synth.SIGN_CLASSES)
    assert len(result["seconds"]["per_epoch"]) == 1
    assert all(0 <= result[k] <= 1 for k in ("precision", "recall", "val_mAP50"))


def test_init_fine_tunes_from_a_checkpoint_instead_of_random_weights(tmp_path, sign_dataset):
    import torch
    from ultralytics.nn.tasks import load_checkpoint

    start = tmp_path / "start.pt"
    train_signs(start, data_yaml=sign_dataset, epochs=1, imgsz=160, model=narrow_yolov8(0.125), batch=4)
    tuned = tmp_path / "tuned.pt"
    result = train_signs(tuned, data_yaml=sign_dataset, epochs=1, imgsz=192, init=start, batch=4, lr0=1e-6,
                         optimizer="AdamW", warmup_epochs=0)
    assert result["model"] == f"fine-tuned from {start}"
    before, after = (load_checkpoint(p, device="cpu", fuse=False)[0].state_dict() for p in (start, tuned))
    # A tiny learning rate barely moves the weights it started from; random ones would differ wholly.
    first = next(k for k in before if k.endswith("conv.weight"))
    assert torch.allclose(before[first].float(), after[first].float(), atol=1e-2)


def test_fixed_settings_cannot_be_overridden(tmp_path, sign_dataset):
    with pytest.raises(ValueError, match="fliplr"):
        train_signs(tmp_path / "x.pt", data_yaml=sign_dataset, epochs=1, fliplr=0.5)


# -- the commands -----------------------------------------------------------------------------------

def test_hazards_command_writes_weights_and_card(tmp_path, capsys, yolic_layout):
    from festival_serve.training import hazard_cells, run_trainer

    out = tmp_path / "hazard_cells" / "yolic_m2.pth.tar"
    assert run_trainer(hazard_cells, ["--out", str(out), "--train-scenes", "4", "--val-scenes", "2", "--epochs", "1",
                         "--batch-size", "4", "--workers", "1", "--no-progress"]) == 0
    load_yolic_checkpoint(out, yolic_layout)
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "--train-scenes 4" in card and "val.f1" in card
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["weights"] == str(out)


def test_signs_command_writes_weights_and_card(tmp_path, capsys):
    from festival_serve.models.sign_detector.detector import YoloCheckpoint
    from festival_serve.training import run_trainer, sign_detector

    out = tmp_path / "sign_detector" / "signs.pt"
    assert run_trainer(sign_detector, ["--out", str(out), "--dataset", str(tmp_path / "data"), "--project", str(tmp_path / "runs"),
                       "--train-scenes", "4", "--val-scenes", "2", "--epochs", "1", "--imgsz", "160",
                       "--batch", "4", "--workers", "1", "--no-progress"]) == 0
    assert YoloCheckpoint(out, 160).names == dict(enumerate(synth.SIGN_CLASSES))
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "image_size: 160" in card and "fliplr=0" in card
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs"] == 1


# -- model cards ------------------------------------------------------------------------------------

def test_model_card_records_data_seed_command_time_and_metrics(tmp_path):
    card = write_model_card(tmp_path / "hazard_cells" / "MODEL_CARD.md", title="hazard cells", model="YOLIC-M2",
                            data="2000 scenes", seed=7,
                            command="python -m festival_serve.training.hazard_cells --epochs 20", seconds=3725.0,
                            metrics={"val": {"f1": 0.91234}, "history": [{"epoch": 1, "loss": 0.1}]}, notes="from scratch")
    text = card.read_text()
    for expected in ("YOLIC-M2", "2000 scenes", "**Seed:** 7", "--epochs 20", "1 h 02 min", "| val.f1 | 0.9123 |",
                     "from scratch"):
        assert expected in text
    assert json.loads(text.split("```json\n")[1].split("\n```")[0]) == {"epoch": 1, "loss": 0.1}


def test_describer_training_writes_a_model_the_production_describer_loads(tmp_path):
    """Two steps of `train describer` (a small tokenizer corpus): an Idefics3 directory that
    `vlm.SceneDescriber` loads as it loads SmolVLM, marked as trained here, then continued with --init."""
    from festival_serve.pipeline.settings import SceneDescriberSettings
    from festival_serve.training.scene_describer import collate, train_describer, weighted_loss
    from festival_serve.models.scene_describer.describer import TRAINED_ON_KEY, SceneDescriber
    from festival_serve.pipeline.types import Findings

    out = tmp_path / "festival-describer"
    result = train_describer(out, steps=2, train_scenes=4, batch_size=2, val_scenes=2, corpus_scenes=20,
                             log_every=1, precision="fp32")
    assert result["steps"] == 2 and result["first_loss"] > 0
    assert set(result["val"]) >= {"mention_recall", "hallucinations_per_description", "lighting_accuracy"}
    describer = SceneDescriber(SceneDescriberSettings(model=str(out), device="cpu", max_new_tokens=4),
                               model_store=tmp_path)
    info = describer.model_info()
    assert info["trained_on"] and getattr(describer.model.config, TRAINED_ON_KEY)
    assert info["pull"]["hub_id"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    [text] = describer.describe([synth.generate_scene(1).image], [Findings()])
    assert isinstance(text, str)

    # The loss is on the description only: every prompt position is masked.
    from festival_serve.training.scene_describer import build_examples

    examples = build_examples(describer.processor, [3, 4], SceneDescriberSettings(), what="test")
    batch = collate(examples, describer.processor.tokenizer, np.random.default_rng(0))
    for row, example in zip(batch["labels"], examples):
        prompt = len(example.prompt_ids)
        assert (row[:prompt] == -100).all() and (row[prompt:] != -100).any()
    # Weighted 1 everywhere, the loss is transformers' own; --fact-weight lands on the sky and lane words only.
    import torch

    with torch.no_grad():
        plain = describer.model(**{k: v for k, v in batch.items() if k not in ("loss_weights", "fact_labels")}).loss
        assert float(weighted_loss(describer.model, batch)) == pytest.approx(float(plain), rel=1e-5)
    weighted = collate(examples, describer.processor.tokenizer, np.random.default_rng(0), fact_weight=8.0)
    tokenizer = describer.processor.tokenizer
    for ids, weights in zip(weighted["input_ids"], weighted["loss_weights"]):
        said = tokenizer.decode([int(t) for t, w in zip(ids, weights) if w == 8.0])
        assert re.search(r"lane|unmarked", said) and re.search(r"clear|hazy|overcast|dusk", said)
        assert not re.search(r"sign|ahead|left|right", said)

    # The image-fact probe: its labels are the scenes' sky and lanes, its loss trains the vision tower, and it is
    # not saved with the model.
    from festival_serve.training.scene_describer import ImageFactProbe, fact_classes

    assert batch["fact_labels"].tolist() == [list(fact_classes(ex.facts)) for ex in examples]
    probe = ImageFactProbe(describer.model, describer.model.config.text_config.hidden_size)
    inputs = {k: v for k, v in batch.items() if k not in ("loss_weights", "fact_labels")}
    describer.model(**inputs)
    first = probe.loss(batch["fact_labels"])
    assert float(first) == pytest.approx(np.log(4) + np.log(6), rel=1e-5)  # zero heads: chance, no gradient burst
    first.backward()
    patch = describer.model.model.vision_model.embeddings.patch_embedding.weight
    assert all(p.grad.abs().sum() > 0 for p in probe.parameters()) and patch.grad.abs().sum() == 0
    with torch.no_grad():  # once the heads have learnt something, the vision tower gets the probe's gradient
        for head in probe.heads.values():
            head.weight.normal_()
    describer.model(**inputs)
    probe.loss(batch["fact_labels"]).backward()
    assert patch.grad.abs().sum() > 0

    again = train_describer(out, steps=1, train_scenes=2, batch_size=2, val_scenes=1, init=out, precision="fp32",
                            probe_weight=0.5)
    assert again["steps"] == 1 and again["vocabulary"] == result["vocabulary"] and again["probe_weight"] == 0.5
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as saved:
        assert saved.keys() and not any("sky" in name or "lanes" in name for name in saved.keys())
