"""Dynamic batching: requests that arrive within a few milliseconds share one `generate` call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher already holds `max_queue` waiting requests: the caller should retry later."""


class DynamicBatcher:
    """`await batcher.submit(item)` -> result; the worker groups up to `max_batch` items that arrive
    within `max_wait_ms` of the first and runs `fn(items) -> results` in a thread.

    At most `max_queue` requests wait (QueueFull beyond that). When a batch fails, each of its
    requests is run again alone, so one bad request fails only itself. Requests whose caller has
    given up (a cancelled future) are dropped before they reach the model.
    """

    def __init__(self, fn: Callable[[Sequence[Any]], list[Any]], max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 256) -> None:
        self.fn, self.max_batch, self.max_wait, self.max_queue = fn, max_batch, max_wait_ms / 1000, max_queue
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch_sizes: list[int] = []
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model (not counting the batch being generated)."""
        return self.queue.qsize()

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        # a new event loop (e.g. a test client per request, a restarted server) gets its own worker
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self.queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker())
        if self.queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} requests are already waiting")
        future = loop.create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.done()]  # callers gone: skip
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            self.batch_sizes[:] = self.batch_sizes[-1000:]
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as err:
                if len(batch) == 1:
                    self.failures += 1
                    if not batch[0][1].done():
                        batch[0][1].set_exception(err)
                    continue
                logger.warning("a batch of %d failed (%s: %s); running its requests one by one",
                               len(batch), type(err).__name__, err)
                for item, future in batch:  # isolate the failure: only the bad request fails
                    if future.done():
                        continue
                    try:
                        result = (await asyncio.to_thread(self.fn, [item]))[0]
                    except Exception as one:
                        self.failures += 1
                        if not future.done():
                            future.set_exception(one)
                        continue
                    if not future.done():
                        future.set_result(result)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
