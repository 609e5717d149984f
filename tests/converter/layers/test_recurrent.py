"""LSTM and RNN against a numpy transcription of Caffe's unrolled nets (recurrent_reference.py, float64).

Forward through onnxruntime and the trainer: atol 1e-5, rtol 1e-4 (float32 graph; measured worst
|diff| 2e-7).  Gradients (x, x_static and every param blob) through the trainer's autograd against
the unrolled net's backward, LSTMUnit::Backward_cpu included: atol 1e-5, rtol 1e-4 (measured 8e-7).
Three SGD iterations of LSTM + InnerProduct + EuclideanLoss through caffeonnx.train against numpy
steps of the same solver: losses rtol 1e-4, weights atol 1e-5, rtol 1e-4 (measured 1.2e-7).  cont
holds 0 at t = 0 and resets mid-sequence.
OpenCV's DNN cannot serve as a second reference: its Caffe LSTM wants OpenCV's own five blobs
(Wh, Wx, b, h0, c0) and has no cont input, and it registers no RNN layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import caffeonnx
from caffeonnx.converter.caffe_io import parse_prototxt, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.metadata import net_without_blobs
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests.converter.layers.recurrent_reference import lstm_backward, lstm_forward, rnn_backward, rnn_forward
from tests.helpers import assert_close, convert_text, rng, run

# (T, N, per-step x dims, x_static dims or None, expose_hidden)
CASES = [
    (4, 2, (3,), None, False),
    (5, 3, (3,), (2,), False),
    (4, 2, (1, 3), (2, 1), False),
    (5, 2, (3,), None, True),
    (4, 3, (3,), (2,), True),
]
HIDDEN = 4


def _dims(shape: tuple[int, ...]) -> str:
    return " ".join(f"dim: {d}" for d in shape)


def recurrent_net(kind: str, steps: int, streams: int, feat: tuple[int, ...], static: tuple[int, ...] | None,
                  expose: bool, hidden: int = HIDDEN) -> str:
    """A deploy net in the style of Caffe's LRCN examples: `input:` blobs, the layer spelled out line by line."""
    states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
    inputs = [("x", (steps, streams, *feat)), ("cont", (steps, streams))]
    if static is not None:
        inputs.append(("x_static", (streams, *static)))
    if expose:
        inputs += [(s, (1, streams, hidden)) for s in states]
    text = "name: \"lrcn\"\n" + "".join(f'input: "{n}"\ninput_shape {{ {_dims(s)} }}\n' for n, s in inputs)
    bottoms = "".join(f'  bottom: "{n}"\n' for n, _ in inputs)
    tops = '  top: "out"\n' + ("".join(f'  top: "{s[0]}T"\n' for s in states) if expose else "")
    return text + f"""layer {{
  name: "{kind.lower()}1"
  type: "{kind}"
{bottoms}{tops}  recurrent_param {{
    num_output: {hidden}
    weight_filler {{
      type: "uniform"
      min: -0.08
      max: 0.08
    }}
    bias_filler {{
      type: "constant"
      value: 0
    }}{chr(10) + "    expose_hidden: true" if expose else ""}
  }}
}}
"""


def param_shapes(kind: str, width: int, static_width: int | None, hidden: int = HIDDEN) -> list[tuple[int, ...]]:
    """Caffe's blob shapes, in blob order (RecurrentLayer's owned params of the unrolled net)."""
    rows = 4 * hidden if kind == "LSTM" else hidden
    shapes = [(rows, width), (rows,)]
    if static_width is not None:
        shapes.append((rows, static_width))
    shapes.append((rows, hidden))
    if kind == "RNN":
        shapes += [(hidden, hidden), (hidden,)]
    return shapes


def make_cont(steps: int, streams: int, seed: int) -> np.ndarray:
    """0 at t = 0 (each sequence starts in the batch), then 1 with seeded resets, at least one mid-sequence."""
    cont = (rng(seed).random((steps, streams)) > 0.3).astype(np.float32)
    cont[0] = 0
    cont[2, 0] = 0
    cont[1, 0] = 1
    return cont


def case_data(kind: str, case: tuple, seed: int = 0) -> tuple[str, dict[str, np.ndarray], list[np.ndarray]]:
    steps, streams, feat, static, expose = case
    r = rng(seed)
    feeds = {"x": r.normal(size=(steps, streams, *feat)).astype(np.float32), "cont": make_cont(steps, streams, seed)}
    if static is not None:
        feeds["x_static"] = r.normal(size=(streams, *static)).astype(np.float32)
    if expose:
        feeds["h0"] = (r.normal(size=(1, streams, HIDDEN)) * 0.5).astype(np.float32)
        if kind == "LSTM":
            feeds["c0"] = r.normal(size=(1, streams, HIDDEN)).astype(np.float32)
    shapes = param_shapes(kind, int(np.prod(feat)), int(np.prod(static)) if static else None)
    params = [(r.normal(size=s) * 0.6).astype(np.float32) for s in shapes]
    return recurrent_net(kind, *case), feeds, params


def reference(kind: str, params: list[np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    p64 = [p.astype(np.float64) for p in params]
    if kind == "LSTM":
        out, h_t, c_t, _ = lstm_forward(p64, feeds["x"], feeds["cont"], feeds.get("x_static"), feeds.get("h0"),
                                        feeds.get("c0"))
        return {"out": out, "hT": h_t, "cT": c_t}
    out, h_t, _ = rnn_forward(p64, feeds["x"], feeds["cont"], feeds.get("x_static"), feeds.get("h0"))
    return {"out": out, "hT": h_t}


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients(kind: str, case: tuple) -> None:
    text, feeds, params = case_data(kind, case)
    name = f"{kind.lower()}1"
    converted = convert_text(text, {name: params})
    assert [v.shape for v in converted.weights.values()] == [p.shape for p in params], "initializers = Caffe's blobs"
    want = reference(kind, params, feeds)
    got = run(converted, feeds)
    expose = case[4]
    for top in ["out", "hT", "cT"][: (3 if kind == "LSTM" else 2) if expose else 1]:
        assert_close(got[top], want[top], f"{kind} {top} (onnxruntime)")

    trained = convert_text(text, {name: params}, phase=caffe_pb2.TRAIN)
    module = GraphModule(trained.model, trained.weights).train()
    wrt = ["x", "x_static"]
    tensors = {k: torch.tensor(v, requires_grad=k in wrt) for k, v in feeds.items()}
    out = module(tensors, ["out"])["out"]
    assert_close(out.detach().numpy(), want["out"], f"{kind} out (trainer)")
    top_diff = rng(1).normal(size=out.shape).astype(np.float32)
    (out * torch.from_numpy(top_diff)).sum().backward()

    p64 = [p.astype(np.float64) for p in params]
    if kind == "LSTM":
        _, _, _, trace = lstm_forward(p64, feeds["x"], feeds["cont"], feeds.get("x_static"), feeds.get("h0"),
                                      feeds.get("c0"))
        grads, dx, dstatic = lstm_backward(p64, trace, top_diff.astype(np.float64))
    else:
        _, _, trace = rnn_forward(p64, feeds["x"], feeds["cont"], feeds.get("x_static"), feeds.get("h0"))
        grads, dx, dstatic = rnn_backward(p64, trace, top_diff.astype(np.float64))
    assert_close(tensors["x"].grad.numpy(), dx.reshape(feeds["x"].shape), f"{kind} dx")
    if dstatic is not None:
        assert_close(tensors["x_static"].grad.numpy(), dstatic.reshape(feeds["x_static"].shape), f"{kind} dx_static")
    for (pname, _), want_grad in zip(converted.weights.items(), grads):
        assert_close(module.parameter(pname).grad.numpy(), want_grad, f"{kind} d{pname}")


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_exposed_states_carry_a_sequence_across_passes(kind: str) -> None:
    """One step at a time with expose_hidden (a captioning decoder's deploy net) gives the whole-sequence run."""
    steps, streams = 5, 2
    whole_text, feeds, params = case_data(kind, (steps, streams, (3,), None, False), seed=4)
    whole = run(convert_text(whole_text, {f"{kind.lower()}1": params}), feeds)["out"]
    step_text = recurrent_net(kind, 1, streams, (3,), None, True)
    stepper = ort.InferenceSession(convert_text(step_text, {f"{kind.lower()}1": params}).to_proto()
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    states = {s: np.zeros((1, streams, HIDDEN), np.float32) for s in (["h0", "c0"] if kind == "LSTM" else ["h0"])}
    names = [o.name for o in stepper.get_outputs()]
    for t in range(steps):
        outs = dict(zip(names, stepper.run(None, {"x": feeds["x"][t:t + 1], "cont": feeds["cont"][t:t + 1], **states})))
        assert_close(outs["out"], whole[t:t + 1], f"{kind} step {t}")
        states = {s: outs[f"{s[0]}T"] for s in states}


@pytest.mark.parametrize("opset", [11, 13])
def test_older_opsets(opset: int) -> None:
    """Split takes its sizes as an attribute before opset 13, as an input from 13."""
    for kind in ("LSTM", "RNN"):
        text, feeds, params = case_data(kind, CASES[4], seed=2)
        got = run(convert_text(text, {f"{kind.lower()}1": params}, opset=opset), feeds)
        want = reference(kind, params, feeds)
        for top, value in want.items():
            assert_close(got[top], value, f"{kind} {top} at opset {opset}")


def test_another_number_of_timesteps_is_refused() -> None:
    """Caffe's Reshape: CHECK_EQ(T_, bottom[0]->shape(0)) << "input number of timesteps changed"."""
    text, feeds, params = case_data("LSTM", CASES[0])
    converted = convert_text(text, {"lstm1": params})
    longer = {"x": np.concatenate([feeds["x"]] * 2), "cont": np.concatenate([feeds["cont"]] * 2)}
    with pytest.raises(Exception, match=r"(?s)invalid dimensions for input: x.*index: 0 Got: 8 Expected: 4"):
        run(converted, longer)


def test_streams_stay_free() -> None:
    """N (axis 1) is not baked in: a net converted for N = 2 runs 3 streams as 3 separate ones."""
    text, feeds, params = case_data("RNN", (4, 3, (3,), (2,), False), seed=6)
    small = text.replace("dim: 4 dim: 3", "dim: 4 dim: 2").replace("dim: 3 dim: 2 }", "dim: 2 dim: 2 }")
    model = convert_text(small, {"rnn1": params}).to_proto()
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims["x"][:2] == [4, "N"] and dims["cont"] == [4, "N"] and dims["x_static"][0] == "N", dims
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["out"], feeds)[0]
    assert_close(got, reference("RNN", params, feeds)["out"], "RNN out with 3 streams")


def test_batch_option_is_refused_for_time_major_inputs() -> None:
    """--batch fixes axis 0, which is T for x and cont: the streams axis is already free."""
    with pytest.raises(LayerError, match=r"--batch fixes axis 0 of input 'x', which LSTM does not read as the batch"):
        convert_text(recurrent_net("LSTM", 5, 2, (3,), None, False), batch=2)


@pytest.mark.parametrize(("kind", "edit", "message"), [
    ("LSTM", ("num_output: 4", "num_output: 0"), "num_output must be positive"),
    ("LSTM", ("  bottom: \"c0\"\n", ""), "takes at least 4 bottom blob"),
    ("RNN", ("  top: \"hT\"\n", ""), "produces 2 top blob"),
    ("LSTM", ("input_shape { dim: 5 dim: 2 }", "input_shape { dim: 5 dim: 2 dim: 1 }"), "cont.*exactly 2 axes"),
    ("RNN", ("input_shape { dim: 5 dim: 2 dim: 3 }", "input_shape { dim: 5 dim: 2 }"), "at least 3 axes"),
    ("LSTM", ('input_shape { dim: 1 dim: 2 dim: 4 }\ninput: "c0"', 'input_shape { dim: 1 dim: 2 dim: 3 }\ninput: "c0"'),
     "hidden state input shape"),
])
def test_bad_nets_are_refused(kind: str, edit: tuple[str, str], message: str) -> None:
    text = recurrent_net(kind, 5, 2, (3,), None, True)
    assert edit[0] in text
    with pytest.raises(LayerError, match=message):
        convert_text(text.replace(*edit))


def test_static_input_must_have_the_streams_first() -> None:
    text = recurrent_net("LSTM", 4, 3, (3,), (2,), False).replace("input_shape { dim: 3 dim: 2 }",
                                                                     "input_shape { dim: 2 dim: 3 }")
    with pytest.raises(LayerError, match="static input 'x_static'"):
        convert_text(text)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_to_caffe_round_trip(kind: str, tmp_path: Path) -> None:
    text, _, params = case_data(kind, CASES[4])
    proto, model = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    proto.write_text(text)
    write_caffemodel(model, parse_prototxt(text), {f"{kind.lower()}1": params})
    first = convert_files(proto, model)
    first.save(tmp_path / "first.onnx")
    convert_to_caffe_files(tmp_path / "first.onnx", tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert net_without_blobs(load_net(tmp_path / "back.prototxt")) == net_without_blobs(load_net(proto))
    back = load_weights(tmp_path / "back.caffemodel").blobs[f"{kind.lower()}1"]
    assert [b.data.tobytes() for b in back] == [p.tobytes() for p in params]
    second = convert_files(tmp_path / "back.prototxt", tmp_path / "back.caffemodel")
    assert second.model.graph == first.model.graph


TRAIN_NET = """name: "seq_regress"
layer {
  name: "data"
  type: "Input"
  top: "x"
  top: "cont"
  top: "target"
  input_param {
    shape { dim: 5 dim: 3 dim: 3 }
    shape { dim: 5 dim: 3 }
    shape { dim: 5 dim: 3 dim: 2 }
  }
}
layer {
  name: "lstm1"
  type: "LSTM"
  bottom: "x"
  bottom: "cont"
  top: "lstm1"
  recurrent_param {
    num_output: 4
    weight_filler { type: "uniform" min: -0.08 max: 0.08 }
    bias_filler { type: "constant" value: 0 }
  }
}
layer {
  name: "predict"
  type: "InnerProduct"
  bottom: "lstm1"
  top: "predict"
  inner_product_param {
    num_output: 2
    axis: 2
  }
}
layer {
  name: "loss"
  type: "EuclideanLoss"
  bottom: "predict"
  bottom: "target"
  top: "loss"
}
"""


def test_sgd_steps_match_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """caffeonnx.train: 3 plain SGD steps (lr 0.5, no momentum or decay) equal numpy's unrolled-net steps."""
    monkeypatch.chdir(tmp_path)
    steps, streams, lr = 5, 3, 0.5
    r = rng(11)
    x = r.normal(size=(steps, streams, 3)).astype(np.float32)
    cont = make_cont(steps, streams, 11)
    target = r.normal(size=(steps, streams, 2)).astype(np.float32) * 0.5
    lstm = [(r.normal(size=s) * 0.5).astype(np.float32) for s in param_shapes("LSTM", 3, None)]
    ip = [(r.normal(size=(2, HIDDEN)) * 0.5).astype(np.float32), np.zeros(2, np.float32)]
    net = parse_prototxt(TRAIN_NET)
    write_caffemodel(tmp_path / "init.caffemodel", net, {"lstm1": lstm, "predict": ip})
    solver = caffe_pb2.SolverParameter(base_lr=lr, lr_policy="fixed", momentum=0.0, weight_decay=0.0, max_iter=3,
                                       display=0, snapshot=0, snapshot_after_train=False, type="SGD")
    result = caffeonnx.train(solver, net=net, weights=tmp_path / "init.caffemodel",
                             data={"x": x, "cont": cont, "target": target}, output=tmp_path / "final",
                             say=lambda _: None, pictures=False)

    params = [p.astype(np.float64) for p in lstm + ip]
    losses = []
    for _ in range(3):
        h, _, _, trace = lstm_forward(params[:3], x, cont)
        predict = h @ params[3].T + params[4]
        diff = predict - target
        losses.append(float((diff ** 2).sum() / steps / 2))  # EuclideanLoss: / (2 · bottom[0]->num())
        d_predict = diff / steps
        grads, _, _ = lstm_backward(params[:3], trace, d_predict @ params[3])
        grads += [np.einsum("tno,tnh->oh", d_predict, h), d_predict.sum(axis=(0, 1))]
        params = [p - lr * g for p, g in zip(params, grads)]
    assert len(result.iterations) == 3
    assert np.allclose([it.loss for it in result.iterations], losses, rtol=1e-4, atol=1e-6)
    assert losses[-1] < losses[0]
    final = load_weights(tmp_path / "final.caffemodel").blobs
    for k, want in enumerate(params):
        layer, index = ("lstm1", k) if k < 3 else ("predict", k - 3)
        assert_close(final[layer][index].data, want, f"{layer} blob {index} after 3 steps")
