"""SignDetector: ultralytics YOLO traffic-sign detection, batched across requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve import signs
from festival_serve.settings import SignDetectorSettings, in_store


@serve.deployment
class SignDetector(ModelDeployment):
    stage = "sign_detector"
    batched_method = "detect"

    def __init__(self, settings: SignDetectorSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(
            lambda: signs.SignDetector(settings, model_store=Path(model_store), gpu_only=gpu_only),
            missing=(FileNotFoundError,),
            weights=in_store(settings.weights, model_store),
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect(self, images: list[np.ndarray]) -> list[list[signs.SignDetection]]:
        """(H, W, 3) uint8 RGB frames → the signs found in each, boxes in frame pixels."""
        return await self._run_batch(len(images), lambda: self.model.detect(images))

    def _describe_model(self) -> dict:
        return self.model.describe()
