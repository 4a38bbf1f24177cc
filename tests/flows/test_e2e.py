"""End to end with real processes: prefect server, mlflow server, a process worker, `prefect deploy`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from e2e import running_stack  # noqa: E402


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
        procs = list(stack.procs)

    assert all(proc.poll() is not None for _, proc in procs), "every process is stopped"
