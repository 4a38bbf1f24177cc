"""The log task's cache: reused for the same revision, config and code; logged again after a code change,
for another config, or when the cached run was deleted in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow

from llmadapter.config import ModelConfig
from llmadapter.settings import configure_mlflow
from llmadapter.source import resolve_source
from tasks import log
from tasks.log import LoggedModel, code_version, log_model_once, run_exists

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
