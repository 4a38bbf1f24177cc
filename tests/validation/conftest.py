"""The validation tests' MLflow store: one real SQLite store shared by the package (tables cost seconds)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest


@pytest.fixture(scope="package")
def store(tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("validation")
    shutil.copyfile(_mlflow_db_template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("validation", (root / "art").as_uri()))
        yield root
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
