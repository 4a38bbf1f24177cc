"""End to end with real processes: prefect server, mlflow server, a process worker, `prefect deploy`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from e2e import running_stack  # noqa: E402


def _paused_promotion(api_url: str, timeout_s: float = 240) -> Any:
    """The first flow run of promote/default once it is paused (it waits for approval)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        only_promote = DeploymentFilter(name=DeploymentFilterName(any_=["default"]))
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(deployment_filter=only_promote):
                if run.state is not None and run.state.is_paused() and "model_name" in run.parameters:
                    return run
            time.sleep(1)
    raise AssertionError("no paused promote run appeared: the deployment trigger did not fire")


def test_deployment_run_registers_a_validated_version(tmp_path: Path, tiny_gpt2: Path) -> None:
    from mlflow import MlflowClient

    with running_stack(tmp_path) as stack:
        output = stack.run_deployment(
            "log-and-validate/default",
            {"source": str(tiny_gpt2), "task": "llm/v1/chat", "model_name": "e2e-chat"},
        )
        assert "Completed" in output

        client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
        version = client.get_model_version_by_alias("e2e-chat", "challenger")
        assert version.version == "1"
        assert version.tags["validation_status"] == "passed"
        assert version.tags["task"] == "llm/v1/chat"
        # The report went through the tracking server's artifact proxy onto the run.
        artifacts = {a.path for a in client.list_artifacts(version.run_id, "validation")}
        assert {"validation/report.json", "validation/report.md"} <= artifacts
        # prefect.yaml's trigger: the registration event started a promotion of the new version, which
        # waits for a person's approval.
        promotion = _paused_promotion(stack.prefect_api)
        assert promotion.parameters["model_name"] == "e2e-chat"
        assert int(promotion.parameters["version"]) == 1
        procs = list(stack.procs)

    assert all(proc.poll() is not None for _, proc in procs), "every process is stopped"
