"""A bounded, seeded fuzz slice in CI: mutants of real fixtures through every file-reading command.

Every outcome must be exit 0, or one `error:` line with exit 2 (1: verify found differences), never
a traceback, never a hidden temp file or (after a failure) any output left behind, and the worker's
memory stays bounded.  benchmarks/fuzz_campaign.py runs the same machinery for longer and records it.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffeonnx.converter.caffe_to_onnx import convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.registry import supported_layers
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from tests.fuzz import describe, mutants, run_mutants, seed_onnx_models, summary

COUNT = 300  # about a minute on a 2-core machine


def test_fuzzed_files_get_one_line_or_success(tmp_path: Path) -> None:
    outcomes, peak_mib = run_mutants(list(mutants(seed=2026, count=COUNT, onnx_models=seed_onnx_models())), tmp_path)
    bad = [describe(o) for o in outcomes if not o.acceptable]
    assert not bad, f"{len(bad)} of {len(outcomes)} mutants misbehaved ({summary(outcomes)}):\n" + "\n".join(bad[:10])
    assert peak_mib < 3072, f"the worker peaked at {peak_mib} MiB"
    codes = {o.code for o in outcomes}
    assert 0 in codes and 2 in codes, "the slice exercises both outcomes"


# Property: any layer type with any number of bottoms and tops, fed by blobs of any small shape, either
# converts or is refused with a CaffeOnnxError — never another exception from inside a handler.
LAYER_TYPES = sorted(h.layer_type for h in supported_layers() if h.counts.bottoms != 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_type=st.sampled_from(LAYER_TYPES), bottoms=st.integers(0, 4), tops=st.integers(0, 3),
       dims=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_any_blob_counts_and_shapes_convert_or_are_refused(layer_type: str, bottoms: int, tops: int,
                                                          dims: list[int]) -> None:
    shape = " ".join(f"dim: {d}" for d in dims)
    text = (f'layer {{ name: "in" type: "Input" top: "a" top: "b" top: "c" top: "d" '
            f'input_param {{ shape {{ {shape} }} }} }}\n'
            f'layer {{ name: "x" type: "{layer_type}" ' + "".join(f'bottom: "{n}" ' for n in "abcd"[:bottoms])
            + "".join(f'top: "t{k}" ' for k in range(tops)) + "}\n")
    try:
        convert_net(text_format.Parse(text, caffe_pb2.NetParameter()), None, ConvertOptions())
    except CaffeOnnxError:
        pass


# Mutants that misbehaved in benchmarks/fuzz_campaign.py runs, replayed by (campaign seed, mutant seed):
# non-UTF-8 names in a caffemodel and in ONNX metadata, npy headers that are not Python literals, a NaN in a
# shared blob's copies (a RuntimeWarning line before the error), and a net left with no layers.
FOUND = {11: [11000875, 11001052, 11001076], 12: [12001439, 12001498], 14: [14000058, 14001054, 14001169]}


def test_campaign_findings_stay_fixed(tmp_path: Path) -> None:
    models = seed_onnx_models()
    replay = [m for seed, wanted in FOUND.items() for m in mutants(seed, 1500, models) if m.seed in wanted]
    assert len(replay) == sum(len(v) for v in FOUND.values())
    outcomes, _ = run_mutants(replay, tmp_path)
    bad = [describe(o) for o in outcomes if not o.acceptable]
    assert not bad, "\n".join(bad)
    assert all(len(o.stderr.strip().splitlines()) == 1 for o in outcomes), [o.stderr for o in outcomes]
