"""The deployments on the platform stack: log-and-validate, promote (approval pause), serve @champion, the
nightly schedule; what they wrote checked in PostgreSQL and in the bucket, not only through MLflow."""

from __future__ import annotations

import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from llmadapter.processes import free_port, running
from llmadapter.stack import LocalStack
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT, HubCache
from tests.platform.conftest import HUB_REPO, PROJECT_ROOT

pytestmark = pytest.mark.slow

NAME = "platform-chat"


def _wait_for_state(flow_run_id: UUID, wanted: str, timeout_s: float = 300) -> Any:
    """The flow run once its state type is `wanted` (AssertionError naming where it stood otherwise)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state.type.value if run.state is not None else None
            if state == wanted:
                return run
            if state in {"FAILED", "CRASHED", "CANCELLED"} or time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} is {state}, not {wanted}")
            time.sleep(0.5)


def _triggered_promotion(version: int, timeout_s: float = 300) -> UUID:
    """The promote flow run that prefect.yaml's trigger started for `version` of NAME."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    promote_runs = FlowFilter(name=FlowFilterName(any_=["promote"]))
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(flow_filter=promote_runs):
                params = run.parameters
                if params.get("model_name") == NAME and str(params.get("version")) == str(version):
                    return run.id
            time.sleep(1)
    raise AssertionError("the deployment trigger started no promotion of the registered version")


def _artifact_keys(stack: LocalStack, artifact_location: str) -> set[str]:
    """The bucket's keys under an `mlflow-artifacts:/...` location, relative to it (read with boto3)."""
    assert stack.objectstore is not None
    relative = artifact_location.removeprefix("mlflow-artifacts:").lstrip("/")
    prefix = f"mlartifacts/mlflow/{relative}/"
    return {key.removeprefix(prefix) for key in stack.objectstore.keys(prefix)}


def test_deployments_log_validate_promote_and_serve_on_postgres_and_s3(
    use_stack: LocalStack, trained_hub: HubCache, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from openai import OpenAI
    from prefect.flow_runs import resume_flow_run

    stack = use_stack
    assert stack.database is not None and stack.objectstore is not None
    # A hub reference (save_pretrained=False): its weights reach the bucket only on the way to @champion.
    params = {"source": HUB_REPO, "task": "llm/v1/chat", "model_name": NAME, "save_pretrained": False}
    assert "Completed" in stack.run_deployment("log-and-validate/default", params)

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    challenger = client.get_model_version_by_alias(NAME, "challenger")
    assert (challenger.version, challenger.tags["validation_status"]) == ("1", "passed")
    assert challenger.tags["weights"] == "hub-reference"
    assert challenger.tags["revision"] == trained_hub.sha
    # The registry is PostgreSQL's: the version is a row of the mlflow database.
    rows = stack.database.query("mlflow", "SELECT version FROM model_versions WHERE name = %s", (NAME,))
    assert rows == [(1,)]

    location = client.get_model_version_download_uri(NAME, "1")  # mlflow-artifacts:/<exp>/models/m-…
    before = _artifact_keys(stack, location)
    # The multi-file artifact went through the tracking server into the bucket; no weights yet.
    assert {"MLmodel", "llmadapter/engine.json", "llmadapter/tokenizer/tokenizer.json"} <= before
    assert len(before) > 40, sorted(before)
    assert not any(key.endswith(".safetensors") for key in before)
    run_keys = _artifact_keys(stack, client.get_run(challenger.run_id).info.artifact_uri)
    assert {"validation/report.json", "validation/report.md"} <= run_keys

    # prefect.yaml's trigger, on Prefect's PostgreSQL: the registration event started a promotion of the
    # new version, which waits for a person's approval.
    flow_run_id = _triggered_promotion(version=1)
    _wait_for_state(flow_run_id, "PAUSED")
    assert not client.get_registered_model(NAME).aliases.get("champion"), "nothing moves before approval"
    resume_flow_run(flow_run_id, run_input={"approve": True, "approver": "platform", "comment": "on s3"})
    _wait_for_state(flow_run_id, "COMPLETED")

    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "1"
    assert (champion.tags["approved_by"], champion.tags["weights"]) == ("platform", "stored")
    after = _artifact_keys(stack, location)
    assert any(key.startswith("model/") and key.endswith(".safetensors") for key in after), sorted(after)

    # A server with the tracking URI and nothing else: no S3 keys, an empty hub cache.
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(PROJECT_ROOT),
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": stack.mlflow_uri,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "LLMADAPTER_DATA_DIR": str(tmp_path / "data"),
    }
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", f"models:/{NAME}@champion"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with running(argv, f"http://127.0.0.1:{port}/ready", log=tmp_path / "serve.log", env=env, timeout_s=180):
        openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = openai.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": TRAINED_PROMPT}],
            temperature=0,
            max_tokens=64,
        )
    assert answer.choices[0].message.content == TRAINED_ANSWER


def test_nightly_schedule_runs_are_rows_of_prefects_postgres_database(use_stack: LocalStack) -> None:
    assert use_stack.database is not None
    query = (
        "SELECT fr.state_type, fr.expected_start_time FROM flow_run fr "
        "JOIN deployment d ON d.id = fr.deployment_id WHERE d.name = 'nightly' ORDER BY 2"
    )
    deadline = time.monotonic() + 120
    while not (rows := use_stack.database.query("prefect", query)) and time.monotonic() < deadline:
        time.sleep(1)  # the scheduler service makes them within its first loop
    assert rows, "the scheduler made no runs of model-refresh/nightly"
    assert {state for state, _ in rows} == {"SCHEDULED"}
    assert all(when.astimezone(UTC).timetuple()[3:6] == (3, 0, 0) for _, when in rows), rows
