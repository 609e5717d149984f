"""The encoder in production: extraction, ONNX Runtime sessions, batch encoding and serving.

- encoder.py: cut an autoencoder at its code blob (`caffeonnx encoder`);
- session.py: EncoderSession, CUDA (IOBinding, CUDA graphs, fp16, TF32) or CPU;
- inputs.py, encode.py: memory-mapped batch encoding (`caffeonnx encode`);
- protocol.py, batcher.py, infer_endpoint.py, server.py: the v2 inference server (`caffeonnx serve`);
- triton.py: a Triton model repository entry (`caffeonnx export-triton`);
- torch_encoder.py, loadgen.py, bench.py: `caffeonnx bench`;
- commands.py: the typer commands, added to the CLI by `register(app)`.

Modules are imported on use, so `import caffeonnx.runtime` stays cheap.
"""
