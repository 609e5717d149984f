"""The SSD fork's Normalize and PriorBox against tests/ssd_reference.py (numpy, loop by loop from
weiliu89/caffe's Forward_cpu/Backward_cpu) and against OpenCV DNN's own implementation of both layers.

Tolerances: PriorBox constant top vs the reference atol 1e-6 (measured 0: both round Caffe's double
corners to float); the run-time-shape subgraph computes the corners in float32, atol 1e-6 (measured
6e-8); OpenCV (float corners, float min_size) atol 1e-6.  Normalize forward atol 1e-5 rtol 1e-4
(float32 sums of squares), gradients atol 1e-5 rtol 1e-4 against Backward_cpu where it is exact
(a shared scale, or equal per-channel scales) and against the exact derivative otherwise (Caffe's
per-channel Backward_cpu differs from its own forward's derivative by the spread of the scales,
which this file also checks); OpenCV atol 1e-5 rtol 1e-4.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from caffeonnx.converter.caffe_io import parse_prototxt, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests import ssd_reference as ref
from tests.helpers import assert_close, convert_text, rng, run

# --- PriorBox ---------------------------------------------------------------------------------

# (case id, feature H×W, image H×W, the prior_box_param block as the public deploy files write it)
PRIOR_CASES = [
    ("mobilenet_ssd_conv11", (19, 19), (300, 300), """
  prior_box_param {
    min_size: 60.0
    aspect_ratio: 2.0
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    offset: 0.5
  }"""),
    ("mobilenet_ssd_conv13", (10, 10), (300, 300), """
  prior_box_param {
    min_size: 105.0
    max_size: 150.0
    aspect_ratio: 2.0
    aspect_ratio: 3.0
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    offset: 0.5
  }"""),
    ("mobilenet_ssd_conv17_2", (1, 1), (300, 300), """
  prior_box_param {
    min_size: 285.0
    max_size: 300.0
    aspect_ratio: 2.0
    aspect_ratio: 3.0
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    offset: 0.5
  }"""),
    ("res10_conv4_3_norm", (38, 38), (300, 300), """
  prior_box_param {
    min_size: 30.0
    max_size: 60.0
    aspect_ratio: 2
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 8
    offset: 0.5
  }"""),
    ("res10_fc7", (19, 19), (300, 300), """
  prior_box_param {
    min_size: 60.0
    max_size: 111.0
    aspect_ratio: 2
    aspect_ratio: 3
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 16
    offset: 0.5
  }"""),
    ("res10_conv9_2", (1, 1), (300, 300), """
  prior_box_param {
    min_size: 264.0
    max_size: 315.0
    aspect_ratio: 2
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 300
    offset: 0.5
  }"""),
    # libfacedetection style: several min_sizes, no max_size, a non-square image
    ("several_min_sizes", (15, 20), (120, 160), """
  prior_box_param { min_size: 10.0 min_size: 16.0 min_size: 24.0 clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5 }"""),
    ("several_min_max_clipped", (3, 5), (30, 50), """
  prior_box_param { min_size: 10 min_size: 20 max_size: 15 max_size: 30 aspect_ratio: 2 aspect_ratio: 3
                    clip: true variance: 0.1 }"""),
    ("img_hw_step_hw_offset0", (4, 6), (64, 96), """
  prior_box_param { min_size: 20 max_size: 40 aspect_ratio: 2 flip: false clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
    img_h: 200 img_w: 320 step_h: 50 step_w: 53.3 offset: 0 }"""),
    ("img_size_rect_feature", (5, 3), (11, 7), """
  prior_box_param { min_size: 33 aspect_ratio: 2.0 aspect_ratio: 0.5 aspect_ratio: 2.0 aspect_ratio: 3
    clip: true variance: 0.2 img_size: 100 }"""),
    ("opencv_width_height_offsets", (4, 5), (40, 50), """
  prior_box_param { width: 5 width: 7.5 height: 3 height: 9 clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
    offset_h: 0.2 offset_h: 0.7 offset_w: 0.3 offset_w: 0.6 }"""),
]
# Not for OpenCV: fractional min/max sizes (Caffe truncates them to ints, OpenCV keeps them), and
# an unset clip (OpenCV's schema defaults clip to true, SSD's to false).
CAFFE_ONLY_CASES = [
    ("ssd512_fractional_sizes", (64, 64), (512, 512), """
  prior_box_param { min_size: 35.84 max_size: 76.8 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5 }"""),
    ("defaults_only", (2, 3), (20, 30), "prior_box_param { min_size: 7 }"),
]


def prior_net(feature_hw: tuple[int, ...], image_hw: tuple[int, int], param: str, name: str = "mbox_priorbox") -> str:
    """Two Input layers (the feature map and the image) and the PriorBox, in deploy-file layout."""
    fdims = " ".join(f"dim: {d}" for d in (1, 8, *feature_hw))
    return f"""layer {{
  name: "feature"
  type: "Input"
  top: "feature"
  input_param {{ shape {{ {fdims} }} }}
}}
layer {{
  name: "data"
  type: "Input"
  top: "data"
  input_param {{ shape {{ dim: 1 dim: 3 dim: {image_hw[0]} dim: {image_hw[1]} }} }}
}}
layer {{
  name: "{name}"
  type: "PriorBox"
  bottom: "feature"
  bottom: "data"
  top: "{name}"{param}
}}
"""


def prior_param(param: str) -> caffe_pb2.PriorBoxParameter:
    return parse_prototxt(prior_net((1, 1), (1, 1), param), "<case>").layer[2].prior_box_param


def prior_feeds(feature_hw: tuple[int, ...], image_hw: tuple[int, int], batch: int = 1) -> dict[str, np.ndarray]:
    g = rng(3)
    return {"feature": g.normal(size=(batch, 8, *feature_hw)).astype(np.float32),
            "data": g.normal(size=(batch, 3, *image_hw)).astype(np.float32)}


def opencv_forward(tmp_path: Path, text: str, feeds: dict[str, np.ndarray], top: str,
                   blobs: dict[str, list[np.ndarray]] | None = None) -> np.ndarray:
    """The top as cv2.dnn computes it from the prototxt (and a caffemodel written from `blobs`)."""
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(text)
    if blobs is None:
        net = cv2.dnn.readNetFromCaffe(str(proto))
    else:
        model = tmp_path / "weights.caffemodel"
        write_caffemodel(model, parse_prototxt(text, "<test>"), blobs)
        net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    for name, value in feeds.items():
        net.setInput(value, name)
    return net.forward(top)


@pytest.mark.parametrize(("case", "feature_hw", "image_hw", "param"), PRIOR_CASES + CAFFE_ONLY_CASES,
                         ids=[c[0] for c in PRIOR_CASES + CAFFE_ONLY_CASES])
def test_prior_box_matches_caffe(case: str, feature_hw: tuple[int, int], image_hw: tuple[int, int],
                                 param: str) -> None:
    """The top is one Constant (no initializer, nothing computed at run time) equal to the reference."""
    converted = convert_text(prior_net(feature_hw, image_hw, param))
    want = ref.prior_box(prior_param(param), feature_hw, image_hw)
    assert converted.shapes["mbox_priorbox"] == want.shape == (1, 2, int(np.prod(feature_hw)) *
                                                               ref.num_priors(prior_param(param)) * 4)
    producer = [n for n in converted.model.graph.node if "mbox_priorbox" in n.output]
    assert [n.op_type for n in producer] == ["Constant"] and not converted.weights
    got = run(converted, prior_feeds(feature_hw, image_hw, batch=2))["mbox_priorbox"]
    assert_close(got, want, case, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("case", "feature_hw", "image_hw", "param"), PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_prior_box_matches_opencv(case: str, feature_hw: tuple[int, int], image_hw: tuple[int, int], param: str,
                                  tmp_path: Path) -> None:
    """OpenCV reads the image size from bottom 1 only (it ignores img_size/img_h/img_w), so where the
    prototxt gives one the image fed to both is of that size."""
    p = prior_param(param)
    if p.HasField("img_size"):
        image_hw = (p.img_size, p.img_size)
    elif p.HasField("img_h"):
        image_hw = (p.img_h, p.img_w)
    text = prior_net(feature_hw, image_hw, param)
    feeds = prior_feeds(feature_hw, image_hw)
    want = opencv_forward(tmp_path, text, feeds, "mbox_priorbox")
    assert_close(run(convert_text(text), feeds)["mbox_priorbox"], want, f"{case} vs OpenCV", atol=1e-6, rtol=0)


SUBGRAPH_CASES = ["mobilenet_ssd_conv13", "res10_fc7", "several_min_max_clipped", "img_hw_step_hw_offset0",
                  "img_size_rect_feature", "opencv_width_height_offsets", "ssd512_fractional_sizes"]


def _dynamic_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every input's height and width symbolic (what a dynamic-size export declares)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, label in ((2, "H"), (3, "W")):
            dims[axis].Clear()
            dims[axis].dim_param = f"{value.name}_{label}"
    return out


@pytest.mark.parametrize("case", SUBGRAPH_CASES)
def test_prior_box_subgraph_follows_runtime_shapes(case: str) -> None:
    """With fold_priors off (convert --prior-graph) the top is built from the bottoms' run-time shapes (Shape → Range → ...):
    converted at one size, run at others, it matches the reference at each."""
    import onnxruntime as ort

    _, feature_hw, image_hw, param = next(c for c in PRIOR_CASES + CAFFE_ONLY_CASES if c[0] == case)
    converted = convert_text(prior_net(feature_hw, image_hw, param), fold_priors=False)
    ops = {n.op_type for n in converted.model.graph.node}
    assert {"Shape", "Range"} <= ops, ops
    model = _dynamic_spatial(converted.to_proto())
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    p = prior_param(param)
    for scale in (1, 2, 3):
        f_hw = (feature_hw[0] * scale + scale - 1, feature_hw[1] * scale)
        i_hw = (image_hw[0] * scale, image_hw[1] * scale + 1)
        got = sess.run(["mbox_priorbox"], prior_feeds(f_hw, i_hw))[0]
        assert_close(got, ref.prior_box(p, f_hw, i_hw), f"{case} at {f_hw} in {i_hw}", atol=1e-6, rtol=0)


def test_prior_box_subgraph_runs_in_the_trainer() -> None:
    _, feature_hw, image_hw, param = PRIOR_CASES[4]
    converted = convert_text(prior_net(feature_hw, image_hw, param), phase=caffe_pb2.TRAIN, fold_priors=False)
    module = GraphModule(converted.model, converted.weights).train()
    feeds = {k: torch.from_numpy(v) for k, v in prior_feeds(feature_hw, image_hw).items()}
    got = module(feeds, ["mbox_priorbox"])["mbox_priorbox"].detach().numpy()
    assert_close(got, ref.prior_box(prior_param(param), feature_hw, image_hw), "trainer", atol=1e-6, rtol=0)


def test_prior_box_top_in_the_trainer_is_the_constant() -> None:
    _, feature_hw, image_hw, param = PRIOR_CASES[1]
    converted = convert_text(prior_net(feature_hw, image_hw, param), phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    feeds = {k: torch.from_numpy(v) for k, v in prior_feeds(feature_hw, image_hw, batch=3).items()}
    got = module(feeds, ["mbox_priorbox"])["mbox_priorbox"].detach().numpy()
    assert_close(got, ref.prior_box(prior_param(param), feature_hw, image_hw), "trainer", atol=1e-6, rtol=0)


@pytest.mark.parametrize(("param", "message"), [
    ("prior_box_param { aspect_ratio: 2 }", r"must provide min_size\."),
    ("prior_box_param { min_size: 0 }", r"min_size must be positive\.: prior_box_param\.min_size is 0\.0"),
    ("prior_box_param { min_size: 30 max_size: 30 }", r"max_size must be greater than min_size\."),
    ("prior_box_param { min_size: 30 min_size: 40 max_size: 60 }", r"2 min_size\(s\) and 1 max_size"),
    ("prior_box_param { min_size: 30 variance: 0.1 variance: 0.2 }", r"2 variances; Caffe takes 1 .* or exactly 4"),
    ("prior_box_param { min_size: 30 variance: 0 }", r"variance 0\.0 is not positive"),
    ("prior_box_param { min_size: 30 img_size: 300 img_h: 300 img_w: 300 }",
     r"Either img_size or img_h/img_w should be specified; not both\."),
    ("prior_box_param { min_size: 30 img_h: 300 }", r"img_w should be larger than 0\.: .* \(unset\)"),
    ("prior_box_param { min_size: 30 step_w: 8 }", r"step_h should be larger than 0\."),
    ("prior_box_param { min_size: 30 step: -8 }", r"step should be larger than 0\."),
    ("prior_box_param { min_size: 30 aspect_ratio: -2 }", r"aspect_ratio -2\.0 is not positive"),
    ("prior_box_param { width: 4 width: 5 height: 4 }", r"2 width\(s\) and 1 height"),
    ("prior_box_param { min_size: 30 width: 4 height: 4 }", r"explicit width/height and also min_size"),
    ("prior_box_param { min_size: 30 offset: 0.5 offset_h: 0.5 offset_w: 0.5 }", r"offset and OpenCV's offset_h"),
    ("prior_box_param { min_size: 30 offset_h: 0.5 }", r"1 offset_h and 0 offset_w"),
    ("prior_box_param { min_size: 30 offset_h: 0 offset_h: 0.5 offset_h: 1 offset_w: 0 offset_w: 0.5 offset_w: 1 }",
     r"3 offset_h/offset_w pairs.*give at most 2"),
])
def test_prior_box_refuses_what_caffe_refuses(param: str, message: str) -> None:
    with pytest.raises(LayerError, match=r"'mbox_priorbox' \(PriorBox\): .*" + message):
        convert_text(prior_net((3, 3), (30, 30), " " + param))


def test_prior_box_refuses_more_than_four_axes() -> None:
    with pytest.raises(LayerError, match=r"Cannot use legacy accessors on Blobs with > 4 axes: bottom 'feature'"):
        convert_text(prior_net((3, 3, 2), (30, 30), " prior_box_param { min_size: 30 }"))


def test_prior_box_reads_a_2d_feature_as_one_cell() -> None:
    """Caffe's legacy height()/width() read 1 for missing axes: a (N, C) bottom is a 1×1 map."""
    param = " prior_box_param { min_size: 30 max_size: 60 clip: false variance: 0.1 }"
    got = run(convert_text(prior_net((), (30, 40), param)), {"feature": np.zeros((1, 8), np.float32),
                                                             "data": np.zeros((1, 3, 30, 40), np.float32)})
    assert_close(got["mbox_priorbox"], ref.prior_box(prior_param(param), (1, 1), (30, 40)), "2-D", atol=1e-6, rtol=0)


# --- Normalize --------------------------------------------------------------------------------

def normalize_net(shape: tuple[int, ...], param: str, name: str = "conv4_3_norm") -> str:
    """An Input and the Normalize, written as SSD's deploy files write conv4_3_norm."""
    dims = "\n".join(f"      dim: {d}" for d in shape)
    return f"""layer {{
  name: "input"
  type: "Input"
  top: "conv4_3"
  input_param {{
    shape {{
{dims}
    }}
  }}
}}
layer {{
  name: "{name}"
  type: "Normalize"
  bottom: "conv4_3"
  top: "{name}"
  norm_param {{{param}
  }}
}}
"""


RES10_NORM = """
    across_spatial: false
    scale_filler {
      type: "constant"
      value: 20
    }
    channel_shared: false"""
# (case id, bottom shape, norm_param body, how the scale is drawn: "equal", "random")
NORM_CASES = [
    ("res10_conv4_3_norm", (2, 8, 5, 6), RES10_NORM, "random"),
    ("res10_equal_scales", (2, 8, 5, 6), RES10_NORM, "equal"),
    ("defaults_across_spatial_shared", (2, 4, 3, 5), "", "random"),
    ("across_spatial_per_channel", (2, 4, 3, 5), " across_spatial: true channel_shared: false", "random"),
    ("per_position_shared", (3, 6, 2, 4), " across_spatial: false channel_shared: true", "random"),
    ("eps_1e-3", (2, 5, 3, 3), " across_spatial: false channel_shared: false eps: 0.001", "random"),
    ("two_axes", (4, 7), " across_spatial: false channel_shared: false", "random"),
    ("three_axes", (2, 3, 6), " across_spatial: true channel_shared: false", "random"),
]


def _norm_flags(param: str) -> tuple[bool, bool, float]:
    across = "across_spatial: false" not in param
    shared = "channel_shared: false" not in param
    eps = 0.001 if "eps: 0.001" in param else 1e-10
    return across, shared, eps


def _scale(case_scale: str, channels: int, shared: bool, seed: int) -> np.ndarray:
    if shared:
        return np.array(rng(seed).uniform(0.5, 20), dtype=np.float32).reshape(())
    if case_scale == "equal":
        return np.full(channels, 20.0, dtype=np.float32)
    return rng(seed).uniform(0.5, 20, size=channels).astype(np.float32)


def trainer_grads(text: str, blobs: dict[str, list[np.ndarray]], x: np.ndarray, dy: np.ndarray,
                  top: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top, d(Σ top·dy)/dx and d(Σ top·dy)/dscale through the trainer's GraphModule."""
    converted = convert_text(text, blobs, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    xt = torch.tensor(x, requires_grad=True)
    out = module({"conv4_3": xt}, [top])[top]
    (out * torch.from_numpy(dy)).sum().backward()
    [(_, scale)] = module.named_blobs()
    return out.detach().numpy(), xt.grad.numpy(), scale.grad.numpy()


@pytest.mark.parametrize(("case", "shape", "param", "scales"), NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_normalize_forward_and_gradients(case: str, shape: tuple[int, ...], param: str, scales: str) -> None:
    across, shared, eps = _norm_flags(param)
    g = rng(len(case))
    x = (g.normal(size=shape) * 2).astype(np.float32)
    scale = _scale(scales, shape[1], shared, len(case) + 1)
    text = normalize_net(shape, param)
    want, _ = ref.normalize(x, scale, across, eps)
    converted = convert_text(text, {"conv4_3_norm": [scale]})
    assert [w.shape for w in converted.weights.values()] == [scale.shape]  # Caffe's blob: () or (C,)
    assert_close(run(converted, {"conv4_3": x})["conv4_3_norm"], want, f"{case} (onnxruntime)")

    dy = g.normal(size=shape).astype(np.float32)
    top, dx, dscale = trainer_grads(text, {"conv4_3_norm": [scale]}, x, dy, "conv4_3_norm")
    assert_close(top, want, f"{case} (trainer)")
    caffe_dx, caffe_dscale = ref.normalize_backward(x, scale, dy, across, eps)
    assert_close(dscale, caffe_dscale, f"{case} dscale")
    # the trainer trains with SSD's Backward_cpu, also where it is not the exact derivative
    assert_close(dx, caffe_dx, f"{case} dx vs Backward_cpu")
    if not shared and scales != "equal":
        spread = float(np.abs(ref.normalize_exact_backward(x, scale, dy, across, eps) - dx).max())
        assert spread > 1e-3, "per-channel Backward_cpu was expected to differ from the exact derivative here"


def test_normalize_gradient_at_zero_is_finite() -> None:
    """An all-zero position has norm sqrt(eps): the top is 0 and the gradient dy·scale/sqrt(eps), never NaN."""
    shape = (1, 3, 2, 2)
    x = np.zeros(shape, dtype=np.float32)
    x[0, :, 0, 0] = [1.0, -2.0, 0.5]
    scale = np.array([2.0, 3.0, 4.0], dtype=np.float32)
    dy = rng(4).normal(size=shape).astype(np.float32) * np.float32(1e-6)
    top, dx, _ = trainer_grads(normalize_net(shape, RES10_NORM), {"conv4_3_norm": [scale]}, x, dy, "conv4_3_norm")
    assert np.isfinite(dx).all() and np.isfinite(top).all()
    assert_close(dx, ref.normalize_backward(x, scale, dy, False, 1e-10)[0], "dx", rtol=1e-3)


@pytest.mark.parametrize(("param", "want"), [
    (RES10_NORM, [20.0] * 8),
    ("", 1.0),
    (" across_spatial: false channel_shared: false", [1.0] * 8),
    (' channel_shared: true scale_filler { type: "constant" value: 10 }', 10.0),
])
def test_normalize_scale_filler_initialises_the_scale(param: str, want: object) -> None:
    """Without a caffemodel the scale comes from scale_filler (Caffe's default: constant 1), as a trainable blob."""
    converted = convert_text(normalize_net((2, 8, 3, 3), param), phase=caffe_pb2.TRAIN)
    [(name, value)] = converted.weights.items()
    assert value.tolist() == want
    module = GraphModule(converted.model, converted.weights)
    [(info, blob)] = module.named_blobs()
    assert info.name == name and blob.requires_grad and info.lr_mult == 1.0


def test_normalize_gaussian_filler_is_seeded_per_channel() -> None:
    param = ' across_spatial: false channel_shared: false scale_filler { type: "gaussian" std: 0.5 }'
    a = convert_text(normalize_net((2, 16, 3, 3), param), seed=1).weights
    b = convert_text(normalize_net((2, 16, 3, 3), param), seed=1).weights
    [va], [vb] = a.values(), b.values()
    assert va.shape == (16,) and np.array_equal(va, vb) and 0.2 < va.std() < 0.9


@pytest.mark.parametrize(("case", "shape", "param"), [
    ("res10_conv4_3_norm", (1, 8, 5, 6), RES10_NORM),
    ("per_position_shared", (2, 6, 4, 4), " across_spatial: false channel_shared: true"),
    ("across_spatial_shared", (2, 4, 3, 5), " across_spatial: true"),
    ("eps_1e-3", (1, 5, 3, 3), " across_spatial: false channel_shared: false eps: 0.001"),
])
def test_normalize_matches_opencv(case: str, shape: tuple[int, ...], param: str, tmp_path: Path) -> None:
    """OpenCV's NormalizeBBox on the same prototxt and caffemodel (it cannot scale per channel across spatial)."""
    _, shared, _ = _norm_flags(param)
    scale = _scale("random", shape[1], shared, 11)
    x = (rng(12).normal(size=shape) * 2).astype(np.float32)
    text = normalize_net(shape, param)
    # OpenCV cannot make a Mat of Caffe's 0-axis shared scale blob: it gets the value as [1]
    want = opencv_forward(tmp_path, text, {"conv4_3": x}, "conv4_3_norm", {"conv4_3_norm": [scale.reshape(-1)]})
    got = run(convert_text(text, {"conv4_3_norm": [scale]}), {"conv4_3": x})["conv4_3_norm"]
    assert_close(got, want, f"{case} vs OpenCV")


@pytest.mark.parametrize(("shape", "message"), [
    ((6,), r"Number of axes of bottom blob must be >=2\."),
    ((1, 2, 3, 4, 5), r"Cannot use legacy accessors on Blobs with > 4 axes"),
])
def test_normalize_refuses_what_caffe_refuses(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(LayerError, match=r"'conv4_3_norm' \(Normalize\): " + message):
        convert_text(normalize_net(shape, RES10_NORM))


# --- both, round trip ---------------------------------------------------------------------------

SSD_HEAD = """name: "ssd_head"
layer {
  name: "input"
  type: "Input"
  top: "conv4_3"
  input_param { shape { dim: 1 dim: 8 dim: 6 dim: 6 } }
}
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 48 dim: 48 } }
}
layer {
  name: "conv4_3_norm"
  type: "Normalize"
  bottom: "conv4_3"
  top: "conv4_3_norm"
  norm_param {
    across_spatial: false
    scale_filler {
      type: "constant"
      value: 20
    }
    channel_shared: false
  }
}
layer {
  name: "conv4_3_norm_mbox_priorbox"
  type: "PriorBox"
  bottom: "conv4_3_norm"
  bottom: "data"
  top: "conv4_3_norm_mbox_priorbox"
  prior_box_param {
    min_size: 30.0
    max_size: 60.0
    aspect_ratio: 2
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 8
    offset: 0.5
  }
}
"""


def test_ssd_head_round_trips_through_to_caffe(tmp_path: Path) -> None:
    """prototxt + caffemodel -> ONNX -> prototxt + caffemodel: the same layers and scale blob, the same graph."""
    proto, model = tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel"
    proto.write_text(SSD_HEAD)
    scale = rng(5).uniform(5, 25, size=8).astype(np.float32)
    write_caffemodel(model, parse_prototxt(SSD_HEAD, "<test>"), {"conv4_3_norm": [scale]})
    first = convert_files(proto, model)
    first.save(tmp_path / "m.onnx")
    convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(proto))
    back = load_weights(tmp_path / "back.caffemodel")
    assert back.blobs["conv4_3_norm"][0].data.tobytes() == scale.tobytes()
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph
    feeds = {"conv4_3": rng(6).normal(size=(1, 8, 6, 6)).astype(np.float32),
             "data": np.zeros((1, 3, 48, 48), np.float32)}
    out = run(convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel", ConvertOptions(all_blobs=True)),
              feeds)
    assert_close(out["conv4_3_norm"], ref.normalize(feeds["conv4_3"], scale, False, 1e-10)[0], "norm")
    want = ref.prior_box(parse_prototxt(SSD_HEAD, "<t>").layer[3].prior_box_param, (6, 6), (48, 48))
    assert_close(out["conv4_3_norm_mbox_priorbox"], want, "priors", atol=1e-6, rtol=0)
