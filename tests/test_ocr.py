"""The sign reader's contract: real PP-OCR models (shipped in rapidocr) read rendered signs,
batched across crops, one bad crop never failing the batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from festival_serve.runtime.backends.base import BackendUnavailable
from festival_serve.runtime.devices import GpuOnlyViolation, cuda_available
from festival_serve.models.sign_reader.ppocr import assemble, boxes_from_map, DB_PARAMS, det_batch, EMPTY, model_dictionary, orientation_groups, reading_order, rec_batch, REC_MAX_WH_RATIO
from festival_serve.models.sign_reader.reader import create_reader, ENGINES, PPOCROnnxReader, SignReaderEngine
from festival_serve.models.sign_reader.paddle import PaddleOCRReader, sign_text_from_paddle
from festival_serve.models.sign_reader.charset import strip_tones
from festival_serve.pipeline.types import SignText, TextLine
from festival_serve.pipeline.settings import SignReaderSettings

WHITE, BLACK, BLUE, RED, GREEN = (255, 255, 255), (0, 0, 0), (0, 70, 160), (200, 0, 0), (0, 120, 60)


# --------------------------------------------------------------------------------------------------
# Fixtures: a real reader on the shipped models, signs rendered with a real TrueType font


def _font_file() -> str | None:
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        mpl = Path(next(iter(spec.submodule_search_locations)))
        candidates.append(mpl / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf")
    return next((str(p) for p in candidates if p.is_file()), None)


@pytest.fixture(scope="module")
def font_file() -> str:
    path = _font_file()
    if path is None:
        pytest.skip("no DejaVu TrueType font on this machine to render signs with")
    return path


def render_sign(font_file, lines, size, *, fg=WHITE, bg=BLUE, font_px=36, origin=None):
    """(H, W, 3) uint8 RGB sign with ``lines`` centred (or at ``origin``); also each line's PIL bbox."""
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(font_file, font_px)
    line_h = font_px * 1.3
    y = (size[1] - len(lines) * line_h) / 2 if origin is None else origin[1]
    bboxes = []
    for text in lines:
        x = (size[0] - draw.textlength(text, font=font)) / 2 if origin is None else origin[0]
        draw.text((x, y), text, font=font, fill=fg)
        bboxes.append(draw.textbbox((x, y), text, font=font))
        y += line_h
    return np.asarray(image), bboxes


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> PPOCROnnxReader:
    settings = SignReaderSettings(device="cpu", threads=2)
    return create_reader(settings, model_store=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def signs(font_file) -> list[tuple[np.ndarray, str]]:
    """Crops of different sizes and colours, with the text each must read as."""
    specs = [
        (["BEN XE"], (240, 120), dict(bg=BLUE)),
        (["STOP"], (160, 160), dict(bg=RED, font_px=40)),
        (["50"], (90, 90), dict(fg=BLACK, bg=WHITE, font_px=40)),
        (["NO PARKING"], (400, 80), dict(fg=BLACK, bg=WHITE, font_px=40)),
        (["HA NOI 25km"], (300, 70), dict(font_px=30)),
        (["30"], (40, 40), dict(fg=BLACK, bg=WHITE, font_px=20)),
    ]
    return [(render_sign(font_file, lines, size, **kw)[0], " ".join(lines)) for lines, size, kw in specs]


# --------------------------------------------------------------------------------------------------
# Reading real signs


@pytest.mark.parametrize(
    "text, size, colours",
    [
        ("BEN XE", (240, 120), dict(fg=WHITE, bg=BLUE)),
        ("STOP", (160, 160), dict(fg=WHITE, bg=RED)),
        ("50", (90, 90), dict(fg=BLACK, bg=WHITE)),
    ],
)
def test_reads_simple_sign_words(reader, font_file, text, size, colours):
    crop, _ = render_sign(font_file, [text], size, font_px=40, **colours)
    [sign] = reader.read([crop])
    assert sign.text == text
    assert sign.score > 0.8
    assert [line.text for line in sign.lines] == [text]


def test_two_line_sign_is_joined_top_to_bottom(reader, font_file):
    crop, _ = render_sign(font_file, ["DUONG", "CAO TOC"], (260, 160), bg=GREEN)
    [sign] = reader.read([crop])
    assert sign.text == "DUONG CAO TOC"
    assert [line.text for line in sign.lines] == ["DUONG", "CAO TOC"]
    assert sign.score == pytest.approx(np.mean([line.score for line in sign.lines]))


@pytest.mark.parametrize("size", [(640, 200), (120, 60)], ids=["larger-than-det_size", "smaller"])
def test_line_boxes_are_in_crop_pixels(reader, font_file, size):
    """Detection scaling is undone: the box surrounds the rendered text in the crop's own pixels."""
    font_px = size[1] // 3
    origin = (size[0] // 5, size[1] // 4)
    crop, [(x0, y0, x1, y1)] = render_sign(font_file, ["EXIT"], size, font_px=font_px, origin=origin)
    [sign] = reader.read([crop])
    assert sign.text == "EXIT"
    box = np.asarray(sign.lines[0].box)
    assert box.shape == (4, 2)
    tol = 0.25 * font_px  # DB unclips boxes beyond the glyphs
    assert box[:, 0].min() == pytest.approx(x0, abs=tol) and box[:, 0].max() == pytest.approx(x1, abs=tol)
    assert box[:, 1].min() == pytest.approx(y0, abs=tol) and box[:, 1].max() == pytest.approx(y1, abs=tol)


def test_batch_reads_every_crop_in_order_and_equals_single_reads(reader, signs):
    crops = [crop for crop, _ in signs]
    batched = reader.read(crops)
    assert [sign.text for sign in batched] == [text for _, text in signs]
    singles = [reader.read([crop])[0] for crop in crops]
    assert [s.text for s in singles] == [b.text for b in batched]
    for single, batch in zip(singles, batched):
        # Alone, a crop's canvas ends at its own edge (rounded up to 32); in a batch it is padded to the largest
        # crop, and DB's receptive field sees black padding instead of the network's zero padding there: boxes
        # move by a few pixels (measured: up to 4 on the 80 px "NO PARKING"), the text does not change.
        assert np.allclose([line.box for line in single.lines], [line.box for line in batch.lines], atol=5)
        assert single.score == pytest.approx(batch.score, abs=0.03)


def test_degenerate_crops_read_empty_without_failing_the_batch(reader, signs):
    (good, text), (other, other_text) = signs[0], signs[1]
    crops = [
        np.zeros((0, 10, 3), np.uint8),
        good,
        np.zeros((1, 50, 3), np.uint8),
        np.zeros((50, 1, 3), np.uint8),
        np.zeros((20, 20), np.uint8),  # not (H, W, 3)
        other,
    ]
    out = reader.read(crops)
    assert [s.text for s in out] == ["", text, "", "", "", other_text]
    assert out[0] == out[2] == out[3] == out[4] == SignText("", 0.0, ())


def test_blank_crop_and_empty_batch(reader):
    assert reader.read([]) == []
    assert reader.read([np.full((100, 160, 3), BLUE, np.uint8)]) == [EMPTY]


def test_read_only_crops_are_accepted(reader, signs):
    crop, text = signs[0]
    frozen = crop.copy()
    frozen.setflags(write=False)  # Ray hands arrays over read-only
    assert reader.read([frozen])[0].text == text


def test_describe_names_engine_backend_device_and_weights(reader):
    info = reader.model_info()
    assert isinstance(reader, SignReaderEngine)
    assert info["engine"] == "onnx" and info["backend"] == "onnxruntime" and info["device"] == "cpu"
    assert "PP-OCRv6_det_small.onnx" in info["weights"] and "PP-OCRv6_rec_small.onnx" in info["weights"]


def test_dictionary_comes_from_the_model_metadata(reader):
    chars = model_dictionary(reader.rec.session)
    assert chars is not None and {"A", "Z", "0", "9"} <= set(chars)
    # blank + dictionary + space = the recogniser's classes
    assert len(chars) + 2 == reader.rec.session.get_outputs()[0].shape[-1]


# --------------------------------------------------------------------------------------------------
# Pure helpers


def test_reading_order_is_top_to_bottom_then_left_to_right():
    def box(x, y, w=40, h=20):
        return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]

    boxes = [box(100, 52), box(10, 50), box(60, 2), box(5, 0)]  # row 2 right, row 2 left, row 1 right, row 1 left
    assert reading_order(boxes) == [3, 2, 1, 0]


def test_assemble_joins_lines_in_reading_order_with_mean_score():
    second = TextLine("CAO TOC", 0.8, [[0, 40], [80, 40], [80, 60], [0, 60]])
    first_right = TextLine("XE", 1.0, [[60, 0], [90, 0], [90, 20], [60, 20]])
    first_left = TextLine("BEN", 0.9, [[0, 2], [50, 2], [50, 22], [0, 22]])
    sign = assemble([second, first_right, first_left])
    assert sign.text == "BEN XE CAO TOC"
    assert sign.lines == (first_left, first_right, second)
    assert sign.score == pytest.approx(0.9)
    assert assemble([]) == SignText("", 0.0, ())


def test_det_batch_keeps_aspect_at_top_left_and_pads_to_the_largest_crop():
    wide, small = np.full((50, 200, 3), 255, np.uint8), np.full((30, 30, 3), 255, np.uint8)
    batch, scales = det_batch([wide], 320)
    assert batch.shape == (1, 3, 96, 320) and scales == [pytest.approx(1.6)]  # 80 rows, rounded up to 32
    assert batch[0, :, :80].min() == 1.0 and batch[0, :, 80:].max() == -1.0  # white text area, black padding
    batch, scales = det_batch([wide, small], 320)
    assert batch.shape == (2, 3, 320, 320) and scales == [pytest.approx(1.6), pytest.approx(320 / 30)]


def test_wide_and_upright_crops_are_detected_in_separate_passes():
    wide, disc, tall = np.zeros((40, 160, 3), np.uint8), np.zeros((60, 60, 3), np.uint8), np.zeros((90, 50, 3), np.uint8)
    assert orientation_groups([disc, wide, tall, wide]) == [[1, 3], [0, 2]]
    assert orientation_groups([disc]) == [[0]]
    assert det_batch([wide, wide], 256)[0].shape == (2, 3, 64, 256)  # not 256 x 256, as beside the disc


def test_boxes_from_a_wide_map_land_in_the_crops_pixels():
    from rapidocr.ch_ppocr_det.utils import DBPostProcess

    crop = np.zeros((50, 200, 3), np.uint8)
    batch, (scale,) = det_batch([crop], 320)
    prob_map = np.zeros(batch.shape[2:], np.float32)
    prob_map[24:56, 32:288] = 1.0  # a text line at crop pixels x 20..180, y 15..35
    ((box, score),) = boxes_from_map(prob_map, scale, crop.shape, DBPostProcess(**DB_PARAMS))
    assert score > DB_PARAMS["box_thresh"]
    assert box[:, 0].min() < 20 < 180 < box[:, 0].max() and box[:, 1].min() < 15 < 35 < box[:, 1].max()
    assert box[:, 0].max() <= 199 and box[:, 1].max() <= 49  # clipped to the crop


def test_rec_batch_pads_to_widest_line_within_limits():
    short, wide = np.zeros((20, 20, 3), np.uint8), np.zeros((10, 150, 3), np.uint8)
    batch = rec_batch([short, wide], 48)
    assert batch.shape == (2, 3, 48, 720) and batch.dtype == np.float32  # 150/10 * 48
    assert batch[0, :, :, 48:].max() == 0  # padding is 0 in normalised space
    assert rec_batch([short], 48).shape[-1] == 320  # never narrower than PaddleOCR's 320 x 48
    very_wide = np.zeros((10, 1000, 3), np.uint8)
    assert rec_batch([very_wide], 48).shape[-1] == int(48 * REC_MAX_WH_RATIO)


def test_strip_tones():
    assert strip_tones("ĐƯỜNG CAO TỐC") == "DUONG CAO TOC"
    assert strip_tones("đường Hồ Chí Minh") == "duong Ho Chi Minh"


def test_paddle_result_becomes_sign_text():
    result = {
        "rec_texts": ["CAO TOC", "DUONG", ""],
        "rec_scores": [0.9, 0.95, 0.99],
        "rec_polys": [
            np.array([[0, 40], [80, 40], [80, 60], [0, 60]]),
            np.array([[0, 0], [80, 0], [80, 20], [0, 20]]),
            np.array([[0, 70], [9, 70], [9, 80], [0, 80]]),
        ],
    }
    sign = sign_text_from_paddle(result, min_score=0.5)
    assert sign.text == "DUONG CAO TOC" and len(sign.lines) == 2


# --------------------------------------------------------------------------------------------------
# Errors


def test_engines_registry():
    assert ENGINES == {"onnx": PPOCROnnxReader, "paddle": PaddleOCRReader}


def test_unknown_engine_lists_the_supported_ones(tmp_path):
    settings = SignReaderSettings().model_copy(update={"engine": "tesseract"})
    with pytest.raises(ValueError, match=r"'tesseract'.*onnx, paddle"):
        create_reader(settings, model_store=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None, reason="paddleocr is installed")
def test_paddle_engine_without_paddleocr_says_how_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"pip install 'festival-serve\[paddle\]'.*paddlepaddle-gpu"):
        create_reader(SignReaderSettings(engine="paddle", device="cpu"), model_store=tmp_path)


@pytest.mark.parametrize("field", ["det_model", "rec_model", "rec_dict"])
def test_missing_model_file_is_named(tmp_path, field):
    settings = SignReaderSettings(device="cpu", **{field: "ocr/missing.onnx"})
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "ocr" / "missing.onnx")):
        create_reader(settings, model_store=tmp_path)


def test_dictionary_file_overrides_the_embedded_one(reader, signs, tmp_path):
    chars = model_dictionary(reader.rec.session)
    (tmp_path / "keys.txt").write_text("\n".join(chars) + "\n", encoding="utf-8")
    custom = create_reader(SignReaderSettings(device="cpu", threads=2, rec_dict="keys.txt"), model_store=tmp_path)
    assert "keys.txt" in custom.model_info()["weights"]
    crop, text = signs[0]
    assert custom.read([crop])[0].text == text


def test_dictionary_that_does_not_fit_the_model_is_refused(tmp_path):
    (tmp_path / "dict.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="rec_dict does not belong to this model"):
        create_reader(SignReaderSettings(device="cpu", rec_dict="dict.txt"), model_store=tmp_path)


def test_rec_height_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="height 48, but rec_height is 32"):
        create_reader(SignReaderSettings(device="cpu", rec_height=32), model_store=tmp_path)


@pytest.mark.skipif(cuda_available(), reason="a CUDA device is visible")
def test_gpu_only_refuses_the_cpu(tmp_path):
    with pytest.raises(GpuOnlyViolation, match="gpu_only"):
        create_reader(SignReaderSettings(), model_store=tmp_path, gpu_only=True)
