"""The device path (``festival_serve.models.sign_detector.device_ops``) answers as the host path does.

The tensor code that runs on the GPU in production runs here on the CPU device (``preprocess: device``), beside
the host path of ``detector`` and ``classifier`` on the same inputs: the shipped detector and classifier
(``models/``) on generated road scenes. Geometry is exact; resized pixels differ from cv2's and PIL's
fixed-point kernels by at most one grey level (1/255), so boxes agree to IoU >= 0.9 and labels exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from festival_serve.models.sign_detector import device_ops
from festival_serve.world import synth
from festival_serve.pipeline.settings import SignDetectorSettings
from festival_serve.models.sign_detector.classifier import preprocess_crops, square_crop
from festival_serve.models.sign_detector.boxes import NmsOptions
from festival_serve.models.sign_detector.detector import SignDetector, letterbox_batch, postprocess, preprocess_path

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "models"  # the shipped signs.pt and sign_classes.pt, with their cached ONNX exports
SIZE = 320  # the shipped detector's side (serve_config.yaml)
ONE_LEVEL = 1 / 255 + 1e-6  # one grey level of a [0, 1] input, plus float32 rounding
#: (width, height): landscape, 720p (an exact 4x downscale to 320), portrait, square, one under the letterbox.
SHAPES = [(848, 480), (1280, 720), (480, 848), (600, 600), (200, 120)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def settings(**overrides) -> SignDetectorSettings:
    # confidence as serve_config.yaml ships it, so a scene has several boxes to compare
    return SignDetectorSettings(**{"device": "cpu", "backend": "torch", "image_size": SIZE, "confidence": 0.15,
                                   "threads": 2, **overrides})


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    images = [synth.generate_scene(seed, size=size).image for seed, size in zip(synth.scene_seeds("test", 5), SHAPES)]
    for image in images:
        image.setflags(write=False)  # as frames arrive from Ray's object store
    return images


@pytest.fixture(scope="module")
def on_host() -> SignDetector:
    return SignDetector(settings(preprocess="host"), model_store=STORE)


@pytest.fixture(scope="module")
def on_device() -> SignDetector:
    return SignDetector(settings(preprocess="device"), model_store=STORE)


@pytest.fixture(scope="module")
def predictions(on_host, images):
    """The shipped detector's raw output on the scenes, through the host path: ``(batch, metas, raw)``."""
    batch, metas = letterbox_batch(images, SIZE)
    return batch, metas, on_host.backend.forward(batch)[0]


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# --- letterbox ----------------------------------------------------------------------------------------


def test_letterbox_on_device_has_the_same_geometry_and_pixels_within_one_grey_level(images):
    expected, expected_metas = letterbox_batch(images, SIZE)

    batch, metas = device_ops.letterbox_on_device(images, SIZE, "cpu")

    assert metas == expected_metas  # boxes map back through identical gains and padding
    assert batch.shape == expected.shape and batch.dtype == torch.float32
    got = batch.numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=ONE_LEVEL)
    assert (got != expected).mean() < 0.1  # cv2's fixed-point SIMD kernel rounds ~1 value in 10 one level lower
    # A whole-ratio downscale (1280x720 → 320x180) and the padding are exact.
    np.testing.assert_array_equal(got[1], expected[1])


def test_letterbox_on_device_rejects_what_is_not_rgb_uint8():
    with pytest.raises(ValueError, match="image 1: expected"):
        device_ops.letterbox_on_device([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], SIZE, "cpu")


# --- NMS and boxes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("agnostic", [False, True])
def test_postprocess_on_device_equals_the_host_postprocess_on_the_same_predictions(on_host, predictions, agnostic):
    _, metas, raw = predictions
    options = NmsOptions(confidence=0.15, iou=0.45, max_detections=50, agnostic=agnostic)

    got = device_ops.postprocess_on_device(torch.from_numpy(raw), metas, on_host.names, options)

    expected = postprocess(raw, metas, on_host.names, options)
    assert sum(map(len, expected)) > 3 and got == expected


def test_postprocess_on_device_reads_six_anchors_as_anchors():
    # (1, 4 + 2, 6): a last axis of 6 that ultralytics' NMS would take for an end-to-end output.
    raw = np.zeros((1, 6, 6), np.float32)
    raw[0, :, 0] = (100, 100, 40, 40, 0.9, 0.0)
    _, metas = letterbox_batch([np.zeros((SIZE, SIZE, 3), np.uint8)], SIZE)
    names = {0: "stop", 1: "give_way"}

    options = NmsOptions(confidence=0.25, iou=0.45, max_detections=5)

    got = device_ops.postprocess_on_device(torch.from_numpy(raw), metas, names, options)

    assert got == postprocess(raw, metas, names, options)
    assert [(d.label, d.box) for d in got[0]] == [("stop", (80.0, 80.0, 120.0, 120.0))]


def test_postprocess_on_device_rejects_predictions_for_another_number_of_classes():
    _, metas = letterbox_batch([np.zeros((8, 8, 3), np.uint8)], SIZE)
    with pytest.raises(ValueError, match="3 classes"):
        device_ops.postprocess_on_device(torch.zeros((1, 4 + 5, 10)), metas, {0: "a", 1: "b", 2: "c"},
                                         NmsOptions(confidence=0.25, iou=0.45, max_detections=5))


# --- classifier crops -----------------------------------------------------------------------------------


def test_crops_on_device_match_the_host_crops_within_one_grey_level(images):
    image = images[0]  # 848 x 480
    boxes = [
        (300.0, 200.0, 330.0, 224.0),  # small: upscaled to 64
        (100.4, 50.6, 300.2, 260.9),  # large: antialiased downscale
        (400.0, 100.0, 455.7, 155.7),  # 64 px square after context: no resize
        (-20.0, -10.0, 25.0, 30.0),  # leaves the frame at the top-left: grey there
        (820.0, 450.0, 900.0, 520.0),  # leaves it at the bottom-right
        (900.0, 600.0, 950.0, 640.0),  # wholly outside: all grey
    ]
    context, size = 1.15, 64
    host_crops = [square_crop(image, box, context) for box in boxes]
    expected = preprocess_crops(host_crops, size)

    crops = device_ops.square_crops(device_ops.upload_frames([image], "cpu"), [boxes], context)
    got = device_ops.preprocess_crops_on_device(crops, size)

    for host, device in zip(host_crops, crops):  # the same squares from the same geometry (boxes.square_window)
        np.testing.assert_array_equal(device.permute(1, 2, 0).numpy(), host)

    assert got.shape == expected.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ONE_LEVEL)
    np.testing.assert_array_equal(got.numpy()[[2, 5]], expected[[2, 5]])  # no resize: exact


def test_the_classifier_names_true_signs_the_same_from_device_crops(on_device, images):
    classifier = on_device.classifier
    boxes = [[sign.box for sign in synth.generate_scene(seed, size=size).signs]
             for seed, size in zip(synth.scene_seeds("test", 5), SHAPES)]
    assert sum(map(len, boxes)) >= 5

    context = on_device.settings.classifier_context

    got = classifier.classify_on_device(device_ops.square_crops(device_ops.upload_frames(images, "cpu"), boxes, context))

    expected = classifier.classify([square_crop(image, box, context) for image, found in zip(images, boxes)
                                    for box in found])
    assert [(i, name) for i, name, _ in got] == [(i, name) for i, name, _ in expected]
    np.testing.assert_allclose([p for *_, p in got], [p for *_, p in expected], atol=0.02)


# --- the detector ---------------------------------------------------------------------------------------


def test_forward_tensor_returns_what_forward_returns_and_keeps_it_on_the_device(on_host, predictions):
    batch, _, raw = predictions

    (got,) = on_host.backend.forward_tensor(torch.from_numpy(np.ascontiguousarray(batch)))  # NCHW, as forward's

    assert isinstance(got, torch.Tensor) and got.device.type == "cpu" and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), raw)


def test_the_device_path_finds_the_same_signs_as_the_host_path(on_host, on_device, images):
    expected = on_host.detect(images)

    got = on_device.detect(images)

    assert sum(map(len, expected)) >= 5  # real signs, named by the classifier: the comparison is not vacuous
    for want, found in zip(expected, got):
        assert [d.label for d in found] == [d.label for d in want]
        assert all(iou(a.box, b.box) >= 0.9 for a, b in zip(found, want))
        np.testing.assert_allclose([d.score for d in found], [d.score for d in want], atol=0.02)


@needs_cuda
def test_on_cuda_auto_takes_the_device_path_and_finds_the_same_signs(on_host, images):
    detector = SignDetector(settings(device="cuda", fp16=False, threads=None), model_store=STORE)  # preprocess: auto
    assert detector.preprocess == "device"

    got = detector.detect(images)

    for want, found in zip(on_host.detect(images), got):
        assert [d.label for d in found] == [d.label for d in want]
        assert all(iou(a.box, b.box) >= 0.9 for a, b in zip(found, want))


def test_describe_says_where_pre_and_post_processing_run(on_host, on_device):
    assert on_host.model_info()["preprocess"] == "host" and on_device.model_info()["preprocess"] == "device"


def test_auto_keeps_the_host_path_on_the_cpu():
    detector = SignDetector(settings(classifier=None), model_store=STORE)  # preprocess: auto
    assert detector.preprocess == "host"


def test_auto_takes_the_device_path_on_cuda_with_a_backend_that_takes_tensors():
    class Runs:
        def __init__(self, name: str, takes: bool, device: str) -> None:
            self.name, self.takes_device_tensors, self._device = name, takes, device

        def runtime_device(self) -> str:
            return self._device

    assert preprocess_path("auto", [Runs("tensorrt", True, "cuda:0"), Runs("torch", True, "cuda:0")]) == "device"
    assert preprocess_path("auto", [Runs("onnxruntime", False, "cuda:0")]) == "host"
    assert preprocess_path("auto", [Runs("torch", True, "cpu")]) == "host"
    assert preprocess_path("host", [Runs("torch", True, "cuda:0")]) == "host"


def test_device_preprocessing_on_onnxruntime_is_refused_at_load():
    with pytest.raises(ValueError, match="preprocess: device needs a backend that takes device tensors "
                                         r"\(tensorrt, torch\), but onnxruntime takes host arrays only"):
        SignDetector(settings(backend="onnxruntime", preprocess="device", classifier=None), model_store=STORE)
