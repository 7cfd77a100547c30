"""What the four model deployments share: loading with honest degradation, batching knobs from
``user_config``, a per-item error convention, and the info that ``/v1/models`` reports."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, Callable, ClassVar

import ray

from festival_serve.serving.public_paths import public_path
from festival_serve.serving.autoscaling import FRAMES_IN_FLIGHT, InFlight
from festival_serve.serving.batching import is_out_of_memory, run_isolating
from festival_serve.runtime.devices import cuda_available
from festival_serve.pipeline.types import StageError, Ticket
from festival_serve.runtime.nvml import process_gpu_memory_bytes
from festival_serve.serving.metrics import record_batch, record_stage_request
from festival_serve.pipeline.serve_config import batch_config
from festival_serve.pipeline.settings import BatchConfig
from festival_serve.pipeline.stages import Stage

logger = logging.getLogger("ray.serve")


def assigned_gpu_fraction() -> float | None:
    """This replica's ``num_gpus`` as Ray assigned it (e.g. 0.2), or None when it holds no GPU share."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return float(share) if share else None


def yield_cpu(niceness: int) -> None:
    """Raise every thread of this process to ``niceness`` (never lower it: unprivileged processes cannot).
    Linux keeps a niceness per thread, and the runtimes' thread pools (ONNX Runtime, torch) were made while
    the model loaded, before Serve hands over ``user_config``: so each existing thread is set, and the
    threads made later inherit it from these."""
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile; a policy that forbids it
            continue


class ModelDeployment:
    """Base of the model deployments. Subclasses set ``STAGE`` (their row of the stage table) and call
    ``_load`` in ``__init__``; the method the table names is the one the ingress calls."""

    STAGE: ClassVar[Stage]
    #: The batched method (``@serve.batch`` or ``@paced_batch``), when the stage's entry method (``STAGE.method``)
    #: only counts the work in flight for the autoscaler and hands over to it; None when the entry method is it.
    BATCHED: ClassVar[str | None] = None

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
        self.request_calls: collections.Counter[int] = collections.Counter()  # calls per Serve request (call_many)
        self.consecutive_failed_batches = 0  # batches in a row in which every item failed; see check_health
        self.expired_items = 0  # items dropped unrun: their deadline passed while they queued
        # Calls accepted and not yet answered, however they were grouped into Serve requests: the detectors'
        # load for the autoscaler (a Serve request may carry several frames, so Serve's own count is too low).
        self.calls_in_flight = InFlight()
        self.batch_config = BatchConfig()
        self.gpu_fraction = assigned_gpu_fraction()
        try:
            self.model = self.STAGE.load(settings, model_store=model_store, gpu_only=gpu_only,
                                         gpu_fraction=self.gpu_fraction)
            self.unavailable: str | None = None
        except self.STAGE.missing_errors() as e:
            # The log gets the loader's message (absolute paths included); clients only the store-relative weights.
            self.model = None
            self.unavailable = f"weights not found in the model store: {public_path(self.weights, model_store)}"
            logger.warning("%s is not serving: %s", self.stage, e)

    def reconfigure(self, user_config: dict | None) -> None:
        # Batch sizes and waits come from the deployment's user_config only: an empty one (or one without a
        # size or wait) fails the deployment with the fix, rather than batching with the decorator's numbers.
        # (Serve skips reconfigure when there is no user_config at all: `festival-serve up` and the cluster
        # commands refuse such a config before it is deployed, festival_serve.pipeline.serve_config.)
        self.batch_config = batch_config(self.STAGE.deployment, user_config)
        batched = getattr(self, self.BATCHED or self.STAGE.method)
        batched.set_max_batch_size(self.batch_config.max_batch_size)
        batched.set_batch_wait_timeout_s(self.batch_config.batch_wait_timeout_s)
        yield_cpu(self.batch_config.niceness)

    async def _run_batch(self, items: list, work: Callable[[list], list], tickets: list[Ticket]) -> list:
        """Run ``work`` (one forward pass: a list of items → one result each, in order) off the event loop, on
        the items whose ``Ticket`` has not expired (one per item; an expired item is answered without being
        computed: nobody is waiting for it). A pass that raises is retried on halves of the batch
        (``festival_serve.serving.batching``), so only an item that fails alone is answered with a ``StageError``."""
        if not items:
            return []
        self.batch_sizes[len(items)] += 1
        if self.model is None:  # the reason is in info(), not in every answer
            return [StageError(self.stage, "model not loaded", "unavailable")] * len(items)
        now = time.time()
        live = [i for i, ticket in enumerate(tickets) if not ticket.expired(now)]
        results: list = [StageError(self.stage, "its deadline passed while it queued at the stage", "timeout")] * len(items)
        self.expired_items += len(items) - len(live)
        record_batch(self.STAGE, [now - ticket.sent_at for ticket in tickets], expired=len(items) - len(live))
        if not live:
            return results
        computed = await asyncio.to_thread(run_isolating, work, [items[i] for i in live],
                                           make_error=self._item_error, label=f"{self.stage} batch")
        for i, result in zip(live, computed):
            results[i] = result
        failed = all(isinstance(result, StageError) for result in computed)
        self.consecutive_failed_batches = self.consecutive_failed_batches + 1 if failed else 0
        return results

    async def call_many(self, calls: list[tuple]) -> list:
        """Several calls of the stage's entry method (``STAGE.method``) in one Serve request: the ingress sends
        the calls that waited for a free request slot together (``festival_serve.serving.coalesce``), since a Serve
        request costs milliseconds of CPU whatever it carries. Each call still goes to the batcher on its
        own, with its own ticket, and gets its own answer, in order. A frame travels as an ``ObjectRef`` inside
        the list, which Ray does not resolve for us: it is fetched here (one copy in the object store, shared
        with the other stage that reads it)."""
        entry = getattr(self, self.STAGE.method)

        async def one(args: tuple):
            try:
                resolved = [await arg if isinstance(arg, ray.ObjectRef) else arg for arg in args]
                return await entry(*resolved)
            except Exception:  # noqa: BLE001 - one call's failure (e.g. its frame was lost) is that call's answer
                logger.exception("%s: a call failed", self.stage)
                return StageError(self.stage, "the stage could not take this frame", "error")

        self.request_calls[len(calls)] += 1
        record_stage_request(self.STAGE, len(calls))
        with self.calls_in_flight.add(len(calls)):
            return list(await asyncio.gather(*(one(args) for args in calls)))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve samples this for the autoscaler: frames in flight (GraphMetricPolicy, serve_config.yaml). The
        # reader and the describer override it with their own weights (crops, tokens).
        return {FRAMES_IN_FLIGHT: self.calls_in_flight.total}

    def _item_error(self, exc: Exception) -> StageError:
        """The answer for an item that failed alone (called inside the ``except``): the traceback goes to the
        log, the client gets a stable code and no exception text."""
        logger.exception("%s: an item failed on its own", self.stage)
        if is_out_of_memory(exc):
            return StageError(self.stage, "out of memory on this item", "error")
        return StageError(self.stage, "the model failed on this item", "error")

    def _model_info(self) -> dict:
        raise NotImplementedError

    def info(self) -> dict:
        model = self._model_info() if self.model is not None else {"weights": self.weights}
        return {
            "stage": self.stage,
            "ready": self.model is not None,
            "gpu_fraction": self.gpu_fraction,
            "gpu_visible": cuda_available(),
            # What the driver says this replica holds on its GPUs (every runtime's arenas and contexts), bytes.
            "process_gpu_memory_bytes": process_gpu_memory_bytes() if cuda_available() else None,
            "unavailable_reason": self.unavailable,
            **model,
            "batch": {**self.batch_config.model_dump(), "observed_sizes": dict(sorted(self.batch_sizes.items())),
                      "observed_request_calls": dict(sorted(self.request_calls.items())),
                      "consecutive_failed": self.consecutive_failed_batches, "expired_items": self.expired_items},
        }

    def check_health(self) -> None:
        # Missing weights are a known, reported state, not a failure: restarting would not fix it. Batches that
        # fail on every item, again and again, point at a broken runtime (a lost CUDA context): a new replica may not.
        if self.consecutive_failed_batches >= self.batch_config.max_consecutive_failed_batches:
            raise RuntimeError(f"{self.stage}: the last {self.consecutive_failed_batches} batches failed on every item")
