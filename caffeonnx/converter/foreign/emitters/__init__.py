"""One module per ONNX op family; each `emit_<op>` writes Caffe layers (see ../registry.py)."""
