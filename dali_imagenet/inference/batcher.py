"""Dynamic batching for a server: requests that arrive close together share one forward pass.

The first request waiting opens a window of `max_wait_s`; when it closes, or `max_batch` requests
are waiting, up to `max_batch` of them go to the model as one batch, on the one thread that runs
the model (a request that waited while the model was busy has its window closed already: it goes
in the next batch at once). Every batch is padded to exactly `max_batch` rows: a CPU's kernels
(oneDNN) and a GPU's (cuDNN) are chosen by shape, and a row's logits differ in the 8th digit
between a batch of 5 and one of 8 (measured on this project's CPU: ResNet-50, 2 threads), while at
one shape a row never depends on the other rows. With the padding an answer is a function of its
image alone, whatever it was batched with; the price is a whole batch's work for a lone request.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class _Waiting:
    item: torch.Tensor
    arrived: float  # the event loop's clock, s
    answer: asyncio.Future = field(repr=False)


class Batcher:
    """`forward(batch)` (N x ... -> N x ...) over the stacked items, N always `max_batch`.
    `start()` in the running event loop, `await submit(item)` from request handlers, `await
    close()` once no request is left (what is queued is still answered)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float,
                 model_thread: concurrent.futures.Executor):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.forward, self.max_batch, self.max_wait_s = forward, max_batch, max_wait_s
        self.model_thread = model_thread  # one worker: the model runs one batch at a time
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # requests per forward: how often
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, item: torch.Tensor) -> torch.Tensor:
        """`item`'s row of the batch it went in."""
        if self._closing or self._task is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        waiting = _Waiting(item, loop.time(), loop.create_future())
        self.waiting.append(waiting)
        self._wake.set()
        return await waiting.answer

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            deadline = self.waiting[0].arrived + self.max_wait_s
            while len(self.waiting) < self.max_batch and not self._closing and loop.time() < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError on Python 3.10
                    break
            batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
            self.batch_sizes[len(batch)] += 1
            try:
                rows = await loop.run_in_executor(self.model_thread, self._forward, [w.item for w in batch])
            except Exception as error:  # noqa: BLE001 - every request of the batch gets it; the loop goes on
                for waiting in batch:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(error)
                continue
            for waiting, row in zip(batch, rows):
                if not waiting.answer.done():  # its client may have gone
                    waiting.answer.set_result(row)

    def _forward(self, items: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(items)
        if len(items) < self.max_batch:
            batch = torch.cat([batch, batch.new_zeros((self.max_batch - len(items), *batch.shape[1:]))])
        return self.forward(batch)[: len(items)]
