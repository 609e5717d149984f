"""The runtime's typer commands: encoder, encode, export-triton, export-kserve, serve, bench.

`register(app)` adds them to the `caffeonnx` CLI; each command is a thin wrapper
over the runtime API, and user errors propagate as CaffeOnnxError (one line, exit 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from caffeonnx.errors import CaffeOnnxError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when it starts, else CPU), cpu or cuda.")]
ThreadsOption = Annotated[int, typer.Option("--threads", help="Intra-op CPU threads (0: onnxruntime's default).")]
ModelArg = Annotated[Path, typer.Argument(help="ONNX model (an encoder, or an autoencoder for 'encoder').")]
FP16Option = Annotated[bool, typer.Option("--fp16", help="CUDA: float16 compute; inputs and codes stay float32.")]
TF32Option = Annotated[bool, typer.Option("--tf32", help="CUDA: allow TF32 tensor-core math for float32 products.")]


def _session_config(device: str, threads: int = 0, **kw: object):
    from caffeonnx.runtime.session import DEVICES, SessionConfig

    if device not in DEVICES:
        raise CaffeOnnxError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if threads < 0:
        raise CaffeOnnxError(f"--threads must be 0 or positive, got {threads}")
    return SessionConfig(device=device, intra_threads=threads, **kw)  # type: ignore[arg-type]


def encoder(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Encoder .onnx to write (atomically).")],
    code: Annotated[str | None, typer.Option("--code", help="Cut at this blob, or at the top of this layer "
                                                "(default: the narrowest blob on the input->reconstruction path; "
                                                "a tie is refused with the candidates).")] = None,
) -> None:
    """Cut an autoencoder at its code blob: keep the encoder, drop decoder and loss."""
    import onnx

    from caffeonnx.converter.onnx_io import load_onnx
    from caffeonnx.fileio import check_output
    from caffeonnx.runtime.encoder import extract_encoder, save_model

    check_output(output, inputs=[model])
    enc, choice = extract_encoder(load_onnx(model), code)
    onnx.checker.check_model(enc, full_check=True)
    save_model(enc, output)
    how = "named with --code" if choice.reconstruction is None else f"narrowest on the path to {choice.reconstruction!r}"
    width = f"{choice.width} values per sample" if choice.width is not None else "width not static"
    out.print(f"code blob {choice.code!r} ({width}; {how})", highlight=False)
    out.print(f"wrote {output} ({len(enc.graph.node)} nodes, {len(enc.graph.initializer)} initializers)",
              highlight=False)


def encode(
    model: Annotated[Path, typer.Argument(help="Encoder .onnx (see 'caffeonnx encoder').")],
    inputs: Annotated[Path, typer.Argument(help="Samples: .npy, .npz or IDX (MNIST), gzip allowed; a Caffe LMDB; "
                                           "an HDF5 file or list of them; an ImageData list of 'path label' lines; "
                                           "a Parquet file; a directory of .npy/.parquet shards (manifest.json).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Codes to write (atomically): a .npy file; with "
                                        "--engine ray also a .parquet file (id + code columns), or a directory "
                                        "when the name ends with '/' (shards + manifest.json).")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per run.")] = 1024,
    device: DeviceOption = "auto",
    threads: ThreadsOption = 0,
    key: Annotated[str | None, typer.Option("--key", help="Array of an .npz, or dataset of an HDF5 file, to read "
                                            "(default: the only one, or the one named like the input blob).")] = None,
    scale: Annotated[float | None, typer.Option(
        "--scale", help="Replace the recorded transform_param scale (default: the model's data layer's; with none "
                        "on record 1/255 for uint8, else 1).")] = None,
    fp16: FP16Option = False,
    tf32: TF32Option = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="CUDA: capture a --batch-size run as a CUDA "
                                             "graph and replay it for every full batch.")] = False,
    engine: Annotated[str, typer.Option("--engine", help="ort: this process; ray: Ray Data actors, one encoder "
                                        "session each (pip install 'caffeonnx[ray]').")] = "ort",
    address: Annotated[str | None, typer.Option("--address", help="--engine ray: the Ray cluster to join (auto, "
                                                "ray://host:10001); default: a local Ray on this machine's "
                                                "CPUs, stopped after.")] = None,
    actors: Annotated[int | None, typer.Option("--actors", help="--engine ray: actors, one encoder session "
                                               "and one CPU each (default 2).")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option("--gpus-per-actor", help="--engine ray: GPUs per actor "
                                                         "(> 0: the actors run on CUDA when it starts, else on CPU; "
                                                         "default 0: CPU).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="--engine ray: npy or parquet (default: parquet for a "
                                            ".parquet -o, else npy).")] = None,
    shard_rows: Annotated[int | None, typer.Option("--shard-rows", help="--engine ray with -o DIR/: rows per shard "
                                                   "(default 1048576).")] = None,
) -> None:
    """Encode a file of samples into codes (.npy; with --engine ray also Parquet or shards), streaming."""
    from caffeonnx.fileio import check_output

    if engine not in ("ort", "ray"):
        raise CaffeOnnxError(f"--engine must be ort or ray, got {engine!r}")
    if engine != "ray" and (address, actors, gpus_per_actor) != (None, None, None):
        raise CaffeOnnxError("--address, --actors and --gpus-per-actor go with --engine ray")
    directory = output.endswith("/")
    if engine != "ray" and (fmt not in (None, "npy") or shard_rows is not None or directory
                            or Path(output).suffix.lower() in (".parquet", ".pq")):
        raise CaffeOnnxError("--format parquet, --shard-rows and directory outputs (-o DIR/) are written by "
                             "--engine ray; --engine ort writes one .npy")
    if shard_rows is not None and not directory:
        raise CaffeOnnxError(f"--shard-rows goes with a directory output: end -o with '/' (-o {output}/)")
    if directory:
        from caffeonnx.runtime.shards import check_output_dir

        check_output_dir(output, inputs=[model, inputs])
    else:
        check_output(output, inputs=[model, inputs])
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"), TimeRemainingColumn())
    if engine == "ray":
        from caffeonnx.runtime.ray_encode import (
            DEFAULT_SHARD_ROWS,
            check_actors,
            check_address,
            encode_file_ray,
            import_ray,
            output_format,
        )

        k, g = 2 if actors is None else actors, gpus_per_actor or 0.0
        check_actors(k, g)
        check_address(address)
        fmt = output_format(output, fmt)
        if (device == "cuda") != (g > 0) and device != "auto":
            raise CaffeOnnxError(f"--engine ray runs actors on CUDA exactly when --gpus-per-actor > 0; got --device "
                                 f"{device} with --gpus-per-actor {g:g}")
        import_ray()
        config = _session_config(device, threads, warmup=(), fp16=fp16, tf32=tf32,
                                 cuda_graphs=(batch_size,) if cuda_graph else ())
        err.print(f"running on Ray: {k} actors, {f'{g:g} GPUs each, CUDA where it starts' if g else 'CPU'}, "
                  f"{address or 'local Ray'}", highlight=False)
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("encode", total=None)
            result = encode_file_ray(model, inputs, output, config, batch_size, key, scale, address, k, g,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total),
                                     fmt=fmt, directory=directory, shard_rows=shard_rows or DEFAULT_SHARD_ROWS)
    else:
        from caffeonnx.runtime.encode import encode_file
        from caffeonnx.runtime.session import EncoderSession

        session = EncoderSession(model, _session_config(device, threads, warmup=(), fp16=fp16, tf32=tf32,
                                                        cuda_graphs=(batch_size,) if cuda_graph else ()))
        err.print(f"running on {session.describe()}", highlight=False)
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("encode", total=None)
            result = encode_file(session, inputs, output, batch_size, key, scale,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    out.print(f"read {result.samples} samples from the {result.kind}; transform: {result.transform}", highlight=False)
    shards = getattr(result, "shards", 0)
    where = f" in {shards} {result.format} shard(s) + manifest.json" if shards else ""
    out.print(f"wrote {output}: {result.samples} codes of shape {list(result.code_shape)}{where} "
              f"(inputs scaled by {result.scale:.6g})", highlight=False)


NameOption = Annotated[str | None, typer.Option("--name", help="Model name (default: the file's stem).")]
MaxBatchOption = Annotated[int, typer.Option("--max-batch", help="Triton max_batch_size (0: no batching; a model "
                                             "with a fixed batch dimension always gets 0, and is told so).")]
QueueDelayOption = Annotated[int, typer.Option("--max-queue-delay", "--max-delay-us",
                                               help="dynamic_batching max_queue_delay_microseconds.")]
PreferredOption = Annotated[list[int] | None, typer.Option(
    "--preferred-batch", help="dynamic_batching preferred_batch_size (repeatable): batch sizes the scheduler "
                              "forms rather than waiting for more.")]
InstancesOption = Annotated[int, typer.Option("--instances", help="instance_group count: model instances, each "
                                              "with its own session (per GPU with --kind gpu).")]
KindOption = Annotated[str, typer.Option("--kind", help="instance_group kind: cpu, gpu, or auto (Triton's "
                                         "default: the GPUs if there are any).")]
TritonThreadsOption = Annotated[int, typer.Option("--threads", help="intra_op_thread_count of each instance "
                                                  "(0: ONNX Runtime's default, every core, per instance).")]
GraphLevelOption = Annotated[str, typer.Option("--graph-level", help="ONNX Runtime graph optimisations: all "
                                               "(default), extended, basic or disable.")]
TensorRTOption = Annotated[bool, typer.Option("--tensorrt", help="Run through ONNX Runtime's TensorRT execution "
                                              "provider (gpu_execution_accelerator 'tensorrt'; needs --kind gpu).")]
TrtPrecisionOption = Annotated[str, typer.Option("--trt-precision", help="TensorRT precision_mode: fp32 or fp16.")]
TrtWorkspaceOption = Annotated[float | None, typer.Option("--trt-workspace-mb", help="TensorRT "
                                                          "max_workspace_size_bytes, in MiB.")]
TrtCacheOption = Annotated[str | None, typer.Option("--trt-engine-cache", help="Directory, as the Triton "
                                                    "container sees it, to keep built TensorRT engines in.")]


def _triton_options(max_batch: int, delay: int, preferred: list[int] | None, instances: int, kind: str,
                    threads: int, graph_level: str, tensorrt: bool, trt_precision: str, trt_workspace_mb: float | None,
                    trt_engine_cache: str | None):
    from caffeonnx.runtime.triton import TritonOptions

    opts = TritonOptions(max_batch, delay, tuple(preferred or ()), instances, kind.lower(), graph_level.lower(),
                         threads, tensorrt, trt_precision.upper(),
                         None if trt_workspace_mb is None else round(trt_workspace_mb * 2**20), trt_engine_cache)
    opts.check()
    return opts


def _report_triton(result) -> None:
    """What was written, how Triton will run it, and every option the model could not honour."""
    from caffeonnx.runtime.triton import describe

    out.print(f"wrote {result.path / 'config.pbtxt'} and {result.path / '1' / 'model.onnx'}", highlight=False)
    out.print(f"Triton: {describe(result)}", highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", highlight=False)


def export_triton(
    model: Annotated[Path, typer.Argument(help="ONNX model to serve (usually an encoder).")],
    repo_dir: Annotated[Path, typer.Argument(help="Triton model repository to write into.")],
    name: NameOption = None,
    max_batch: MaxBatchOption = 64,
    max_queue_delay: QueueDelayOption = 100,
    preferred_batch: PreferredOption = None,
    instances: InstancesOption = 1,
    kind: KindOption = "auto",
    threads: TritonThreadsOption = 0,
    graph_level: GraphLevelOption = "all",
    tensorrt: TensorRTOption = False,
    trt_precision: TrtPrecisionOption = "fp32",
    trt_workspace_mb: TrtWorkspaceOption = None,
    trt_engine_cache: TrtCacheOption = None,
) -> None:
    """Write a Triton model repository entry: NAME/config.pbtxt and NAME/1/model.onnx (ONNX Runtime backend)."""
    from caffeonnx.runtime.triton import export_triton as export

    opts = _triton_options(max_batch, max_queue_delay, preferred_batch, instances, kind, threads, graph_level,
                           tensorrt, trt_precision, trt_workspace_mb, trt_engine_cache)
    _report_triton(export(model, repo_dir, name, opts))


def export_kserve(
    model: Annotated[Path, typer.Argument(help="ONNX model to serve (usually an encoder).")],
    repo_dir: Annotated[Path, typer.Argument(help="Triton model repository to write into (upload it to "
                                             "--storage-uri).")],
    storage_uri: Annotated[str, typer.Option("--storage-uri", help="Where KServe reads the repository from: "
                                             "s3://, gs://, pvc://, https://... (the repository's root).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="InferenceService YAML to write.")] = Path(
        "inferenceservice.yaml"),
    service_name: Annotated[str | None, typer.Option("--service-name", help="InferenceService name (default: the "
                                                     "model name, lower-cased, '_' and '.' as '-').")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Kubernetes namespace.")] = None,
    min_replicas: Annotated[int, typer.Option("--min-replicas", help="Fewest replicas (0: scale to zero).")] = 1,
    max_replicas: Annotated[int | None, typer.Option("--max-replicas", help="Most replicas (default: "
                                                     "--min-replicas).")] = None,
    scale_metric: Annotated[str, typer.Option("--scale-metric", help="What the autoscaler watches: concurrency or "
                                              "rps (Knative, Serverless mode), cpu or memory (HPA).")] = "concurrency",
    scale_target: Annotated[int | None, typer.Option("--scale-target", help="Target value of --scale-metric per "
                                                     "replica (default: the autoscaler's).")] = None,
    cpu: Annotated[str | None, typer.Option("--cpu", help="CPU request and limit of a replica (default: --instances "
                                            "x --threads, at least 1).")] = None,
    memory: Annotated[str, typer.Option("--memory", help="Memory request and limit of a replica.")] = "2Gi",
    name: NameOption = None,
    max_batch: MaxBatchOption = 64,
    max_queue_delay: QueueDelayOption = 100,
    preferred_batch: PreferredOption = None,
    instances: InstancesOption = 1,
    kind: KindOption = "auto",
    threads: TritonThreadsOption = 0,
    graph_level: GraphLevelOption = "all",
    tensorrt: TensorRTOption = False,
    trt_precision: TrtPrecisionOption = "fp32",
    trt_workspace_mb: TrtWorkspaceOption = None,
    trt_engine_cache: TrtCacheOption = None,
) -> None:
    """Write the Triton repository entry (as export-triton) and a KServe InferenceService running it on Triton."""
    from caffeonnx.fileio import check_output, write_bytes_atomic
    from caffeonnx.runtime.kserve import KServeOptions, inference_service, to_yaml
    from caffeonnx.runtime.protocol import check_model_name
    from caffeonnx.runtime.triton import export_triton as export

    opts = _triton_options(max_batch, max_queue_delay, preferred_batch, instances, kind, threads, graph_level,
                           tensorrt, trt_precision, trt_workspace_mb, trt_engine_cache)
    model_name = check_model_name(name if name is not None else model.stem)
    isvc = KServeOptions(storage_uri, service_name or model_name.lower().replace("_", "-").replace(".", "-"),
                         namespace, min_replicas, max_replicas, scale_metric, scale_target, gpu=opts.kind == "gpu",
                         cpu=cpu if cpu is not None else str(opts.instances * max(opts.threads, 1)), memory=memory)
    manifest = inference_service(isvc)  # every option checked before anything is written
    check_output(output, inputs=[model])
    _report_triton(export(model, repo_dir, model_name, opts))
    write_bytes_atomic(output, to_yaml(manifest).encode())
    pred = manifest["spec"]["predictor"]
    target = f", target {pred['scaleTarget']}" if "scaleTarget" in pred else ""
    out.print(f"wrote {output}: InferenceService {isvc.name!r}, {pred['minReplicas']}-{pred['maxReplicas']} replicas "
              f"scaled on {pred['scaleMetric']}{target}, runtime kserve-tritonserver reading {storage_uri}",
              highlight=False)
    if opts.kind == "auto":
        out.print("note: --kind auto requests no GPU for the replicas, so Triton runs the model on their CPUs; "
                  "use --kind gpu for one GPU per replica", highlight=False)


def serve(
    model: Annotated[Path, typer.Argument(help="Encoder .onnx to serve.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    name: Annotated[str | None, typer.Option("--name", help="Model name in URLs (default: the file's stem).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most rows per model run and per request.")] = 64,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", help="How long a request waits for others to "
                                                "batch with.")] = 1.0,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="Batch concurrent requests.")] = True,
    device: DeviceOption = "auto",
    threads: ThreadsOption = 0,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Larger request bodies get 413.")] = 64.0,
    fp16: FP16Option = False,
    tf32: TF32Option = False,
    keep_alive: Annotated[float, typer.Option("--keep-alive", help="Seconds an idle connection is kept open.")] = 5.0,
    request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request's head and body "
                                                   "have to arrive, from its first byte (then 408).")] = 30.0,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Open connections; more get 503 and "
                                                 "are closed (the open-files limit is raised to fit).")] = 512,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="SIGTERM: seconds to finish the "
                                                    "requests in flight before the rest get 503.")] = 10.0,
    access_log: Annotated[str | None, typer.Option("--access-log", help="Append one line per request to this file "
                                                   "('-': standard output): time, client, method, path, status, "
                                                   "bytes, seconds.")] = None,
) -> None:
    """Serve an encoder over the Open Inference Protocol v2 (KServe / Triton REST), with dynamic batching."""
    from caffeonnx.runtime.protocol import check_model_name
    from caffeonnx.runtime.server import ServerConfig, check_descriptors, listen
    from caffeonnx.runtime.server import serve as run_server
    from caffeonnx.runtime.session import EncoderSession

    name = check_model_name(name if name is not None else model.stem)
    if max_batch < 1 or max_delay_ms < 0 or max_body_mb <= 0 or not 0 <= port < 65536:
        raise CaffeOnnxError(f"need --max-batch >= 1, --max-delay-ms >= 0, --max-body-mb > 0 and a port in "
                             f"0..65535; got {max_batch}, {max_delay_ms}, {max_body_mb}, {port}")
    if min(keep_alive, request_timeout, shutdown_timeout) <= 0 or max_connections < 1:
        raise CaffeOnnxError(f"need --keep-alive, --request-timeout and --shutdown-timeout > 0 and --max-connections "
                             f">= 1; got {keep_alive}, {request_timeout}, {shutdown_timeout}, {max_connections}")
    check_descriptors(max_connections)
    if access_log is not None:
        from caffeonnx.runtime.access_log import open_access_log

        log_stream = open_access_log(access_log)  # a bad path fails here, before the model loads
    with listen(host, port) as sock:  # a busy port fails here, before the model loads or anything says it serves
        session = EncoderSession(model, _session_config(device, threads, warmup=sorted({1, max_batch}), fp16=fp16,
                                                        tf32=tf32))
        config = ServerConfig(name, max_batch, max_delay_ms, batching, int(max_body_mb * (1 << 20)), keep_alive,
                              request_timeout, max_connections, shutdown_timeout,
                              log_stream if access_log is not None else None)
        how = f"batching up to {max_batch} rows within {max_delay_ms:g} ms" if batching else "no batching"
        port = sock.getsockname()[1]  # --port 0: the port the system chose
        err.print(f"serving model {name!r} on http://{host}:{port}/v2 ({session.describe()}; {how})",
                  highlight=False)
        run_server(session, config, sock)
    err.print("server stopped", highlight=False)


def bench(
    model: Annotated[Path | None, typer.Argument(help="Encoder .onnx (default: a 784-1000-500-250-30 deep AE "
                                                 "encoder with seeded weights).")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="Thread counts to compare the engines at, "
                                                "comma-separated (default: 1 and every core).")] = None,
    server_threads: Annotated[int, typer.Option("--server-threads", help="The server's intra-op threads.")] = 1,
    large_batch: Annotated[int, typer.Option("--large-batch", help="Batch of the throughput test.")] = 4096,
    concurrency: Annotated[str, typer.Option("--concurrency", help="Server load sweep, comma-separated.")] = "1,8,32",
    seconds: Annotated[float, typer.Option("--seconds", help="Load time per server point.")] = 3.0,
    server: Annotated[bool, typer.Option("--server/--no-server", help="Also load-test the server.")] = True,
    max_batch: Annotated[int, typer.Option("--max-batch", help="The server's max batch.")] = 64,
    max_delay_ms: Annotated[float, typer.Option("--max-delay-ms", help="The server's batching delay.")] = 1.0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the results here (.json, plus a "
                                                ".md beside it).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda: also both engines on the GPU "
                                        "(IOBinding + CUDA graphs, fp32/TF32/fp16) and the servers on it.")] = "cpu",
) -> None:
    """ONNX Runtime vs torch eager on one encoder, and the server under load with batching on and off."""
    import json

    from rich.markdown import Markdown

    from caffeonnx.fileio import write_bytes_atomic
    from caffeonnx.runtime.bench import default_threads, render_markdown, run_bench

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
        counts = default_threads() if threads is None else tuple(int(t) for t in threads.split(","))
    except ValueError:
        raise CaffeOnnxError(f"--concurrency and --threads expect integers like 1,8,32, got {concurrency!r} and "
                             f"{threads!r}") from None
    if min(counts) < 1 or server_threads < 1 or large_batch < 1 or seconds <= 0 or not levels or min(levels) < 1:
        raise CaffeOnnxError("--threads, --server-threads, --large-batch, --seconds and every --concurrency must "
                             "be positive")
    with err.status("benchmarking (engines, then the server)"):
        result = run_bench(model, counts, large_batch, levels, seconds, server, max_batch, max_delay_ms,
                           device=device, server_threads=server_threads)
    report = render_markdown(result)
    out.print(Markdown(report))
    if output is not None:
        write_bytes_atomic(output, (json.dumps(result, indent=1) + "\n").encode())
        write_bytes_atomic(output.with_suffix(".md"), report.encode())
        out.print(f"wrote {output} and {output.with_suffix('.md')}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the runtime commands to the `caffeonnx` CLI."""
    app.command("encoder")(encoder)
    app.command("encode")(encode)
    app.command("export-triton")(export_triton)
    app.command("export-kserve")(export_kserve)
    app.command("serve")(serve)
    app.command("bench")(bench)
