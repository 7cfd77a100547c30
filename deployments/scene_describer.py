"""SceneDescriber: SmolVLM scene descriptions grounded on the detectors' findings, batched generate."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve.serving.autoscaling import TOKENS_IN_FLIGHT, InFlight
from festival_serve.serving.batching import paced_batch
from festival_serve.pipeline.types import Findings, Ticket
from festival_serve.pipeline.settings import SceneDescriberSettings
from festival_serve.pipeline.stages import stage


@serve.deployment
class SceneDescriber(ModelDeployment):
    STAGE = stage("scene_describer")
    BATCHED = "_describe_batch"

    def __init__(self, settings: SceneDescriberSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)
        self.max_new_tokens = settings.max_new_tokens
        self.tokens_in_flight = InFlight()  # the token budget of frames queued or generating: the autoscaler's load

    async def describe(self, image: np.ndarray, findings: Findings, ticket: Ticket) -> str:
        """A frame and what was found in it → one short description."""
        with self.tokens_in_flight.add(self.max_new_tokens):
            return await self._describe_batch(image, findings, ticket)

    # Paced by the model, not @serve.batch: a batch takes seconds here, and every frame that arrives meanwhile must
    # go into the next one (festival_serve.serving.batching.PacedBatcher says why). Sizes and waits: user_config.
    @paced_batch
    async def _describe_batch(self, images: list[np.ndarray], findings: list[Findings],
                              tickets: list[Ticket]) -> list[str]:
        """Frames and what was found in them → one short description each (one generate call)."""
        # Each item is a (frame, findings) pair, so a retried half keeps every frame with its own findings.
        return await self._run_batch(list(zip(images, findings)), self._describe_pairs, tickets)

    def _describe_pairs(self, pairs: list[tuple[np.ndarray, Findings]]) -> list[str]:
        return self.model.describe([image for image, _ in pairs], [found for _, found in pairs])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve samples this for the autoscaler: the describer scales by tokens (GraphMetricPolicy, serve_config.yaml).
        return {TOKENS_IN_FLIGHT: self.tokens_in_flight.total}

    def _model_info(self) -> dict:
        return self.model.model_info()
