"""Caffe-exact training in torch: the converter's ONNX graph as a module, Caffe's solvers and loop."""
