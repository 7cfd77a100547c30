"""A stage's calls from the ingress, sent as few, large Serve requests under load.

A Serve handle call costs milliseconds of CPU on each side, whatever it carries (the router, the request's
metadata, the actor task, the replica's bookkeeping: 2-3.5 ms in the caller and 1.8-3 ms in the replica on
the 2-core bench machine, a quarter of that per call when four travel as one: festival_serve.measure.bench.call_cost). So
the ingress keeps at most a few requests in flight to each stage; while they are out, the frames' calls to
the stage wait, and leave together as one request when one answers: the requests grow with the load instead
of multiplying, and the replica still hands each call to its batcher on its own
(``ModelDeployment.call_many``). A call made while fewer requests are out is not held back for company: it
leaves at the event loop's next turn, with whatever other calls were made in the same turn.

No Ray import: ``send_many`` is any callable taking the calls' argument tuples and returning an awaitable of
their results in order (a Serve response, whose ``cancel`` stops the request when no caller still waits).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

SendMany = Callable[[list[tuple]], Awaitable[list]]


class CallCoalescer:
    """``coalescer(*args)`` → a future of that call's result. At most ``max_requests`` requests are in flight at
    once; while they are, new calls wait here, and leave together (at most ``max_calls`` a request) as soon as
    one answers. So a call made while nothing is in flight leaves at the event loop's next turn, and under load
    the requests grow with the queue instead of multiplying. A failure of the request (a full queue, a lost
    replica) is every call's failure; a call cancelled before it leaves is dropped, and a request whose callers
    all gave up is cancelled (which frees its slot)."""

    def __init__(self, send_many: SendMany, *, max_calls: int, max_requests: int) -> None:
        if max_calls < 1 or max_requests < 1:
            raise ValueError(f"max_calls and max_requests must be >= 1, got {max_calls} and {max_requests}")
        self.send_many = send_many
        self.max_calls, self.max_requests = max_calls, max_requests
        self._waiting: list[tuple[tuple, asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # requests in flight (strong references: the loop keeps weak ones)
        self._flush_due = False

    def __call__(self, *args: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((args, future))
        self._schedule_flush()
        return future

    def _schedule_flush(self) -> None:
        # At the next turn, after every callback already ready in this one has made its calls.
        if self._waiting and not self._flush_due and len(self._sending) < self.max_requests:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self._waiting = [(args, future) for args, future in self._waiting if not future.done()]
        while self._waiting and len(self._sending) < self.max_requests:
            group, self._waiting = self._waiting[: self.max_calls], self._waiting[self.max_calls :]
            task = asyncio.ensure_future(self._send(group))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        self._schedule_flush()

    async def _send(self, group: list[tuple[tuple, asyncio.Future]]) -> None:
        futures = [future for _, future in group]
        try:
            pending = self.send_many([args for args, _ in group])
        except Exception as e:  # noqa: BLE001 - e.g. a handle that cannot route: each caller gets the error
            _fail(futures, e)
            return
        cancel = getattr(pending, "cancel", None)
        if cancel is not None:
            def abandon_if_unwanted(_: asyncio.Future) -> None:
                if all(future.cancelled() for future in futures):
                    cancel()

            for future in futures:
                future.add_done_callback(abandon_if_unwanted)
        try:
            results = await pending
        except asyncio.CancelledError:  # the ingress is shutting down: its callers get an answer, not silence
            _fail(futures, asyncio.TimeoutError("the stage call was cancelled"))
            raise
        except Exception as e:  # noqa: BLE001 - each caller maps it (festival_serve.serving.flow._stage_failure)
            _fail(futures, e)
            return
        if len(results) != len(futures):
            _fail(futures, RuntimeError(f"the stage answered {len(results)} of {len(futures)} calls"))
            return
        for future, result in zip(futures, results):
            if not future.done():
                future.set_result(result)


def _fail(futures: list[asyncio.Future], error: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)
