"""Run a converted net in the trainer's GraphModule: one top's forward and the gradients autograd gives."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests.helpers import convert_text


def module_of(text: str, phase: int = caffe_pb2.TRAIN) -> GraphModule:
    """The GraphModule of prototxt `text` converted for `phase` (fillers for any params)."""
    converted = convert_text(text, phase=phase)
    return GraphModule(converted.model, converted.weights).train()


def forward_backward(text: str, feeds: Mapping[str, np.ndarray], top: str, top_diff: np.ndarray | float,
                     wrt: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`top` computed by the GraphModule, and d(Σ top·top_diff)/d(feed) for each feed in `wrt` (Caffe's bottom diffs)."""
    module = module_of(text)
    tensors = {k: torch.tensor(np.asarray(v), requires_grad=k in wrt) for k, v in feeds.items()}
    out = module(tensors, [top])[top]
    if out.requires_grad:  # a top that does not depend on its bottoms (Clip with min > max) passes no gradient
        (out * torch.as_tensor(np.asarray(top_diff, dtype=np.float32))).sum().backward()
    grads = {k: tensors[k].grad for k in wrt}
    return out.detach().numpy(), {k: np.zeros_like(feeds[k]) if g is None else g.numpy() for k, g in grads.items()}
