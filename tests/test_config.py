"""ModelConfig: OpenAI defaults, validation that names the key, rejection at log time (not predict time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import llmadapter
from llmadapter.config import (
    DEFAULT_MAX_TOKENS,
    OPENAI_DEFAULTS,
    EmbeddingsConfig,
    GenerationParams,
    ModelConfig,
    parse_model_config,
)
from llmadapter.errors import ConfigError


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
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
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
        parse_model_config("llm/v1/chat", data)
    assert info.value.param == key
    assert key in info.value.message


def test_unknown_key_message_says_unknown() -> None:
    with pytest.raises(ConfigError, match="Unknown model_config key 'temprature'"):
        parse_model_config("llm/v1/chat", {"temprature": 0.5})


def test_model_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_config("llm/v1/chat", [("temperature", 0.5)])  # type: ignore[arg-type]
    assert info.value.param == "model_config"


def test_valid_config_and_stop_string() -> None:
    config = parse_model_config("llm/v1/completions", {"temperature": 0, "stop": "END", "max_tokens": 5})
    assert isinstance(config, ModelConfig)
    assert config.temperature == 0.0
    assert config.stop == ["END"]
    assert parse_model_config("llm/v1/chat", None) == ModelConfig()


def test_embeddings_task_uses_embeddings_config() -> None:
    config = parse_model_config("llm/v1/embeddings", {"dimensions": 8, "encoding_format": "base64"})
    assert isinstance(config, EmbeddingsConfig)
    with pytest.raises(ConfigError) as info:
        parse_model_config("llm/v1/embeddings", {"temperature": 0.5})
    assert info.value.param == "temperature"
    with pytest.raises(ConfigError) as info:
        parse_model_config("llm/v1/embeddings", {"encoding_format": "hex"})
    assert info.value.param == "encoding_format"


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
        llmadapter.log_model(gpt2_pipeline, name="model", task="llm/v1/chat", model_config={"top_p": 0})
    assert info.value.param == "top_p"
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []
