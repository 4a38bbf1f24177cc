"""The log-and-validate flow under a real Prefect harness, with real tiny models and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.log_and_validate import log_and_validate
from llmadapter import catalog
from llmadapter.config import EmbeddingsConfig, ModelConfig, StoredConfig, validate_config
from llmadapter.errors import ConfigError, ValidationFailedError
from llmadapter.registry import list_versions
from llmadapter.settings import get_settings
from llmadapter.testing import build_tiny_model
from tasks.validate import ValidationOptions

pytestmark = pytest.mark.usefixtures("prefect_harness")

# In-process validation for the tests that are about the flow, not about the fresh process (which
# test_chat_happy_path and tests/validation/ cover): saves a model load per test.
IN_PROCESS = ValidationOptions(fresh_process=False)


def _artifact(key: str) -> str | None:
    from prefect.artifacts import Artifact

    found = Artifact.get(key)
    return None if found is None else str(found.data)


def _runs() -> list[mlflow.entities.Run]:
    experiment = mlflow.get_experiment_by_name(get_settings().experiment_name)
    return [] if experiment is None else MlflowClient().search_runs([experiment.experiment_id])


@pytest.fixture(scope="session")
def short_context_model(model_cache: Path) -> Path:
    """A GPT-2-shaped model with a 24-token window: the built-in chat samples do not fit in it."""
    return build_tiny_model(model_cache / "short-context-gpt2", "gpt2", n_positions=24)


def test_chat_happy_path(store: str, tiny_gpt2: Path) -> None:
    result = log_and_validate(source=str(tiny_gpt2), task="llm/v1/chat", model_name="tiny-chat")

    assert (result.version, result.created, result.aliases) == (1, True, ["challenger"])
    assert result.validation.startswith("passed")
    (version,) = list_versions("tiny-chat")
    assert version.aliases == ["challenger"]
    assert version.tags["source"] == str(tiny_gpt2)
    assert version.tags["revision"] == result.revision
    assert version.tags["task"] == "llm/v1/chat"
    assert version.tags["model_config_hash"] == result.config_hash
    assert version.tags["validation_status"] == "passed"
    assert version.tags["weights"] == "stored"
    # The report is on the MLflow run, and in Prefect as markdown and table artifacts.
    report = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/validation/report.json")
    assert report["status"] == "passed"
    assert "fresh-process-load" in {c["name"] for c in report["checks"]}
    assert "Validation passed" in (_artifact("validation-tiny-chat") or "")
    checks = json.loads(_artifact("validation-tiny-chat-checks") or "[]")
    assert {"signature", "stop-handling", "context-limit", "determinism"} <= {row["check"] for row in checks}
    # The registered version answers through MLflow's own loader.
    answer = mlflow.pyfunc.load_model("models:/tiny-chat@challenger").predict(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    )
    assert answer["object"] == "chat.completion"


def test_rerun_with_same_revision_and_config_registers_nothing_new(store: str, tiny_gpt2: Path) -> None:
    first = log_and_validate(
        source=str(tiny_gpt2),
        model_name="tiny-chat",
        config=ModelConfig(temperature=0.2),
        validation=IN_PROCESS,
    )
    runs = len(_runs())
    again = log_and_validate(
        source=str(tiny_gpt2),
        model_name="tiny-chat",
        config=ModelConfig(temperature=0.2),
        validation=IN_PROCESS,
    )
    other_config = log_and_validate(
        source=str(tiny_gpt2),
        model_name="tiny-chat",
        config=ModelConfig(temperature=0.3),
        validation=IN_PROCESS,
    )

    assert (again.version, again.created) == (first.version, False)
    assert len(_runs()) == runs + 1  # only the other config was logged again
    assert (other_config.version, other_config.created) == (2, True)
    assert [v.version for v in list_versions("tiny-chat")] == [2, 1]


def test_a_config_given_to_the_flow_is_validated_once_and_reaches_save_model_typed(
    store: str, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given: list[object] = []

    def recorded(cls: type[StoredConfig], data: object) -> StoredConfig:
        given.append(data)
        return validate_config(cls, data)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "validate_config", recorded)
    # A plain dict, as a deployment or the Prefect UI sends it: Prefect makes the ModelConfig of it.
    result = log_and_validate(
        source=str(tiny_gpt2), model_name="tiny-chat", config={"temperature": 0.2}, validation=IN_PROCESS
    )

    # Resolved for the task by the flow, then by save_model: both times the typed config, validated
    # when Prefect made it and never again.
    assert given == [ModelConfig(temperature=0.2)] * 2
    assert all(type(config) is ModelConfig for config in given)
    assert result.config_hash == ModelConfig(temperature=0.2).digest()
    (version,) = list_versions("tiny-chat")
    params = MlflowClient().get_run(version.run_id).data.params
    assert params["model_config"] == '{"temperature": 0.2}'


def test_completions_happy_path(store: str, tiny_llama: Path) -> None:
    result = log_and_validate(
        source=str(tiny_llama),
        task="llm/v1/completions",
        model_name="tiny-completions",
        validation=IN_PROCESS,
    )

    assert result.version == 1
    answer = mlflow.pyfunc.load_model("models:/tiny-completions@challenger").predict(
        {"prompt": "Once upon", "max_tokens": 2}
    )
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] <= 2


def test_embeddings_happy_path_with_promote(store: str, minilm: Path) -> None:
    result = log_and_validate(
        source=str(minilm),
        task="llm/v1/embeddings",
        model_name="minilm",
        config=EmbeddingsConfig(dimensions=128),
        validation=IN_PROCESS,
        promote=True,
    )

    assert result.aliases == ["challenger", "champion"]
    (version,) = list_versions("minilm")
    assert version.tags["approved_by"] == "log-and-validate"
    vectors = mlflow.pyfunc.load_model("models:/minilm@champion").predict({"input": ["Hello", "Paris"]})
    assert [len(d["embedding"]) for d in vectors["data"]] == [128, 128]


def test_failing_validation_fails_the_run_and_registers_nothing(
    store: str, short_context_model: Path
) -> None:
    with pytest.raises(ValidationFailedError, match="sample:chat-greedy"):
        log_and_validate(source=str(short_context_model), model_name="too-short", validation=IN_PROCESS)

    assert list_versions("too-short") == []
    # The report is still attached to the run (and to the Prefect flow run) for the person who looks.
    (run,) = _runs()
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/validation/report.json")
    assert report["status"] == "failed"
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "sample:chat-greedy" in failed
    assert "Validation FAILED" in (_artifact("validation-too-short") or "")


def test_chat_task_without_chat_template_fails_at_log_time(store: str, no_template_model: Path) -> None:
    with pytest.raises(ConfigError, match="chat template"):
        log_and_validate(source=str(no_template_model), model_name="no-template", validation=IN_PROCESS)

    assert list_versions("no-template") == []


def test_config_for_the_wrong_task_is_refused_naming_the_key(store: str, tiny_gpt2: Path) -> None:
    with pytest.raises(ConfigError, match="dimensions") as info:
        log_and_validate(
            source=str(tiny_gpt2),
            model_name="x",
            config=EmbeddingsConfig(dimensions=8),
            validation=IN_PROCESS,
        )
    assert info.value.param == "dimensions"
