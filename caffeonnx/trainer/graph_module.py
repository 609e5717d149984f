"""An ONNX graph written by the converter, run by torch with autograd: the trainer's net.

Why an interpreter and not a re-implementation of Caffe layers: the converter already
states every layer's forward as ONNX nodes (checked against real Caffe), so running
those nodes in torch gives the same forward and, through autograd, Caffe's backward.
Each initializer (= one Caffe param blob, shared blobs included) is ONE nn.Parameter:
a tied decoder reads the encoder's weight through a transposed view, so autograd adds
up the gradients of every user exactly as Caffe's shared diff does.

Caffe's TRAIN phase differs from ONNX inference for a few layer types (Dropout masks
and scales; BatchNorm accumulates its moving averages into its blobs), and
SigmoidCrossEntropyLoss trains with Caffe's closed-form gradient rather than autograd
through its dozen inference nodes; the metadata's per-layer records say which ONNX
values are a Caffe layer's bottoms and tops, so in training mode such a layer's tops
are computed from its bottoms by a `LayerOverride` instead of by its inference nodes.  Training-only transforms of a layer's top (WTA
sparsity) hook in the same way.  Feeding an intermediate value runs only the graph
above it, which is how stacked training bypasses inner layers.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import ModelProto, helper, numpy_helper
from torch import nn

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import CaffeWeights, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import ConvertedModel
from caffeonnx.converter.forks import layer_fork
from caffeonnx.converter.layers.loss import effective_loss_weights, normalization_mode
from caffeonnx.errors import CaffeOnnxError, UnsupportedError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.ops import NodeSpec, get_op
from caffeonnx.trainer.ops.shape import constant_value

Tensor = torch.Tensor
Values = dict[str, Tensor]

_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"}


@dataclass
class ParamInfo:
    """One learnable blob: its initializer name and Caffe's per-param multipliers."""

    name: str
    lr_mult: float
    decay_mult: float
    users: list[metadata.ParamUse]  # every layer sharing it (by position), with the shape it sees
    dtype: np.dtype  # storage dtype of the initializer (float16 when converted with --fp16)


@dataclass
class LossTerm:
    """A net output that Caffe adds to the objective: loss_weight · sum(value)."""

    value: str  # ONNX value name
    blob: str  # Caffe top name
    layer: str
    weight: float
    position: int = -1  # the layer's position in the net (names may repeat)


@dataclass
class LayerOverride:
    """A Caffe layer whose TRAIN-phase forward replaces its inference nodes."""

    layer: str
    bottoms: list[str]
    tops: list[str]
    run: Callable[[list[Tensor]], list[Tensor]]


class _CaffeNormalize(torch.autograd.Function):
    """y = s_c·x/‖x‖ forward; SSD's Backward_cpu for the bottom, the true derivative for the scale."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, across_spatial: bool, eps: float) -> Tensor:
        axes = tuple(range(1, x.dim())) if across_spatial else (1,)
        norm = torch.sqrt((x * x).sum(dim=axes, keepdim=True) + eps)
        s = scale.reshape(1, -1, *([1] * (x.dim() - 2)))
        ctx.save_for_backward(x, norm, s)
        ctx.axes = axes
        return x / norm * s

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, norm, s = ctx.saved_tensors
        dx = (dy - x * (x * dy).sum(dim=ctx.axes, keepdim=True) / (norm * norm)) / norm * s
        per_channel = [0, *range(2, x.dim())]
        dscale = (dy * x / norm).sum(dim=per_channel)
        return dx, dscale, None, None


@dataclass
class _Step:
    kernel: Callable[..., Any]
    inputs: list[str]
    outputs: list[str]
    what: str  # node or layer name, for error messages


def _attr_value(attr: onnx.AttributeProto, node: onnx.NodeProto) -> Any:
    """A node attribute as plain Python / numpy."""
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise UnsupportedError(f"node {node.name!r} ({node.op_type}) has a subgraph; control flow cannot be trained")
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _caffe_layers(model: ModelProto, records: list[metadata.LayerRecord]) -> list[caffe_pb2.LayerParameter | None]:
    """The LayerParameter of every converted layer, aligned with `records` (found by position, never by name)."""
    net = metadata.caffe_net_from(model)
    if net is None:
        return [None] * len(records)
    return [net.layer[r.index] if 0 <= r.index < len(net.layer) else None for r in records]


def find_layer(records: Sequence[metadata.LayerRecord], name: str, what: str = "") -> int:
    """The record index of the layer a user named; refuses a name that several layers share, listing them."""
    found = [k for k, r in enumerate(records) if r.name == name]
    where = f"{what}: " if what else ""
    if not found:
        raise CaffeOnnxError(f"{where}no layer named {name!r} in this net; its layers are {[r.name for r in records]}")
    if len(found) > 1:
        listed = ", ".join(f"#{records[k].index} ({records[k].type}, tops {records[k].tops})" for k in found)
        raise CaffeOnnxError(f"{where}layer name {name!r} is ambiguous: {len(found)} layers have it ({listed}); "
                             "rename one of them in the prototxt (Caffe allows repeated names, but a name given "
                             "here must pick one layer)")
    return found[0]


class GraphModule(nn.Module):
    """A caffeonnx ONNX graph as a differentiable torch module with one Parameter per initializer."""

    def __init__(self, model: ModelProto, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.skeleton = ModelProto()
        self.skeleton.CopyFrom(model)
        del self.skeleton.graph.initializer[:]
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
        arrays = dict(weights) if weights is not None else {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.records = metadata.layer_records(model)
        self.caffe_layers = _caffe_layers(model, self.records)  # aligned with records: one entry per layer
        self.phase = metadata.read_metadata(model).get(metadata.KEY_PHASE, "TEST")

        records = {r["name"]: r for r in metadata.param_records(model)}
        self.param_info: list[ParamInfo] = []
        self.params = nn.ParameterList()
        self._param_index: dict[str, int] = {}
        constants: dict[str, np.ndarray] = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if not np.issubdtype(arr.dtype, np.floating):
                constants[name] = arr
                continue
            rec = records.get(name, {})
            info = ParamInfo(name, float(rec.get("lr_mult", 1.0)), float(rec.get("decay_mult", 1.0)),
                             metadata.param_uses(rec) if rec else [], arr.dtype)
            self._param_index[name] = len(self.param_info)
            self.param_info.append(info)
            self.params.append(nn.Parameter(torch.from_numpy(np.array(arr, dtype=np.float32))))
        for info, p in zip(self.param_info, self.params):
            p.requires_grad_(info.lr_mult != 0.0)  # Caffe computes no param diff when lr_mult is 0

        self.input_names = [i.name for i in graph.input if i.name not in arrays]
        self.input_dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]  # 0 where symbolic
                           for i in graph.input if i.name not in arrays}
        self.output_names = [o.name for o in graph.output]
        self._steps, constants = self._build_steps(graph, opset, constants)
        self._const_keys: list[tuple[str, str]] = []
        for i, (name, value) in enumerate(constants.items()):
            key = f"const_{i}"
            self.register_buffer(key, torch.from_numpy(np.array(value)), persistent=False)
            self._const_keys.append((name, key))
        self._producer = {o: i for i, s in enumerate(self._steps) for o in s.outputs if o}
        self.loss_terms = self._find_loss_terms()
        self.overrides = self._find_overrides()
        self._plans: dict[tuple[tuple[str, ...], bool, frozenset[str]], list[tuple[_Step, list[str]]]] = {}
        self.train_transforms: dict[int, tuple[str, Callable[[Tensor], Tensor]]] = {}  # by layer position
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    # --- building -----------------------------------------------------------------
    def _build_steps(
        self, graph: onnx.GraphProto, opset: int, constants: dict[str, np.ndarray]
    ) -> tuple[list[_Step], dict[str, np.ndarray]]:
        """Kernels for every node; nodes that depend only on constants are folded now."""
        steps: list[_Step] = []
        known = dict(constants)
        missing: Counter[str] = Counter()
        used_consts: set[str] = set()
        for node in graph.node:
            factory = get_op(node.op_type) if node.domain in ("", "ai.onnx") else None
            if factory is None:
                missing[f"{node.domain + '.' if node.domain else ''}{node.op_type}"] += 1
                continue
            attrs = {a.name: _attr_value(a, node) for a in node.attribute}
            spec = NodeSpec(node.op_type, node.name, list(node.input), list(node.output), attrs, opset,
                            {i: known[n] for i, n in enumerate(node.input) if n in known})
            if node.op_type == "Constant":
                known[node.output[0]] = constant_value(spec)
                continue
            ins = [n for n in node.input if n]
            if node.op_type not in _RANDOM_OPS and all(n in known for n in ins):
                outs = factory(spec)(*[torch.from_numpy(np.array(known[n])) if n else None for n in node.input])
                outs = outs if isinstance(outs, tuple) else (outs,)
                for name, value in zip(node.output, outs):
                    if name:
                        known[name] = value.detach().numpy()
                continue
            used_consts.update(n for n in ins if n in known)
            steps.append(_Step(factory(spec), list(node.input), list(node.output), f"{node.op_type} node {node.name!r}"))
        if missing:
            listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in sorted(missing.items()))
            raise UnsupportedError(
                f"the trainer has no torch kernel for {sum(missing.values())} node(s): {listed}; "
                "see caffeonnx.trainer.ops.supported_ops() for the ops it runs"
            )
        outputs = {o.name for o in graph.output}
        return steps, {n: known[n] for n in known if n in used_consts or n in outputs}

    def _find_loss_terms(self) -> list[LossTerm]:
        """Caffe's objective: every top with a non-zero loss_weight (1 on top 0 of loss layers by default)."""
        terms = []
        for rec, layer in zip(self.records, self.caffe_layers):
            if layer is None:
                continue
            for j, w in enumerate(effective_loss_weights(layer)):
                if w and j < len(rec.tops):
                    terms.append(LossTerm(rec.tops[j], layer.top[j], layer.name, float(w), rec.index))
        return terms

    def _find_overrides(self) -> dict[int, LayerOverride]:
        """TRAIN-phase forwards of the Caffe layers whose inference graph differs or trains slower (by position)."""
        found: dict[int, LayerOverride] = {}
        for rec, layer in zip(self.records, self.caffe_layers):
            if layer is None:
                continue
            if layer.type == "Dropout":
                found[rec.index] = LayerOverride(rec.name, rec.bottoms, rec.tops, self._dropout(layer))
            elif layer.type == "BatchNorm" and not layer.batch_norm_param.use_global_stats and len(rec.params) == 3:
                found[rec.index] = LayerOverride(rec.name, rec.bottoms, rec.tops, self._batch_norm(layer, rec.params))
            elif (layer.type == "BN" and layer_fork(layer) == "deeplab" and self.phase == "TRAIN"
                  and not layer.bn_param.frozen and len(rec.params) == 4):  # PSPNet's BN (SegNet's has no averages)
                found[rec.index] = LayerOverride(rec.name, rec.bottoms, rec.tops, self._pspnet_bn(layer, rec.params))
            elif layer.type == "SigmoidCrossEntropyLoss" and len(rec.bottoms) == 2 and len(rec.tops) == 1:
                found[rec.index] = LayerOverride(rec.name, rec.bottoms, rec.tops, self._sigmoid_cross_entropy(layer))
            elif layer.type == "Normalize" and not layer.norm_param.channel_shared and len(rec.params) == 1:
                found[rec.index] = LayerOverride(rec.name, rec.bottoms, rec.tops, self._normalize(layer, rec.params))
        return found

    def _normalize(self, layer: caffe_pb2.LayerParameter, blobs: list[str]) -> Callable[[list[Tensor]], list[Tensor]]:
        """SSD's Normalize with per-channel scales, trained with SSD's own backward.

        NormalizeLayer::Backward_cpu gives the bottom s_c·(dy − x·Σ(x·dy)/‖x‖²)/‖x‖, where the
        derivative of its forward has Σ(x·s·dy) in place of s_c·Σ(x·dy): the two differ once the
        channels' scales do, and SSD's models were trained with the former.
        """
        p = layer.norm_param
        eps = float(np.float32(p.eps))
        scale = self.parameter(blobs[0])

        def run(xs: list[Tensor]) -> list[Tensor]:
            return [_CaffeNormalize.apply(xs[0], scale, p.across_spatial, eps)]

        return run

    def _dropout(self, layer: caffe_pb2.LayerParameter) -> Callable[[list[Tensor]], list[Tensor]]:
        """Caffe Dropout in TRAIN: keep each unit with probability 1 − p and scale it by 1/(1 − p)."""
        p = float(layer.dropout_param.dropout_ratio)
        scale = 1.0 / (1.0 - p)

        def run(xs: list[Tensor]) -> list[Tensor]:
            x = xs[0]
            keep = torch.rand(x.shape, generator=self.generator_for(x.device), device=x.device) >= p
            return [x * keep.to(x.dtype) * scale]

        return run

    def _batch_norm(self, layer: caffe_pb2.LayerParameter, blobs: list[str]) -> Callable[[list[Tensor]], list[Tensor]]:
        """Caffe BatchNorm in TRAIN: batch statistics, and the blobs accumulate their moving averages.

        Caffe: s ← λ·s + 1, mean_blob ← λ·mean_blob + mean, var_blob ← λ·var_blob + m/(m−1)·var,
        with m the values per channel and var the biased batch variance.
        """
        p = layer.batch_norm_param
        eps, fraction = float(p.eps), float(p.moving_average_fraction)
        mean_blob, var_blob, factor_blob = (self.parameter(n) for n in blobs)

        def run(xs: list[Tensor]) -> list[Tensor]:
            x = xs[0]
            axes = [0, *range(2, x.dim())]
            mean = x.mean(dim=axes, keepdim=True)
            centred = x - mean
            var = (centred * centred).mean(dim=axes, keepdim=True)
            with torch.no_grad():
                m = x.numel() // x.shape[1]
                correction = m / (m - 1) if m > 1 else 1.0
                factor_blob.mul_(fraction).add_(1.0)
                mean_blob.mul_(fraction).add_(mean.reshape(-1))
                var_blob.mul_(fraction).add_(var.reshape(-1), alpha=correction)
            return [centred / torch.sqrt(var + eps)]

        return run

    def _pspnet_bn(self, layer: caffe_pb2.LayerParameter, blobs: list[str]) -> Callable[[list[Tensor]], list[Tensor]]:
        """PSPNet's BN in TRAIN, not frozen: the converted graph's batch-statistics forward, plus the moving averages.

        BNLayer::Forward_cpu updates blob ← (1 − momentum)·batch + momentum·blob for the mean and
        for the biased variance E[(x − E[x])²] over N, H, W (its CuDNNBN engine stores cuDNN's
        unbiased one instead; this follows the CPU layer, as the converter does).
        """
        p = layer.bn_param
        eps, momentum = float(np.float32(p.eps)), float(np.float32(p.momentum))
        slope, bias, mean_blob, var_blob = (self.parameter(n) for n in blobs)

        def run(xs: list[Tensor]) -> list[Tensor]:
            x = xs[0]
            legacy = (*x.shape, 1, 1, 1)[:4]  # Caffe's num/channels/height/width, 1 for missing axes
            x4 = x.reshape(legacy)
            mean = x4.mean(dim=(0, 2, 3), keepdim=True)
            centred = x4 - mean
            var = (centred * centred).mean(dim=(0, 2, 3), keepdim=True)
            with torch.no_grad():
                mean_blob.mul_(momentum).add_(mean.reshape(mean_blob.shape), alpha=1.0 - momentum)
                var_blob.mul_(momentum).add_(var.reshape(var_blob.shape), alpha=1.0 - momentum)
            top = centred * torch.pow(var + eps, -0.5) * slope.reshape(mean.shape) + bias.reshape(mean.shape)
            return [top.reshape(x.shape)]

        return run

    def _sigmoid_cross_entropy(self, layer: caffe_pb2.LayerParameter) -> Callable[[list[Tensor]], list[Tensor]]:
        """Caffe SigmoidCrossEntropyLoss with its own backward: ∂x = (sigmoid(x) − t)·[kept] / normalizer.

        The inference graph states the same loss as a dozen elementwise nodes, and autograd through
        them reaches Caffe's closed-form gradient only up to rounding, a dozen passes later; torch's
        binary_cross_entropy_with_logits computes max(x,0) − x·t + log(1 + e^−|x|) in one pass and its
        backward is exactly Caffe's formula.  Targets equal to ignore_label (after Caffe's int cast)
        count as zero loss and zero gradient; the normalizer is Caffe's get_normalizer, at least 1.
        """
        p = layer.loss_param
        mode = normalization_mode(p, caffe_pb2.LossParameter.BATCH_SIZE)
        ignore = int(p.ignore_label) if p.HasField("ignore_label") else None

        def run(xs: list[Tensor]) -> list[Tensor]:
            x, t = xs
            t = t.reshape(x.shape)
            kept = None if ignore is None else t.to(torch.int64) != ignore
            weight = None if kept is None else kept.to(x.dtype)
            total = F.binary_cross_entropy_with_logits(x, t.to(x.dtype), weight=weight, reduction="sum")
            if mode == caffe_pb2.LossParameter.NONE:
                return [total]
            if mode == caffe_pb2.LossParameter.FULL or (mode == caffe_pb2.LossParameter.VALID and kept is None):
                count = x.numel()
            elif mode == caffe_pb2.LossParameter.VALID:
                count = kept.sum()  # type: ignore[union-attr]
            else:  # BATCH_SIZE: Caffe's outer_num_, the first axis
                count = x.shape[0]
            return [total / torch.clamp(torch.as_tensor(count, dtype=x.dtype, device=x.device), min=1.0)]

        return run

    def add_train_transform(self, layer: str | int, fn: Callable[[Tensor], Tensor]) -> str:
        """Apply `fn` to the first top of Caffe layer `layer` in training mode only (e.g. WTA sparsity).

        `layer` is a name, which must be unambiguous, or a position in the stored net.

        Returns the ONNX value transformed.  Inference and exported graphs are untouched.
        """
        if isinstance(layer, int):  # a position in the stored net
            rec = next((r for r in self.records if r.index == layer), None)
            if rec is None:
                raise CaffeOnnxError(f"no converted layer at position {layer} of the net")
        else:
            rec = self.records[find_layer(self.records, layer)]
        if not rec.tops:
            raise CaffeOnnxError(f"layer {layer!r} has no top to transform")
        self.train_transforms[rec.index] = (rec.tops[0], fn)
        self._plans.clear()
        return rec.tops[0]

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The random generator of TRAIN-phase layers (Dropout) on `device`, seeded with the module's seed."""
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    # --- running ------------------------------------------------------------------
    def _plan(self, outputs: tuple[str, ...], training: bool,
              fed: frozenset[str] = frozenset()) -> list[tuple[_Step, list[str]]]:
        """The steps needed for `outputs` given the `fed` values, in graph order, with the values to free after each.

        A fed value is a source even when a node would compute it: feeding an intermediate
        value runs only the part of the graph above it (stacked training bypasses layers so).
        """
        key = (outputs, training, fed)
        if key in self._plans:
            return self._plans[key]
        producer = dict(self._producer)
        steps = list(self._steps)
        position = {i: float(i) for i in range(len(steps))}
        if training:
            for ov in self.overrides.values():
                index = len(steps)
                # Just before the inference node that wrote the layer's top: its bottoms are ready there.
                position[index] = min((self._producer[t] for t in ov.tops if t in self._producer),
                                      default=len(self._steps)) - 0.5
                steps.append(_Step(lambda *xs, _ov=ov: tuple(_ov.run(list(xs))), ov.bottoms, ov.tops,
                                   f"Caffe layer {ov.layer!r} (TRAIN)"))
                for t in ov.tops:
                    producer[t] = index
            for at, (top, fn) in self.train_transforms.items():
                layer = next(r.name for r in self.records if r.index == at)
                j = producer[top]
                before = f"{top}#before:{layer}"
                src = steps[j]
                steps[j] = _Step(src.kernel, src.inputs, [before if o == top else o for o in src.outputs], src.what)
                index = len(steps)
                position[index] = position[j] + 0.25  # right after the producer, before any consumer
                steps.append(_Step(fn, [before], [top], f"training transform of layer {layer!r}"))
                producer[before], producer[top] = j, index
        needed: set[int] = set()
        stack = list(outputs)
        seen: set[str] = set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            i = producer.get(v)
            if i is None or v in fed:
                continue
            needed.add(i)
            stack.extend(n for n in steps[i].inputs if n)
        order = sorted(needed, key=lambda i: position[i])
        last_use: dict[str, int] = {}
        for k, i in enumerate(order):
            for n in steps[i].inputs:
                if n:
                    last_use[n] = k
        keep = set(outputs) | set(fed)
        plan = [(steps[i], [n for n in dict.fromkeys(steps[i].inputs) if n and last_use.get(n) == k and n not in keep])
                for k, i in enumerate(order)]
        self._plans[key] = plan
        return plan

    def forward(self, feeds: Mapping[str, Tensor | np.ndarray], outputs: Sequence[str] | None = None) -> Values:
        """Run the graph on `feeds` (graph input name -> batch); returns the requested values."""
        wanted = tuple(outputs) if outputs is not None else tuple(self.output_names)
        plan = self._plan(wanted, self.training, frozenset(n for n in feeds if n not in self.input_names))
        device, dtype = self.device, self.dtype
        env: Values = {name: self._buffers[key] for name, key in self._const_keys}  # type: ignore[misc]
        for info, p in zip(self.param_info, self.params):
            env[info.name] = p
        for name, value in feeds.items():
            t = torch.as_tensor(value)
            if t.is_floating_point():
                t = t.to(dtype or (t.dtype if isinstance(value, Tensor) else torch.float32))
            env[name] = t.to(device)
        for step, free in plan:
            try:
                args = [env[n] if n else None for n in step.inputs]
            except KeyError as exc:
                raise CaffeOnnxError(
                    f"graph input {exc.args[0]!r} was not fed (needed by {step.what}); feed every one of "
                    f"{self.input_names}"
                ) from None
            out = step.kernel(*args)
            if isinstance(out, tuple):
                for name, value in zip(step.outputs, out):
                    if name:
                        env[name] = value
            else:
                env[step.outputs[0]] = out
            for n in free:
                env.pop(n, None)
        missing = [o for o in wanted if o not in env]
        if missing:
            raise CaffeOnnxError(f"no value named {missing!r} in the graph; its outputs are {self.output_names}")
        return {o: env[o] for o in wanted}

    def loss(self, values: Mapping[str, Tensor]) -> Tensor:
        """Caffe's objective from computed values: Σ loss_weight · sum(top) over the loss terms."""
        if not self.loss_terms:
            raise CaffeOnnxError("the net has no loss: give a loss layer (e.g. EuclideanLoss) or a top a loss_weight")
        total = values[self.loss_terms[0].value].sum() * self.loss_terms[0].weight
        for term in self.loss_terms[1:]:
            total = total + values[term.value].sum() * term.weight
        return total

    def required_inputs(self, outputs: Sequence[str]) -> list[str]:
        """The graph inputs that computing `outputs` reads (in graph order)."""
        read = {n for step, _ in self._plan(tuple(outputs), self.training) for n in step.inputs}
        return [n for n in self.input_names if n in read or n in outputs]

    def loss_outputs(self) -> list[str]:
        """The ONNX values the objective needs."""
        return list(dict.fromkeys(t.value for t in self.loss_terms))

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        for p in self.params:
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype float feeds are cast to: the parameters' (None for a graph without any)."""
        for p in self.params:
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return None

    # --- parameters in and out -----------------------------------------------------
    def named_blobs(self) -> list[tuple[ParamInfo, nn.Parameter]]:
        """Every learnable blob with its Caffe multipliers, in Caffe's learnable_params order."""
        return list(zip(self.param_info, self.params))

    def parameter(self, name: str) -> nn.Parameter:
        """The Parameter of initializer `name`."""
        return self.params[self._param_index[name]]

    def arrays(self) -> dict[str, np.ndarray]:
        """Current initializer values (float32, or the stored dtype such as float16)."""
        return {info.name: p.detach().cpu().numpy().astype(info.dtype, copy=True) for info, p in self.named_blobs()}

    def load_arrays(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        """Overwrite parameters from arrays by initializer name (shapes must match)."""
        with torch.no_grad():
            for name, arr in arrays.items():
                if name not in self._param_index:
                    continue
                p = self.parameter(name)
                if tuple(arr.shape) != tuple(p.shape):
                    raise CaffeOnnxError(
                        f"{source}: {name!r} has shape {list(arr.shape)} but the net's blob is {list(p.shape)}; "
                        "are these weights from another net?"
                    )
                p.copy_(torch.from_numpy(np.array(arr, dtype=np.float32)))

    def load_caffe_weights(self, weights: CaffeWeights) -> list[str]:
        """Copy each param from the first of its layers found in a caffemodel; returns the params not found.

        As Caffe's CopyTrainedLayersFrom, a caffemodel layer's blobs go to the FIRST layer of that name.
        """
        first: dict[str, int] = {}
        for rec in self.records:
            first.setdefault(rec.name, rec.index)
        missing, arrays = [], {}
        for info, p in self.named_blobs():
            found = next((u for u in info.users
                          if first.get(u.layer) == u.position and len(weights.blobs.get(u.layer, ())) > u.index), None)
            if found is None:
                missing.append(info.name)
                continue
            arr = weights.blobs[found.layer][found.index].data
            arrays[info.name] = arr.reshape(tuple(p.shape)) if arr.size == p.numel() else arr
        self.load_arrays(arrays, str(weights.path))
        return missing

    def share_parameters(self, other: GraphModule) -> None:
        """Use `other`'s Parameter objects for every initializer both have (a TEST net sharing the TRAIN weights)."""
        for name, i in self._param_index.items():
            if name in other._param_index:
                self.params[i] = other.parameter(name)

    def to_converted(self) -> ConvertedModel:
        """The same ONNX graph with the current values as its initializers (ties stay one initializer)."""
        return ConvertedModel(self.skeleton, self.arrays())

    def save_onnx(self, path: str | os.PathLike[str]) -> None:
        """Write the graph with the trained initializers (atomically)."""
        self.to_converted().save(path)

    def caffe_blobs(self) -> dict[int, list[np.ndarray]]:
        """Each layer's param blobs by its position in `caffe_net()`; a shared blob appears in every layer using it."""
        where = {rec.index: k for k, rec in enumerate(r for r, layer in zip(self.records, self.caffe_layers) if layer)}
        blobs: dict[int, dict[int, np.ndarray]] = {}
        for info, p in self.named_blobs():
            value = p.detach().cpu().numpy().astype(np.float32)
            for use in info.users:
                if use.position in where:
                    blobs.setdefault(where[use.position], {})[use.index] = value.reshape(use.shape)
        return {k: [by_index[i] for i in sorted(by_index)] for k, by_index in blobs.items()}

    def caffe_net(self) -> caffe_pb2.NetParameter:
        """The converted layers of the stored Caffe net, in order (what Caffe's Net::ToProto lists)."""
        net = metadata.caffe_net_from(self.skeleton)
        if net is None:
            raise CaffeOnnxError("this ONNX model was not written by caffeonnx (no caffe.net metadata): it has no Caffe net to save")
        out = caffe_pb2.NetParameter()
        out.CopyFrom(net)
        del out.layer[:]
        for layer in self.caffe_layers:
            if layer is not None:
                out.layer.add().CopyFrom(layer)
        return out

    def save_caffemodel(self, path: str | os.PathLike[str]) -> None:
        """Write the trained weights as a Caffe .caffemodel (atomically)."""
        write_caffemodel(path, self.caffe_net(), self.caffe_blobs())
