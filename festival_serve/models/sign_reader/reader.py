"""Sign reader: PP-OCR text detection + recognition on sign crops, batched across crops.

``read(crops)`` takes the crops of many signs (from many requests) and runs each network once:

1. detection: every crop is scaled so its longest side is ``det_size`` (aspect kept) and the wide crops,
   then the upright ones, go through the DB text detector in one forward pass each (padded to the
   largest crop of the pass); DB post-processing (rapidocr's) turns each probability map
   into text-line quadrilaterals, mapped back to the crop's pixels;
2. recognition: every text line of every crop is rectified, resized to ``rec_height`` and padded to
   the batch's widest line, and the whole set goes through the CTC recogniser in ONE forward pass;
3. the decoded lines are split back per crop and joined in reading order.

Both networks are the PP-OCR ONNX exports shipped in the ``rapidocr`` wheel by default
(PP-OCRv6 small det/rec). Their preprocessing follows rapidocr / PaddleOCR: BGR channel order,
``x / 255`` then ``(x - 0.5) / 0.5``. The recogniser's character dictionary is embedded in its ONNX
metadata (``character``); ``rec_dict`` overrides it for models that do not carry one. Both exports
have a dynamic batch axis (det ``(N, 3, H, W)``, rec ``(N, 3, 48, W)``: the height is fixed, checked
against ``rec_height`` at load).

No Ray import here: the Serve deployment wraps a :class:`SignReaderEngine`. PP-OCR's pre/post-processing and
model files are in ``ppocr``, the PaddleOCR 3.x engine in ``paddle``, the recognizer trained here in ``crnn``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from festival_serve.runtime.devices import resolve_device, warn_cpu_beside_gpu
from festival_serve.pipeline.settings import SignReaderSettings
from festival_serve.models.sign_reader.paddle import PaddleOCRReader
from festival_serve.models.sign_reader.ppocr import (
    DB_PARAMS, EMPTY, SHIPPED_DET, boxes_from_map, check_rec_model, cut_lines, det_batch, group_lines, is_readable,
    model_dictionary, model_file, orientation_groups, rec_batch, recognizer_file, rgb_to_bgr, store_path,
)
from festival_serve.pipeline.types import SignText

logger = logging.getLogger(__name__)


@runtime_checkable
class SignReaderEngine(Protocol):
    def read(self, crops: list[np.ndarray]) -> list[SignText]:
        """``crops``: (H, W, 3) uint8 RGB of any sizes; returns one SignText per crop, same order."""

    def model_info(self) -> dict[str, str]:
        """``{"engine", "backend", "device", "weights"}`` for ``/v1/models`` and logs."""


# --------------------------------------------------------------------------------------------------
# Engines


class PPOCROnnxReader:
    """PP-OCR det + rec ONNX models on ONNX Runtime; one forward pass per network per batch."""

    engine = "onnx"

    def __init__(self, settings: SignReaderSettings, *, model_store: Path, gpu_only: bool = False,
                 gpu_fraction: float | None = None) -> None:
        # Imported here: rapidocr's det/rec packages pull in its whole engine stack (~2 s).
        from rapidocr.ch_ppocr_det.utils import DBPostProcess
        from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

        from festival_serve.runtime.backends import Placement
        from festival_serve.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        det_path, det_label = model_file(settings.det_model, model_store, SHIPPED_DET)
        rec_path, rec_label = recognizer_file(settings.rec_model, model_store)
        dict_path = store_path(settings.rec_dict, model_store) if settings.rec_dict else None
        self.settings = settings
        self.device = resolve_device(settings.device, gpu_only=gpu_only, model="sign_reader")
        self.cpu_beside_gpu = warn_cpu_beside_gpu("sign_reader", self.device)
        # fp32: PP-OCR's exports are fp32 and small; CTC scores near the threshold are sensitive to precision.
        # Two sessions, one arena each: each gets half of the replica's GPU share.
        session_share = gpu_fraction / 2 if gpu_fraction else None
        load = dict(device=self.device, threads=settings.threads,
                    placement=Placement(gpu_only, session_share, batch_slices=settings.batch_slices or 1))
        self.det = OnnxRuntimeBackend.from_file(str(det_path), name="sign_reader.det", **load)
        self.rec = OnnxRuntimeBackend.from_file(str(rec_path), name="sign_reader.rec", **load)
        # A dictionary file is split on "\n" only, as PaddleOCR reads it (some characters are
        # line breaks to str.splitlines).
        chars = CTCLabelDecode.read_character_file(dict_path) if dict_path else model_dictionary(self.rec.session)
        if chars is None:
            raise ValueError(f"sign_reader: {rec_path} embeds no character dictionary; set rec_dict")
        check_rec_model(self.rec.session, settings.rec_height, len(chars), "sign_reader")
        # CTCLabelDecode inserts blank and space into the list it is given: hand it a copy.
        self.decoder = CTCLabelDecode(character=list(chars))
        self.postprocess = DBPostProcess(**DB_PARAMS)
        self.weights = f"det={det_label} rec={rec_label}" + (f" dict={dict_path}" if dict_path else "")
        # Warm-up: the first run of each session allocates its arenas; do it before serving.
        self.detect([np.zeros((settings.det_size, settings.det_size, 3), np.uint8)])
        self.recognize([np.zeros((settings.rec_height, settings.rec_height * 4, 3), np.uint8)])
        logger.info("sign_reader: PP-OCR onnx on %s (%s, %d characters)", self.device, self.weights, len(chars))

    def model_info(self) -> dict:
        networks = [{"name": "sign_reader.det", **self.det.model_info()}, {"name": "sign_reader.rec", **self.rec.model_info()}]
        return {"engine": self.engine, **self.det.model_info(), "weights": self.weights,
                "cpu_beside_gpu": self.cpu_beside_gpu, "networks": networks}

    def read(self, crops: list[np.ndarray]) -> list[SignText]:
        results = [EMPTY] * len(crops)
        usable = [i for i, crop in enumerate(crops) if is_readable(crop)]
        if len(usable) < len(crops):
            logger.debug("sign_reader: %d unreadable crop(s) answered empty", len(crops) - len(usable))
        if not usable:
            return results
        images = [rgb_to_bgr(crops[i]) for i in usable]
        owners, boxes, lines = cut_lines(images, self.detect(images))
        signs = group_lines(len(images), owners, boxes, self.recognize(lines), self.settings.min_text_score)
        for i, sign in zip(usable, signs):
            results[i] = sign
        return results

    def detect(self, images: list[np.ndarray]) -> list[list[tuple[np.ndarray, float]]]:
        """BGR images -> per image [(box, score)]: one detector forward pass per crop orientation."""
        found: list[list[tuple[np.ndarray, float]]] = [[] for _ in images]
        for group in orientation_groups(images):
            batch, scales = det_batch([images[i] for i in group], self.settings.det_size)
            prob_maps = self.det.forward(batch)[0]  # (n, 1, H, W) text probability, H and W <= det_size
            # DB post-processing is contour geometry on the CPU, one map at a time (rapidocr's API).
            for i, prob_map, scale in zip(group, prob_maps, scales):
                found[i] = boxes_from_map(prob_map, scale, images[i].shape, self.postprocess)
        return found

    def recognize(self, lines: list[np.ndarray]) -> list[tuple[str, float]]:
        """BGR line images -> [(text, score)]: one recogniser forward pass for all of them."""
        if not lines:
            return []
        probs = self.rec.forward(rec_batch(lines, self.settings.rec_height))[0]  # (N, T, classes) softmax
        decoded, _ = self.decoder(probs)
        return [(text, float(score)) for text, score in decoded]


ENGINES: dict[str, type] = {"onnx": PPOCROnnxReader, "paddle": PaddleOCRReader}


def create_reader(settings: SignReaderSettings, *, model_store: Path, gpu_only: bool = False,
                  gpu_fraction: float | None = None) -> SignReaderEngine:
    """Build the engine named by ``settings.engine``; an unknown name lists the supported ones."""
    try:
        engine_cls = ENGINES[settings.engine]
    except KeyError:
        raise ValueError(
            f"unknown sign reader engine {settings.engine!r}; supported engines: {', '.join(sorted(ENGINES))}"
        ) from None
    return engine_cls(settings, model_store=Path(model_store), gpu_only=gpu_only, gpu_fraction=gpu_fraction)
