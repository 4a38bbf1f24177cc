"""Environment settings (prefix LLMADAPTER_): the data dir and the MLflow tracking/registry URIs.

Precedence for each MLflow URI: LLMADAPTER_TRACKING_URI / LLMADAPTER_REGISTRY_URI, then MLflow's own
MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (the fields' AliasChoices, in that order), then a SQLite store
in the data dir. The registry URI follows the tracking URI when neither registry variable is set, as
MLflow itself does. An empty variable counts as unset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_EXPERIMENT = "llmadapter"


class LLMAdapterSettings(BaseSettings):
    """Where llmadapter keeps its state and which MLflow stores it talks to."""

    # An empty variable must not hide the next alias (LLMADAPTER_TRACKING_URI="" with MLFLOW_TRACKING_URI
    # set); the aliases name environment variables, and code may still pass tracking_uri=... by name.
    model_config = SettingsConfigDict(
        env_prefix="LLMADAPTER_", env_ignore_empty=True, extra="ignore", frozen=True, populate_by_name=True
    )

    data_dir: Path = Field(
        default_factory=lambda: Path.cwd() / ".llmadapter",
        description="Project data dir: SQLite MLflow store, artifacts, built demo models.",
    )
    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LLMADAPTER_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI; None: the SQLite store in data_dir.",
    )
    registry_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LLMADAPTER_REGISTRY_URI", "MLFLOW_REGISTRY_URI"),
        description="MLflow registry URI; None: the tracking URI.",
    )
    experiment_name: Annotated[str, Field(min_length=1, description="MLflow experiment for logged runs.")] = (
        DEFAULT_EXPERIMENT
    )
    validation_timeout_s: Annotated[
        float, Field(gt=0, le=24 * 3600, description="Limit for the fresh validation process.")
    ] = 900.0

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "mlartifacts"

    @property
    def default_store_uri(self) -> str:
        return f"sqlite:///{(self.data_dir / 'mlflow.db').absolute()}"

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or self.default_store_uri

    def resolved_registry_uri(self) -> str:
        return self.registry_uri or self.resolved_tracking_uri()

    def local_artifact_dir(self) -> Path | None:
        """Artifact root for a SQLite tracking store: `mlartifacts` next to the database file.

        MLflow's own default for a SQLite store is ./mlruns of the current directory, which scatters
        artifacts wherever a process happens to start. Other stores (a tracking server) decide themselves.
        """
        uri = self.resolved_tracking_uri()
        if uri == self.default_store_uri:
            return self.artifact_dir
        if uri.startswith("sqlite:///"):
            return Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        return None


def get_settings() -> LLMAdapterSettings:
    """Fresh settings from the current environment (cheap; read at each call so tests can change env)."""
    return LLMAdapterSettings()


def configure_mlflow(settings: LLMAdapterSettings | None = None) -> str:
    """Point MLflow at the configured stores and make sure the experiment exists; returns its id.

    With the default SQLite store the experiment's artifacts go under <data_dir>/mlartifacts, so
    nothing lands in ./mlruns of whatever directory the process happens to run in.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    settings = settings or get_settings()
    if settings.resolved_tracking_uri() == settings.default_store_uri:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri())
    mlflow.set_registry_uri(settings.resolved_registry_uri())
    experiment = mlflow.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
    else:
        local = settings.local_artifact_dir()
        artifact_location = local.absolute().as_uri() if local is not None else None
        try:
            experiment_id = mlflow.create_experiment(settings.experiment_name, artifact_location)
        except MlflowException:
            # Another process created it between our lookup and create (parallel flow runs).
            experiment = mlflow.get_experiment_by_name(settings.experiment_name)
            if experiment is None:
                raise
            experiment_id = str(experiment.experiment_id)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
