"""Running one forward pass over a batch so that a bad item fails alone, and batching paced by the model
(``PacedBatcher``). No Ray import.

A batch that raises is split in halves and each half retried, down to single items: one poisoned
item costs about 2·log2(N) + 1 forward passes and an error for itself only. A CUDA out-of-memory
error takes the same path, after releasing the allocator's cached blocks, so a batch too large for
the memory left on a shared GPU finishes in smaller passes instead of failing; only an item that
still runs out of memory alone is answered with an error.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or any error whose message says "out of memory" (ONNX Runtime,
    TensorRT and CUDA itself report it in their messages). torch is only looked at if already imported."""
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower()


def _release_cached_gpu_memory() -> None:
    torch = sys.modules.get("torch")  # a replica without torch has no torch allocator cache to release
    empty_cache = getattr(getattr(torch, "cuda", None), "empty_cache", None)
    if empty_cache is not None:
        empty_cache()


def run_isolating(work: Callable[[list], list], items: list, *, make_error: Callable[[Exception], Any],
                  is_oom: Callable[[BaseException], bool] = is_out_of_memory, label: str = "batch") -> list:
    """``work(items)`` (one forward pass, one result per item, in order); where it raises, the results of
    its halves, recursively, with ``make_error(exc)`` for a single item that still fails. ``make_error`` is
    called inside the ``except`` block, so it may log the exception with its traceback."""
    if not items:
        return []
    try:
        results = list(work(items))
        if len(results) != len(items):
            raise ValueError(f"{label}: {len(results)} results for {len(items)} items")
        return results
    except Exception as e:  # noqa: BLE001 - every item must get an answer
        oom = is_oom(e)
        if oom:
            _release_cached_gpu_memory()
        if len(items) == 1:
            return [make_error(e)]
        half = len(items) // 2
        logger.warning("%s of %d items failed (%s%s); retrying as %d + %d", label, len(items), type(e).__name__,
                       ", out of memory" if oom else "", half, len(items) - half)
    return (run_isolating(work, items[:half], make_error=make_error, is_oom=is_oom, label=label)
            + run_isolating(work, items[half:], make_error=make_error, is_oom=is_oom, label=label))


# --------------------------------------------------------------------------------------------------
# Batching paced by the model

class PacedBatcher:
    """Dynamic batching in which the model sets the pace: a batch is taken from the queue when the previous one
    has finished, so every call that arrived while the model was busy goes into the next batch (up to
    ``max_batch_size``; Triton's dynamic batcher does the same). An idle model waits for company at most
    ``batch_wait_timeout_s`` after the oldest waiting call arrived.

    Why not ``@serve.batch``: since concurrent batches (ray-project/ray#53096; the Ray pinned here) it forms
    batch n + 1 from the calls of one ``batch_wait_timeout_s`` window while batch n still runs, and only then
    queues it behind its ``max_concurrent_batches`` semaphore. For a model whose batch takes far longer than that window
    (the describer: ~250 ms a frame on 2 CPU cores) every batch is the calls of one short window: measured, 8
    clients in flight and 1.05 frames a batch. Same interface as ``@serve.batch``'s: the decorated async method
    takes one list per argument and returns one result per call; ``set_max_batch_size`` and
    ``set_batch_wait_timeout_s`` change it at run time (a deployment's ``reconfigure``)."""

    def __init__(self, func: Callable[..., Any], *, size_fn: Callable[[tuple], int] | None = None,
                 max_batch_size: int = 1, batch_wait_timeout_s: float = 0.0) -> None:
        self._func = func  # async (one list per argument) -> one result per call
        self._size_fn = size_fn  # a call's weight (e.g. its crops); None: 1
        self._max_batch_size = max_batch_size
        self._wait_s = batch_wait_timeout_s
        self._queue: collections.deque[_Call] = collections.deque()
        # Made on first use, on the event loop that serves the calls (reconfigure may run on another thread).
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None

    def set_max_batch_size(self, max_batch_size: int) -> None:
        self._max_batch_size = max_batch_size

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self._wait_s = seconds

    # The names @serve.batch's wrapper reads them by.
    def _get_max_batch_size(self) -> int:
        return self._max_batch_size

    def _get_batch_wait_timeout_s(self) -> float:
        return self._wait_s

    async def __call__(self, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(args, loop.create_future(), loop.time(), self._size_fn(args) if self._size_fn else 1)
        if call.size > self._max_batch_size:
            raise ValueError(f"a call of size {call.size} is larger than max_batch_size {self._max_batch_size}")
        self._queue.append(call)
        if self._runner is None or self._runner.done():
            self._arrived = asyncio.Event()
            self._runner = loop.create_task(self._run())
        self._arrived.set()
        return await call.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            # Company for a lone call: until the batch is full or the oldest call has waited the timeout (calls
            # that queued behind a running batch have waited long enough already).
            deadline = self._queue[0].arrived + self._wait_s
            while self._queued_size() < self._max_batch_size and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:  # every waiting call was cancelled (its client gave up)
                continue
            try:
                results = await self._func(*(list(column) for column in zip(*(call.args for call in batch))))
                if len(results) != len(batch):
                    raise ValueError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as e:  # noqa: BLE001 - every waiting call gets the error; the runner goes on
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(e)
                continue
            for call, result in zip(batch, results):
                if not call.future.done():  # cancelled meanwhile
                    call.future.set_result(result)

    def _queued_size(self) -> int:
        return sum(call.size for call in self._queue)

    def _take(self) -> list[_Call]:
        """The oldest live calls that fit in one batch (at least one), off the queue."""
        batch, size = [], 0
        while self._queue:
            call = self._queue[0]
            if call.future.done():  # cancelled while it waited
                self._queue.popleft()
                continue
            if batch and size + call.size > self._max_batch_size:
                break
            batch.append(self._queue.popleft())
            size += call.size
        return batch


@dataclass
class _Call:
    args: tuple
    future: asyncio.Future
    arrived: float  # the event loop's clock, s
    size: int


class paced_batch:  # noqa: N801 - used as a decorator, like serve.batch
    """``@paced_batch`` (or ``@paced_batch(size_fn=...)``) on an async method: each instance gets its own
    ``PacedBatcher`` around the method, made on first access (so also on an instance made without
    ``__init__``), behind an ``async def`` that carries its ``set_*`` knobs. ``__wrapped__`` is the method."""

    def __init__(self, func: Callable | None = None, *, size_fn: Callable[[tuple], int] | None = None) -> None:
        self.size_fn = size_fn
        if func is not None:
            self._wrap(func)

    def __call__(self, func: Callable) -> "paced_batch":  # the @paced_batch(size_fn=...) form
        self._wrap(func)
        return self

    def _wrap(self, func: Callable) -> None:
        functools.update_wrapper(self, func)
        self.name = func.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        batcher = PacedBatcher(functools.partial(self.__wrapped__, instance), size_fn=self.size_fn)

        # A real ``async def`` (Serve calls a deployment method by its kind and name), with the batcher's knobs.
        @functools.wraps(self.__wrapped__)
        async def batched(*args: Any) -> Any:
            return await batcher(*args)

        for knob in ("set_max_batch_size", "set_batch_wait_timeout_s", "_get_max_batch_size",
                     "_get_batch_wait_timeout_s"):
            setattr(batched, knob, getattr(batcher, knob))
        instance.__dict__[self.name] = batched  # later lookups find it there, before this descriptor
        return batched
