"""YOLIC-M2 hazard cells without Ray: layout data, checkpoint formats, I/O conventions, cell geometry."""

import json

import numpy as np
import pytest
import torch

from festival_serve.pipeline.settings import HazardCellsSettings
from festival_serve.models.hazard_cells.yolic import (
    INPUT_SIZE,
    HazardCellClassifier,
    build_yolic_m2,
    cells_from_logits,
    load_layout,
    load_yolic_checkpoint,
    preprocess_batch,
)
from festival_serve.training.standins.hazard_cells import build_yolic_checkpoint


def test_outdoor_layout_matches_the_paper(yolic_layout):
    assert yolic_layout.num_cells == 104
    assert yolic_layout.classes == ("Bump", "Column", "Dent", "Fence", "Creature", "Vehicle", "Wall", "Weed",
                                    "ZebraCrossing", "TrafficCone", "TrafficSign")
    assert yolic_layout.outputs_per_cell == 12  # + background, last
    boxes = yolic_layout.boxes
    assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 1


def test_head_is_linear_1280_to_cells_times_outputs(yolic_layout):
    head = build_yolic_m2(yolic_layout).classifier[-1]
    assert isinstance(head, torch.nn.Linear)
    assert (head.in_features, head.out_features) == (1280, 104 * 12)


def test_layout_from_file_with_polygons(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"name": "two", "classes": ["Cone"], "cells": [
        {"box": [0, 0, 0.5, 0.5]}, {"polygon": [[0.5, 0.5], [1, 0.5], [0.75, 1]]}]}))
    layout = load_layout(str(path))
    np.testing.assert_allclose(layout.boxes[1], [0.5, 0.5, 1, 1])


def test_unknown_layout_names_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match="outdoor"):
        load_layout("indoor")


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", ""), ("model", ""), (None, "module."),
                                         ("state_dict", "module.")])
def test_checkpoint_formats_load_identically(tmp_path, yolic_layout, wrap, prefix):
    reference = build_yolic_checkpoint(tmp_path / "ref.pth.tar", yolic_layout, seed=3)
    variant = build_yolic_checkpoint(tmp_path / "v.pth.tar", yolic_layout, seed=3, wrap=wrap, prefix=prefix)
    a, b = load_yolic_checkpoint(reference, yolic_layout), load_yolic_checkpoint(variant, yolic_layout)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_foreign_checkpoint_names_missing_and_unexpected_keys(tmp_path, yolic_layout):
    path = tmp_path / "resnet.pth.tar"
    torch.save({"conv1.weight": torch.zeros(1), "features.0.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"missing keys .*classifier\.1\.weight.*unexpected keys conv1\.weight"):
        load_yolic_checkpoint(path, yolic_layout)


def test_checkpoint_for_another_layout_is_refused(tmp_path, yolic_layout, monkeypatch):
    small = load_layout("outdoor")
    object.__setattr__(small, "boxes", small.boxes[:10])
    path = build_yolic_checkpoint(tmp_path / "small.pth.tar", small)
    with pytest.raises(ValueError, match="104 cells"):
        load_yolic_checkpoint(path, yolic_layout)


def test_missing_checkpoint_is_file_not_found(tmp_path, yolic_layout):
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load_yolic_checkpoint(tmp_path / "nope.pth.tar", yolic_layout)


def test_preprocess_is_rgb_224_unit_range_without_normalisation():
    image = np.zeros((480, 848, 3), np.uint8)
    image[..., 0] = 255  # pure red
    image.setflags(write=False)  # as arrays arrive from Ray's object store
    batch = preprocess_batch([image, image])
    assert batch.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[:, 0], 1.0)
    np.testing.assert_allclose(batch[:, 1:], 0.0)


def test_cells_from_logits_flags_only_hazards_above_threshold(yolic_layout):
    logits = np.full((1, 104 * 12), -10.0, np.float32)
    per_cell = logits.reshape(1, 104, 12)
    per_cell[0, 5, 9] = 3.0   # TrafficCone in cell 5
    per_cell[0, 5, 0] = 1.0   # Bump in cell 5, lower score
    per_cell[0, 7, 11] = 10.0  # background only: not a hazard
    (cells,) = cells_from_logits(logits, yolic_layout, [(848, 480)], threshold=0.5)
    assert [c.cell for c in cells] == [5]
    assert [lab.label for lab in cells[0].labels] == ["TrafficCone", "Bump"]
    expected = yolic_layout.boxes[5] * [848, 480, 848, 480]
    np.testing.assert_allclose(cells[0].box, expected, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_classifier_backends_agree(tmp_path, yolic_layout, backend):
    weights = build_yolic_checkpoint(tmp_path / "yolic.pth.tar", yolic_layout, head_bias=0.0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (480, 848, 3), dtype=np.uint8), rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)]
    settings = HazardCellsSettings(weights=str(weights), backend=backend, device="cpu")
    model = HazardCellClassifier(settings, model_store=tmp_path)
    reference = load_yolic_checkpoint(weights, yolic_layout)
    with torch.no_grad():
        expected = reference(torch.from_numpy(preprocess_batch(images))).numpy()
    (got,) = model.backend.forward(preprocess_batch(images))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    batched = model.classify(images)
    assert [c.cell for c in batched[1]] == [c.cell for c in model.classify(images[1:])[0]]
    assert model.model_info()["backend"] == backend


def test_onnx_export_is_cached_by_checkpoint_hash(tmp_path, yolic_layout):
    weights = build_yolic_checkpoint(tmp_path / "yolic.pth.tar", yolic_layout)
    settings = HazardCellsSettings(weights="yolic.pth.tar", backend="onnxruntime", device="cpu")
    HazardCellClassifier(settings, model_store=tmp_path)
    (onnx_file,) = tmp_path.glob("yolic.*.onnx")
    mtime = onnx_file.stat().st_mtime_ns
    HazardCellClassifier(settings, model_store=tmp_path)
    assert onnx_file.stat().st_mtime_ns == mtime and len(list(tmp_path.glob("*.onnx"))) == 1
    build_yolic_checkpoint(weights, yolic_layout, seed=1)  # new weights → a new export
    HazardCellClassifier(settings, model_store=tmp_path)
    assert len(list(tmp_path.glob("yolic.*.onnx"))) == 2
