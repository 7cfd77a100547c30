"""SceneDescriber: SmolVLM scene descriptions grounded on the detectors' findings, batched generate."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve import vlm
from festival_serve.flow import Ticket
from festival_serve.settings import SceneDescriberSettings
from festival_serve.stages import stage


@serve.deployment
class SceneDescriber(ModelDeployment):
    STAGE = stage("scene_describer")

    def __init__(self, settings: SceneDescriberSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)

    @serve.batch  # sizes and waits: user_config in serve_config.yaml (reconfigure)
    async def describe(self, images: list[np.ndarray], findings: list[vlm.Findings],
                       tickets: list[Ticket]) -> list[str]:
        """Frames and what was found in them → one short description each (one generate call)."""
        # Each item is a (frame, findings) pair, so a retried half keeps every frame with its own findings.
        return await self._run_batch(list(zip(images, findings)), self._describe_pairs, tickets)

    def _describe_pairs(self, pairs: list[tuple[np.ndarray, vlm.Findings]]) -> list[str]:
        return self.model.describe([image for image, _ in pairs], [found for _, found in pairs])

    def _describe_model(self) -> dict:
        return self.model.describe_info()
