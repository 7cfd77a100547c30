"""The sign detector's contract: ultralytics checkpoints in, detections in original pixels out.

A small random YOLOv8n checkpoint (``festival_serve/training/standins/sign_detector.py``) goes through the same loader, exporter
and backends that production uses; letterbox geometry and NMS are checked on hand-made inputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from festival_serve.pipeline.settings import SignDetectorSettings
from festival_serve.models.sign_detector.boxes import LetterboxMeta, NmsOptions
from festival_serve.models.sign_detector.detector import PAD_VALUE, SignDetector, YoloCheckpoint, letterbox_batch, postprocess
from festival_serve.pipeline.types import SignDetection
from festival_serve.training.standins.sign_detector import build_yolo_checkpoint, smooth_random_image

NAMES = {0: "stop", 1: "give_way", 2: "speed_limit_50"}
SIZE = 320  # small letterbox side keeps export and forward passes quick on two cores
ANCHORS = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2  # YOLOv8 strides 8, 16, 32


def read_only(image: np.ndarray) -> np.ndarray:
    image.setflags(write=False)  # as images arrive from Ray's object store
    return image


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def weights(store) -> Path:
    # class_bias -2: some anchors score above 0.25, so detect() has boxes to compare.
    return build_yolo_checkpoint(store / "sign_detector" / "signs.pt", NAMES, class_bias=-2.0)


def settings(**overrides) -> SignDetectorSettings:
    return SignDetectorSettings(
        **{"weights": "sign_detector/signs.pt", "classifier": None, "device": "cpu", "image_size": SIZE, **overrides}
    )


@pytest.fixture(scope="module")
def onnx_detector(store, weights) -> SignDetector:
    return SignDetector(settings(backend="onnxruntime", threads=2), model_store=store)


@pytest.fixture(scope="module")
def torch_detector(store, weights) -> SignDetector:
    return SignDetector(settings(backend="torch"), model_store=store)


def frames() -> list[np.ndarray]:
    """Landscape, portrait and square frames (read-only), smooth like the builder's calibration images."""
    shapes = [(480, 848), (848, 480), (600, 600)]
    return [read_only(smooth_random_image(h, w, seed=100 + i)) for i, (h, w) in enumerate(shapes)]


# --- checkpoint -------------------------------------------------------------------------------------


def test_checkpoint_loads_through_ultralytics_with_its_own_class_names(weights):
    import torch
    from ultralytics import YOLO

    checkpoint = YoloCheckpoint(weights, SIZE)

    assert checkpoint.names == NAMES
    assert YOLO(weights).names == NAMES  # the builder writes what ultralytics itself loads
    assert checkpoint.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    module = checkpoint.torch_module()
    assert not module.training
    assert {(p.dtype, p.device.type) for p in module.parameters()} == {(torch.float32, "cpu")}
    with torch.inference_mode():
        out = module(torch.zeros(2, 3, SIZE, SIZE))
    assert tuple(out.shape) == (2, 4 + len(NAMES), ANCHORS)  # raw predictions, as the ONNX export gives


def test_builder_takes_class_names_as_a_list(tmp_path):
    path = build_yolo_checkpoint(tmp_path / "two.pt", ["stop", "give_way"], seed=1)
    assert YoloCheckpoint(path, SIZE).names == {0: "stop", 1: "give_way"}


def test_missing_weights_are_an_error_naming_the_path(store):
    absent = store / "nowhere" / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        YoloCheckpoint(absent, SIZE)
    with pytest.raises(FileNotFoundError, match=str(absent)):
        SignDetector(settings(weights="nowhere/absent.pt"), model_store=store)


def test_gpu_only_refuses_to_run_on_the_cpu(store, weights):
    from festival_serve.runtime.devices import GpuOnlyViolation

    with pytest.raises(GpuOnlyViolation):
        SignDetector(settings(device="cpu"), model_store=store, gpu_only=True)


def test_ultralytics_is_kept_offline_and_never_installs_packages():
    import ultralytics.utils
    import ultralytics.utils.checks

    assert ultralytics.utils.ONLINE is False
    assert ultralytics.utils.checks.AUTOINSTALL is False


# --- letterbox geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(480, 848), (848, 480), (100, 200), (640, 640)])
def test_letterbox_places_the_image_centred_and_maps_boxes_back_exactly(height, width):
    box = (width // 4, height // 3, width // 2, 2 * height // 3)  # x1, y1, x2, y2 in original pixels
    image = np.zeros((height, width, 3), np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255

    batch, (meta,) = letterbox_batch([read_only(image)], SIZE)

    assert batch.shape == (1, 3, SIZE, SIZE) and batch.dtype == np.float32
    gain = SIZE / max(height, width)
    new_h, new_w = round(height * gain), round(width * gain)
    assert meta == LetterboxMeta(
        orig_shape=(height, width),
        input_shape=(SIZE, SIZE),
        resized_shape=(new_h, new_w),
        pad=((SIZE - new_w) // 2, (SIZE - new_h) // 2),
    )
    assert meta.gain == (new_h / height, new_w / width)
    pad_x, pad_y = meta.pad
    if pad_y:  # grey bars, as ultralytics pads
        assert np.all(batch[0, :, : pad_y - 1] == np.float32(PAD_VALUE / 255))
    if pad_x:
        assert np.all(batch[0, :, :, : pad_x - 1] == np.float32(PAD_VALUE / 255))

    # The drawn box lands where the forward mapping says, to within a pixel of interpolation.
    ys, xs = np.nonzero(batch[0, 0] > 0.5)
    found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    gain_y, gain_x = meta.gain
    mapped = (box[0] * gain_x + pad_x, box[1] * gain_y + pad_y, box[2] * gain_x + pad_x, box[3] * gain_y + pad_y)
    np.testing.assert_allclose(found, mapped, atol=1.0)

    # A prediction of exactly that letterboxed box comes back as the original box.
    raw = np.zeros((1, 4 + len(NAMES), 1), np.float32)
    x1, y1, x2, y2 = mapped
    raw[0, :4, 0] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)  # cx, cy, w, h
    raw[0, 4 + 1, 0] = 0.9
    (dets,) = postprocess(raw, [meta], NAMES, NmsOptions(confidence=0.25, iou=0.45, max_detections=10))
    assert len(dets) == 1
    np.testing.assert_allclose(dets[0].box, box, atol=1e-3)


def test_letterbox_agrees_with_ultralytics_predictor_geometry():
    import torch
    from ultralytics.utils.ops import scale_boxes

    _, metas = letterbox_batch([np.zeros((480, 848, 3), np.uint8), np.zeros((1080, 1920, 3), np.uint8)], SIZE)
    for meta in metas:
        letterboxed = torch.tensor([[10.0, 80.0, 300.0, 200.0]])
        ours = scale_boxes(meta.input_shape, letterboxed.clone(), meta.orig_shape, ratio_pad=meta.ratio_pad)
        theirs = scale_boxes(meta.input_shape, letterboxed.clone(), meta.orig_shape)  # as the predictor calls it
        torch.testing.assert_close(ours, theirs)


#: (height, width): down- and upscaled, odd paddings, a whole 4x ratio, one line, one pixel over the square.
ULTRALYTICS_SHAPES = [(480, 848), (848, 480), (100, 200), (333, 517), (720, 1280), (1, 300), (321, 320), (SIZE, SIZE)]


def test_letterbox_equals_ultralytics_letterbox_pixel_for_pixel():
    from ultralytics.data.augment import LetterBox

    images = [smooth_random_image(h, w, seed=i) for i, (h, w) in enumerate(ULTRALYTICS_SHAPES)]
    theirs = LetterBox(new_shape=(SIZE, SIZE), auto=False, scaleup=True, center=True, padding_value=PAD_VALUE)

    batch, metas = letterbox_batch(images, SIZE)

    for image, ours, meta in zip(images, batch, metas):
        params = theirs.get_params({"img": image})
        assert (meta.resized_shape, meta.pad) == (params["new_unpad"][::-1], (params["left"], params["top"]))
        expected = theirs(image=image).transpose(2, 0, 1).astype(np.float32) / 255.0  # as the predictor feeds it
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("scores", ["continuous", "tied", "fp16"])
def test_postprocess_equals_ultralytics_nms_and_scale_boxes(agnostic, scores):
    """The host path's numpy NMS against ultralytics' (over torchvision's kernel) on crowded random predictions:
    the same boxes, scores and classes to the last bit, ties between equal scores broken the same way."""
    import torch
    import torchvision  # noqa: F401  (ultralytics' NMS takes torchvision's kernel once it is imported, as in training)
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    rng = np.random.default_rng(7)
    _, metas = letterbox_batch([np.zeros((h, w, 3), np.uint8) for h, w in ULTRALYTICS_SHAPES], SIZE)
    raw = np.empty((len(metas), 4 + len(NAMES), 400), np.float32)
    raw[:, :2] = rng.uniform(-20, SIZE + 20, (len(metas), 2, 400))  # centres, some outside the square: clipped
    raw[:, 2:4] = rng.uniform(0, 120, (len(metas), 2, 400))  # 400 boxes up to 120 px: many overlaps
    raw[:, 4:] = rng.uniform(0, 1, (len(metas), len(NAMES), 400))
    if scores == "tied":
        raw[:, 4:] = np.round(raw[:, 4:] * 8) / 8
    elif scores == "fp16":  # an fp16 network's outputs
        raw = raw.astype(np.float16)
    options = NmsOptions(confidence=0.25, iou=0.45, max_detections=50, agnostic=agnostic)

    ours = postprocess(raw, metas, NAMES, options)

    kept = non_max_suppression(torch.from_numpy(raw.astype(np.float32)), conf_thres=0.25, iou_thres=0.45,
                               max_det=50, nc=len(NAMES), agnostic=agnostic, max_time_img=float("inf"))
    for found, rows, meta in zip(ours, kept, metas):
        boxes = scale_boxes(meta.input_shape, rows[:, :4].clone(), meta.orig_shape, ratio_pad=meta.ratio_pad)
        theirs = [(tuple(box), int(k), score) for box, (score, k) in zip(boxes.tolist(), rows[:, 4:6].tolist())]
        assert [(d.box, d.class_id, d.score) for d in found] == theirs
    assert sum(map(len, ours)) > 2 * len(metas)  # the comparison is not vacuous


def test_letterbox_rejects_what_is_not_rgb_uint8():
    with pytest.raises(ValueError, match="image 1"):
        letterbox_batch([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)], SIZE)


# --- postprocess -------------------------------------------------------------------------------------


def test_postprocess_keeps_the_best_of_overlapping_boxes_in_original_pixels():
    _, (meta,) = letterbox_batch([np.zeros((480, 848, 3), np.uint8)], SIZE)
    gain_y, gain_x = meta.gain
    pad_x, pad_y = meta.pad  # 848x480 → 320x181, 70 px bars top and bottom
    # Columns are anchors: cx, cy, w, h (letterboxed pixels), then one score per class.
    anchors = [
        (100, 150, 60, 60, 0.90, 0.00, 0.00),  # kept
        (104, 152, 60, 60, 0.80, 0.00, 0.00),  # same class, IoU ~0.85 with the first: suppressed
        (100, 150, 60, 60, 0.00, 0.70, 0.00),  # same place, another class: NMS is per class, kept
        (250, 150, 40, 40, 0.00, 0.00, 0.20),  # below the confidence threshold: dropped
        (250, 80, 40, 40, 0.00, 0.00, 0.60),  # reaches into the top bar: clipped to the image
        (0, 0, 0, 0, 0.00, 0.00, 0.00),
    ]
    raw = np.array(anchors, np.float32).T[None]
    raw.setflags(write=False)

    (dets,) = postprocess(raw, [meta], NAMES, NmsOptions(confidence=0.25, iou=0.45, max_detections=10))

    def original(cx, cy, w, h):
        return ((cx - w / 2 - pad_x) / gain_x, (cy - h / 2 - pad_y) / gain_y,
                (cx + w / 2 - pad_x) / gain_x, (cy + h / 2 - pad_y) / gain_y)

    assert [(d.label, d.class_id) for d in dets] == [("stop", 0), ("give_way", 1), ("speed_limit_50", 2)]
    np.testing.assert_allclose([d.score for d in dets], [0.9, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(dets[0].box, original(100, 150, 60, 60), rtol=1e-5)
    np.testing.assert_allclose(dets[1].box, original(100, 150, 60, 60), rtol=1e-5)
    x1, _, x2, y2 = original(250, 80, 40, 40)
    np.testing.assert_allclose(dets[2].box, (x1, 0.0, x2, y2), rtol=1e-5)
    assert all(isinstance(d, SignDetection) and isinstance(d.box[0], float) for d in dets)

    (best,) = postprocess(raw, [meta], NAMES, NmsOptions(confidence=0.25, iou=0.45, max_detections=1))
    assert [d.score for d in best] == [dets[0].score]


def test_postprocess_rejects_predictions_for_another_number_of_classes():
    _, metas = letterbox_batch([np.zeros((8, 8, 3), np.uint8)], SIZE)
    with pytest.raises(ValueError, match="3 classes"):
        postprocess(np.zeros((1, 4 + 5, 10), np.float32), metas, NAMES, NmsOptions(confidence=0.25, iou=0.45, max_detections=5))


# --- backends and the detector ------------------------------------------------------------------------


def test_onnx_export_is_cached_by_content_and_reused(store, weights, onnx_detector, monkeypatch):
    import onnx
    from ultralytics.engine.model import Model

    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    cached = weights.with_name(f"signs.{sha[:12]}.{SIZE}.onnx")
    assert cached.is_file()
    assert sorted(p.name for p in weights.parent.iterdir()) == sorted([weights.name, cached.name])  # no leftovers
    dims = onnx.load(str(cached)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["batch", 3, SIZE, SIZE]  # TensorRT profiles need this

    mtime = cached.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cached ONNX file exists")

    monkeypatch.setattr(Model, "export", no_export)
    again = SignDetector(settings(backend="onnxruntime", threads=2), model_store=store)
    assert again.checkpoint.onnx_file() == cached
    assert cached.stat().st_mtime_ns == mtime


def test_onnx_runtime_matches_the_torch_network(onnx_detector, torch_detector):
    batch, _ = letterbox_batch(frames(), SIZE)

    (from_onnx,) = onnx_detector.backend.forward(batch)
    (from_torch,) = torch_detector.backend.forward(batch)

    assert from_onnx.shape == from_torch.shape == (3, 4 + len(NAMES), ANCHORS)
    np.testing.assert_allclose(from_onnx[:, :4], from_torch[:, :4], rtol=1e-4, atol=1e-2)  # letterboxed pixels
    np.testing.assert_allclose(from_onnx[:, 4:], from_torch[:, 4:], atol=1e-4)  # class scores


def test_a_batch_run_in_slices_at_once_equals_one_run(onnx_detector, store):
    """batch_slices (cores by need): a batch of 3 split over 2 concurrent runs gives the one-run outputs, in order."""
    sliced = SignDetector(settings(backend="onnxruntime", threads=1, batch_slices=2), model_store=store)
    batch, _ = letterbox_batch(frames(), SIZE)

    (whole,) = onnx_detector.backend.forward(batch)
    (in_slices,) = sliced.backend.forward(batch)

    assert sliced.backend.model_info()["batch_slices"] == 2
    assert in_slices.shape == whole.shape == (3, 4 + len(NAMES), ANCHORS)
    np.testing.assert_allclose(in_slices, whole, rtol=1e-4, atol=1e-3)
    assert [d.box for d in sliced.detect(frames())[1]] == [d.box for d in sliced.detect([frames()[1]])[0]]


def test_detect_batch_equals_single_image_calls(onnx_detector):
    images = frames()

    batched = onnx_detector.detect(images)
    singles = [onnx_detector.detect([image])[0] for image in images]

    assert len(batched) == len(images)
    assert sum(len(dets) for dets in batched) > 0  # the comparison is not vacuous
    for image, together, alone in zip(images, batched, singles):
        assert [d.class_id for d in together] == [d.class_id for d in alone]
        assert [d.label for d in together] == [NAMES[d.class_id] for d in together]
        np.testing.assert_allclose([d.box for d in together], [d.box for d in alone], atol=1e-3)
        np.testing.assert_allclose([d.score for d in together], [d.score for d in alone], atol=1e-5)
        height, width = image.shape[:2]
        for d in together:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
            assert d.score > onnx_detector.settings.confidence
        assert len(together) <= onnx_detector.settings.max_detections
    assert onnx_detector.detect([]) == []


def test_stream_frames_are_detected_at_the_stream_size_in_the_same_batch(store, onnx_detector):
    both = SignDetector(settings(backend="onnxruntime", threads=2, stream_image_size=2 * SIZE), model_store=store)
    at_stream_size = SignDetector(settings(backend="onnxruntime", threads=2, image_size=2 * SIZE), model_store=store)
    images = frames()
    mixed = both.detect(images, streams=[False, True, False])
    want = [onnx_detector.detect([images[0]])[0], at_stream_size.detect([images[1]])[0],
            onnx_detector.detect([images[2]])[0]]
    assert sum(map(len, want)) > 0 and want[1] != onnx_detector.detect([images[1]])[0]  # the sizes differ
    for got, expected in zip(mixed, want):
        np.testing.assert_allclose([d.box for d in got], [d.box for d in expected], atol=1e-3)
        np.testing.assert_allclose([d.score for d in got], [d.score for d in expected], atol=1e-5)
    assert both.detect(images) == both.detect(images, streams=[False] * 3)  # images: image_size
    info = both.model_info()
    assert (info["image_size"], info["stream_image_size"]) == (SIZE, 2 * SIZE)
    assert [n["name"] for n in info["networks"]] == ["sign_detector", "sign_detector_streams"]


def test_describe_reports_what_the_runtime_runs_on_weights_and_classes(onnx_detector, weights):
    assert onnx_detector.names == NAMES
    described = onnx_detector.model_info()
    assert {k: described[k] for k in ("backend", "device", "runtime_device", "precision", "weights", "classes",
                                      "text_classes", "cpu_beside_gpu")} == {
        "backend": "onnxruntime",
        "device": "cpu",
        "runtime_device": "cpu",  # read back from the session's providers, not the setting
        "precision": "fp32",
        "weights": str(weights),
        "classes": len(NAMES),
        "text_classes": None,
        "cpu_beside_gpu": False,
    }
    [network] = described["networks"]  # no classifier in this fixture
    assert network["name"] == "sign_detector" and network["providers"] == ["CPUExecutionProvider"]


def test_only_text_classes_are_marked_for_reading(store, weights):
    detector = SignDetector(settings(backend="onnxruntime", threads=2, text_classes=["speed_limit_50"]), model_store=store)

    found = [d for dets in detector.detect(frames()) for d in dets]

    assert {d.label for d in found} >= {"speed_limit_50", "stop"}  # both kinds present: the check is not vacuous
    assert all(d.has_text == (d.label == "speed_limit_50") for d in found)
    assert detector.model_info()["text_classes"] == ["speed_limit_50"]


def test_text_classes_the_detector_cannot_output_are_refused(store, weights):
    with pytest.raises(ValueError, match=r"text_classes names \['info'\].*'give_way', 'speed_limit_50', 'stop'"):
        SignDetector(settings(backend="onnxruntime", text_classes=["speed_limit_50", "info"]), model_store=store)
