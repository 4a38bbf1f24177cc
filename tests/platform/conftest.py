"""The platform path's fixtures: one real stack per session (PostgreSQL, SeaweedFS S3, mlflow server with
proxied artifacts, prefect server on PostgreSQL, a process worker), a hub cache its flows log from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmadapter.stack import LocalStack, running_stack
from llmadapter.testing import HubCache, make_hub_cache

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HUB_REPO = "acme/trained-gpt2"


@pytest.fixture(scope="session")
def trained_hub(tmp_path_factory: pytest.TempPathFactory, trained_model: Path) -> HubCache:
    """trained_model as hub repo acme/trained-gpt2 in a hub cache of its own (offline)."""
    cache = tmp_path_factory.mktemp("platform-hf-cache")
    sha = make_hub_cache(cache, HUB_REPO, trained_model)
    return HubCache(cache_dir=cache, repo_id=HUB_REPO, sha=sha)


@pytest.fixture(scope="session")
def platform_stack(tmp_path_factory: pytest.TempPathFactory, trained_hub: HubCache) -> Iterator[LocalStack]:
    """The whole platform stack, up for the session (about 30 s to start on 2 cores)."""
    assert not set(os.environ) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "no S3 keys of our own"
    root = tmp_path_factory.mktemp("platform-stack")
    extra = {"HF_HUB_CACHE": str(trained_hub.cache_dir), "HF_HUB_OFFLINE": "1"}
    with running_stack(root, project_dir=PROJECT_ROOT, extra_env=extra) as stack:
        yield stack


@pytest.fixture()
def use_stack(platform_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """This process as one of the stack's clients (MLflow and Prefect URIs) for one test."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for key, value in platform_stack.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LLMADAPTER_DATA_DIR", str(platform_stack.root / "data"))
    mlflow.set_tracking_uri(platform_stack.mlflow_uri)
    mlflow.set_registry_uri(platform_stack.mlflow_uri)
    with temporary_settings({PREFECT_API_URL: platform_stack.prefect_api}):
        yield platform_stack
    mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
