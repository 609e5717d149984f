"""SSD's DetectionOutput, converted, run by the trainer's GraphModule (torch kernels for NonMaxSuppression,
Compress, CumSum, TopK...) against onnxruntime on the same graph and against tests/ssd_detection_reference.py
(a numpy transcription of the fork's DetectionOutputLayer::Forward_cpu).

Tolerances: image ids, labels, scores and the row order are exact (atol 0) against both; boxes within 1e-6
(measured: bit-exact here against onnxruntime, which decodes in float32 op by op as torch does, but torch's
and onnxruntime's float exp may differ by an ulp on other data or CPUs; the reference's CENTER_SIZE decode
calls the double exp).  The seeded data keeps every pairwise overlap at least 2e-6 from
nms_threshold (checked by the converter's tests' check_margin), so no selection hangs on rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffeonnx.trainer.graph_module import GraphModule
from tests.converter.layers.test_detection_output import CODES, check_margin, deploy, make_inputs, reference
from tests.helpers import assert_close, convert_text, run

# (code type, share_location, detection_output_param body, reference keywords)
CASES = [
    ("CENTER_SIZE", True, "nms_param {\n  nms_threshold: 0.45\n  top_k: 12\n}\nkeep_top_k: 20\nconfidence_threshold: 0.05",
     {"nms_threshold": 0.45, "top_k": 12, "keep_top_k": 20, "confidence_threshold": 0.05}),
    ("CORNER", False, "background_label_id: 2\nnms_param { nms_threshold: 0.3 }\nconfidence_threshold: 0.1",
     {"background_label_id": 2, "nms_threshold": 0.3, "confidence_threshold": 0.1}),
    ("CORNER_SIZE", True, "nms_param { nms_threshold: 0.5 top_k: 8 }\nkeep_top_k: 7",
     {"nms_threshold": 0.5, "top_k": 8, "keep_top_k": 7}),
]


def _module_rows(text: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    converted = convert_text(text)
    module = GraphModule(converted.model, converted.weights).eval()
    with torch.no_grad():
        out = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    return out["detection_out"].numpy()


@pytest.mark.parametrize(("code", "share", "param", "kw"), CASES, ids=[c[0] for c in CASES])
def test_detection_output_runs_in_the_trainer(code: str, share: bool, param: str, kw: dict) -> None:
    """Batch 2, 5 classes, 40 clustered priors: the GraphModule's rows are onnxruntime's and Caffe's."""
    batch, priors, classes = 2, 40, 5
    feeds = make_inputs(21 + len(code) + share, batch, priors, classes, share=share, encoded=False)
    check_margin(feeds, classes, share, CODES[code], False, float(kw["nms_threshold"]))
    text = deploy(batch, priors, classes, f"code_type: {code}\n{param}", share=share)
    got = _module_rows(text, feeds)
    want = run(convert_text(text), feeds)["detection_out"]
    assert got.dtype == want.dtype == np.float32
    assert got.shape == want.shape and got.shape[2] > 2 * batch, f"{got.shape} vs onnxruntime's {want.shape}"
    assert_close(got[..., :3], want[..., :3], f"{code} image/label/score vs onnxruntime", atol=0, rtol=0)
    assert_close(got[..., 3:], want[..., 3:], f"{code} boxes vs onnxruntime", atol=1e-6, rtol=0)
    caffe = reference(feeds, num_classes=classes, share_location=share, code_type=CODES[code], **kw)
    assert got.shape == caffe.shape, f"{got.shape[2]} rows, Caffe has {caffe.shape[2]}"
    assert_close(got[..., :3], caffe[..., :3], f"{code} image/label/score vs Caffe", atol=0, rtol=0)
    assert_close(got[..., 3:], caffe[..., 3:], f"{code} boxes vs Caffe", atol=1e-6, rtol=0)


def test_no_detections_gives_caffes_fallback_rows() -> None:
    """Nothing above confidence_threshold: NonMaxSuppression selects nothing, one [i, -1, ...] row per image."""
    feeds = make_inputs(5, 2, 20, 3, share=True, encoded=False)
    text = deploy(2, 20, 3, "nms_param { nms_threshold: 0.45 }\nkeep_top_k: 10\nconfidence_threshold: 0.999")
    got = _module_rows(text, feeds)
    want = np.array([[[[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]]]], np.float32)
    assert_close(got, want, "fallback rows", atol=0, rtol=0)


def test_gradient_reaches_the_kept_location_predictions() -> None:
    """The box columns are a differentiable gather of the decoded loc (Compress, Gather, GatherElements): autograd
    matches finite differences along random directions (gradcheck fast mode, float64, atol 1e-5, rtol 1e-3), and only
    the priors of kept detections get a gradient."""
    batch, priors, classes = 1, 24, 3
    feeds = make_inputs(9, batch, priors, classes, share=True, encoded=False)
    check_margin(feeds, classes, True, CODES["CENTER_SIZE"], False, 0.45)
    text = deploy(batch, priors, classes, "nms_param { nms_threshold: 0.45 top_k: 10 }\nkeep_top_k: 6\n"
                  "code_type: CENTER_SIZE\nconfidence_threshold: 0.05")
    converted = convert_text(text)
    module = GraphModule(converted.model, converted.weights).double().eval()
    fixed = {k: torch.from_numpy(v.astype(np.float64)) for k, v in feeds.items() if k != "mbox_loc"}
    weights = torch.from_numpy(np.random.default_rng(3).normal(size=4))

    def boxes(loc: torch.Tensor) -> torch.Tensor:
        rows = module({**fixed, "mbox_loc": loc})["detection_out"]
        return (rows[..., 3:] * weights).sum()

    loc = torch.from_numpy(feeds["mbox_loc"].astype(np.float64)).requires_grad_()
    assert torch.autograd.gradcheck(boxes, (loc,), eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
    boxes(loc).backward()
    assert loc.grad is not None
    touched = (loc.grad.reshape(priors, 4) != 0).any(-1)
    assert 0 < int(touched.sum()) <= 6, "only the (at most keep_top_k) kept priors' predictions get a gradient"
