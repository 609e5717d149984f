"""Winner-Take-All sparsity for autoencoders (Makhzani & Frey, NIPS 2015), training only.

FC-WTA (a 2-D top, N×units): lifetime sparsity — each unit keeps its k% largest
activations across the mini-batch, the rest become 0.  CONV-WTA (a 4-D top,
N×C×H×W): spatial sparsity — each feature map of each sample keeps only its largest
value — then lifetime sparsity over those winners across the mini-batch.  The mask is
a constant of the forward pass, so gradients flow through the winners only.  Nothing
of this is in the inference or exported graphs: at test time the codes are dense.

Configured per Caffe layer: `--wta LAYER=5%` sparsifies that layer's top (usually the
encoder's ReLU).  In a prototxt, the Caffe way to add a layer is a Python layer; an
in-place one naming this module is read as a WTA spec on the blob it sits on and is
taken out of the net (so inference and exports never see it):

    layer { name: "wta" type: "Python" bottom: "code" top: "code"
            python_param { module: "caffeonnx.wta" layer: "WinnerTakeAll" param_str: "5%" } }
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule

Tensor = torch.Tensor


@dataclass(frozen=True)
class WtaSpec:
    """Lifetime sparsity `fraction` (0 < f <= 1) on the top of Caffe layer `layer`.

    `position` pins the layer by its place in the net where the spec comes from the prototxt
    itself (a layer name may repeat); a name from the command line must be unambiguous.
    """

    layer: str
    fraction: float
    position: int | None = None


def parse_wta(text: str) -> WtaSpec:
    """`LAYER=5%` or `LAYER=0.05` as a WtaSpec."""
    layer, sep, value = text.partition("=")
    try:
        if not sep or not layer:
            raise ValueError
        fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise CaffeOnnxError(f"--wta expects LAYER=k% (e.g. encode1neuron=5%), got {text!r}") from None
    if not 0 < fraction <= 1:
        raise CaffeOnnxError(f"--wta {text!r}: the kept fraction must be in (0%, 100%], got {fraction:g}")
    return WtaSpec(layer, fraction)


PYTHON_MODULE = "caffeonnx.wta"


def take_wta_layers(net: caffe_pb2.NetParameter, source: str) -> list[WtaSpec]:
    """Remove the WTA Python layers from `net`; each becomes a spec on the last earlier layer writing its blob."""
    specs, kept = [], []
    writer: dict[str, tuple[str, int]] = {}  # blob -> (name, position in the net left) of its latest writer
    for layer in net.layer:
        if layer.type == "Python" and layer.python_param.module == PYTHON_MODULE:
            if len(layer.bottom) != 1 or list(layer.top) != list(layer.bottom):
                raise CaffeOnnxError(f"{source}: layer {layer.name!r}: a {PYTHON_MODULE} layer must work in place "
                                     f"(one bottom, top == bottom), got bottom {list(layer.bottom)} top {list(layer.top)}")
            blob = layer.bottom[0]
            if blob not in writer:
                raise CaffeOnnxError(f"{source}: layer {layer.name!r}: no earlier layer writes {blob!r}")
            name, position = writer[blob]
            spec = parse_wta(f"{name}={layer.python_param.param_str.strip()}")
            specs.append(WtaSpec(spec.layer, spec.fraction, position))
            continue
        for top in layer.top:
            writer[top] = (layer.name, len(kept))
        kept.append(layer)
    del net.layer[:]
    net.layer.extend(kept)
    return specs


def _kept(count: int, fraction: float) -> int:
    """How many of `count` samples each unit keeps: k% rounded, at least one."""
    return max(1, min(count, round(count * fraction)))


def lifetime_sparsity(x: Tensor, fraction: float) -> Tensor:
    """FC-WTA: per unit (column), zero all but its k% largest values over the batch (dim 0)."""
    k = _kept(x.shape[0], fraction)
    threshold = torch.topk(x.detach(), k, dim=0).values[-1:]
    return x * (x.detach() >= threshold).to(x.dtype)


def spatial_lifetime_sparsity(x: Tensor, fraction: float) -> Tensor:
    """CONV-WTA: per (sample, map) keep the spatial maximum only, then per map the k% largest of those over the batch."""
    flat = x.detach().flatten(2)
    best, where = flat.max(dim=2)  # the winner of each feature map
    k = _kept(x.shape[0], fraction)
    threshold = torch.topk(best, k, dim=0).values[-1:]
    keep = (best >= threshold).to(x.dtype)
    mask = torch.zeros_like(flat).scatter_(2, where.unsqueeze(2), keep.unsqueeze(2))
    return x * mask.reshape(x.shape)


def winner_take_all(fraction: float) -> Callable[[Tensor], Tensor]:
    """The WTA transform for a top: FC-WTA for 2-D tops, CONV-WTA for tops with spatial axes."""

    def run(x: Tensor) -> Tensor:
        if x.dim() == 2:
            return lifetime_sparsity(x, fraction)
        if x.dim() >= 3:
            return spatial_lifetime_sparsity(x, fraction)
        raise CaffeOnnxError(f"WTA needs a (N, units) or (N, C, H, W) top, got shape {list(x.shape)}")

    return run


def apply_wta(module: GraphModule, specs: list[WtaSpec]) -> list[str]:
    """Install each spec on `module` (training mode only); returns the ONNX values sparsified."""
    return [module.add_train_transform(spec.layer if spec.position is None else spec.position,
                                       winner_take_all(spec.fraction)) for spec in specs]
