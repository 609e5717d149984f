"""The shared registry: lazy discovery, duplicate refusal, sorted listing."""
from __future__ import annotations

import pytest

from caffeonnx.converter.registry import get_handler, register_layer, supported_layers
from caffeonnx.registry import Registry, summary


def test_duplicate_names_are_refused_naming_the_holder() -> None:
    reg: Registry = Registry("thing", "caffeonnx.converter.layers")

    @reg.register("A", "B")
    def first() -> None:
        """First thing."""

    with pytest.raises(RuntimeError, match=r"thing 'B' is already registered to .*first"):
        reg.register("B")(lambda: None)
    assert reg.get("A") is first and summary(first) == "First thing."


def test_converter_layers_are_discovered_and_a_second_handler_is_refused() -> None:
    assert get_handler("InnerProduct") is not None and get_handler("NoSuchLayer") is None
    types = [h.layer_type for h in supported_layers()]
    assert types == sorted(types) and "Convolution" in types
    with pytest.raises(RuntimeError, match=r"Caffe layer type 'InnerProduct' is already registered to .*inner_product"):
        register_layer("InnerProduct", bottoms=1, tops=1)(lambda layer, ctx: None)
