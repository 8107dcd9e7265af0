"""Dynamic batching: requests that arrive within a few milliseconds share one `generate` call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any


class DynamicBatcher:
    """`await batcher.submit(item)` -> result; the worker groups up to `max_batch` items that arrive
    within `max_wait_ms` of the first and runs `fn(items) -> results` in a thread."""

    def __init__(self, fn: Callable[[Sequence[Any]], list[Any]], max_batch: int = 8, max_wait_ms: float = 10.0) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batch_sizes: list[int] = []
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        # a new event loop (e.g. a test client per request, a restarted server) gets its own worker
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self.queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
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
            self.batch_sizes.append(len(batch))
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as err:  # every waiter learns of the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
