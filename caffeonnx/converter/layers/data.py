"""Data-producing layers: each top becomes an ONNX graph input of the same name."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("Input")
def convert_input(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Input: tops fed by the user, with the shapes of input_param (one shape, or one per top)."""
    shapes = [tuple(s.dim) for s in layer.input_param.shape]
    if len(shapes) not in (0, 1, len(layer.top)):
        raise ctx.error(f"input_param has {len(shapes)} shapes for {len(layer.top)} tops; give 1 or {len(layer.top)}")
    for i in range(len(layer.top)):
        shape = shapes[i] if len(shapes) > 1 else (shapes[0] if shapes else (0,))
        ctx.graph_input(i, shape)


@register_layer("DummyData")
def convert_dummy_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """DummyData: filler-made blobs in Caffe; graph inputs here, so callers feed them."""
    p = layer.dummy_data_param
    n = len(layer.top)
    if p.shape:
        shapes = [tuple(s.dim) for s in p.shape]
    else:
        legacy = [list(p.num), list(p.channels), list(p.height), list(p.width)]
        shapes = [tuple(f[i] if len(f) > 1 else f[0] for f in legacy) for i in range(n)] if all(legacy) else []
    if len(shapes) not in (1, n):
        raise ctx.error(f"dummy_data_param gives {len(shapes)} shapes for {n} tops")
    for i in range(n):
        ctx.graph_input(i, shapes[i] if len(shapes) > 1 else shapes[0])


@register_layer("MemoryData")
def convert_memory_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """MemoryData: (batch, channels, height, width) data and a (batch,) label."""
    p = layer.memory_data_param
    ctx.graph_input(0, (p.batch_size, p.channels, p.height, p.width))
    if len(layer.top) > 1:
        ctx.graph_input(1, (p.batch_size,))


def _datum_shape(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> tuple[int, ...]:
    """Shape of one Datum in the Data layer's LMDB (after transform_param crop)."""
    p = layer.data_param
    if layer.top[0] in ctx.options.input_shapes:
        return ()
    from caffeonnx.data.lmdb_source import first_datum_shape  # optional dependency: lmdb

    try:
        c, h, w = first_datum_shape(p.source)
    except Exception as exc:  # noqa: BLE001 - reported with the fix to apply
        raise ctx.error(
            f"cannot read the data shape from source {p.source!r} ({exc}); give it with "
            f"--input-shape {layer.top[0]}=N,C,H,W"
        ) from None
    crop = layer.transform_param.crop_size
    return (c, crop, crop) if crop else (c, h, w)


@register_layer("Data")
def convert_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Data: batches of Datum records from an LMDB; image and label become graph inputs."""
    batch = layer.data_param.batch_size
    ctx.graph_input(0, (batch, *_datum_shape(layer, ctx)))
    if len(layer.top) > 1:
        ctx.graph_input(1, (batch,))


@register_layer("HDF5Data")
def convert_hdf5_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """HDF5Data: one top per dataset; shapes come from --input-shape (the files are not read)."""
    for i, top in enumerate(layer.top):
        if top not in ctx.options.input_shapes:
            raise ctx.error(
                f"the shape of HDF5 dataset {top!r} is not in the prototxt; give it with --input-shape {top}=N,..."
            )
        ctx.graph_input(i, ctx.options.input_shapes[top])
