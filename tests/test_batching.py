"""A bad item fails alone (``festival_serve.serving.batching``), the deployments' batches keep that promise and count
whole-batch failures for ``check_health``, the reader's crop weighing never raises, batches are paced by the model, and ``/readyz``'s
required stages are names from the stage table. No Ray cluster: the deployments' classes run as plain objects."""

from __future__ import annotations

import asyncio
import collections
import inspect
import sys
import time
import types

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.base import ModelDeployment
from deployments.sign_reader import SignReader, _crop_count
from festival_serve.serving.batching import is_out_of_memory, paced_batch, run_isolating
from festival_serve.pipeline.types import StageError, Ticket
from festival_serve.pipeline.settings import BatchConfig, IngressSettings
from festival_serve.pipeline.stages import STAGE_NAMES

POISON = "poison"


class Work:
    """Doubles each item in one call; a batch holding the poison raises, as a model does on a bad input."""

    def __init__(self, fail=lambda items: POISON in items) -> None:
        self.fail = fail
        self.calls: list[list] = []

    def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        if self.fail(items):
            raise ValueError("/models/secret/path.onnx: bad input")
        return [2 * item for item in items]


def error(exc: Exception) -> tuple:
    return ("error", type(exc).__name__)


class OutOfMemory(RuntimeError):
    pass


@pytest.fixture
def fake_torch(monkeypatch):
    """An imported ``torch`` whose CUDA allocator counts ``empty_cache`` calls."""
    cleared = []
    cuda = types.SimpleNamespace(OutOfMemoryError=OutOfMemory, empty_cache=lambda: cleared.append(True))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    return cleared


def test_one_poisoned_item_among_eight_fails_alone_in_2_log2_n_plus_1_passes():
    items = [1, 2, 3, 4, 5, POISON, 7, 8]
    work = Work()
    results = run_isolating(work, items, make_error=error)
    assert results == [2, 4, 6, 8, 10, ("error", "ValueError"), 14, 16]
    assert len(work.calls) == 7  # the batch, then two halves at each of the 3 levels down to the poison
    assert work.calls[0] == items


@pytest.mark.parametrize("poisoned", [{0}, {3}, {6}, {0, 6}, {1, 2, 4}])
def test_results_keep_order_and_length(poisoned):
    items = [POISON if i in poisoned else i for i in range(7)]
    results = run_isolating(Work(), items, make_error=error)
    assert results == [("error", "ValueError") if i in poisoned else 2 * i for i in range(7)]


def test_when_every_item_fails_each_gets_an_error():
    work = Work(fail=lambda items: True)
    assert run_isolating(work, list(range(8)), make_error=error) == [("error", "ValueError")] * 8
    assert len(work.calls) == 15  # every node of the bisection tree


def test_a_wrong_number_of_results_is_a_failure_not_a_misaligned_answer():
    assert run_isolating(lambda items: items[1:], [1, 2], make_error=error) == [("error", "ValueError")] * 2


def test_out_of_memory_halves_the_batch_until_it_fits_and_marks_nothing_failed(fake_torch):
    def work(items):
        work.sizes.append(len(items))
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [2 * item for item in items]

    work.sizes = []
    assert run_isolating(work, list(range(8)), make_error=error) == [2 * i for i in range(8)]
    assert work.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert len(fake_torch) == 3  # the allocator's cache released after each out-of-memory pass


def test_a_single_item_that_still_runs_out_of_memory_is_an_error(fake_torch):
    def work(items):
        raise OutOfMemory("CUDA error")  # torch.cuda.OutOfMemoryError, whatever its message

    assert run_isolating(work, [1, 2], make_error=error) == [("error", "OutOfMemory")] * 2
    assert is_out_of_memory(OutOfMemory("no words")) and len(fake_torch) == 3


def test_out_of_memory_is_recognised_by_type_or_message_without_importing_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert is_out_of_memory(RuntimeError("[ONNXRuntimeError] : 6 : Out of memory"))
    assert not is_out_of_memory(ValueError("bad shape"))
    assert "torch" not in sys.modules


# -- the deployments' batches ------------------------------------------------------------------------


class Reader:
    """Reads an (h, w, 3) crop as its mean; any other shape makes the whole call raise."""

    def read(self, crops: list[np.ndarray]) -> list[str]:
        if any(crop.ndim != 3 for crop in crops):
            raise ValueError("/models/sign_reader/rec.onnx: expected rank 3")
        return [f"{crop.mean():.0f}" for crop in crops]


def replica(model, cls=SignReader.func_or_class, max_failed: int = 3) -> ModelDeployment:
    """A deployment object as ``_load`` leaves it, without a Ray runtime."""
    deployment = object.__new__(cls)
    deployment.model, deployment.unavailable = model, None if model else "weights missing: /models/x.pt"
    deployment.batch_sizes = collections.Counter()
    deployment.consecutive_failed_batches = 0
    deployment.expired_items = 0
    deployment.batch_config = BatchConfig(max_consecutive_failed_batches=max_failed)
    return deployment


def crop(value: int, ndim: int = 3) -> np.ndarray:
    return np.full((4, 4, 3) if ndim == 3 else (4, 4), value, np.uint8)


def read(deployment, requests: list, tickets: list | None = None) -> list:
    live = Ticket(sent_at=time.time(), deadline=time.time() + 60)
    batched = type(deployment)._read_batch.__wrapped__  # the @serve.batch method's own body: a list of requests
    return asyncio.run(batched(deployment, requests, tickets or [live] * len(requests)))


def test_a_bad_crop_fails_alone_and_its_error_carries_no_exception_text():
    answers = read(replica(Reader()), [[crop(1), crop(2)], [crop(3), crop(0, ndim=2), crop(5)], [crop(6)]])
    assert answers[0] == ["1", "2"] and answers[2] == ["6"]
    assert answers[1][0] == "3" and answers[1][2] == "5"
    failed = answers[1][1]
    assert isinstance(failed, StageError) and failed.stage == "sign_reader" and failed.code == "error"
    assert "/" not in failed.reason and "ValueError" not in failed.reason


def test_a_request_that_is_not_a_list_of_crops_is_answered_with_an_error():
    answers = read(replica(Reader()), [[crop(1)], "not crops", None, [crop(2), "x"]])
    assert answers[0] == ["1"]
    assert all(isinstance(answer, StageError) for answer in answers[1:])


def test_crop_count_never_raises_and_weighs_anything_else_as_one():
    assert _crop_count([[crop(1), crop(2)], []]) == 2
    assert _crop_count([[crop(1)], "garbage", None, 3, [crop(1), "x"], (crop(1),)]) == 6
    assert _crop_count(None) == 1  # not even a list of requests


def test_check_health_fails_after_n_batches_in_a_row_fail_on_every_item_and_a_success_resets():
    deployment = replica(Reader(), max_failed=2)
    read(deployment, [[crop(0, ndim=2)]])
    deployment.check_health()
    read(deployment, [[crop(1)]])  # a success resets the count
    read(deployment, [[crop(0, ndim=2)]])
    deployment.check_health()
    read(deployment, [[crop(1), crop(0, ndim=2)]])  # one item succeeded: not a failed batch
    deployment.check_health()
    read(deployment, [[crop(0, ndim=2)], [crop(0, ndim=2)]])
    read(deployment, [[crop(0, ndim=2)]])
    with pytest.raises(RuntimeError, match="sign_reader: the last 2 batches failed"):
        deployment.check_health()


def test_missing_weights_answer_every_item_without_the_path_and_stay_healthy():
    deployment = replica(None, max_failed=1)
    for _ in range(3):
        answers = read(deployment, [[crop(1), crop(2)]])
    assert answers == [[StageError("sign_reader", "model not loaded", "unavailable")] * 2]
    deployment.check_health()


# -- settings ------------------------------------------------------------------------------------------


def test_required_stages_default_to_the_safety_stages_and_must_be_stage_names():
    assert IngressSettings().required_stages == ["sign_detector", "hazard_cells", "sign_reader"]
    assert IngressSettings(required_stages=[]).required_stages == []
    with pytest.raises(ValidationError) as raised:
        IngressSettings(required_stages=["sign_detector", "lane_keeper"])
    assert "lane_keeper" in str(raised.value) and ", ".join(STAGE_NAMES) in str(raised.value)


def test_crops_whose_deadline_passed_in_the_queue_are_answered_unread():
    reader = Reader()
    stale = Ticket(sent_at=time.time() - 5, deadline=time.time() - 1)
    live = Ticket(sent_at=time.time(), deadline=time.time() + 60)
    deployment = replica(reader)
    answers = read(deployment, [[crop(1), crop(2)], [crop(3)]], [stale, live])
    assert [a.code for a in answers[0]] == ["timeout", "timeout"] and answers[1] == ["3"]
    assert deployment.expired_items == 2


# --------------------------------------------------------------------------------------------------
# PacedBatcher: the next batch is taken when the model is free (the describer's batching)

class SlowModel:
    """Doubles each item; each batch takes ``seconds`` (awaited, as a replica awaits its model's thread)."""

    def __init__(self, seconds: float = 0.05, fail: bool = False) -> None:
        self.seconds, self.fail = seconds, fail
        self.batches: list[list] = []

    @paced_batch
    async def double(self, items: list, tags: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail and POISON in items:
            raise ValueError("bad batch")
        return [(2 * item, tag) for item, tag in zip(items, tags)]


def test_calls_that_arrive_while_a_batch_runs_all_go_into_the_next_batch():
    """@serve.batch would run the eight late calls as the one-window batches they arrived in; paced, the model
    takes all of them (up to max_batch_size) as soon as it is free."""
    model = SlowModel(seconds=0.2)
    # Serve calls a deployment method by its kind and name: it must stay an `async def` called "double".
    assert inspect.iscoroutinefunction(model.double) and model.double.__name__ == "double"
    model.double.set_max_batch_size(16)
    model.double.set_batch_wait_timeout_s(0.0)

    async def scenario():
        first = asyncio.ensure_future(model.double(0, "a"))
        await asyncio.sleep(0.02)  # the first batch is running
        late = []
        for i in range(1, 9):  # arrive one by one, 10 ms apart, while it runs
            late.append(asyncio.ensure_future(model.double(i, f"t{i}")))
            await asyncio.sleep(0.01)
        return await asyncio.gather(first, *late)

    results = asyncio.run(scenario())
    assert results == [(2 * i, "a" if i == 0 else f"t{i}") for i in range(9)]  # each call its own result
    assert model.batches == [[0], list(range(1, 9))]


def test_batches_respect_max_batch_size_and_weigh_calls_by_size_fn():
    class Crops:
        @paced_batch(size_fn=lambda args: len(args[0]))
        async def read(self, requests: list) -> list:
            self.batches.append([len(r) for r in requests])
            await asyncio.sleep(0.01)
            return [len(r) for r in requests]

    crops = Crops()
    crops.batches = []
    crops.read.set_max_batch_size(5)
    crops.read.set_batch_wait_timeout_s(0.5)  # long enough that the queue is full before a batch is taken

    async def scenario():
        return await asyncio.gather(*(crops.read(["c"] * n) for n in (2, 2, 2, 3, 1)))

    assert asyncio.run(scenario()) == [2, 2, 2, 3, 1]
    assert crops.batches == [[2, 2], [2, 3], [1]]  # 4 <= 5, then 2 + 3 = 5, then what is left
    with pytest.raises(ValueError, match="larger than max_batch_size"):
        asyncio.run(crops.read(["c"] * 6))


def test_a_lone_call_waits_for_company_only_up_to_the_timeout():
    model = SlowModel(seconds=0.0)
    model.double.set_max_batch_size(8)
    model.double.set_batch_wait_timeout_s(0.3)

    async def scenario():
        first = asyncio.ensure_future(model.double(1, "a"))
        await asyncio.sleep(0.05)  # within the wait: joins the first call's batch
        second = asyncio.ensure_future(model.double(2, "b"))
        await asyncio.gather(first, second)
        await asyncio.sleep(0.01)
        return await model.double(3, "c")  # alone: answered once its wait has passed

    asyncio.run(scenario())
    assert model.batches == [[1, 2], [3]]


def test_a_failed_batch_answers_each_of_its_calls_with_the_error_and_the_next_batch_still_runs():
    model = SlowModel(seconds=0.01, fail=True)
    model.double.set_max_batch_size(4)
    model.double.set_batch_wait_timeout_s(0.05)

    async def scenario():
        failed = await asyncio.gather(model.double(POISON, "x"), model.double(1, "y"), return_exceptions=True)
        return failed, await model.double(5, "z")

    failed, after = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) for e in failed) and after == (10, "z")


def test_a_call_cancelled_while_it_queues_is_never_run():
    model = SlowModel(seconds=0.1)
    model.double.set_max_batch_size(8)

    async def scenario():
        running = asyncio.ensure_future(model.double(1, "a"))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(model.double(2, "b"))
        kept = asyncio.ensure_future(model.double(3, "c"))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client gave up (the ingress cancels a call past its budget)
        return await asyncio.gather(running, kept)

    assert asyncio.run(scenario()) == [(2, "a"), (6, "c")]
    assert model.batches == [[1], [3]]
