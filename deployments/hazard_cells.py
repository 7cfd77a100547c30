"""HazardCells: YOLIC-M2 multi-label hazard classification of the outdoor cell layout, batched."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve.serving.batching import paced_batch
from festival_serve.pipeline.types import HazardCell, Ticket
from festival_serve.pipeline.settings import HazardCellsSettings
from festival_serve.pipeline.stages import stage


@serve.deployment
class HazardCells(ModelDeployment):
    STAGE = stage("hazard_cells")

    def __init__(self, settings: HazardCellsSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)

    @paced_batch  # paced by the model (festival_serve.serving.batching); sizes and waits: user_config (reconfigure)
    async def classify(self, images: list[np.ndarray], tickets: list[Ticket]) -> list[list[HazardCell]]:
        """(H, W, 3) uint8 RGB frames → the cells flagged with hazards in each."""
        return await self._run_batch(images, lambda batch: self.model.classify(batch), tickets)

    def _model_info(self) -> dict:
        return self.model.model_info()
