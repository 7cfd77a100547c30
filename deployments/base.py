"""What the four model deployments share: loading with honest degradation, batching knobs from
``user_config``, a per-item error convention, and the info that ``/v1/models`` reports."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable, ClassVar

import ray

from festival_serve.api import StageError
from festival_serve.devices import cuda_available
from festival_serve.gpu_share import process_gpu_memory_bytes
from festival_serve.settings import BatchConfig
from festival_serve.stages import Stage

logger = logging.getLogger("ray.serve")


def assigned_gpu_fraction() -> float | None:
    """This replica's ``num_gpus`` as Ray assigned it (e.g. 0.2), or None when it holds no GPU share."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return float(share) if share else None


class ModelDeployment:
    """Base of the model deployments. Subclasses set ``STAGE`` (their row of the stage table) and call
    ``_load`` in ``__init__``; the batched method is the one the table names."""

    STAGE: ClassVar[Stage]

    @property
    def stage(self) -> str:
        return self.STAGE.name

    def _load(self, settings: Any, model_store: str, gpu_only: bool) -> None:
        """Load the model. Missing weights leave the deployment running but unavailable (every answer
        says why); any other failure (a corrupt checkpoint, a missing GPU runtime, GPU-only refusal)
        fails the deployment at once with the loader's message."""
        weights = self.STAGE.weights(settings)
        self.weights = str(weights) if weights else "bundled"
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.batch_config = BatchConfig()
        self.gpu_fraction = assigned_gpu_fraction()
        try:
            self.model = self.STAGE.load(settings, model_store=model_store, gpu_only=gpu_only,
                                         gpu_fraction=self.gpu_fraction)
            self.unavailable: str | None = None
        except self.STAGE.missing_errors() as e:
            self.model, self.unavailable = None, str(e)
            logger.warning("%s is not serving: %s", self.stage, e)

    def reconfigure(self, user_config: dict) -> None:
        self.batch_config = BatchConfig.model_validate(user_config or {})
        batched = getattr(self, self.STAGE.method)
        batched.set_max_batch_size(self.batch_config.max_batch_size)
        batched.set_batch_wait_timeout_s(self.batch_config.batch_wait_timeout_s)

    async def _run_batch(self, size: int, work: Callable[[], list]) -> list:
        """Run ``work`` (one forward pass over the whole batch) off the event loop; on failure answer
        every item with a ``StageError`` instead of failing the requests."""
        self.batch_sizes[size] += 1
        if self.model is None:
            return [StageError(self.stage, f"model not loaded: {self.unavailable}")] * size
        try:
            results = await asyncio.to_thread(work)
        except Exception as e:  # noqa: BLE001 - every request must get an answer
            logger.exception("%s batch of %d failed", self.stage, size)
            return [StageError(self.stage, f"{type(e).__name__}: {e}")] * size
        assert len(results) == size, f"{self.stage} returned {len(results)} results for {size} items"
        return results

    def _describe_model(self) -> dict:
        raise NotImplementedError

    def info(self) -> dict:
        model = self._describe_model() if self.model is not None else {"weights": self.weights}
        return {
            "stage": self.stage,
            "ready": self.model is not None,
            "gpu_fraction": self.gpu_fraction,
            "gpu_visible": cuda_available(),
            # What the driver says this replica holds on its GPUs (every runtime's arenas and contexts), bytes.
            "process_gpu_memory_bytes": process_gpu_memory_bytes() if cuda_available() else None,
            "unavailable_reason": self.unavailable,
            **model,
            "batch": {**self.batch_config.model_dump(), "observed_sizes": dict(sorted(self.batch_sizes.items()))},
        }

    def check_health(self) -> None:
        # Missing weights are a known, reported state, not a failure: restarting would not fix it.
        return None
