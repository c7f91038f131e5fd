"""Continuous batching for a replica whose model runs one call at a time, or a few side by side.

Requests queue while the model is busy; when it is free, everything queued (up to ``max_units``)
runs as the next batch. A request that finds the model idle runs at once, unless other requests
have reached the replica and are still being prepared (their media decoded): then it waits for
those, at most ``wait_s``, so that requests sent together run together. A full batch can be handed
over while the model still works on the last one (``ahead``), so that the model starts it the
moment it is free instead of when the event loop gets round to it; a partial one waits, to fill.

Why not ``@serve.batch``: its window opens at the first request and is waited out whenever the
batch is not full, so a lone request always paid the whole ``batch_wait_timeout_s`` (10 ms of a
~140 ms request at concurrency 1), and under load a batch held only what arrived within the window
while the previous batch ran, not everything that queued up behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """``await submit(item)`` -> that item's result from ``run(batch)`` (one result per item, in
    order). ``size(item)``: its batch units; a batch holds at most ``max_units`` (and at least one
    item). ``ahead``: batches handed to ``run`` at once; beyond the first, only full ones, for a
    ``run`` that queues them for the model's threads (the next call is at hand the moment a thread
    is free: ``serving/threads.py``). Each replica (one event loop) owns its batchers; they are created
    inside it."""

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Result]]],
        size: Callable[[Item], int],
        max_units: int,
        wait_s: float,
        ahead: int = 1,
    ) -> None:
        self.run = run
        self.size = size
        self.max_units = max_units
        self.wait_s = wait_s
        self.ahead = ahead
        self._running: set[asyncio.Task] = set()  # batches handed to ``run``, not yet done
        self._queue: list[tuple[Item, asyncio.Future]] = []
        self._preparing = 0  # requests in the replica that will be submitted once prepared
        self._changed = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Wrap a request's preparation before :meth:`submit`: an idle model waits for it (up to
        ``wait_s``) instead of starting a batch without it."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            self._changed.set()

    def quiet(self) -> bool:
        """Inside :meth:`preparing`: whether the caller's is the only request here (nothing queued,
        running or being prepared beside it), so that it can run at once without costing a batch.
        Also read from a model thread (``serving.worker``'s idle path): a moment's answer there."""
        return not self._queue and not self._running and self._preparing <= 1

    async def submit(self, item: Item) -> Result:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._changed.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        while self._queue:
            self._changed.clear()
            if self._running:
                # a batch is already handed over: the next goes too only when it is full (a partial
                # one waits to fill while the model works) and the model takes one more
                if len(self._running) >= self.ahead or self._queued_units() < self.max_units:
                    await self._changed.wait()  # a batch done, or the queue grew
                    continue
            else:
                await self._gather_company()
            batch = self._take()
            if batch:
                task = asyncio.create_task(self._run_batch(batch))
                self._running.add(task)
                task.add_done_callback(self._batch_done)

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
        except Exception as error:  # the batch's callers see the failure; the batcher goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _batch_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._changed.set()

    async def _gather_company(self) -> None:
        """While requests are still being prepared and the batch is not full, wait for them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self._preparing and self._queued_units() < self.max_units:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _queued_units(self) -> int:
        return sum(self.size(item) for item, _ in self._queue)

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        """The oldest queued requests that fit ``max_units`` (at least one); cancelled ones (their
        caller left) are dropped."""
        self._queue = [(item, future) for item, future in self._queue if not future.cancelled()]
        batch, units = [], 0
        while self._queue:
            units += self.size(self._queue[0][0])
            if batch and units > self.max_units:
                break
            batch.append(self._queue.pop(0))
        return batch
