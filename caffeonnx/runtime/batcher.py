"""Dynamic batching: concurrent requests share one model run.

Requests queue up; the worker takes the first, then keeps taking queued requests
until `max_batch` rows are gathered or `max_delay` has passed since the first one
arrived, concatenates them along the batch axis, runs the model once in a worker
thread (so the event loop keeps accepting requests meanwhile) and hands each
request its rows of the result.  With batching off every request runs alone,
through the same queue and thread: the fair baseline for the same server.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

_STOP = object()  # queued by stop(): everything before it is still served


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]


class DynamicBatcher:
    """Gathers concurrent requests into model runs of at most `max_batch` rows."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay: float,
        batching: bool = True,
        on_run: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_delay < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay >= 0, got {max_batch} and {max_delay}")
        self._run = run
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.batching = batching
        self._on_run = on_run  # (rows, seconds) after each model run
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._stopping = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="caffeonnx-run")
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker (inside the running event loop)."""
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        if self._worker is not None:
            await self._queue.put(_STOP)
            await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The model's output for `rows` (one request), computed in some batch."""
        if self._worker is None or self._stopping:
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(rows, future))
        return await future

    async def _next(self, timeout: float | None) -> _Pending | None:
        """The carried-over request, else the next queued one; None on timeout or once stopping."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if self._stopping:
            return None
        try:
            if timeout is None:
                got = await self._queue.get()
            elif timeout <= 0:
                got = self._queue.get_nowait()
            else:
                got = await asyncio.wait_for(self._queue.get(), timeout)
        except (asyncio.QueueEmpty, asyncio.TimeoutError):
            return None
        if got is _STOP:
            self._stopping = True
            return None
        return got  # type: ignore[return-value]

    async def _gather(self, first: _Pending) -> list[_Pending]:
        """`first` plus the queued requests that join its batch (up to max_batch rows, within max_delay)."""
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.max_delay
        while self.batching and rows < self.max_batch:
            item = await self._next(deadline - time.monotonic())
            if item is None:
                break
            if rows + len(item.rows) > self.max_batch:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first is None:  # stopping, and nothing carried over
                break
            live = [p for p in await self._gather(first) if not p.future.done()]  # a client may have gone
            if not live:
                continue
            inputs = live[0].rows if len(live) == 1 else np.concatenate([p.rows for p in live])
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, inputs)
            except Exception as exc:  # noqa: BLE001  the model failed: each request of the batch gets the error
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            if self._on_run is not None:
                self._on_run(len(inputs), time.perf_counter() - start)
            offset = 0
            for p in live:
                n = len(p.rows)
                if not p.future.done():
                    p.future.set_result(outputs[offset:offset + n])
                offset += n
