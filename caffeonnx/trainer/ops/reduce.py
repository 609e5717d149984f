"""Reductions and ONNX's built-in losses."""
from __future__ import annotations

from collections.abc import Callable

import torch

from caffeonnx.trainer.ops import Kernel, NodeSpec, host_ints, ints, register_op

Tensor = torch.Tensor


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCE: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


@register_op(*_REDUCE)
def reduce(node: NodeSpec) -> Kernel:
    """Reduce* over `axes` (an input from opset 13 for ReduceSum, 18 for the others)."""
    fn = _REDUCE[node.op_type]
    keep = bool(node.attr("keepdims", 1))
    noop = bool(node.attr("noop_with_empty_axes", 0))
    static = node.attr("axes") or ints(node.const(1))

    def run(x: Tensor, axes: Tensor | None = None) -> Tensor:
        ax = host_ints(axes, static)
        if not ax:
            if noop:
                return x
            ax = list(range(x.dim()))
        return fn(x, [a + x.dim() if a < 0 else a for a in ax], keep)

    return run


def _nll(node: NodeSpec, logp: Tensor, labels: Tensor, weights: Tensor | None) -> Tensor:
    """−logp[n, label[n], ...]·w[label], ignored labels weigh 0; 'mean' divides by the total weight."""
    labels = labels.to(logp.device).long()
    ignore = node.attr("ignore_index")
    valid = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    picked = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    w = weights[safe] if weights is not None else torch.ones_like(picked)
    w = w * valid.to(w.dtype)
    loss = picked * w
    reduction = node.attr("reduction", "mean")
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w.sum()


@register_op("NegativeLogLikelihoodLoss")
def negative_log_likelihood_loss(node: NodeSpec) -> Kernel:
    """NegativeLogLikelihoodLoss: −input[n, label[n]], weighted, ignore_index, mean/sum/none."""
    return lambda logp, labels, weights=None: _nll(node, logp, labels, weights)


@register_op("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy_loss(node: NodeSpec) -> Kernel:
    """SoftmaxCrossEntropyLoss: NLL of log-softmax over axis 1 (optionally also the log-probabilities)."""
    want_logp = len(node.outputs) > 1 and node.outputs[1] != ""

    def run(scores: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        logp = torch.log_softmax(scores, dim=1)
        loss = _nll(node, logp, labels, weights)
        return (loss, logp) if want_logp else loss

    return run
