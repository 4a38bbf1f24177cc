"""llmadapter.settings: where state lives and which MLflow stores are used (env precedence)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from llmadapter.settings import LLMAdapterSettings, configure_mlflow, get_settings


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "LLMADAPTER_TRACKING_URI",
        "LLMADAPTER_REGISTRY_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_a_sqlite_store_in_the_data_dir_under_the_current_directory(clean_env: Path) -> None:
    settings = LLMAdapterSettings()

    assert settings.data_dir == clean_env / ".llmadapter"
    assert settings.resolved_tracking_uri() == f"sqlite:///{clean_env / '.llmadapter' / 'mlflow.db'}"
    assert settings.resolved_registry_uri() == settings.resolved_tracking_uri()
    assert settings.local_artifact_dir() == clean_env / ".llmadapter" / "mlartifacts"


@pytest.mark.parametrize(
    ("env", "tracking", "registry"),
    [
        ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "http://mlflow:5000", "http://mlflow:5000"),
        (
            {"MLFLOW_TRACKING_URI": "http://t", "MLFLOW_REGISTRY_URI": "http://r"},
            "http://t",
            "http://r",
        ),
        (
            {"MLFLOW_TRACKING_URI": "http://mlflow", "LLMADAPTER_TRACKING_URI": "http://ours"},
            "http://ours",
            "http://ours",
        ),
        ({"LLMADAPTER_REGISTRY_URI": "http://reg"}, None, "http://reg"),
        (
            {"MLFLOW_REGISTRY_URI": "http://mlflow-reg", "LLMADAPTER_REGISTRY_URI": "http://our-reg"},
            None,
            "http://our-reg",
        ),
        (
            {"LLMADAPTER_TRACKING_URI": "http://ours", "MLFLOW_REGISTRY_URI": "http://mlflow-reg"},
            "http://ours",
            "http://mlflow-reg",
        ),
        (
            {"MLFLOW_TRACKING_URI": "http://mlflow", "LLMADAPTER_REGISTRY_URI": "http://our-reg"},
            "http://mlflow",
            "http://our-reg",
        ),
        (
            {"LLMADAPTER_TRACKING_URI": "", "MLFLOW_TRACKING_URI": "http://mlflow"},
            "http://mlflow",
            "http://mlflow",
        ),
        ({"LLMADAPTER_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": ""}, None, None),
    ],
    # The README's Prefect section documents this order: LLMADAPTER_*, then MLFLOW_*, then SQLite.
    ids=[
        "mlflow-own-variable",
        "mlflow-both",
        "prefixed-wins",
        "registry-only",
        "prefixed-registry-wins",
        "any-registry-variable-beats-the-tracking-uri",
        "prefixed-registry-with-mlflow-tracking",
        "empty-means-unset",
        "all-empty-is-the-default-store",
    ],
)
def test_uri_precedence(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    tracking: str | None,
    registry: str | None,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = LLMAdapterSettings()

    assert settings.resolved_tracking_uri() == (tracking or settings.default_store_uri)
    assert settings.resolved_registry_uri() == (registry or settings.default_store_uri)


def test_values_given_directly_beat_the_environment(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMADAPTER_TRACKING_URI", "http://env")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://env-reg")
    settings = LLMAdapterSettings(tracking_uri="http://given", registry_uri="http://given-reg")

    assert settings.resolved_tracking_uri() == "http://given"
    assert settings.resolved_registry_uri() == "http://given-reg"


def test_settings_follow_the_environment_at_each_call(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests and flows change MLFLOW_* between calls: get_settings() must not keep an old value.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://first")
    assert get_settings().resolved_tracking_uri() == "http://first"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://second")
    assert get_settings().resolved_registry_uri() == "http://second"


def test_bad_values_are_refused_naming_the_field(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMADAPTER_VALIDATION_TIMEOUT_S", "-1")
    with pytest.raises(ValueError, match="validation_timeout_s"):
        LLMAdapterSettings()


def test_configure_mlflow_creates_the_experiment_with_artifacts_in_the_data_dir(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMADAPTER_DATA_DIR", str(clean_env / "data"))
    try:
        experiment_id = configure_mlflow()
        again = configure_mlflow()

        experiment = mlflow.get_experiment(experiment_id)
        assert again == experiment_id
        assert experiment.name == "llmadapter"
        assert experiment.artifact_location == (clean_env / "data" / "mlartifacts").as_uri()
        assert mlflow.get_tracking_uri() == f"sqlite:///{clean_env / 'data' / 'mlflow.db'}"
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
