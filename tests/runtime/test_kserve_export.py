"""export-kserve: the InferenceService YAML fits KServe's v1beta1 CRD and runs the exported repository on Triton.

KSERVE_SUBSET is the part of the InferenceService CRD's OpenAPI schema that export-kserve writes, transcribed from
KServe's API types (pkg/apis/serving/v1beta1: InferenceServiceSpec.predictor, PredictorSpec's inlined
ComponentExtensionSpec {minReplicas, maxReplicas, scaleTarget, scaleMetric (kubebuilder enum cpu, memory,
concurrency, rps)} and its ModelSpec {modelFormat {name required, version}, runtime, protocolVersion, storageUri,
resources}) and Kubernetes' ResourceRequirements (quantities are int-or-string).  `additionalProperties: false`
where the CRD has a closed set of fields, so a misspelt field fails, as the API server's structural schema would
prune or refuse it; metadata.name follows KServe's IsvcNameFmt.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.kserve import KServeOptions, inference_service, to_yaml

jsonschema = pytest.importorskip("jsonschema")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|"
                                                                         r"Ti|Pi|Ei)?$"}]}
RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    "limits": {"type": "object", "additionalProperties": QUANTITY},
    "requests": {"type": "object", "additionalProperties": QUANTITY},
}}
MODEL = {"type": "object", "required": ["modelFormat"], "properties": {
    "modelFormat": {"type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
    "runtime": {"type": "string"},
    "protocolVersion": {"type": "string"},
    "storageUri": {"type": "string"},
    "resources": RESOURCES,
}, "additionalProperties": False}
PREDICTOR = {"type": "object", "properties": {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer"},
    "scaleMetric": {"type": "string", "enum": ["cpu", "memory", "concurrency", "rps"]},
    "model": MODEL,
}, "additionalProperties": False}
KSERVE_SUBSET = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "serving.kserve.io/v1beta1"},
    "kind": {"const": "InferenceService"},
    "metadata": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"}}},
    "spec": {"type": "object", "required": ["predictor"], "properties": {"predictor": PREDICTOR},
             "additionalProperties": False},
}}


def load_checked(path: Path) -> dict:
    """The YAML at `path`, validated against the CRD subset and KServe's own replica rule."""
    manifest = yaml.safe_load(path.read_text())
    jsonschema.validate(manifest, KSERVE_SUBSET)
    pred = manifest["spec"]["predictor"]
    assert pred["minReplicas"] <= pred["maxReplicas"]  # validateReplicas (maxReplicas 0 means no bound; never written)
    return manifest


def test_gpu_service_for_the_deep_encoder(deep_encoder_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "isvc.yaml"
    res = CliRunner().invoke(app, [
        "export-kserve", str(deep_encoder_path), str(tmp_path / "repo"), "--name", "deep_encoder", "--storage-uri",
        "s3://models/repo", "-o", str(out), "--kind", "gpu", "--instances", "2", "--min-replicas", "2",
        "--max-replicas", "8", "--scale-target", "16", "--namespace", "serving", "--preferred-batch", "32"])
    assert res.exit_code == 0, res.output
    manifest = load_checked(out)
    assert manifest["metadata"] == {"name": "deep-encoder", "namespace": "serving"}
    pred = manifest["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == \
        (2, 8, "concurrency", 16)
    model = pred["model"]
    assert model["modelFormat"] == {"name": "onnx", "version": "1"} and model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2" and model["storageUri"] == "s3://models/repo"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the repository it points at is written alongside, with the same options
    cfg = text_format.Parse((tmp_path / "repo" / "deep_encoder" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [32]
    assert "InferenceService 'deep-encoder', 2-8 replicas scaled on concurrency, target 16" in res.output


def test_cpu_service_sizes_the_replica_from_instances_and_threads(deep_encoder_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "isvc.yaml"
    res = CliRunner().invoke(app, [
        "export-kserve", str(deep_encoder_path), str(tmp_path / "repo"), "--storage-uri", "pvc://models/repo",
        "-o", str(out), "--kind", "cpu", "--instances", "3", "--threads", "2", "--memory", "1Gi"])
    assert res.exit_code == 0, res.output
    manifest = load_checked(out)
    pred = manifest["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 1) and "scaleTarget" not in pred
    resources = pred["model"]["resources"]
    assert resources == {"requests": {"cpu": "6", "memory": "1Gi"}, "limits": {"cpu": "6", "memory": "1Gi"}}
    assert manifest["metadata"]["name"] == "deep-encoder"


def test_kind_auto_is_said_to_run_on_cpu(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export-kserve", str(deep_encoder_path), str(tmp_path / "r"), "--storage-uri",
                                   "gs://b/r", "-o", str(tmp_path / "i.yaml")])
    assert res.exit_code == 0, res.output
    assert "note: --kind auto requests no GPU for the replicas" in res.output
    assert "nvidia.com/gpu" not in (tmp_path / "i.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--service-name", "Bad_Name"], r"InferenceService name 'Bad_Name' is not valid"),
    (["--storage-uri", "models/repo"], r"--storage-uri 'models/repo' is not a location"),
    (["--min-replicas", "3", "--max-replicas", "2"], r"need 0 <= --min-replicas <= --max-replicas"),
    (["--scale-metric", "latency"], r"--scale-metric must be one of concurrency, rps, cpu, memory"),
    (["--scale-target", "0"], r"--scale-target must be a positive integer"),
    (["--cpu", "two"], r"--cpu 'two' is not a Kubernetes quantity"),
    (["--tensorrt"], r"--tensorrt runs on GPU instances"),
])
def test_bad_options_are_refused_before_anything_is_written(deep_encoder_path: Path, tmp_path: Path,
                                                            args: list[str], message: str) -> None:
    base = ["export-kserve", str(deep_encoder_path), str(tmp_path / "repo"), "-o", str(tmp_path / "i.yaml")]
    if "--storage-uri" not in args:
        base += ["--storage-uri", "s3://b/repo"]
    res = CliRunner().invoke(app, base + args)
    assert isinstance(res.exception, CaffeOnnxError), res.output
    assert re.search(message, str(res.exception)), res.exception
    assert list(tmp_path.iterdir()) == []


def test_yaml_round_trips_odd_strings() -> None:
    manifest = inference_service(KServeOptions("https://host/a b/\"repo\": #1", "svc", scale_metric="rps",
                                               scale_target=5, min_replicas=0, max_replicas=3))
    assert yaml.safe_load(to_yaml(manifest)) == manifest
    jsonschema.validate(manifest, KSERVE_SUBSET)
