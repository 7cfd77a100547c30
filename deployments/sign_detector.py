"""SignDetector: ultralytics YOLO traffic-sign detection, batched across requests."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve.serving.batching import paced_batch
from festival_serve.pipeline.types import SignDetection, Ticket
from festival_serve.pipeline.settings import SignDetectorSettings
from festival_serve.pipeline.stages import stage


@serve.deployment
class SignDetector(ModelDeployment):
    STAGE = stage("sign_detector")

    def __init__(self, settings: SignDetectorSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)

    @paced_batch  # paced by the model (festival_serve.serving.batching); sizes and waits: user_config (reconfigure)
    async def detect(self, images: list[np.ndarray], tickets: list[Ticket]) -> list[list[SignDetection]]:
        """(H, W, 3) uint8 RGB frames → the signs found in each, boxes in frame pixels; camera-stream frames (their
        tickets say so) at the stream letterbox size."""
        return await self._run_batch(list(zip(images, (t.stream for t in tickets))),
                                     lambda batch: self.model.detect([image for image, _ in batch],
                                                                     streams=[stream for _, stream in batch]),
                                     tickets)

    def _model_info(self) -> dict:
        return self.model.model_info()
