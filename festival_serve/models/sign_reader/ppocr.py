"""PP-OCR's pre- and post-processing for batches of sign crops, and where its model files are: pure
numpy/OpenCV functions, following rapidocr / PaddleOCR (BGR channel order, ``x / 255`` then
``(x - 0.5) / 0.5``; DB post-processing of the detector's map; CTC decoding), unit-tested alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import logging

import cv2
import numpy as np
from rapidocr.utils.process_img import get_rotate_crop_image

from festival_serve.pipeline.settings import in_store
from festival_serve.pipeline.types import SignText, TextLine

logger = logging.getLogger(__name__)



#: Pixel normalisation of both PP-OCR networks: x / 255 -> (x - 0.5) / 0.5, i.e. [-1, 1]
#: (rapidocr ``config.yaml`` Det.mean/std and ``TextRecognizer.resize_norm_img``).
PIXEL_MEAN = 0.5


PIXEL_STD = 0.5


#: DB post-processing of the detector's probability map, as rapidocr's ``config.yaml`` (Det).
DB_PARAMS: dict[str, Any] = {
    "thresh": 0.3,  # pixel probability that counts as text
    "box_thresh": 0.5,  # mean probability inside a box to keep it
    "max_candidates": 1000,
    "unclip_ratio": 1.6,  # DB shrinks text regions in training; grow them back by this ratio
    "use_dilation": True,
    "score_mode": "fast",
}


#: DB's output stride: the detector's input sides must be multiples of it (pixels).
DET_STRIDE = 32


#: PaddleOCR pads every line to at least 320 x 48 (``rec_img_shape``): the width the recogniser was
#: trained at. Short words padded to it read better than words squeezed into a narrow tensor.
REC_MIN_WH_RATIO = 320 / 48


#: One very long line would widen the whole recognition batch (it is padded to the widest line).
#: 25:1 is 1200 px at height 48, longer than any sign line scaled to det_size; wider lines are
#: squeezed horizontally rather than widening the batch further.
REC_MAX_WH_RATIO = 25.0


#: Crops or text lines thinner than this (pixels) carry no readable text.
MIN_SIDE = 2


EMPTY = SignText("", 0.0, ())


def reading_order(boxes: list[list[list[float]]]) -> list[int]:
    """Indices of ``boxes`` top-to-bottom, then left-to-right within a row.

    A box joins the current row when its vertical centre lies inside the y-span of the row's first
    box: relative to the text's own height, so it holds for crops of any scale (rapidocr's
    ``sorted_boxes`` uses a fixed 10-pixel tolerance: too loose for tiny crops, too tight for big ones).
    """
    arrays = [np.asarray(b, dtype=np.float32) for b in boxes]
    rows: list[list[int]] = []
    row_bottom = -math.inf
    for i in sorted(range(len(arrays)), key=lambda k: float(arrays[k][:, 1].min())):
        centre = float(arrays[i][:, 1].mean())
        if rows and centre <= row_bottom:
            rows[-1].append(i)
        else:
            rows.append([i])
            row_bottom = float(arrays[i][:, 1].max())
    return [i for row in rows for i in sorted(row, key=lambda k: float(arrays[k][:, 0].min()))]


def assemble(lines: list[TextLine]) -> SignText:
    """One sign's lines -> SignText: reading order, " "-joined, mean score."""
    if not lines:
        return EMPTY
    ordered = tuple(lines[i] for i in reading_order([line.box for line in lines]))
    score = float(np.mean([line.score for line in ordered]))
    return SignText(" ".join(line.text for line in ordered), score, ordered)


def is_readable(crop: Any) -> bool:
    """A crop the networks can take: (H, W, 3) with both sides >= MIN_SIDE pixels."""
    shape = getattr(crop, "shape", ())
    return len(shape) == 3 and shape[2] == 3 and shape[0] >= MIN_SIDE and shape[1] >= MIN_SIDE


def rgb_to_bgr(crop: np.ndarray) -> np.ndarray:
    """PP-OCR was trained on cv2-decoded (BGR) images. Contiguous, so cv2 accepts it (and a copy,
    so read-only arrays from Ray's object store are never written)."""
    return np.ascontiguousarray(crop[..., ::-1], dtype=np.uint8)


def normalize(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    x = images.astype(np.float32) * (1.0 / 255.0)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def fit_longest_side(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """``image`` resized so its longest side is ``size`` (aspect kept); returns (resized, scale)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), scale


def det_batch(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[float]]:
    """BGR images -> the detector's (N, 3, H, W) float32 input, and each image's scale.

    Each crop is scaled so its longest side is ``size`` and keeps its aspect ratio: a 4:1 direction sign
    costs a quarter of a square (DB is fully convolutional). The batch is as large as its largest crop,
    each side rounded up to DB's stride of 32. Crops sit at the top-left corner, so mapping back is a
    single division by ``scale``; padding is black, as rapidocr pads (``add_round_letterbox``).
    """
    fitted = [fit_longest_side(image, size) for image in images]
    height = DET_STRIDE * math.ceil(max(im.shape[0] for im, _ in fitted) / DET_STRIDE)
    width = DET_STRIDE * math.ceil(max(im.shape[1] for im, _ in fitted) / DET_STRIDE)
    canvas = np.zeros((len(images), height, width, 3), dtype=np.uint8)
    for k, (im, _) in enumerate(fitted):
        canvas[k, :im.shape[0], :im.shape[1]] = im
    return normalize(canvas), [scale for _, scale in fitted]


def orientation_groups(images: list[np.ndarray]) -> list[list[int]]:
    """Indices of the wide crops (direction and information plates) and of the rest (discs, triangles):
    padded into one batch, a wide crop's canvas would grow to a square beside an upright one."""
    wide = [i for i, image in enumerate(images) if image.shape[1] > image.shape[0]]
    upright = [i for i, image in enumerate(images) if image.shape[1] <= image.shape[0]]
    return [group for group in (wide, upright) if group]


def boxes_from_map(
    prob_map: np.ndarray, scale: float, image_shape: tuple[int, ...], postprocess
) -> list[tuple[np.ndarray, float]]:
    """One (H, W) text-probability map -> [(box (4, 2) float32 in image pixels, score)].

    rapidocr's ``DBPostProcess`` rescales boxes from the map to a destination size; the map spans
    ``(H, W) / scale`` image pixels, so that destination lands them in the image's coordinates.
    Unclipping may push a box into the padding: clip it back to the image.
    """
    map_h, map_w = prob_map.shape[-2:]
    boxes, scores = postprocess(prob_map.reshape(1, 1, map_h, map_w), (map_h / scale, map_w / scale))
    h, w = image_shape[:2]
    out = []
    for box, score in zip(boxes, scores):
        box = np.asarray(box, dtype=np.float32)
        box[:, 0] = np.clip(box[:, 0], 0, w - 1)
        box[:, 1] = np.clip(box[:, 1], 0, h - 1)
        out.append((box, float(score)))
    return out


def crop_line(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Rectify one text line (perspective warp; tall lines turned upright), via rapidocr."""
    return get_rotate_crop_image(image, box.astype(np.float32).copy())


def rec_width(lines: list[np.ndarray], height: int) -> int:
    """Width of the recognition batch: the widest line at ``height``, within [min, max] ratios."""
    ratio = max([REC_MIN_WH_RATIO] + [line.shape[1] / line.shape[0] for line in lines])
    return int(math.ceil(height * min(ratio, REC_MAX_WH_RATIO)))


def rec_batch(lines: list[np.ndarray], height: int) -> np.ndarray:
    """BGR line images -> the recogniser's (N, 3, height, W) float32 input.

    Each line is resized to ``height`` keeping its aspect ratio (squeezed if wider than the batch)
    and right-padded with 0 in normalised space, as PaddleOCR's ``resize_norm_img`` does.
    """
    width = rec_width(lines, height)
    batch = np.zeros((len(lines), 3, height, width), dtype=np.float32)
    for i, line in enumerate(lines):
        new_w = min(width, int(math.ceil(height * line.shape[1] / line.shape[0])))
        resized = cv2.resize(line, (new_w, height), interpolation=cv2.INTER_LINEAR)
        batch[i, :, :, :new_w] = normalize(resized[None])[0]
    return batch


def cut_lines(
    images: list[np.ndarray], detections: list[list[tuple[np.ndarray, float]]]
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Every detected line of every image, flattened into one recognition batch.

    Returns parallel lists: the owning image's index, the box, the rectified BGR line image.
    """
    owners, boxes, lines = [], [], []
    for k, (image, found) in enumerate(zip(images, detections)):
        for box, _ in found:
            try:
                line = crop_line(image, box)
            except cv2.error:
                # A degenerate quadrilateral costs its own line, never the batch.
                logger.warning("sign_reader: could not rectify text box %s", box.tolist())
                continue
            if min(line.shape[:2]) >= MIN_SIDE:
                owners.append(k)
                boxes.append(box)
                lines.append(line)
    return owners, boxes, lines


def group_lines(
    count: int, owners: list[int], boxes: list[np.ndarray], recognized: list[tuple[str, float]], min_score: float
) -> list[SignText]:
    """Recognised lines back to their ``count`` images; empty and low-score lines dropped (as rapidocr)."""
    per_image: list[list[TextLine]] = [[] for _ in range(count)]
    for k, box, (text, score) in zip(owners, boxes, recognized):
        text = text.strip()
        if text and score >= min_score:
            per_image[k].append(TextLine(text, float(score), box.tolist()))
    return [assemble(lines) for lines in per_image]


def _rapidocr_models() -> tuple[Path, str]:
    import rapidocr
    from rapidocr._version import __version__

    return Path(rapidocr.__file__).parent / "models", f"rapidocr-{__version__}"


#: The models shipped in the rapidocr wheel (its config.yaml default: PP-OCRv6, small).
SHIPPED_DET = "PP-OCRv6_det_small.onnx"


SHIPPED_REC = "PP-OCRv6_rec_small.onnx"


def store_path(value: str, model_store: Path) -> Path:
    """A path from the settings: relative to ``model_store`` unless absolute; it must exist."""
    path = in_store(value, model_store)
    if not path.exists():
        raise FileNotFoundError(f"sign reader model file not found: {path}")
    return path


def model_file(value: str | None, model_store: Path, shipped: str) -> tuple[Path, str]:
    """A det/rec model setting (None: rapidocr's shipped model) -> (path, short source label)."""
    if value is not None:
        path = store_path(value, model_store)
        return path, str(path)
    models_dir, source = _rapidocr_models()
    path = models_dir / shipped
    if not path.is_file():
        raise FileNotFoundError(f"sign reader model file not found: {path} (is the rapidocr wheel complete?)")
    return path, f"{source}/{shipped}"


def recognizer_file(value: str | None, model_store: Path) -> tuple[Path, str]:
    """The ``rec_model`` setting -> (ONNX path, source label). A ``.pt`` is a sign-text checkpoint
    (``festival-serve train sign-text``): its ONNX export is served, made once beside it."""
    path, label = model_file(value, model_store, SHIPPED_REC)
    if path.suffix != ".pt":
        return path, label
    from festival_serve.models.sign_reader.crnn import cached_onnx

    return cached_onnx(path), label


def model_dictionary(session) -> list[str] | None:
    """The dictionary PaddleOCR's ONNX export embeds in the model metadata, if any."""
    meta = session.get_modelmeta().custom_metadata_map
    return meta["character"].splitlines() if "character" in meta else None


def check_rec_model(session, height: int, num_chars: int, name: str) -> None:
    """Refuse settings that cannot match the recogniser: a fixed input height, a class count."""
    in_h = session.get_inputs()[0].shape[2]
    if isinstance(in_h, int) and in_h != height:
        raise ValueError(f"{name}: the recognition model takes height {in_h}, but rec_height is {height}")
    classes = session.get_outputs()[0].shape[-1]
    # CTC classes = blank + dictionary + space (PaddleOCR's ``use_space_char``).
    if isinstance(classes, int) and classes != num_chars + 2:
        raise ValueError(
            f"{name}: the dictionary has {num_chars} characters but the model predicts {classes} classes "
            f"(expected dictionary size + 2); rec_dict does not belong to this model"
        )
