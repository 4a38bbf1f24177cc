"""Prefect tasks over llmadapter.log_model and .runs: log a source in a new MLflow run; end stale runs."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict

import llmadapter
from llmadapter.config import TaskConfig
from llmadapter.runs import EndedRun, end_stale_runs, owner_tags
from llmadapter.settings import configure_mlflow, get_settings
from llmadapter.source import ResolvedSource
from tasks._owners import current_owner, reason_over
from tasks._retry import transient_task

# The source that decides what a logged model is (its engine, loader, signature): hashed into the key.
_PACKAGE_DIR = Path(llmadapter.__file__).resolve().parent


class LoggedModel(BaseModel):
    """A model logged to MLflow by the log task (what validation and registration need)."""

    model_config = ConfigDict(frozen=True)

    model_uri: str
    run_id: str
    source: str
    revision: str
    task: str
    config_hash: str
    save_pretrained: bool


def code_version(package_dir: Path | None = None) -> dict[str, str]:
    """What the logged artifact depends on besides its inputs: llmadapter's version and source, and
    the mlflow and transformers versions. A fixed engine bug changes the source digest, so the same
    revision and config are logged again instead of reusing a run logged by the old code."""
    root = package_dir or _PACKAGE_DIR
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "llmadapter": metadata.version("llmadapter"),
        "llmadapter_source": digest.hexdigest()[:16],
        "mlflow": metadata.version("mlflow"),
        "transformers": metadata.version("transformers"),
    }


def _log_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Key on the resolved revision (never a branch name), the config's digest, the MLflow store and the code.

    The store is part of the key because a cached result names a run in one particular store.
    """
    resolved: ResolvedSource = parameters["resolved"]
    settings = get_settings()
    parts = {
        "source": resolved.pinned(),
        "revision": resolved.revision,
        "task": parameters["task"],
        "config_hash": parameters["model_config"].digest(),
        "save_pretrained": parameters.get("save_pretrained", True),
        "tracking_uri": settings.resolved_tracking_uri(),
        "experiment": settings.experiment_name,
        "code": code_version(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return f"llmadapter-log-{digest}"


@transient_task(
    name="log",
    retry_delay_seconds=[5, 30],
    cache_key_fn=_log_cache_key,
    cache_expiration=timedelta(days=7),
    persist_result=True,
    task_run_name="log {task} model",
)
def log_model(
    resolved: ResolvedSource,
    task: str,
    model_config: TaskConfig,
    save_pretrained: bool = True,
    model_name: str | None = None,
) -> LoggedModel:
    """Log the resolved source with llmadapter.log_model in a new MLflow run (nothing is registered).

    The run is named after `model_name` (the registered name it is logged for) and tagged with it and
    with this flow run and process (llmadapter.runs.owner_tags), so that a later run for the same name
    can tell a run left RUNNING by a killed flow (end_runs_left_running). Cached for 7 days on the key
    above; call it through log_model_once, which logs again when the cached run has been deleted from
    MLflow since.
    """
    import mlflow

    configure_mlflow()
    source = resolved.pinned()
    config_hash = model_config.digest()
    tags = {
        "source": resolved.source,
        "revision": resolved.revision,
        "task": task,
        "model_config_hash": config_hash,
    }
    if model_name is not None:
        tags |= owner_tags(model_name, current_owner())
    with mlflow.start_run(run_name=model_name, tags=tags) as run:
        mlflow.log_params(
            {
                "source": resolved.source,
                "source_kind": resolved.kind,
                "revision": resolved.revision,
                "task": task,
                "save_pretrained": save_pretrained,
                "model_config": json.dumps(
                    model_config.model_dump(mode="json", exclude_unset=True), sort_keys=True
                ),
            }
        )
        info = llmadapter.log_model(
            source, name="model", task=task, model_config=model_config, save_pretrained=save_pretrained
        )
    return LoggedModel(
        model_uri=info.model_uri,
        run_id=run.info.run_id,
        source=resolved.source,
        revision=resolved.revision,
        task=task,
        config_hash=config_hash,
        save_pretrained=save_pretrained,
    )


def log_model_once(*args: Any, **kwargs: Any) -> LoggedModel:
    """log_model (its parameters), with the cached result checked: a run since deleted in MLflow is
    logged again."""
    logged = log_model(*args, **kwargs)
    if not run_exists(logged.run_id):
        logged = log_model.with_options(refresh_cache=True)(*args, **kwargs)
    return logged


@transient_task(name="run-exists", task_run_name="check run {run_id}")
def run_exists(run_id: str) -> bool:
    """True while the run is in the store and not deleted (deleted runs linger until garbage collection)."""
    from mlflow import MlflowClient
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return bool(run.info.lifecycle_stage == LifecycleStage.ACTIVE)


@transient_task(name="end-runs-left-running", task_run_name="end runs of {model_name} left running")
def end_runs_left_running(model_name: str) -> list[EndedRun]:
    """Mark KILLED the MLflow runs for `model_name` left RUNNING by flow runs that are over (killed,
    crashed, gone); the runs of flow runs still running are left alone."""
    ended = end_stale_runs(model_name, reason_over)
    for run in ended:
        get_run_logger().warning("MLflow run %s of %s marked KILLED: %s.", run.run_id, model_name, run.reason)
    return ended
