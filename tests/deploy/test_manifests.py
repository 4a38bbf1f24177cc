"""deploy/ and the Dockerfile, checked offline: no cluster or registry is reachable here.

Core resources against the Kubernetes schemas (kubernetes-validate, strict: an unknown field fails);
the KServe resources against KServe's own CRD schemas (tests/deploy/crds, from kserve/kserve at
aaac4e294, Apache-2.0; made strict the way the API server prunes: a field a schema does not name is an
error); the Prefect work pool's base job template rendered by prefect-kubernetes itself, its Job then
validated as above; the Dockerfile with hadolint. What the containers run is checked against our own
CLI and settings, so a renamed flag or setting breaks here, not in a cluster.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from llmadapter.cli import build_parser
from llmadapter.server.app import build_app
from llmadapter.server.settings import ServerSettings
from llmadapter.settings import LLMAdapterSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = Path(__file__).parent / "crds"
K8S_VERSION = "1.37.0"
IMAGE_HOME = "/opt/llmadapter"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(path: Path) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _documents(path)}


def _strict(schema: Any) -> Any:
    """`schema` with every object that names its properties closed to others, as the API server's
    pruning treats a structural schema (unless it says x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    if isinstance(schema.get("properties"), dict):
        closed["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
    return closed


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    group_version = doc["apiVersion"].split("/")
    plural = {"ServingRuntime": "servingruntimes", "InferenceService": "inferenceservices"}[doc["kind"]]
    with gzip.open(CRDS / f"{plural}.{group_version[0]}.{group_version[1]}.json.gz") as f:
        schema = _strict(json.load(f)["openAPIV3Schema"])
    body = {k: v for k, v in doc.items() if k != "metadata"}  # metadata is ObjectMeta, checked by the server
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(body)
    ]


def _k8s_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}: {e.message}"]
    return []


# -- Kubernetes resources ------------------------------------------------------------------------


def test_every_core_manifest_passes_strict_kubernetes_validation() -> None:
    docs = _documents(DEPLOY / "kubernetes" / "serve.yaml")
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert [error for doc in docs for error in _k8s_errors(doc)] == []


def test_strict_validation_catches_a_misspelled_field() -> None:
    deployment = copy.deepcopy(_by_kind(DEPLOY / "kubernetes" / "serve.yaml")["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}
    assert _k8s_errors(deployment) != []


def _serve_args(args: list[str]) -> Any:
    assert args[:2] == ["llmadapter", "serve"], args
    return build_parser().parse_args(args[1:])  # a flag the CLI lacks exits here (SystemExit)


def test_the_deployment_runs_our_server_with_its_probes_and_settings() -> None:
    kinds = _by_kind(DEPLOY / "kubernetes" / "serve.yaml")
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    parsed = _serve_args(container["args"])
    assert parsed.model_uris == ["models:/chat-model@champion"]
    assert (parsed.host, parsed.port) == ("0.0.0.0", "8080")  # strings, read by the settings
    assert container["ports"][0]["containerPort"] == 8080

    # Every LLMADAPTER_* variable the pod sets is a setting the server reads.
    names = set(kinds["ConfigMap"]["data"]) | {e["name"] for e in container["env"]}
    known = {f"LLMADAPTER_{name.upper()}" for name in ServerSettings.model_fields}
    assert {n for n in names if n.startswith("LLMADAPTER_")} - known == {"LLMADAPTER_API_KEY"}
    # ... and the key variable is the one the server is told to read.
    assert kinds["ConfigMap"]["data"]["LLMADAPTER_API_KEY_ENV"] == "LLMADAPTER_API_KEY"

    # The probes hit routes our app has: /health at once, /ready when the models are loaded.
    with TestClient(build_app({}, ServerSettings())) as app:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert app.get(container[probe]["httpGet"]["path"]).status_code == 200, probe

    # The drain fits the kill timeout: preStop pause + shutdown grace < terminationGracePeriodSeconds.
    grace = float(kinds["ConfigMap"]["data"]["LLMADAPTER_SHUTDOWN_GRACE_S"])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + grace < pod["terminationGracePeriodSeconds"]

    # The HPA and the PDB point at this Deployment's pods.
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == "llmadapter-serve"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert kinds["Service"]["spec"]["selector"] == labels


# -- KServe ----------------------------------------------------------------------------------------


def test_kserve_resources_pass_kserve_crd_schemas() -> None:
    runtime = _documents(DEPLOY / "kserve" / "servingruntime.yaml")[0]
    service = _documents(DEPLOY / "kserve" / "inferenceservice.yaml")[0]
    assert _crd_errors(runtime) == []
    assert _crd_errors(service) == []

    # The service selects this runtime and gives the URI the runtime's args expand.
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    env = {e["name"]: e.get("value") for e in model["env"]}
    args = runtime["spec"]["containers"][0]["args"]
    assert "$(LLMADAPTER_MODEL_URI)" in args and env["LLMADAPTER_MODEL_URI"] == "models:/chat-model@champion"
    parsed = _serve_args([a.replace("$(LLMADAPTER_MODEL_URI)", env["LLMADAPTER_MODEL_URI"]) for a in args])
    assert parsed.model_uris == ["models:/chat-model@champion"]
    assert "storageUri" not in model  # the server resolves models:/ itself: no storage initializer


def test_kserve_schema_check_catches_a_misspelled_field() -> None:
    service = copy.deepcopy(_documents(DEPLOY / "kserve" / "inferenceservice.yaml")[0])
    service["spec"]["predictor"]["model"]["runtimee"] = "llmadapter"
    assert any("runtimee" in error for error in _crd_errors(service))


# -- Prefect's Kubernetes work pool ---------------------------------------------------------------


def _rendered_job(values: dict[str, Any]) -> dict[str, Any]:
    """The Job a Kubernetes worker would create for a flow run, rendered by prefect-kubernetes."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((DEPLOY / "prefect" / "kubernetes-base-job-template.json").read_text())
    defaults = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    jsonschema.validate({**defaults, **values}, template["variables"])
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, {**defaults, **values})
    )
    # What the worker does next for a flow run: its env (PREFECT_* included), command and labels.
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-run"))
    job: dict[str, Any] = config.job_manifest
    return job


def test_the_work_pool_template_renders_a_valid_job_that_runs_our_flows() -> None:
    job = _rendered_job({"env": {"LLMADAPTER_VALIDATION_TIMEOUT_S": "1800"}})
    assert _k8s_errors(job) == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/llmadapter:0.1.0"
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]  # the worker's default command
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LLMADAPTER_VALIDATION_TIMEOUT_S"] == "1800"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials", "optional": True}}]


def test_the_work_pool_template_refuses_a_bad_variable() -> None:
    with pytest.raises(jsonschema.ValidationError, match="Sometimes"):
        _rendered_job({"image_pull_policy": "Sometimes"})


# -- the image ---------------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    lint = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_image_holds_what_the_flows_and_the_server_need() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    # Every path copied exists; the flows run from the image's working directory, as prefect.yaml's
    # pull step (set_working_directory to where `prefect deploy` ran) needs when deployed from it.
    assert all((ROOT / path).exists() for path in copied), copied
    assert {"llmadapter", "flows", "tasks", "prefect.yaml"} <= set(copied)
    assert f"WORKDIR {IMAGE_HOME}" in dockerfile
    # The data dir the image sets is where the manifests mount their writable volume.
    assert "LLMADAPTER_DATA_DIR=/var/lib/llmadapter" in dockerfile
    assert "data_dir" in LLMAdapterSettings.model_fields
    pod = _by_kind(DEPLOY / "kubernetes" / "serve.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "data", "mountPath": "/var/lib/llmadapter"} in pod["containers"][0]["volumeMounts"]
    assert pod["securityContext"]["runAsUser"] == 10001 and "--uid 10001" in dockerfile
