"""The ingress's call coalescer (festival_serve.serving.coalesce): calls made together travel as one request."""

from __future__ import annotations

import asyncio

import pytest

from festival_serve.serving.coalesce import CallCoalescer


class Stage:
    """Answers each call's argument doubled, after ``delay_s``; records every group it was sent."""

    def __init__(self, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.groups: list[list[tuple]] = []
        self.delay_s, self.error = delay_s, error
        self.cancelled = 0

    def send_many(self, calls: list[tuple]) -> "Request":
        self.groups.append(calls)
        return Request(self, calls)


class Request:
    """Stands where a Serve response stands: awaitable, with ``cancel``."""

    def __init__(self, stage: Stage, calls: list[tuple]) -> None:
        self.task = asyncio.ensure_future(self._answer(stage, calls))
        self.stage = stage

    async def _answer(self, stage: Stage, calls: list[tuple]) -> list:
        await asyncio.sleep(stage.delay_s)
        if stage.error is not None:
            raise stage.error
        return [2 * x for (x,) in calls]

    def cancel(self) -> None:
        self.stage.cancelled += 1
        self.task.cancel()

    def __await__(self):
        return self.task.__await__()


def run(coroutine):
    return asyncio.run(coroutine)


def test_calls_made_in_the_same_turn_go_as_one_request_and_each_gets_its_own_answer():
    async def scenario():
        stage = Stage()
        call = CallCoalescer(stage.send_many, max_calls=16, max_requests=4)
        answers = await asyncio.gather(*(call(i) for i in range(5)))
        later = await call(10)  # alone: not held back for company
        return stage, answers, later

    stage, answers, later = run(scenario())
    assert answers == [0, 2, 4, 6, 8]
    assert later == 20
    assert [len(group) for group in stage.groups] == [5, 1]


def test_calls_made_while_the_requests_in_flight_are_at_the_cap_wait_and_leave_together():
    async def scenario():
        stage = Stage(delay_s=0.05)
        call = CallCoalescer(stage.send_many, max_calls=16, max_requests=1)
        first = call(1)
        await asyncio.sleep(0.01)  # the first request is out: these wait for it to answer
        waiting = [call(i) for i in (2, 3, 4)]
        await asyncio.sleep(0.01)
        assert len(stage.groups) == 1
        return stage, await first, await asyncio.gather(*waiting)

    stage, first, waiting = run(scenario())
    assert (first, waiting) == (2, [4, 6, 8])
    assert stage.groups == [[(1,)], [(2,), (3,), (4,)]]


def test_a_failed_request_frees_its_slot_for_the_calls_that_wait():
    async def scenario():
        stage = Stage(delay_s=0.02, error=RuntimeError("replica lost"))
        call = CallCoalescer(stage.send_many, max_calls=16, max_requests=1)
        answers = await asyncio.gather(call(1), *(_later(call, i) for i in (2, 3)), return_exceptions=True)
        return stage, answers

    stage, answers = run(scenario())
    assert all(isinstance(a, RuntimeError) for a in answers)
    assert [len(group) for group in stage.groups] == [1, 2]


async def _later(call, value):
    await asyncio.sleep(0.005)
    return await call(value)


def test_a_group_never_exceeds_max_calls_and_max_calls_1_sends_each_call_alone():
    async def scenario(max_calls: int):
        stage = Stage()
        call = CallCoalescer(stage.send_many, max_calls=max_calls, max_requests=4)
        answers = await asyncio.gather(*(call(i) for i in range(7)))
        return stage, answers

    stage, answers = run(scenario(3))
    assert answers == [0, 2, 4, 6, 8, 10, 12]
    assert [len(group) for group in stage.groups] == [3, 3, 1]
    stage, _ = run(scenario(1))
    assert [len(group) for group in stage.groups] == [1] * 7
    with pytest.raises(ValueError, match="max_calls"):
        CallCoalescer(stage.send_many, max_calls=0, max_requests=1)
    with pytest.raises(ValueError, match="max_requests"):
        CallCoalescer(stage.send_many, max_calls=1, max_requests=0)


def test_a_failed_request_fails_every_call_in_it_with_the_same_error():
    class Full(Exception):
        pass

    async def scenario():
        call = CallCoalescer(Stage(error=Full("queue full")).send_many, max_calls=16, max_requests=4)
        return await asyncio.gather(*(call(i) for i in range(3)), return_exceptions=True)

    answers = run(scenario())
    assert len(answers) == 3 and all(isinstance(a, Full) and str(a) == "queue full" for a in answers)


def test_a_cancelled_call_leaves_its_group_and_the_request_is_cancelled_when_nobody_waits():
    async def scenario():
        stage = Stage(delay_s=0.2)
        call = CallCoalescer(stage.send_many, max_calls=16, max_requests=4)
        first, second = call(1), call(2)
        first.cancel()  # before the group left: it never travels
        assert await second == 4
        lone = call(3)  # its caller gives up while the request runs: the request is cancelled too
        await asyncio.sleep(0.01)
        lone.cancel()
        await asyncio.sleep(0.05)
        return stage

    stage = run(scenario())
    assert stage.groups == [[(2,)], [(3,)]]
    assert stage.cancelled == 1


def test_a_request_that_answers_the_wrong_number_of_calls_fails_them():
    async def scenario():
        call = CallCoalescer(lambda calls: _answer([1]), max_calls=16, max_requests=4)
        return await asyncio.gather(call(1), call(2), return_exceptions=True)

    answers = run(scenario())
    assert all(isinstance(a, RuntimeError) and "1 of 2" in str(a) for a in answers)


async def _answer(value):
    return value
