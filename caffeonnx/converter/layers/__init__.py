"""Caffe layer handlers, one module per layer family (discovered by the registry)."""
