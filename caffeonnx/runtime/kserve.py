"""A KServe InferenceService for a Triton model repository written by export_triton.

KServe (serving.kserve.io/v1beta1) runs the repository with its `kserve-tritonserver`
ClusterServingRuntime: the storage initializer copies `storageUri` (the repository
root, holding NAME/config.pbtxt and NAME/1/model.onnx) to /mnt/models, which Triton
serves (`--model-store=/mnt/models`) over the v2 protocol.  The fields written are those
of the v1beta1 API: `spec.predictor` carries the ComponentExtensionSpec (minReplicas,
maxReplicas, scaleTarget, scaleMetric) and `spec.predictor.model` the ModelSpec
(modelFormat, runtime, protocolVersion, storageUri, and the container's resources).
`protocolVersion: v2` is needed: a ModelSpec defaults to v1, which the Triton runtime
does not list, so no runtime would be found.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from caffeonnx.errors import CaffeOnnxError

SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")  # ScaleMetric's kubebuilder enum
STORAGE_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://")
_ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # KServe's IsvcNameFmt (a DNS-1035 label)
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")  # a Kubernetes resource quantity
RUNTIME = "kserve-tritonserver"


@dataclass
class KServeOptions:
    """The InferenceService's name, where the repository lives, replicas and resources of each replica."""

    storage_uri: str
    name: str
    namespace: str | None = None
    min_replicas: int = 1
    max_replicas: int | None = None  # None: min_replicas (a fixed number of replicas)
    scale_metric: str = "concurrency"
    scale_target: int | None = None  # None: the autoscaler's default (Knative: 100 concurrent requests)
    gpu: bool = False  # each replica gets one nvidia.com/gpu
    cpu: str = "1"
    memory: str = "2Gi"

    def check(self) -> None:
        """Refuse what KServe's validation or the API server would refuse, with one line naming the option."""
        if not _ISVC_NAME.match(self.name) or len(self.name) > 63:
            raise CaffeOnnxError(f"InferenceService name {self.name!r} is not valid: lower-case letters, digits and "
                                 "'-', starting with a letter, at most 63 characters; choose one with --service-name")
        if self.namespace is not None and not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", self.namespace):
            raise CaffeOnnxError(f"--namespace {self.namespace!r} is not a valid Kubernetes namespace")
        if not self.storage_uri.startswith(STORAGE_PREFIXES):
            raise CaffeOnnxError(f"--storage-uri {self.storage_uri!r} is not a location KServe's storage initializer "
                                 f"reads; use one of {', '.join(STORAGE_PREFIXES)} (the repository's root)")
        top = self.max_replicas if self.max_replicas is not None else self.min_replicas
        if self.min_replicas < 0 or top < 1 or self.min_replicas > top:
            raise CaffeOnnxError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                                 f"{self.min_replicas} and {top}")
        if self.scale_metric not in SCALE_METRICS:
            raise CaffeOnnxError(f"--scale-metric must be one of {', '.join(SCALE_METRICS)}, got "
                                 f"{self.scale_metric!r}")
        if self.scale_target is not None and self.scale_target < 1:
            raise CaffeOnnxError(f"--scale-target must be a positive integer, got {self.scale_target}")
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory)):
            if not _QUANTITY.match(value):
                raise CaffeOnnxError(f"{flag} {value!r} is not a Kubernetes quantity (like 2, 500m, 4Gi)")


def inference_service(opts: KServeOptions) -> dict:
    """The InferenceService manifest as a dict (written by `to_yaml`)."""
    opts.check()
    metadata: dict = {"name": opts.name}
    if opts.namespace is not None:
        metadata["namespace"] = opts.namespace
    limits = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.gpu:
        limits["nvidia.com/gpu"] = "1"  # extended resources are set as limits; the request defaults to it
    predictor: dict = {
        "minReplicas": opts.min_replicas,
        "maxReplicas": opts.max_replicas if opts.max_replicas is not None else opts.min_replicas,
        "scaleMetric": opts.scale_metric,
    }
    if opts.scale_target is not None:
        predictor["scaleTarget"] = opts.scale_target
    predictor["model"] = {
        "modelFormat": {"name": "onnx", "version": "1"},
        "runtime": RUNTIME,
        "protocolVersion": "v2",
        "storageUri": opts.storage_uri,
        "resources": {"requests": {"cpu": opts.cpu, "memory": opts.memory}, "limits": limits},
    }
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a YAML double-quoted scalar: "1" stays a string, nothing is read as a number
    raise TypeError(f"cannot write {value!r} as YAML")


def _yaml_lines(value: dict, indent: str) -> list[str]:
    lines: list[str] = []
    for key, item in value.items():
        name = key if re.match(r"^[A-Za-z][A-Za-z0-9_./-]*$", key) else json.dumps(key)
        if isinstance(item, dict):
            lines += [f"{indent}{name}:", *_yaml_lines(item, indent + "  ")] if item else [f"{indent}{name}: {{}}"]
        else:
            lines.append(f"{indent}{name}: {_scalar(item)}")
    return lines


def to_yaml(manifest: dict) -> str:
    """Block-style YAML of a manifest made of dicts, strings and integers (strings always quoted)."""
    return "\n".join(_yaml_lines(manifest, "")) + "\n"
