"""Flow-test fixtures: one Prefect test harness per session, MLflow stores, registered tiny models.

PREFECT_HOME and Prefect's other settings are set in the root conftest, before anything imports Prefect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API (and database) for the whole session (about 13 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _use_store(mp: pytest.MonkeyPatch, root: Path) -> str:
    """Point llmadapter and MLflow at a fresh SQLite store under `root` (undone by `mp`)."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_REGISTRY_URI", uri)
    mp.setenv("LLMADAPTER_DATA_DIR", str(root / "data"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real MLflow tracking + registry store (SQLite) for one test; flows create their experiment."""
    import mlflow

    uri = _use_store(monkeypatch, tmp_path)
    yield uri
    mlflow.end_run()


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A store shared by the tests of one module (models registered once, aliases reset per test)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        uri = _use_store(mp, tmp_path_factory.mktemp("store"))
        yield uri
        mlflow.end_run()
