"""Dynamic batching: concurrent requests share one model run.

Requests queue up in arrival order; the worker takes the first and every queued
request that fits, up to `max_batch` rows; if the batch is not full and requests
are on their way (the server announces each one with `expect` while it reads and
parses it) it waits for them, at most until `max_delay` after the first request
arrived (Triton's max queue delay): a lone request never waits; then it concatenates the rows, runs the model once in a worker thread (so the
event loop keeps accepting requests meanwhile) and hands each request its rows of
the result.  Requests also pile up while a run is under way, so under load batches
form even with no delay.  With batching off every request runs alone, through the
same queue and thread: the fair baseline for the same server.  A request of 0 rows
(an empty batch) goes through the same way and gets its 0 rows of the result: the
worker waits for requests, not rows.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float  # loop time
    queued_ns: int = 0  # time.perf_counter_ns() when submitted (the queue time of the statistics)


class DynamicBatcher:
    """Gathers concurrent requests into model runs of at most `max_batch` rows."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay: float,
        batching: bool = True,
        on_run: Callable[[int, float], None] | None = None,
        on_batch: Callable[[int, list[int], tuple[int, int, int]], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_delay < 0:
            raise ValueError(f"max_batch must be >= 1 and max_delay >= 0, got {max_batch} and {max_delay}")
        self._run = run
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.batching = batching
        self._on_run = on_run  # (rows, seconds) after each model run
        # (rows, ns each request answered waited, ns to concatenate / run / hand out) after each successful run
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wake: asyncio.Future[None] | None = None  # resolved when the waiting worker has what it waits for
        self._wake_rows = 0  # rows it waits for; 0: any request, even one of 0 rows (an empty batch)
        self._filling = False  # the worker waits to fill a batch (not for a first request)
        self._incoming = 0  # requests announced with expect() and not yet submitted
        self._stopping = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="caffeonnx-run")
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the worker (inside the running event loop)."""
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Finish every queued request, then stop the worker and its thread."""
        self._stopping = True
        self._notify(force=True)
        if self._worker is not None:
            await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """The model's output for `rows` (one request), computed in some batch."""
        if self._worker is None or self._stopping:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append(_Pending(rows, future, loop.time(), time.perf_counter_ns()))
        self._queued_rows += len(rows)
        self._notify()
        return await future

    def expect(self, count: int) -> None:
        """Announce (+1) a request being received, or withdraw (-1) it once submitted or refused."""
        self._incoming += count
        if self._incoming == 0 and self._filling:
            self._notify(force=True)  # nothing more is coming: run what there is

    def _notify(self, force: bool = False) -> None:
        """Wake the worker if it waits and now has the rows it waits for (or must stop)."""
        wake = self._wake
        if wake is not None and not wake.done() and (force or self._has(self._wake_rows)):
            wake.set_result(None)

    def _has(self, rows: int) -> bool:
        """`rows` rows are queued; 0 rows: a request is queued (counting rows alone, 0-row requests never wake)."""
        return self._queued_rows >= rows if rows > 0 else bool(self._pending)

    async def _wait_for_rows(self, rows: int, timeout: float | None) -> None:
        """Until `rows` rows (0: a request) are queued, `timeout` seconds pass, or stop() is called."""
        if self._has(rows) or self._stopping:
            return
        loop = asyncio.get_running_loop()
        self._wake, self._wake_rows, self._filling = loop.create_future(), rows, timeout is not None
        timer = loop.call_later(timeout, self._notify, True) if timeout is not None else None
        try:
            await self._wake
        finally:
            self._wake, self._filling = None, False
            if timer is not None:
                timer.cancel()

    def _take(self, room: int, batch: list[_Pending]) -> int:
        """Move queued requests that fit in `room` rows into `batch` (in order); returns the rows taken."""
        taken = 0
        while self._pending and (not batch or taken + len(self._pending[0].rows) <= room):
            item = self._pending.popleft()
            n = len(item.rows)
            self._queued_rows -= n
            taken += n
            batch.append(item)
            if not self.batching:
                break
        return taken

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_rows(0, None)
            if not self._pending:  # stopping, and nothing left
                break
            batch: list[_Pending] = []
            rows = self._take(self.max_batch, batch)
            remaining = batch[0].arrived + self.max_delay - loop.time()
            more = self._incoming > 0 and not self._pending  # on their way, and room for them
            if self.batching and rows < self.max_batch and more and remaining > 0:
                await self._wait_for_rows(self.max_batch - rows, remaining)
                rows += self._take(self.max_batch - rows, batch)
            live = [p for p in batch if not p.future.done()]  # a client may have gone away
            if live:
                await self._execute(loop, live)

    async def _execute(self, loop: asyncio.AbstractEventLoop, live: list[_Pending]) -> None:
        """Run the model once on the concatenated requests and hand out the results."""
        began = time.perf_counter_ns()
        inputs = live[0].rows if len(live) == 1 else np.concatenate([p.rows for p in live])
        concatenated = time.perf_counter_ns()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, inputs)
        except Exception as exc:  # noqa: BLE001  the model failed: each request of the batch gets the error
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        ran = time.perf_counter_ns()
        if self._on_run is not None:
            self._on_run(len(inputs), (ran - concatenated) / 1e9)
        offset, waits = 0, []
        for p in live:
            n = len(p.rows)
            if not p.future.done():
                p.future.set_result(outputs[offset:offset + n])
                waits.append(began - p.queued_ns)
            offset += n
        if self._on_batch is not None:
            self._on_batch(len(inputs), waits, (concatenated - began, ran - concatenated, time.perf_counter_ns() - ran))
