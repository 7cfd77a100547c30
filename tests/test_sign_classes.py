"""The sign classifier: crops cut from the full frame name each detected sign, or drop it as background.

Stand-in classifiers (``festival_serve/training/standins/sign_detector.py``) always answer one known class, so the tests know
what the detector must return while every crop still goes through the real loader, exporter and backends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from festival_serve.world import synth
from festival_serve.pipeline.settings import SignDetectorSettings
from festival_serve.models.sign_detector.boxes import NmsOptions
from festival_serve.models.sign_detector.classifier import (BACKGROUND, ClassifierCheckpoint, SignClassifier, preprocess_crops,
                                                            square_crop)
from festival_serve.models.sign_detector.detector import PAD_VALUE, SignDetector, letterbox_batch, postprocess
from festival_serve.training.standins.sign_detector import build_yolo_checkpoint, build_yolo_classifier, smooth_random_image

NAMES = {0: "stop", 1: "give_way", 2: "speed_limit_50"}
SIZE = 320


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    build_yolo_checkpoint(store / "sign_detector" / "signs.pt", NAMES, class_bias=-2.0)
    build_yolo_classifier(store / "sign_classifier" / "give_way.pt", NAMES, favour="give_way")
    build_yolo_classifier(store / "sign_classifier" / "background.pt", [*NAMES.values(), BACKGROUND], favour=BACKGROUND)
    build_yolo_classifier(store / "sign_classifier" / "alien.pt", ["stop", "yield_to_camels"], favour="stop")
    return store


def detector(store: Path, classifier: str | None, backend: str = "onnxruntime") -> SignDetector:
    # max_detections high enough that no box of the random detector is cut, so the two NMS modes compare.
    settings = SignDetectorSettings(weights="sign_detector/signs.pt", classifier=classifier, device="cpu",
                                    image_size=SIZE, backend=backend, threads=2, max_detections=1000)
    return SignDetector(settings, model_store=store)


def frames() -> list[np.ndarray]:
    return [smooth_random_image(h, w, seed=100 + i) for i, (h, w) in enumerate([(480, 848), (600, 600)])]


# --- crops ------------------------------------------------------------------------------------------

def test_square_crop_is_the_box_grown_by_context_around_its_centre():
    image = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    crop = square_crop(image, (50, 40, 90, 60), context=1.5)  # 40 x 20 box → 60 x 60 square centred at (70, 50)
    assert crop.shape == (60, 60, 3)
    np.testing.assert_array_equal(crop, image[20:80, 40:100])


def test_square_crop_pads_with_grey_where_it_leaves_the_frame():
    image = np.zeros((50, 50, 3), np.uint8)
    crop = square_crop(image, (-10, -10, 10, 10), context=1.0)
    assert crop.shape == (20, 20, 3)
    assert (crop[:10, :10] == PAD_VALUE).all() and (crop[10:, 10:] == 0).all()


def test_crops_are_preprocessed_as_ultralytics_validates_classifiers():
    from ultralytics.data.augment import classify_transforms

    crop = smooth_random_image(37, 37, seed=1)
    batch = preprocess_crops([crop, crop], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], classify_transforms(64)(Image.fromarray(crop)).numpy())  # no torch here
    assert 0 <= batch.min() and batch.max() <= 1


def test_crops_that_are_not_square_are_refused():
    with pytest.raises(ValueError, match=r"crop 1: expected a square"):
        preprocess_crops([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], 64)


# --- the checkpoint and the detector ---------------------------------------------------------------

def test_checkpoint_names_its_classes_and_its_onnx_export_matches_torch(store):
    import torch

    checkpoint = ClassifierCheckpoint(store / "sign_classifier" / "give_way.pt", 64)
    assert checkpoint.names == NAMES
    batch = preprocess_crops([smooth_random_image(50, 50, seed=s) for s in range(3)], 64)
    with torch.no_grad():
        expected = checkpoint.torch_module()(torch.from_numpy(batch)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(checkpoint.onnx_file()), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: batch})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # A second load finds the export cached and reads the names from it.
    assert ClassifierCheckpoint(store / "sign_classifier" / "give_way.pt", 64).names == NAMES


def test_a_detection_checkpoint_is_not_a_classifier(store):
    with pytest.raises(ValueError, match="classification checkpoint"):
        ClassifierCheckpoint(store / "sign_detector" / "signs.pt", 64)


def test_missing_classifier_weights_name_the_path(store):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        detector(store, "sign_classifier/nowhere.pt")


def test_classes_the_detector_does_not_know_are_refused(store):
    with pytest.raises(ValueError, match="yield_to_camels"):
        detector(store, "sign_classifier/alien.pt")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_the_classifier_renames_every_box_and_keeps_box_and_score(store, backend):
    plain = detector(store, None)
    batch, metas = letterbox_batch(frames(), SIZE)
    settings = plain.settings
    # One box per sign whatever class the detector guessed: class-agnostic NMS over its raw output.
    options = NmsOptions(confidence=settings.confidence, iou=settings.iou, max_detections=settings.max_detections,
                         agnostic=True)
    expected = postprocess(plain.backend.forward(batch)[0], metas, plain.names, options)
    named = detector(store, "sign_classifier/give_way.pt", backend).detect(frames())
    assert sum(map(len, named)) > 0
    for want, got in zip(expected, named):
        assert [d.label for d in got] == ["give_way"] * len(want) and {d.class_id for d in got} <= {1}
        np.testing.assert_allclose([d.box for d in got], [d.box for d in want], atol=0.05)
        np.testing.assert_allclose([d.score for d in got], [d.score for d in want], atol=1e-4)


def test_the_host_path_never_imports_torch_or_ultralytics(store):
    """An ONNX Runtime replica's whole batch, letterbox to named crops, without torch (~500 MB of its memory)."""
    assert sum(map(len, detector(store, "sign_classifier/give_way.pt").detect(frames()))) > 0  # exports both ONNX
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_sign_classes import detector, frames\n"
        "found = detector(Path(sys.argv[1]), 'sign_classifier/give_way.pt').detect(frames())\n"
        "assert {d.label for signs in found for d in signs} == {'give_way'}\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'ultralytics') if m in sys.modules))\n"
    )
    # A replica finds the cached ONNX exports and reads the class names from them, as this one does.
    done = subprocess.run([sys.executable, "-c", probe, str(store)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_boxes_the_classifier_calls_background_are_dropped(store):
    assert detector(store, None).detect(frames()) != [[], []]
    assert detector(store, "sign_classifier/background.pt").detect(frames()) == [[], []]


def test_describe_names_the_classifier(store):
    described = detector(store, "sign_classifier/give_way.pt").model_info()
    assert described["classifier"].endswith("give_way.pt") and described["classifier_precision"] == "fp32"


# --- training ---------------------------------------------------------------------------------------

def test_crop_dataset_holds_every_sign_and_background_in_ultralytics_layout(tmp_path):
    from festival_serve.training.sign_classifier import write_crop_dataset
    from festival_serve.training.sign_detector import write_yolo_dataset

    data = write_yolo_dataset(tmp_path / "scenes", train=3, val=2, progress=False, workers=1)
    counts = write_crop_dataset(data.parent, tmp_path / "crops", copies=2, progress=False)
    labelled = {split: sum(len(p.read_text().splitlines()) for p in (data.parent / "labels" / split).glob("*.txt"))
                for split in ("train", "val")}
    signs = {split: sum(v for k, v in counts.items() if k.startswith(split) and not k.endswith(BACKGROUND))
             for split in ("train", "val")}
    assert signs == {"train": 2 * labelled["train"], "val": labelled["val"]}
    folders = {p.name for p in (tmp_path / "crops" / "train").iterdir()}
    assert folders == {*synth.SIGN_CLASSES, BACKGROUND}
    for png in (tmp_path / "crops").rglob("*.png"):
        width, height = Image.open(png).size
        assert width == height


def test_one_epoch_of_the_classifier_command_writes_weights_the_detector_loads(tmp_path, capsys):
    import json

    from festival_serve.training import run_trainer, sign_classifier

    out = tmp_path / "sign_classifier" / "sign_classes.pt"
    assert run_trainer(sign_classifier, ["--out", str(out), "--scenes", str(tmp_path / "scenes"), "--crops", str(tmp_path / "crops"),
                              "--train-scenes", "4", "--val-scenes", "2", "--epochs", "1", "--imgsz", "32",
                              "--batch", "8", "--workers", "1", "--negatives-from", str(tmp_path / "none.pt"),
                              "--no-progress"]) == 0
    checkpoint = ClassifierCheckpoint(out, 32)
    assert set(checkpoint.names.values()) == {*synth.SIGN_CLASSES, BACKGROUND}
    classifier = SignClassifier(out, image_size=32, backend="onnxruntime", device="cpu", fp16=False, threads=1,
                                expected_names=dict(enumerate(synth.SIGN_CLASSES)))
    [(_, name, probability)] = classifier.classify([square_crop(smooth_random_image(100, 100, seed=0), (10, 10, 40, 40),
                                                                1.15)])
    assert name in checkpoint.names.values() and 0 <= probability <= 1
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "background" in card and "--epochs 1" in card
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs"] == 1
