"""SignReader: PP-OCR text detection + recognition on sign crops, batched by crop count across
requests (a request with five signs weighs five in the batch)."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve import ocr
from festival_serve.settings import SignReaderSettings
from festival_serve.stages import stage


def _crop_count(requests: list[list[np.ndarray]]) -> int:
    return sum(len(crops) for crops in requests)


@serve.deployment
class SignReader(ModelDeployment):
    STAGE = stage("sign_reader")

    def __init__(self, settings: SignReaderSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_crop_count)
    async def read(self, requests: list[list[np.ndarray]]) -> list[list[ocr.SignText]]:
        """Each request: the (h, w, 3) uint8 RGB crops of one frame's signs → their text, in order."""
        counts = [len(crops) for crops in requests]
        flat = [crop for crops in requests for crop in crops]
        texts = await self._run_batch(len(flat), lambda: self.model.read(flat))
        return _split(texts, counts)

    def _describe_model(self) -> dict:
        return self.model.describe()


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out
