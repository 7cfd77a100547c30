"""SignReader: PP-OCR text detection + recognition on sign crops, batched by crop count across
requests (a request with five signs weighs five in the batch)."""

from __future__ import annotations

import logging

import numpy as np
from ray import serve

from deployments.base import ModelDeployment
from festival_serve.serving.autoscaling import CROPS_IN_FLIGHT, InFlight
from festival_serve.serving.batching import paced_batch
from festival_serve.pipeline.types import SignText, StageError, Ticket
from festival_serve.pipeline.settings import SignReaderSettings
from festival_serve.pipeline.stages import stage

logger = logging.getLogger("ray.serve")


def _is_crop_list(request: object) -> bool:
    """What ``read`` can read: a list of arrays (their shapes are the model's to judge, one crop at a time)."""
    return isinstance(request, list) and all(isinstance(crop, np.ndarray) for crop in request)


def _crop_count(requests: list) -> int:
    """Requests' weight in a batch: their number of crops. Never raises (it weighs every call as it arrives; with
    ``@serve.batch`` an exception here stopped the batching loop, Ray issue 66140). A request that is not a
    list of crops weighs 1, and ``read`` answers it with an error."""
    try:
        total = 0
        for request in requests:
            if _is_crop_list(request):
                total += len(request)
            else:
                logger.warning("sign_reader: a request of type %s is not a list of crops; it weighs 1",
                               type(request).__name__)
                total += 1
        return total
    except Exception:  # noqa: BLE001 - see above
        logger.exception("sign_reader: could not weigh a batch; it weighs 1")
        return 1


@serve.deployment
class SignReader(ModelDeployment):
    STAGE = stage("sign_reader")
    BATCHED = "_read_batch"

    def __init__(self, settings: SignReaderSettings, model_store: str, gpu_only: bool = False) -> None:
        self._load(settings, model_store, gpu_only)
        self.crops_in_flight = InFlight()  # queued or being read: this replica's load for the autoscaler

    async def read(self, crops: list[np.ndarray], ticket: Ticket) -> list[SignText] | StageError:
        """The (h, w, 3) uint8 RGB crops of one frame's signs → their text, in order (a crop that fails alone
        gets a ``StageError``); a request that is not a list of crops gets one ``StageError``."""
        with self.crops_in_flight.add(_crop_count([crops])):
            return await self._read_batch(crops, ticket)

    # Paced by the model (festival_serve.serving.batching), weighed in crops; sizes and waits: user_config (reconfigure).
    @paced_batch(size_fn=lambda call: _crop_count(call[:1]))
    async def _read_batch(self, requests: list[list[np.ndarray]],
                          tickets: list[Ticket]) -> list[list[SignText] | StageError]:
        readable = [_is_crop_list(request) for request in requests]
        counts = [len(request) if ok else 0 for request, ok in zip(requests, readable)]
        flat = [crop for request, ok in zip(requests, readable) if ok for crop in request]
        crop_tickets = [ticket for ticket, count in zip(tickets, counts) for _ in range(count)]  # one per crop
        texts = _split(await self._run_batch(flat, lambda crops: self.model.read(crops), crop_tickets), counts)
        unreadable = StageError(self.stage, "not a list of crops", "error")
        return [text if ok else unreadable for text, ok in zip(texts, readable)]

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve samples this for the autoscaler: the reader scales by crops (GraphMetricPolicy, serve_config.yaml).
        return {CROPS_IN_FLIGHT: self.crops_in_flight.total}

    def _model_info(self) -> dict:
        return self.model.model_info()


def _split(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out
