"""Dynamic batching on a real event loop: batch composition, carry-over, errors, draining."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from caffeonnx.runtime.batcher import DynamicBatcher
from tests.helpers import rng


class Doubler:
    """A model (y = 2x) that records the rows of every run."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.runs.append(len(x))
        return x * 2


async def _submit_all(batcher: DynamicBatcher, requests: list[np.ndarray]) -> list[np.ndarray]:
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.stop()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batching, max_batch, sizes, runs", [
    (True, 4, [1] * 10, [4, 4, 2]),
    (True, 4, [3, 3, 3], [3, 3, 3]),  # a request that does not fit starts the next batch
    (True, 8, [2, 5, 1, 3], [8, 3]),
    (False, 8, [1] * 5, [1] * 5),
])
def test_concurrent_requests_share_runs_and_get_their_own_rows(seed: int, batching: bool, max_batch: int,
                                                               sizes: list[int], runs: list[int]) -> None:
    model = Doubler()
    batcher = DynamicBatcher(model, max_batch, max_delay=0.05, batching=batching)
    requests = [rng(seed + k).standard_normal((n, 3)).astype(np.float32) for k, n in enumerate(sizes)]
    results = asyncio.run(_submit_all(batcher, requests))
    assert model.runs == runs, f"runs of {model.runs} rows, expected {runs}"
    for k, (req, got) in enumerate(zip(requests, results)):
        np.testing.assert_array_equal(got, req * 2, err_msg=f"request {k} ({len(req)} rows) got another's rows")


def test_a_lone_request_does_not_wait_for_the_delay() -> None:
    async def one() -> float:
        batcher = DynamicBatcher(Doubler(), 64, max_delay=0.5)
        await batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit(np.ones((1, 3), np.float32))
        took = loop.time() - start
        await batcher.stop()
        return took

    took = asyncio.run(one())
    assert took < 0.25, f"a lone request took {took * 1000:.0f} ms; nothing was on its way, so it should not wait"


@pytest.mark.parametrize("arrives_after, runs", [(0.01, [2]), (0.3, [1, 1])])
def test_a_batch_waits_for_announced_requests_up_to_the_delay(arrives_after: float, runs: list[int]) -> None:
    model = Doubler()

    async def scenario() -> None:
        batcher = DynamicBatcher(model, 64, max_delay=0.1)
        await batcher.start()
        batcher.expect(1)  # the server is reading a second request

        async def late() -> np.ndarray:
            await asyncio.sleep(arrives_after)
            batcher.expect(-1)
            return await batcher.submit(np.full((1, 1), 2.0, np.float32))

        first, second = await asyncio.gather(batcher.submit(np.ones((1, 1), np.float32)), late())
        assert (float(first[0, 0]), float(second[0, 0])) == (2.0, 4.0)
        await batcher.stop()

    asyncio.run(scenario())
    assert model.runs == runs, f"runs {model.runs}: a request {arrives_after * 1000:.0f} ms late with a 100 ms delay"


def test_a_withdrawn_announcement_ends_the_wait() -> None:
    model = Doubler()

    async def scenario() -> float:
        batcher = DynamicBatcher(model, 64, max_delay=5.0)
        await batcher.start()
        batcher.expect(1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, batcher.expect, -1)  # that request was refused (a 400): nothing more comes
        start = loop.time()
        await batcher.submit(np.ones((1, 1), np.float32))
        took = loop.time() - start
        await batcher.stop()
        return took

    took = asyncio.run(scenario())
    assert took < 1.0 and model.runs == [1], f"waited {took:.2f} s after the announced request was withdrawn"


def test_model_errors_reach_every_request_of_the_batch() -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError(f"model failed on {len(x)} rows")

    async def run() -> list[object]:
        batcher = DynamicBatcher(broken, 8, max_delay=0.05)
        await batcher.start()
        out = await asyncio.gather(*(batcher.submit(np.ones((1, 2))) for _ in range(3)), return_exceptions=True)
        await batcher.stop()
        return out

    results = asyncio.run(run())
    assert [str(r) for r in results] == ["model failed on 3 rows"] * 3


def test_stop_answers_queued_requests_first() -> None:
    model = Doubler()

    async def run() -> list[np.ndarray]:
        batcher = DynamicBatcher(model, 2, max_delay=0.0)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(np.full((1, 1), k, np.float32))) for k in range(5)]
        await asyncio.sleep(0)  # the submissions are queued
        await batcher.stop()
        return [p.result() for p in pending]

    assert [float(r[0, 0]) for r in asyncio.run(run())] == [0, 2, 4, 6, 8]
    assert sum(model.runs) == 5


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        DynamicBatcher(Doubler(), 0, 0.01)


@pytest.mark.parametrize("batching, sizes, runs", [(True, [2, 5, 1, 3], [(8, 3), (3, 1)]),
                                                   (False, [2, 1], [(2, 1), (1, 1)])])
def test_statistics_get_each_run_and_its_requests(batching: bool, sizes: list[int], runs: list[tuple[int, int]]) -> None:
    """on_batch: rows of each run, one queue wait per request answered, and the three phases of the run."""
    from caffeonnx.runtime.stats import ModelStats

    stats = ModelStats("m")
    seen: list[tuple[int, int]] = []

    def on_batch(rows: int, waits: list[int], phases: tuple[int, int, int]) -> None:
        assert all(w >= 0 for w in waits) and all(p >= 0 for p in phases) and phases[1] > 0
        seen.append((rows, len(waits)))
        stats.on_batch(rows, waits, phases)

    batcher = DynamicBatcher(Doubler(), 8, max_delay=0.05, batching=batching, on_batch=on_batch)
    asyncio.run(_submit_all(batcher, [np.ones((n, 3), np.float32) for n in sizes]))
    assert seen == runs
    body = stats.json()
    assert (body["inference_count"], body["execution_count"]) == (sum(sizes), len(runs))
    assert body["inference_stats"]["queue"]["count"] == body["inference_stats"]["compute_infer"]["count"] == len(sizes)
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in body["batch_stats"]] == \
        sorted((rows, 1) for rows, _ in runs)
