"""Caffe <-> ONNX conversion (ONNX is the hub every other part builds on)."""
