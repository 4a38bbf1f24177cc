"""Shared fixtures: tiny real models (built once, cached under the pytest cache dir) and MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest

from llmadapter.testing import build_tiny_model


@pytest.fixture(scope="session")
def model_cache(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.cache.mkdir("llmadapter-models"))


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache: Path) -> Path:
    """Untrained GPT-2-shaped model: random but deterministic tokens, ChatML template."""
    return build_tiny_model(model_cache / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(model_cache: Path) -> Path:
    """Untrained Llama-shaped model, ChatML template."""
    return build_tiny_model(model_cache / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def trained_model(model_cache: Path) -> Path:
    """GPT-2-shaped model that answers "Hello" with llmadapter.testing.TRAINED_ANSWER (greedy)."""
    return build_tiny_model(model_cache / "trained-gpt2", "gpt2", trained=True)


@pytest.fixture(scope="session")
def bos_model(model_cache: Path) -> Path:
    """Llama-shaped model whose tokenizer adds BOS and whose chat template writes BOS (and tools)."""
    return build_tiny_model(model_cache / "bos-llama", "llama", bos=True)


@pytest.fixture(scope="session")
def no_template_model(model_cache: Path) -> Path:
    """GPT-2-shaped model whose tokenizer has no chat template."""
    return build_tiny_model(model_cache / "no-template-gpt2", "gpt2", chat_template=None)


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow tracking + registry store (SQLite) in a temp dir, set as the active URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    (tmp_path / "artifacts").mkdir()
    exp = mlflow.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield uri
    mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
