"""The log task's cache: reused for the same revision, config and code; logged again after a code change,
for another config, or when the cached run was deleted in MLflow. The run's owner tags, and the runs
that killed flow runs left RUNNING."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.client.schemas.objects import State
from prefect.states import Completed, Crashed, Running

from llmadapter.config import ModelConfig
from llmadapter.runs import TAG_KILLED_REASON, RunOwner, owner_tags
from llmadapter.settings import configure_mlflow, get_settings
from llmadapter.source import resolve_source
from tasks import log
from tasks._owners import api_identity
from tasks.log import LoggedModel, code_version, end_runs_left_running, log_model_once, run_exists

pytestmark = pytest.mark.usefixtures("prefect_harness")
CHAT = "llm/v1/chat"


@flow
def log_once(source: str, config: ModelConfig | None = None) -> LoggedModel:
    configure_mlflow()
    return log_model_once(resolve_source(source), CHAT, config or ModelConfig(), save_pretrained=True)


def _copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "llmadapter"
    shutil.copytree(log._PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_code_version_follows_the_package_source(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    assert code_version(copy) == code_version()

    with (copy / "engine" / "generation.py").open("a") as f:
        f.write("\n# an engine fix\n")

    changed = code_version(copy)
    assert changed["llmadapter_source"] != code_version()["llmadapter_source"]
    assert {k: v for k, v in changed.items() if k != "llmadapter_source"} == {
        k: v for k, v in code_version().items() if k != "llmadapter_source"
    }


def test_same_code_reuses_the_logged_run_and_changed_code_logs_again(
    store: str, tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "_PACKAGE_DIR", _copy_package(tmp_path))
    first = log_once(str(tiny_gpt2))
    assert log_once(str(tiny_gpt2)).run_id == first.run_id

    # An engine bug is fixed: the same revision and config must not reuse the run the old code logged.
    with (log._PACKAGE_DIR / "engine" / "generation.py").open("a") as f:
        f.write("\n# an engine fix\n")
    fixed = log_once(str(tiny_gpt2))

    assert fixed.run_id != first.run_id
    assert log_once(str(tiny_gpt2)).run_id == fixed.run_id


def test_a_cached_run_deleted_in_mlflow_is_logged_again(store: str, tiny_gpt2: Path) -> None:
    first = log_once(str(tiny_gpt2))
    MlflowClient().delete_run(first.run_id)
    assert not run_exists(first.run_id)

    again = log_once(str(tiny_gpt2))

    assert again.run_id != first.run_id
    assert run_exists(again.run_id)
    assert log_once(str(tiny_gpt2)).run_id == again.run_id  # the refreshed cache entry is used next time


def test_the_cache_keys_on_the_typed_configs_digest(store: str, tiny_gpt2: Path) -> None:
    first = log_once(str(tiny_gpt2), ModelConfig(temperature=0.2))
    # The same values spelled otherwise (a default given explicitly) are the same config.
    assert log_once(str(tiny_gpt2), ModelConfig(temperature=0.2, top_k=0)).run_id == first.run_id

    other = log_once(str(tiny_gpt2), ModelConfig(temperature=0.3))

    assert other.run_id != first.run_id
    assert (first.config_hash, other.config_hash) == (
        ModelConfig(temperature=0.2).digest(),
        ModelConfig(temperature=0.3).digest(),
    )
    params = MlflowClient().get_run(other.run_id).data.params
    assert params["model_config"] == '{"temperature": 0.3}'
    assert params["temperature"] == "0.3"  # MLflow's own Model.log logs the model_config keys too


# --- MLflow runs left RUNNING by flow runs that were killed -------------------------------------------


@flow(name="owner-of-runs")
def _owner_flow() -> None:
    """A flow whose runs (created through the API in the states a test needs) own MLflow runs."""


def _flow_run(state: State) -> str:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(_owner_flow, state=state).id)


def _running_mlflow_run(name: str, owner: RunOwner) -> str:
    configure_mlflow()
    experiment_id = mlflow.get_experiment_by_name(get_settings().experiment_name).experiment_id
    return MlflowClient().create_run(experiment_id, tags=owner_tags(name, owner)).info.run_id


def test_runs_left_running_by_flow_runs_that_are_over_are_marked_killed(store: str) -> None:
    here = RunOwner.this_process(api=api_identity())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = here.model_copy(update={"pid": proc.pid})
    completed = _flow_run(Completed())
    owners = {
        "completed": here.model_copy(update={"flow_run_id": completed}),
        "crashed": here.model_copy(update={"flow_run_id": _flow_run(Crashed())}),
        "gone": here.model_copy(update={"flow_run_id": str(uuid.uuid4())}),
        "running, process alive": here.model_copy(update={"flow_run_id": _flow_run(Running())}),
        "running, process gone": dead.model_copy(update={"flow_run_id": _flow_run(Running())}),
        "another API, process alive": here.model_copy(
            update={"flow_run_id": completed, "api": "http://elsewhere"}
        ),
    }
    runs = {what: _running_mlflow_run("chat", owner) for what, owner in owners.items()}
    other_name = _running_mlflow_run("embeddings", owners["crashed"])

    ended = end_runs_left_running("chat")

    client = MlflowClient()
    status = {what: client.get_run(run_id).info.status for what, run_id in runs.items()}
    assert status == {
        "completed": "KILLED",
        "crashed": "KILLED",
        "gone": "KILLED",
        "running, process alive": "RUNNING",
        "running, process gone": "KILLED",
        "another API, process alive": "RUNNING",
    }
    assert client.get_run(other_name).info.status == "RUNNING"
    reasons = {what: client.get_run(runs[what]).data.tags.get(TAG_KILLED_REASON) for what in owners}
    assert reasons["completed"] == f"its Prefect flow run {completed} ended Completed"
    assert reasons["crashed"].endswith("ended Crashed")
    assert reasons["gone"].endswith("no longer exists")
    assert reasons["running, process gone"].startswith(f"its process (pid {proc.pid} on ")
    assert "; Prefect still shows flow run " in reasons["running, process gone"]
    assert reasons["running, process gone"].endswith(" Running")
    assert sorted(e.run_id for e in ended) == sorted(runs[w] for w, s in status.items() if s == "KILLED")


@flow
def _log_for(source: str, model_name: str) -> tuple[LoggedModel, str]:
    from prefect.runtime import flow_run

    configure_mlflow()
    logged = log_model_once(resolve_source(source), CHAT, ModelConfig(), model_name=model_name)
    return logged, str(flow_run.id)


def test_the_logged_run_names_its_flow_run_process_and_registered_name(store: str, tiny_gpt2: Path) -> None:
    logged, flow_run_id = _log_for(str(tiny_gpt2), "tiny-chat")

    run = MlflowClient().get_run(logged.run_id)
    assert run.info.run_name == "tiny-chat"
    assert run.data.tags["llmadapter.registered_name"] == "tiny-chat"
    owner = RunOwner.from_tags(run.data.tags)
    assert owner is not None
    assert (owner.flow_run_id, owner.api, owner.pid) == (flow_run_id, api_identity(), os.getpid())
