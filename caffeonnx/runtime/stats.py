"""Per-model inference statistics in the format of Triton's statistics extension.

GET /v2/models[/NAME[/versions/1]]/stats answers {"model_stats": [...]} as Triton
does, so `tritonclient.http.InferenceServerClient.get_inference_statistics` (and
perf_analyzer, dashboards that poll it) work against `caffeonnx serve`.  What each
number counts, as Triton's core counts it:

- success / fail: requests to this model answered with 200 / with an error (4xx, 5xx;
  not 404, which names another model or version, nor clients gone before an answer),
  and their time from the first byte of the body being read to the response sent;
- queue: per request, the wait from being handed to the batcher to its batch starting;
- compute_input / compute_infer / compute_output: per request, the phases of the model
  run its rows went through (concatenating the batch, the ONNX Runtime run, handing out
  each request's rows), so a batch of k requests adds k counts of the batch's durations;
- inference_count: rows computed (a request of 64 rows counts 64); execution_count:
  model runs; batch_stats: per batch size, the count and durations of the runs;
- last_inference: milliseconds since the epoch when the last successful request ended.

Everything is updated and read on the event loop's thread: no locks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    """A Triton StatisticDuration: how many times, and nanoseconds in all."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, times: int = 1) -> None:
        self.count += times
        self.ns += ns * times

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _BatchSize:
    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})


class ModelStats:
    """The cumulative statistics of one served model version."""

    def __init__(self, name: str, version: str = "1") -> None:
        self.name, self.version = name, version
        self.success, self.fail, self.queue = Duration(), Duration(), Duration()
        self.phases = {p: Duration() for p in PHASES}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, _BatchSize] = {}

    def on_batch(self, rows: int, waits_ns: list[int], phases_ns: tuple[int, int, int]) -> None:
        """A model run of `rows` rows for requests that waited `waits_ns` each, in (input, infer, output) ns."""
        self.execution_count += 1
        self.inference_count += rows
        for wait in waits_ns:
            self.queue.add(wait)
        per_size = self._batches.setdefault(rows, _BatchSize())
        for phase, ns in zip(PHASES, phases_ns):
            self.phases[phase].add(ns, len(waits_ns))
            per_size.phases[phase].add(ns)

    def on_request(self, status: int, seconds: float) -> None:
        """An infer request answered with HTTP `status` after `seconds`."""
        if status == 200:
            self.success.add(round(seconds * 1e9))
            self.last_inference_ms = time.time_ns() // 1_000_000
        elif status not in (404, 499):
            self.fail.add(round(seconds * 1e9))

    def json(self) -> dict:
        """One $model_stat object of the statistics extension."""
        return {
            "name": self.name, "version": self.version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": self.success.json(), "fail": self.fail.json(), "queue": self.queue.json(),
                                **{p: d.json() for p, d in self.phases.items()},
                                "cache_hit": Duration().json(), "cache_miss": Duration().json()},
            "batch_stats": [{"batch_size": size, **{p: d.json() for p, d in b.phases.items()}}
                            for size, b in sorted(self._batches.items())],
            "memory_usage": [], "response_stats": {},  # newer Triton's fields: no memory reports, no decoupled models
        }
