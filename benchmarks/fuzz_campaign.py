"""A longer fuzz campaign with the CI slice's machinery (tests/fuzz.py): more seeds, more mutants.

Records the outcome counts per command, the peak RSS of the worker and every unacceptable outcome
(with the seed that replays it) in benchmarks/results/fuzz_campaign.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from tests.fuzz import describe, mutants, run_mutants, seed_onnx_models, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14])
    ap.add_argument("--count", type=int, default=1500, help="mutants per seed")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz_campaign.json")
    args = ap.parse_args()
    models = seed_onnx_models()
    outcomes, peaks, start = [], [], time.perf_counter()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            got, peak = run_mutants(list(mutants(seed, args.count, models)), Path(tmp), timeout=3600)
        outcomes += got
        peaks.append(peak)
    bad = [describe(o) for o in outcomes if not o.acceptable]
    result = {
        "mutants": len(outcomes),
        "seeds": args.seeds,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()} python {platform.python_version()}",
        "per_command": summary(outcomes),
        "unacceptable": len(bad),
        "unacceptable_examples": bad[:50],
        "worker_peak_rss_mib": max(peaks),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "unacceptable_examples"}, indent=2))


if __name__ == "__main__":
    main()
