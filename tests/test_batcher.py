"""Continuous batching (serving/batcher.py), without Ray: a lone request runs at once, requests that
queue while the model is busy run together next, requests still being prepared are waited for, a
batch never exceeds its units, a failing batch fails only its own callers."""

from __future__ import annotations

import asyncio

import pytest

from serving.batcher import Batcher


class Model:
    """Records each batch; each call takes ``seconds``."""

    def __init__(self, seconds: float = 0.05, fail_on: object = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list] = []

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError("bad item")
        return [item * 10 for item in items]


def _batcher(model: Model, max_units: int = 100, wait_s: float = 1.0) -> Batcher:
    return Batcher(model, lambda item: 1, max_units, wait_s)


def test_lone_request_does_not_wait_for_company():
    """With an hour's batch window, a lone request on an idle model still runs at once: had it
    waited for company, the guard below (far shorter than the window) would end the test."""

    async def scenario():
        model = Model(seconds=0)
        batcher = _batcher(model, wait_s=3600.0)
        assert await asyncio.wait_for(batcher.submit(1), timeout=60) == 10
        return model.batches

    assert asyncio.run(scenario()) == [[1]]


def test_requests_queued_behind_a_busy_model_run_as_one_batch():
    async def scenario():
        model = Model(seconds=0.2)
        batcher = _batcher(model)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        return await asyncio.gather(first, *rest), model.batches

    results, batches = asyncio.run(scenario())
    assert results == [10, 20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


def test_idle_model_waits_for_requests_being_prepared():
    async def scenario():
        model = Model(seconds=0)
        batcher = _batcher(model, wait_s=5.0)

        async def request(item: int, preparing_s: float) -> int:
            with batcher.preparing():
                await asyncio.sleep(preparing_s)  # decoding its media
            return await batcher.submit(item)

        return await asyncio.gather(request(1, 0.0), request(2, 0.1), request(3, 0.2)), model.batches

    results, batches = asyncio.run(scenario())
    assert results == [10, 20, 30]
    assert batches == [[1, 2, 3]]


def test_batches_hold_at_most_max_units_in_arrival_order():
    async def scenario():
        model = Model(seconds=0.1)
        batcher = _batcher(model, max_units=3)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 8)]
        await asyncio.gather(first, *rest)
        return model.batches

    assert asyncio.run(scenario()) == [[0], [1, 2, 3], [4, 5, 6], [7]]


def test_a_failing_batch_fails_its_callers_only_and_the_batcher_goes_on():
    async def scenario():
        model = Model(seconds=0.1, fail_on=2)
        batcher = _batcher(model)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)
        failing = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
        outcomes = await asyncio.gather(first, *failing, return_exceptions=True)
        return outcomes, await batcher.submit(4)

    outcomes, later = asyncio.run(scenario())
    assert outcomes[0] == 10
    assert all(isinstance(outcome, ValueError) for outcome in outcomes[1:])
    assert later == 40


def test_a_caller_that_left_is_dropped_from_its_batch():
    async def scenario():
        model = Model(seconds=0.1)
        batcher = _batcher(model)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.02)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await asyncio.gather(first, kept), model.batches

    results, batches = asyncio.run(scenario())
    assert results == [10, 30]
    assert batches == [[1], [3]]


def test_a_full_batch_is_handed_over_while_the_model_works_and_a_partial_one_waits():
    """``ahead=2``: behind a running batch, the next one is handed over at once when it is full
    (its run starts while the first still runs) and waits to fill when it is not."""

    async def scenario(waiting: int):
        started: list[tuple[int, int]] = []  # (batch size, batches running when it started)
        running: list[int] = []

        async def run(items: list) -> list:
            started.append((len(items), len(running)))
            running.append(1)
            await asyncio.sleep(0.3)
            running.pop()
            return [item * 10 for item in items]

        batcher = Batcher(run, lambda item: 1, 2, 1.0, ahead=2)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 1 + waiting)]
        assert await asyncio.gather(first, *rest) == [i * 10 for i in range(1 + waiting)]
        return started

    assert asyncio.run(scenario(waiting=2)) == [(1, 0), (2, 1)]  # full: handed over beside the first
    assert asyncio.run(scenario(waiting=1)) == [(1, 0), (1, 0)]  # partial: after the first was done


def test_quiet_only_while_the_callers_request_is_the_one_here():
    """``quiet`` (asked inside ``preparing``): true for a lone request, false once another is being
    prepared, queued or running beside it."""

    async def scenario() -> list[bool]:
        model = Model(seconds=0.2)
        batcher = _batcher(model, wait_s=0.01)
        seen = []
        with batcher.preparing():
            seen.append(batcher.quiet())  # alone
            with batcher.preparing():
                seen.append(batcher.quiet())  # another one is being prepared
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)
        with batcher.preparing():
            seen.append(batcher.quiet())  # a batch is running
        await running
        with batcher.preparing():
            seen.append(batcher.quiet())  # done: alone again
        return seen

    assert asyncio.run(scenario()) == [True, False, False, True]
