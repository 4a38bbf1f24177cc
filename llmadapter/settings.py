"""Environment settings (prefix LLMADAPTER_): the data dir, the MLflow stores, MLflow's HTTP retries.

Precedence for each MLflow URI: LLMADAPTER_TRACKING_URI / LLMADAPTER_REGISTRY_URI, then MLflow's own
MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (the fields' AliasChoices, in that order), then a SQLite store
in the data dir. The registry URI follows the tracking URI when neither registry variable is set, as
MLflow itself does. An empty variable counts as unset.

MLflow's HTTP client retries each request 7 times with exponential backoff (about four minutes against a
dead server) under our own task retries. The `mlflow_http_*` settings replace those defaults in our
processes (`apply_mlflow_http_settings`: configure_mlflow, `llmadapter serve`, the validation worker's
environment) through MLflow's own variables, MLFLOW_HTTP_REQUEST_{MAX_RETRIES,BACKOFF_FACTOR,
BACKOFF_JITTER,TIMEOUT}, which MLflow reads at each request; a value the user set in one of those wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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

    # With these defaults a request to a server that refuses connections fails after about 4 s (retries
    # after 0 s and 4 s + jitter), one to a server that never answers after 3 x 20 s + 4 s (64 s measured).
    mlflow_http_max_retries: Annotated[
        int,
        Field(
            ge=0,
            le=10,  # MLflow's own upper limit
            description="Retries of each MLflow HTTP request (connection errors, 429, 5xx); MLflow's "
            "default is 7. Sets MLFLOW_HTTP_REQUEST_MAX_RETRIES unless that is set.",
        ),
    ] = 2
    mlflow_http_backoff_factor: Annotated[
        int,
        Field(
            ge=0,
            le=120,  # MLflow's own upper limit
            description="Backoff between those retries: 0 s, then factor x 2, x 4, ... s; MLflow's default "
            "is 2. Sets MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR unless that is set.",
        ),
    ] = 2
    mlflow_http_backoff_jitter: Annotated[
        float,
        Field(
            ge=0,
            le=60,
            description="Random seconds added to each backoff (up to this many). Sets "
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER unless that is set.",
        ),
    ] = 1.0
    mlflow_http_timeout_s: Annotated[
        int,
        Field(
            ge=1,
            le=3600,
            description="Seconds one MLflow HTTP request may wait to connect or for the server's next "
            "bytes; MLflow's default is 120. Sets MLFLOW_HTTP_REQUEST_TIMEOUT unless that is set.",
        ),
    ] = 20

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


# Each mlflow_http_* setting and MLflow's own variable that carries it to MLflow's HTTP client.
_MLFLOW_HTTP_VARIABLES = {
    "mlflow_http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "mlflow_http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "mlflow_http_backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "mlflow_http_timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}
# What apply_mlflow_http_settings wrote into os.environ: a variable holding one of these values is ours
# to update when our settings change, any other value is the user's.
_WRITTEN: dict[str, str] = {}


def mlflow_http_environment(
    environ: Mapping[str, str] | None = None, settings: LLMAdapterSettings | None = None
) -> dict[str, str]:
    """MLflow's HTTP retry and timeout variables from our settings, for those that `environ` (default:
    this process's) leaves unset or empty; a value the user gave MLflow's own variable is kept."""
    environ = os.environ if environ is None else environ
    settings = settings or get_settings()
    values: dict[str, str] = {}
    for field, variable in _MLFLOW_HTTP_VARIABLES.items():
        current = environ.get(variable)
        if not current or current == _WRITTEN.get(variable):
            values[variable] = str(getattr(settings, field))
    return values


def apply_mlflow_http_settings(settings: LLMAdapterSettings | None = None) -> dict[str, str]:
    """Set MLflow's HTTP variables in this process's environment (inherited by its children); returns
    what was set."""
    values = mlflow_http_environment(settings=settings)
    os.environ.update(values)
    _WRITTEN.update(values)
    return values


def configure_mlflow(settings: LLMAdapterSettings | None = None) -> str:
    """Point MLflow at the configured stores, with our HTTP retries and timeout, and make sure the
    experiment exists; returns its id.

    With the default SQLite store the experiment's artifacts go under <data_dir>/mlartifacts, so
    nothing lands in ./mlruns of whatever directory the process happens to run in.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    settings = settings or get_settings()
    apply_mlflow_http_settings(settings)  # before the first request below
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
