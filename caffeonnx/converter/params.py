"""Learnable parameters and Caffe's sharing rules.

A Caffe param with a `name` is one blob shared by every layer that names it: one
ONNX initializer, named after it.  The checks and their wording follow Caffe's
Net::AppendParam so users see the message they know from Caffe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from caffeonnx.converter.metadata import ParamUse
from caffeonnx.errors import SharedParamError, WeightsError
from caffeonnx.proto import caffe_pb2


def shape_string(shape: tuple[int, ...]) -> str:
    """Caffe's Blob::shape_string: '10 20 (200)'."""
    return " ".join(str(d) for d in shape) + f" ({math.prod(shape)})"


@dataclass
class Param:
    """One learnable blob (one ONNX initializer) and every layer that uses it."""

    name: str  # ONNX initializer name
    caffe_name: str  # ParamSpec.name ("" when the blob is not shared)
    shape: tuple[int, ...]
    data: np.ndarray
    owner: str
    share_mode: int = caffe_pb2.ParamSpec.STRICT
    lr_mult: float | None = None  # None: never set, Caffe's default 1 applies
    decay_mult: float | None = None
    users: list[ParamUse] = field(default_factory=list)


class ParamTable:
    """All learnable params of a net in Caffe's order, with sharing resolved."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.params: dict[str, Param] = {}  # by initializer name
        self._by_caffe_name: dict[str, Param] = {}

    def add(
        self,
        layer: str,
        position: int,
        index: int,
        spec: caffe_pb2.ParamSpec | None,
        shape: tuple[int, ...],
        data: np.ndarray,
        default_name: str,
        taken: set[str],
        weights_source: str | None = None,
    ) -> Param:
        """Register blob `index` of `layer` (at `position` in the net); returns the (possibly shared) Param.

        `weights_source` names the caffemodel `data` was read from; None means a filler made it.
        """
        caffe_name = spec.name if spec is not None else ""
        owner = self._by_caffe_name.get(caffe_name) if caffe_name else None
        if owner is None:
            name = caffe_name or default_name
            base, k = name, 1
            while name in self.params or name in taken:
                name = f"{base}_{k}"
                k += 1
            param = Param(name=name, caffe_name=caffe_name, shape=shape, data=data, owner=layer)
            if spec is not None:
                param.share_mode = spec.share_mode
                if spec.HasField("lr_mult"):
                    param.lr_mult = spec.lr_mult
                if spec.HasField("decay_mult"):
                    param.decay_mult = spec.decay_mult
            param.users.append(ParamUse(layer, index, shape, position))
            self.params[name] = param
            if caffe_name:
                self._by_caffe_name[caffe_name] = param
            return param
        self._check_share(owner, layer, spec, shape)
        # A filled copy is dropped (Caffe's ShareData points the sharing layer at the owner's blob);
        # a caffemodel holds one copy per layer (PERMISSIVE: same count, own shape) and they must agree.
        if weights_source is not None and not np.array_equal(data.reshape(-1), owner.data.reshape(-1), equal_nan=True):
            with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf copies: the message says so, not a warning
                diff = float(np.max(np.abs(data.reshape(-1) - owner.data.reshape(-1))))
            raise WeightsError(
                f"{weights_source}: shared param {caffe_name!r} differs between layer {owner.owner!r} and "
                f"layer {layer!r} (max abs difference {diff:g}); Caffe keeps one copy per layer and "
                "they must be identical: re-save the caffemodel from Caffe"
            )
        owner.users.append(ParamUse(layer, index, shape, position))
        return owner

    def _check_share(self, owner: Param, layer: str, spec: caffe_pb2.ParamSpec, shape: tuple[int, ...]) -> None:
        name = owner.caffe_name
        where = f"{self.source}: layer {layer!r}"
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if math.prod(shape) != math.prod(owner.shape):
                raise SharedParamError(
                    f"{where}: Cannot share param '{name}' owned by layer '{owner.owner}' with layer "
                    f"'{layer}'; count mismatch.  Owner layer param shape is {shape_string(owner.shape)}; "
                    f"sharing layer expects shape {shape_string(shape)}"
                )
        elif shape != owner.shape:
            raise SharedParamError(
                f"{where}: Cannot share param '{name}' owned by layer '{owner.owner}' with layer "
                f"'{layer}'; shape mismatch.  Owner layer param shape is {shape_string(owner.shape)}; "
                f"sharing layer expects shape {shape_string(shape)} "
                "(for a tied decoder set inner_product_param { transpose: true }, or use share_mode: PERMISSIVE)"
            )
        for attr in ("lr_mult", "decay_mult"):
            if spec.HasField(attr):
                mine, theirs = getattr(spec, attr), getattr(owner, attr)
                if theirs is None:
                    setattr(owner, attr, mine)
                elif mine != theirs:
                    raise SharedParamError(
                        f"{where}: Shared param '{name}' has mismatched {attr}. ({mine:g} vs. {theirs:g}) "
                        f"Give every layer sharing '{name}' the same {attr}."
                    )
