"""Dynamic batching: concurrent requests gathered into one forward, the results scattered back.

One collector task per worker process takes the first queued request, then everything else already
queued, and waits up to `max_wait_ms` for more only while other requests have arrived but are not
queued yet (still being read or parsed). A lone user therefore never waits, and under load a batch
fills while the previous one runs. The forward runs in one thread beside the event loop (torch
releases the GIL), through `Model.predict` / `Model.predict_proba`: the one forward path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Batcher"]


@dataclass
class _Item:
    x: np.ndarray
    probabilities: bool
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(
        self,
        model: Any,
        *,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] = lambda rows: None,
    ) -> None:
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1e3
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.arriving = 0  # requests received but not queued yet: worth waiting for
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hpcml-forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=True)

    async def submit(self, x: np.ndarray, *, probabilities: bool) -> np.ndarray:
        """The model's output for rows `x` (predict, or predict_proba), computed in some batch."""
        item = _Item(x, probabilities, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(item)
        return await item.future

    async def _gather(self) -> list[_Item]:
        batch = [await self.queue.get()]
        rows = len(batch[0].x)
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch:
            if self.queue.empty():
                left = deadline - time.perf_counter()
                if self.arriving <= 0 or left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            if rows + len(item.x) > self.max_batch:
                self.queue.put_nowait(item)  # too big for this batch: back in the queue for the next
                break
            batch.append(item)
            rows += len(item.x)
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            batch = [i for i in batch if not i.future.done()]  # the client went away: skip its rows
            if not batch:
                continue
            try:
                outs = await loop.run_in_executor(self._pool, self._forward, batch)
            except Exception as err:  # one bad batch fails its requests, never the collector
                for i in batch:
                    if not i.future.done():
                        i.future.set_exception(err)
                continue
            for i, out in zip(batch, outs, strict=True):
                if not i.future.done():
                    i.future.set_result(out)

    def _forward(self, batch: list[_Item]) -> list[np.ndarray]:
        """One forward per kind of output asked for (predict, predict_proba), split back per request."""
        self.on_batch(sum(len(i.x) for i in batch))
        outs: list[np.ndarray | None] = [None] * len(batch)
        for proba in (False, True):
            idx = [k for k, i in enumerate(batch) if i.probabilities is proba]
            if not idx:
                continue
            x = np.concatenate([batch[k].x for k in idx])
            kw = {"batch_size": self.max_batch}  # one forward per batch, as --max-batch documents
            y = self.model.predict_proba(x, **kw) if proba else self.model.predict(x, **kw)
            bounds = np.cumsum([0] + [len(batch[k].x) for k in idx])
            for k, a, b in zip(idx, bounds[:-1], bounds[1:], strict=True):
                outs[k] = y[a:b]
        return outs  # type: ignore[return-value]
