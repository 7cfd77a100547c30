"""The PaddleOCR 3.x engine for the sign reader (``engine: paddle``), for GPU clusters with
``paddlepaddle-gpu``: PaddleOCR's own pipeline on the crops, its answers as ``SignText``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from festival_serve.models.sign_reader.ppocr import EMPTY, assemble, is_readable, rgb_to_bgr, store_path
from festival_serve.pipeline.settings import SignReaderSettings
from festival_serve.runtime.devices import resolve_device
from festival_serve.runtime.errors import BackendUnavailable
from festival_serve.pipeline.types import SignText, TextLine

logger = logging.getLogger(__name__)



def paddle_device(device: str) -> str:
    """Our device names -> PaddlePaddle's ("cuda:1" -> "gpu:1")."""
    if device.startswith("cuda"):
        return "gpu:" + (device.split(":")[1] if ":" in device else "0")
    return device


def sign_text_from_paddle(result: Any, min_score: float) -> SignText:
    """One PaddleOCR 3.x ``predict`` result (``rec_texts``, ``rec_scores``, ``rec_polys``) -> SignText."""
    lines = [
        TextLine(str(text).strip(), float(score), np.asarray(poly, dtype=np.float32).reshape(-1, 2).tolist())
        for text, score, poly in zip(result["rec_texts"], result["rec_scores"], result["rec_polys"])
        if str(text).strip() and float(score) >= min_score
    ]
    return assemble(lines)


def _import_paddleocr():
    try:
        from paddleocr import PaddleOCR
    except ImportError as e:
        raise BackendUnavailable(
            "sign_reader engine 'paddle' needs PaddleOCR 3.x, which is not installed: "
            "pip install 'festival-serve[paddle]' plus paddlepaddle-gpu 3.x from Paddle's own package index "
            "(https://www.paddlepaddle.org.cn/packages/stable/<cuda version>/; see README), or use engine 'onnx'"
        ) from e
    return PaddleOCR


class PaddleOCRReader:
    """PaddleOCR 3.x pipeline (det + rec, no document preprocessing); one ``predict`` per batch."""

    engine = "paddle"

    def __init__(self, settings: SignReaderSettings, *, model_store: Path, gpu_only: bool = False,
                 gpu_fraction: float | None = None) -> None:
        # gpu_fraction is not applied: Paddle's allocator is capped only by FLAGS_fraction_of_gpu_memory_to_use,
        # read once at import; set it in the replica's runtime_env to cap this engine.
        if settings.rec_model and Path(settings.rec_model).suffix == ".pt":
            raise ValueError(f"sign_reader: {settings.rec_model} is a sign-text checkpoint, which the onnx engine "
                             "serves; the paddle engine reads a Paddle inference model directory (set rec_model to "
                             "one, or null for PaddleOCR's own)")
        paddle_ocr = _import_paddleocr()
        self.settings = settings
        self.device = resolve_device(settings.device, gpu_only=gpu_only, model="sign_reader")
        kwargs: dict[str, Any] = {
            # Sign crops are upright and already cut out: skip the document and line-orientation models.
            "use_doc_orientation_classify": False,
            "use_doc_unwarping": False,
            "use_textline_orientation": False,
            # Crops larger than det_size shrink to it (the onnx engine also enlarges smaller ones).
            "text_det_limit_side_len": settings.det_size,
            "text_det_limit_type": "max",
            "text_rec_score_thresh": settings.min_text_score,
            "device": paddle_device(self.device),
        }
        if settings.threads:
            kwargs["cpu_threads"] = settings.threads
        self.weights = "paddleocr default models"
        if settings.det_model or settings.rec_model:
            # PaddleOCR takes Paddle inference model directories, not ONNX files.
            det = store_path(settings.det_model, model_store) if settings.det_model else None
            rec = store_path(settings.rec_model, model_store) if settings.rec_model else None
            kwargs.update(text_detection_model_dir=det and str(det), text_recognition_model_dir=rec and str(rec))
            self.weights = f"det={det or 'default'} rec={rec or 'default'}"
        if settings.rec_dict:
            logger.warning("sign_reader: rec_dict is ignored by the paddle engine (its model directory has its own)")
        self.ocr = paddle_ocr(**kwargs)
        logger.info("sign_reader: PaddleOCR on %s (%s)", self.device, self.weights)

    def model_info(self) -> dict[str, str]:
        return {"engine": self.engine, "backend": "paddle", "device": self.device, "weights": self.weights}

    def read(self, crops: list[np.ndarray]) -> list[SignText]:
        results = [EMPTY] * len(crops)
        usable = [i for i, crop in enumerate(crops) if is_readable(crop)]
        if not usable:
            return results
        # predict() takes the whole list: one call per batch; numpy inputs are read as BGR.
        outputs = self.ocr.predict([rgb_to_bgr(crops[i]) for i in usable])
        for i, output in zip(usable, outputs):
            results[i] = sign_text_from_paddle(output, self.settings.min_text_score)
        return results
