"""ModelConfig: OpenAI defaults, validation that names the key, rejection at log time (not predict time),
the registry digest and the stored form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import llmadapter
from llmadapter.catalog import get_task
from llmadapter.config import (
    DEFAULT_MAX_TOKENS,
    OPENAI_DEFAULTS,
    EmbeddingsConfig,
    GenerationParams,
    ModelConfig,
    StoredConfig,
    TaskConfig,
    read_stored_config,
    stored_config,
    validate_config,
)
from llmadapter.errors import ConfigError


def parse_for(task: str, data: Any) -> TaskConfig:
    return get_task(task).parse_config(data)


def test_defaults_are_openai_defaults() -> None:
    config = ModelConfig()
    for key, value in OPENAI_DEFAULTS.items():
        assert getattr(config, key) == value, key
    assert config.max_tokens == DEFAULT_MAX_TOKENS
    assert config.stop == []
    assert config.seed is None


# (model_config, the key the error must name)
BAD_CONFIGS = [
    ({"temprature": 0.5}, "temprature"),
    ({"max_new_tokens": 10}, "max_new_tokens"),
    ({"do_sample": False}, "do_sample"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"context_window": 0}, "context_window"),
    ({"seed": 2**64}, "seed"),
]


@pytest.mark.parametrize(
    ("data", "key"), BAD_CONFIGS, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_CONFIGS)]
)
def test_bad_model_config_names_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_for("llm/v1/chat", data)
    assert info.value.param == key
    assert key in info.value.message


def test_unknown_key_message_says_unknown() -> None:
    with pytest.raises(ConfigError, match="Unknown model_config key 'temprature'"):
        parse_for("llm/v1/chat", {"temprature": 0.5})


def test_model_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        parse_for("llm/v1/chat", [("temperature", 0.5)])  # type: ignore[arg-type]
    assert info.value.param == "model_config"


def test_valid_config_and_stop_string() -> None:
    config = parse_for("llm/v1/completions", {"temperature": 0, "stop": "END", "max_tokens": 5})
    assert isinstance(config, ModelConfig)
    assert config.temperature == 0.0
    assert config.stop == ["END"]
    assert parse_for("llm/v1/chat", None) == ModelConfig()


def test_embeddings_task_uses_embeddings_config() -> None:
    config = parse_for("llm/v1/embeddings", {"dimensions": 8, "encoding_format": "base64"})
    assert isinstance(config, EmbeddingsConfig)
    with pytest.raises(ConfigError) as info:
        parse_for("llm/v1/embeddings", {"temperature": 0.5})
    assert info.value.param == "temperature"
    with pytest.raises(ConfigError) as info:
        parse_for("llm/v1/embeddings", {"encoding_format": "hex"})
    assert info.value.param == "encoding_format"


def test_a_config_of_the_task_is_returned_unchanged() -> None:
    config = ModelConfig(temperature=0.2)
    assert validate_config(ModelConfig, config) is config
    assert get_task("llm/v1/completions").parse_config(config) is config


def test_another_tasks_config_counts_as_the_keys_set_on_it() -> None:
    # A Prefect parameter typed as either config holds ModelConfig for {}: for embeddings it is
    # the defaults, and a key that only the other task knows is refused by name.
    assert parse_for("llm/v1/embeddings", ModelConfig()) == EmbeddingsConfig()
    assert parse_for("llm/v1/embeddings", ModelConfig(max_batch_size=8)) == EmbeddingsConfig(max_batch_size=8)
    with pytest.raises(ConfigError) as info:
        parse_for("llm/v1/chat", EmbeddingsConfig(dimensions=8))
    assert info.value.param == "dimensions"


# Values computed by registry.config_hash before the digest moved onto the config models: versions
# users registered with them must still be found (and reused).
PINNED_DIGESTS = [
    ("llm/v1/chat", {}, "fb49cd7d5feee3ee"),
    ("llm/v1/completions", {}, "fb49cd7d5feee3ee"),
    ("llm/v1/chat", {"temperature": 0.2, "stop": "END", "seed": 7}, "9f75da4c70d4d04f"),
    ("llm/v1/embeddings", {}, "a0db923185c06181"),
    ("llm/v1/embeddings", {"dimensions": 128}, "167a82ff453c5250"),
]


@pytest.mark.parametrize(("task", "data", "expected"), PINNED_DIGESTS, ids=lambda v: str(v))
def test_digest_values_are_pinned(task: str, data: dict[str, Any], expected: str) -> None:
    assert parse_for(task, data).digest() == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({}, {"temperature": 1.0}, True),
        ({}, None, True),
        ({"temperature": 0.5}, {"temperature": 0.6}, False),
        ({"stop": "x"}, {"stop": ["x"]}, True),
    ],
    ids=["defaults-filled", "none-is-empty", "value-differs", "stop-string-is-list"],
)
def test_digest_is_the_validated_config(
    a: dict[str, Any] | None, b: dict[str, Any] | None, same: bool
) -> None:
    assert (parse_for("llm/v1/chat", a).digest() == parse_for("llm/v1/chat", b).digest()) is same


def test_stored_config_keeps_what_differs_from_the_defaults_and_reads_back() -> None:
    config = ModelConfig(temperature=1.0, max_tokens=5, stop="END")
    assert stored_config(config) == {"max_tokens": 5, "stop": ["END"]}
    assert stored_config(ModelConfig(temperature=1.0)) is None
    # What save_model stored under MLflow's pyfunc key, with load-time overrides on top.
    pyfunc_conf = {"loader_module": "llmadapter.mlflow_model", "config": stored_config(config)}
    assert read_stored_config(ModelConfig, pyfunc_conf) == config
    assert read_stored_config(ModelConfig, pyfunc_conf, {"max_tokens": 7}) == ModelConfig(
        max_tokens=7, stop="END"
    )
    assert read_stored_config(ModelConfig, {"model_config": {"max_tokens": 5}}).max_tokens == 5
    assert read_stored_config(EmbeddingsConfig, {}) == EmbeddingsConfig()
    with pytest.raises(ConfigError) as info:
        read_stored_config(ModelConfig, pyfunc_conf, {"dimensions": 8})
    assert info.value.param == "dimensions"


@pytest.mark.parametrize("cls", [ModelConfig, EmbeddingsConfig])
def test_every_task_config_is_a_stored_config(cls: type[StoredConfig]) -> None:
    assert issubclass(cls, StoredConfig)
    assert cls().digest() == cls.model_validate({}).digest()


def test_greedy_only_at_temperature_zero() -> None:
    assert GenerationParams(max_tokens=1, temperature=0.0).greedy
    assert not GenerationParams(max_tokens=1, temperature=0.01).greedy
    assert not GenerationParams(max_tokens=1).greedy


# --- through the real log call: rejected at log time, before anything is written --------------------


@pytest.fixture(scope="module")
def gpt2_pipeline(tiny_gpt2: Path) -> Any:
    import transformers

    return transformers.pipeline("text-generation", model=str(tiny_gpt2))


@pytest.mark.parametrize(
    ("data", "key"),
    [({"temprature": 0.5}, "temprature"), ({"temperature": 3.0}, "temperature"), ({"stop": [""]}, "stop")],
    ids=["unknown-key", "out-of-range", "empty-stop"],
)
def test_save_model_rejects_bad_model_config_naming_the_key(
    gpt2_pipeline: Any, tmp_path: Path, data: dict[str, Any], key: str
) -> None:
    target = tmp_path / "model"
    with pytest.raises(ConfigError) as info:
        llmadapter.save_model(gpt2_pipeline, target, task="llm/v1/chat", model_config=data)
    assert info.value.param == key
    assert not target.exists()


def test_log_model_rejects_bad_model_config_naming_the_key(gpt2_pipeline: Any, mlflow_store: str) -> None:
    import mlflow

    with mlflow.start_run() as run, pytest.raises(ConfigError) as info:
        llmadapter.log_model(gpt2_pipeline, name="model", task="llm/v1/chat", model_config={"top_p": 1.5})
    assert info.value.param == "top_p"
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []
