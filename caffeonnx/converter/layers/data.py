"""Data-producing layers: each top becomes an ONNX graph input of the same name."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2


@register_layer("Input", bottoms=0, tops=(1, None))
def convert_input(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Input: tops fed by the user, with the shapes of input_param (one shape, or one per top)."""
    shapes = [tuple(s.dim) for s in layer.input_param.shape]
    if len(shapes) not in (0, 1, len(layer.top)):
        raise ctx.error(f"input_param has {len(shapes)} shapes for {len(layer.top)} tops; give 1 or {len(layer.top)}")
    for i in range(len(layer.top)):
        shape = shapes[i] if len(shapes) > 1 else (shapes[0] if shapes else (0,))
        ctx.graph_input(i, shape)


@register_layer("DummyData", bottoms=0, tops=(1, None))
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


@register_layer("MemoryData", bottoms=0, tops=2)
def convert_memory_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """MemoryData: (batch, channels, height, width) data and a (batch,) label."""
    p = layer.memory_data_param
    ctx.graph_input(0, (p.batch_size, p.channels, p.height, p.width))
    if len(layer.top) > 1:
        ctx.graph_input(1, (p.batch_size,))


def _decode_color(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> bool | None:
    """How an encoded Datum decodes: force_color, force_gray, or as stored."""
    t = layer.transform_param
    if t.force_color and t.force_gray:
        raise ctx.error("cannot set both force_color and force_gray")
    return True if t.force_color else (False if t.force_gray else None)


def _cropped(layer: caffe_pb2.LayerParameter, c: int, h: int, w: int) -> tuple[int, int, int]:
    crop = layer.transform_param.crop_size
    return (c, crop, crop) if crop else (c, h, w)


def _datum_shape(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> tuple[int, ...]:
    """Shape of one Datum in the Data layer's LMDB or LevelDB (decoded if encoded; after the crop)."""
    p = layer.data_param
    if layer.top[0] in ctx.options.input_shapes:
        return ()
    from caffeonnx.data.lmdb_source import first_datum_shape

    color = _decode_color(layer, ctx)
    try:
        c, h, w = first_datum_shape(p.source, p.backend, color)
    except CaffeOnnxError as exc:
        raise ctx.error(
            f"cannot read the data shape from source {p.source!r} ({exc}); give it with "
            f"--input-shape {layer.top[0]}=N,C,H,W"
        ) from None
    return _cropped(layer, c, h, w)


@register_layer("Data", bottoms=0, tops=(1, 2))
def convert_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """Data: batches of Datum records from an LMDB or LevelDB; image and label become graph inputs."""
    batch = layer.data_param.batch_size
    ctx.graph_input(0, (batch, *_datum_shape(layer, ctx)))
    if len(layer.top) > 1:
        ctx.graph_input(1, (batch,))


@register_layer("HDF5Data", bottoms=0, tops=(1, None))
def convert_hdf5_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """HDF5Data: one top per dataset, its per-row shape read from the first listed .h5 file."""
    from caffeonnx.data.hdf5_source import dataset_shapes, read_hdf5_list

    p = layer.hdf5_data_param
    unknown = [t for t in layer.top if t not in ctx.options.input_shapes]
    shapes: dict[str, tuple[int, ...]] = {}
    if unknown:
        try:
            _, shapes = dataset_shapes(read_hdf5_list(p.source, "HDF5Data")[0], unknown, "HDF5Data")
        except CaffeOnnxError as exc:
            raise ctx.error(
                f"cannot read the dataset shapes from source {p.source!r} ({exc}); give them with "
                + " ".join(f"--input-shape {t}=N,..." for t in unknown)
            ) from None
    for i, top in enumerate(layer.top):
        ctx.graph_input(i, (p.batch_size, *shapes.get(top, ())))


@register_layer("ImageData", bottoms=0, tops=2)
def convert_image_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """ImageData: images from a list file (BGR or gray, new_height/new_width, crop) and labels as graph inputs."""
    p = layer.image_data_param
    if layer.top[0] in ctx.options.input_shapes:
        sample: tuple[int, ...] = ()
    elif p.new_height > 0 and p.new_width > 0:
        sample = _cropped(layer, 3 if p.is_color else 1, p.new_height, p.new_width)
    else:
        from caffeonnx.data.image_source import first_image_shape

        try:
            sample = first_image_shape(layer)
        except CaffeOnnxError as exc:
            raise ctx.error(
                f"cannot read the image size from source {p.source!r} ({exc}); give it with "
                f"--input-shape {layer.top[0]}=N,C,H,W"
            ) from None
    ctx.graph_input(0, (p.batch_size, *sample))
    if len(layer.top) > 1:
        ctx.graph_input(1, (p.batch_size,))


@register_layer("WindowData", bottoms=0, tops=2)
def convert_window_data(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """WindowData: R-CNN's warped BGR windows [batch, 3, crop, crop] and their labels [batch] as graph inputs."""
    crop = layer.transform_param.crop_size
    if crop <= 0:
        # WindowDataLayer::DataLayerSetUp CHECKs crop_size > 0 (window_data_param.crop_size is the deprecated copy)
        crop = layer.window_data_param.crop_size
    if crop <= 0:
        raise ctx.error("WindowData needs transform_param { crop_size } > 0: every window is warped to that square")
    ctx.graph_input(0, (layer.window_data_param.batch_size, 3, crop, crop))
    ctx.graph_input(1, (layer.window_data_param.batch_size,))
