"""save_model/log_model/load: the MLflow artifact, and every parameter through pyfunc `predict`.

MLflow's schema enforcement turns requests into DataFrames and drops fields the signature lacks before our
loader sees them, so the parameters are tested here through pyfunc, not only through the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import transformers
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK

import llmadapter
from llmadapter.engine.generation import GenerationEngine
from llmadapter.errors import ConfigError, ContextLengthError, InvalidRequestError
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT, HubCache, without_cached

CHAT, COMPLETIONS, EMBEDDINGS = llmadapter.CHAT, llmadapter.COMPLETIONS, llmadapter.EMBEDDINGS
HELLO = [{"role": "user", "content": TRAINED_PROMPT}]
QUESTIONS = [
    "Hi",
    "Hello",
    "What is the capital of France?",
    "Café crème, naïve façade: 日本語",
    "Once upon a time, a small model learned to write. It wrote about foxes, dogs and cafés.",
    "1 2 3 4 5 6 7 8 9 10",
    "🙂",
    "Tell me about the quick brown fox and the lazy dog, in detail, with numbers: 1 2 3.",
]


def text_pipeline(folder: Path) -> Any:
    return transformers.pipeline("text-generation", model=str(folder))


def content(response: dict[str, Any], index: int = 0) -> str:
    return str(response["choices"][index]["message"]["content"])


Saver = Callable[..., Any]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saver:
    """save_model(folder's pipeline) once per (folder, task, model_config); returns the loaded pyfunc."""
    cache: dict[str, Any] = {}

    def save(folder: Path, task: str = CHAT, **model_config: Any) -> Any:
        key = json.dumps([str(folder), task, model_config], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp("saved") / "model"
            llmadapter.save_model(text_pipeline(folder), path, task=task, model_config=model_config or None)
            cache[key] = mlflow.pyfunc.load_model(str(path))
        return cache[key]

    return save


@pytest.fixture(scope="module")
def trained(saved: Saver, trained_model: Path) -> Any:
    return saved(trained_model)


@pytest.fixture(scope="module")
def untrained(saved: Saver, tiny_gpt2: Path) -> Any:
    """Untrained GPT-2-shaped model: near-uniform next-token distribution, so sampling parameters show."""
    return saved(tiny_gpt2)


# ---------------------------------------------------------------------------------------------
# The artifact: MLflow's own layout, metadata and signature
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, trained_model: Path, tiny_gpt2: Path
) -> dict[str, Any]:
    """For each llm/v1 task: (our artifact, the one mlflow.transformers writes) from the same pipeline."""
    text = text_pipeline(trained_model)
    features = transformers.pipeline("feature-extraction", model=str(tiny_gpt2))
    out = {}
    for task, pipe in ((CHAT, text), (COMPLETIONS, text), (EMBEDDINGS, features)):
        root = tmp_path_factory.mktemp(task.replace("/", "-"))
        llmadapter.save_model(pipe, root / "ours", task=task)
        mlflow.transformers.save_model(
            pipe, str(root / "native"), task=task, pip_requirements=llmadapter.default_pip_requirements(task)
        )
        out[task] = (root / "ours", root / "native")
    return out


def mlmodel(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((path / "MLmodel").read_text())
    return data


@pytest.mark.parametrize("task", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_task_metadata_exactly_as_mlflow_writes_it(artifacts: dict[str, Any], task: str) -> None:
    ours, native = (mlmodel(p) for p in artifacts[task])
    for key in ("task", "inference_task", "instance_type", "pipeline_model_type"):
        assert ours["flavors"]["transformers"][key] == native["flavors"]["transformers"][key], key
    assert ours["flavors"]["transformers"]["inference_task"] == task
    assert ours["metadata"]["task"] == native["metadata"]["task"] == task
    assert ours["flavors"]["python_function"]["loader_module"] == "llmadapter.mlflow_model"
    assert native["flavors"]["python_function"]["loader_module"] == "mlflow.transformers"


@pytest.mark.parametrize("task", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_signature_extends_the_one_mlflow_writes(artifacts: dict[str, Any], task: str) -> None:
    ours_path, native_path = artifacts[task]
    ours = Model.load(str(ours_path / "MLmodel")).signature
    native = Model.load(str(native_path / "MLmodel")).signature
    assert native == _SIGNATURE_FOR_LLM_INFERENCE_TASK[task]  # what MLflow writes is its own table
    ours_cols = {c.name: c for c in ours.inputs.inputs}
    for col in native.inputs.inputs:
        assert col.name in ours_cols, col.name
        assert ours_cols[col.name].type == col.type or col.name == "tools", col.name  # widened (catalog)
        assert ours_cols[col.name].required == col.required, col.name
    extra = set(ours_cols) - set(native.inputs.input_names())
    assert extra, "no parameters beyond MLflow's own"
    assert all(not ours_cols[name].required for name in extra)
    assert ours.outputs == native.outputs
    if task != EMBEDDINGS:
        assert {"seed", "logit_bias", "stream_options", "top_p", "presence_penalty"} <= set(ours_cols)
        assert ("logprobs" in ours_cols) and (task == COMPLETIONS) == ("echo" in ours_cols)


@pytest.mark.parametrize("task", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_requirements_have_no_torchvision(artifacts: dict[str, Any], task: str) -> None:
    ours, _ = artifacts[task]
    requirements = (ours / "requirements.txt").read_text().splitlines()
    assert not [r for r in requirements if r.startswith("torchvision")]
    names = {r.split("==")[0] for r in requirements}
    assert {"mlflow", "transformers", "torch"} <= names
    assert "torchvision" not in (ours / "conda.yaml").read_text()
    assert not [r for r in llmadapter.default_pip_requirements(task) if "torchvision" in r]


@pytest.mark.parametrize("task", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_mlflow_transformers_load_model_returns_the_pipeline(artifacts: dict[str, Any], task: str) -> None:
    ours, _ = artifacts[task]
    pipe = mlflow.transformers.load_model(str(ours))
    assert isinstance(pipe, transformers.Pipeline)
    assert pipe.task == ("feature-extraction" if task == EMBEDDINGS else "text-generation")


def test_artifact_ships_our_code(artifacts: dict[str, Any]) -> None:
    ours, _ = artifacts[CHAT]
    assert (ours / "code" / "llmadapter" / "mlflow_model.py").is_file()
    assert (ours / "code" / "llmadapter" / "engine" / "generation.py").is_file()


def test_log_model_to_a_store_registers_and_predicts(trained_model: Path, mlflow_store: str) -> None:
    example = {"messages": HELLO, "max_tokens": 5}
    with mlflow.start_run():
        info = llmadapter.log_model(
            text_pipeline(trained_model),
            name="model",
            task=CHAT,
            model_config={"temperature": 0, "stop": ["lazy"]},
            input_example=example,
            registered_model_name="chat-model",
        )
    assert info.flavors["transformers"]["task"] == "text-generation"
    assert info.flavors["transformers"]["inference_task"] == CHAT
    assert info.metadata == {"task": CHAT}
    assert info.registered_model_version == 1
    assert isinstance(mlflow.transformers.load_model(info.model_uri), transformers.Pipeline)
    for uri in (info.model_uri, "models:/chat-model/1"):
        response = mlflow.pyfunc.load_model(uri).predict({"messages": HELLO})
        assert content(response) == "The quick brown fox jumps over the "
        assert response["choices"][0]["finish_reason"] == "stop"


def test_a_typed_model_config_is_validated_once_and_logged_as_run_params(
    trained_model: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = llmadapter.ModelConfig(temperature=0, max_tokens=4)

    def validated_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the typed model_config was validated again")

    with monkeypatch.context() as mp, mlflow.start_run() as run:
        mp.setattr(llmadapter.ModelConfig, "model_validate", classmethod(validated_again))
        info = llmadapter.log_model(
            text_pipeline(trained_model), name="model", task=CHAT, model_config=config
        )

    assert info.flavors["python_function"]["config"] == {"temperature": 0.0, "max_tokens": 4}
    # MLflow's Model.log logs the model_config's keys as run params, as it does for a plain mapping.
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.params == {
        "temperature": "0.0",
        "max_tokens": "4",
    }
    response = mlflow.pyfunc.load_model(info.model_uri).predict({"messages": HELLO})
    assert response["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------------------------------------
# Log-time refusals
# ---------------------------------------------------------------------------------------------


def test_chat_task_on_a_tokenizer_without_template_fails_at_log_time(
    no_template_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        llmadapter.save_model(text_pipeline(no_template_model), tmp_path / "m", task=CHAT)
    assert info.value.param == "task"
    assert "chat template" in info.value.message
    assert not (tmp_path / "m").exists()
    # The same model logs fine for completions.
    llmadapter.save_model(text_pipeline(no_template_model), tmp_path / "c", task=COMPLETIONS)
    response = mlflow.pyfunc.load_model(str(tmp_path / "c")).predict({"prompt": "Hi", "max_tokens": 2})
    assert response["choices"][0]["finish_reason"] == "length"


def test_embeddings_task_on_a_text_generation_pipeline_fails_at_log_time(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        llmadapter.save_model(text_pipeline(tiny_gpt2), tmp_path / "m", task=EMBEDDINGS)
    assert info.value.param == "task"
    assert not (tmp_path / "m").exists()


def test_a_signature_that_drops_mlflow_fields_is_refused(tiny_gpt2: Path, tmp_path: Path) -> None:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string", "messages")]))
    with pytest.raises(ConfigError) as info:
        llmadapter.save_model(text_pipeline(tiny_gpt2), tmp_path / "m", task=CHAT, signature=signature)
    assert info.value.param == "signature"
    assert "temperature" in info.value.message


def test_a_misspelt_keyword_is_refused_by_name(tiny_gpt2: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="save_pretraind"):
        llmadapter.save_model(text_pipeline(tiny_gpt2), tmp_path / "m", task=CHAT, save_pretraind=False)  # type: ignore[call-arg]
    assert not (tmp_path / "m").exists()


def test_save_pretrained_false_needs_a_hub_model(tiny_gpt2: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        llmadapter.save_model(text_pipeline(tiny_gpt2), tmp_path / "m", task=CHAT, save_pretrained=False)
    assert info.value.param == "save_pretrained"
    assert "weights must be stored" in info.value.message


# ---------------------------------------------------------------------------------------------
# save_pretrained=False through a real, offline Hugging Face cache
# ---------------------------------------------------------------------------------------------

EDITED_TEMPLATE_PREFIX = "{{ 'SYSTEM: answer briefly.\\n' }}"


def test_save_pretrained_false_pins_repo_and_sha_offline_and_keeps_template_edits(
    hub_cache: HubCache, tmp_path: Path
) -> None:
    pipe = transformers.pipeline("text-generation", model=hub_cache.repo_id)
    original = pipe.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    pipe.tokenizer.chat_template = EDITED_TEMPLATE_PREFIX + pipe.tokenizer.chat_template
    edited = pipe.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert edited == "SYSTEM: answer briefly.\n" + original

    path = tmp_path / "model"
    llmadapter.save_model(pipe, path, task=CHAT, save_pretrained=False)  # HF_HUB_OFFLINE=1: no hub call
    flavor = mlmodel(path)["flavors"]["transformers"]
    assert flavor["source_model_name"] == hub_cache.repo_id
    assert flavor["source_model_revision"] == hub_cache.sha
    assert "model_binary" not in flavor
    assert not list(path.rglob("*.safetensors"))

    # Upstream moves on; the logged model still loads the pinned commit from the cache.
    config = json.loads((hub_cache.snapshot / "config.json").read_text())
    hub_cache.add_commit({"config.json": json.dumps({**config, "n_positions": 64})})

    response = mlflow.pyfunc.load_model(str(path)).predict({"messages": HELLO, "max_tokens": 200})
    assert response["usage"]["prompt_tokens"] == len(
        pipe.tokenizer(edited, add_special_tokens=False)["input_ids"]
    )
    assert response["usage"]["prompt_tokens"] > len(
        pipe.tokenizer(original, add_special_tokens=False)["input_ids"]
    )
    assert response["model"] == hub_cache.repo_id
    assert isinstance(mlflow.transformers.load_model(str(path)), transformers.Pipeline)


# ---------------------------------------------------------------------------------------------
# Responses through pyfunc
# ---------------------------------------------------------------------------------------------


def test_pyfunc_is_our_engine(trained: Any) -> None:
    assert trained.loader_module == "llmadapter.mlflow_model"
    assert isinstance(trained.get_raw_model(), GenerationEngine)


def test_greedy_answer_with_exact_usage(trained: Any, trained_model: Path) -> None:
    response = trained.predict({"messages": HELLO, "temperature": 0, "max_tokens": 100})
    assert content(response) == TRAINED_ANSWER
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["finish_reason"] == "stop"
    tok = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    prompt = tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
    completion_tokens = len(tok(TRAINED_ANSWER, add_special_tokens=False)["input_ids"])
    assert response["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": response["usage"]["prompt_tokens_details"],  # prefix cache reuse
    }
    assert 0 <= response["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt_tokens


def test_model_field_is_not_a_local_path(trained: Any, trained_model: Path) -> None:
    model = trained.predict({"messages": HELLO, "max_tokens": 1})["model"]
    assert not os.path.isabs(model)
    assert str(trained_model) not in model and trained_model.name not in model


def test_length_limit_gives_finish_reason_length(trained: Any) -> None:
    response = trained.predict({"messages": HELLO, "temperature": 0, "max_tokens": 4})
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 4
    assert content(response) == "The quick brown fox"


def test_max_completion_tokens_reaches_the_engine(trained: Any) -> None:
    response = trained.predict({"messages": HELLO, "temperature": 0, "max_completion_tokens": 2})
    assert response["usage"]["completion_tokens"] == 2
    assert response["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["lazy"], "The quick brown fox jumps over the "),
        (["Caf", "zebra"], "The quick brown fox jumps over the lazy dog. "),
        (["日本", "crème"], "The quick brown fox jumps over the lazy dog. Café "),
        (["naïve", "Café"], "The quick brown fox jumps over the lazy dog. "),
    ],
    ids=["one", "ends-mid-token", "multibyte", "earliest-wins"],
)
def test_stop_strings_are_trimmed(trained: Any, stop: list[str], expected: str) -> None:
    response = trained.predict({"messages": HELLO, "temperature": 0, "max_tokens": 100, "stop": stop})
    assert content(response) == expected
    assert response["choices"][0]["finish_reason"] == "stop"


def test_model_config_defaults_and_request_overrides(saved: Saver, trained_model: Path) -> None:
    model = saved(trained_model, temperature=0, max_tokens=40, stop=["lazy"])
    assert content(model.predict({"messages": HELLO})) == "The quick brown fox jumps over the "
    overridden = model.predict({"messages": HELLO, "stop": ["brown"], "max_tokens": 2})
    assert content(overridden) == "The quick"
    assert overridden["choices"][0]["finish_reason"] == "length"
    assert content(model.predict({"messages": HELLO, "stop": ["crème"]})) == (
        "The quick brown fox jumps over the lazy dog. Café "
    )


def test_temperature_zero_is_greedy_and_repeatable(untrained: Any) -> None:
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
    answers = {content(untrained.predict(request)) for _ in range(3)}
    assert len(answers) == 1


def test_defaults_are_openai_not_the_pipelines_sampling(untrained: Any) -> None:
    """No sampling fields == temperature 1, top_p 1, no top_k (OpenAI), not transformers' 0.7 / top_k 50."""
    base = {"messages": HELLO, "max_tokens": 16, "seed": 11}
    default = content(untrained.predict(base))
    assert default == content(untrained.predict({**base, "temperature": 1.0, "top_p": 1.0, "top_k": 0}))
    assert default != content(untrained.predict({**base, "temperature": 0.7, "top_k": 50}))
    assert default != content(untrained.predict({**base, "temperature": 0}))


def test_seed_reproducible_and_different_seeds_differ(untrained: Any) -> None:
    def sample(seed: int) -> str:
        return content(
            untrained.predict({"messages": HELLO, "temperature": 1.0, "max_tokens": 12, "seed": seed})
        )

    assert sample(3) == sample(3)
    assert len({sample(3), sample(4), sample(5)}) == 3


def test_top_p_and_top_k_reach_the_engine(untrained: Any) -> None:
    greedy = content(untrained.predict({"messages": HELLO, "temperature": 0, "max_tokens": 10}))
    for extra in ({"top_p": 1e-6}, {"top_k": 1}):
        sampled = untrained.predict(
            {"messages": HELLO, "temperature": 1.0, "max_tokens": 10, "seed": 1, **extra}
        )
        assert content(sampled) == greedy, extra


def test_n_choices(untrained: Any) -> None:
    response = untrained.predict({"messages": HELLO, "n": 3, "max_tokens": 6, "seed": 2})
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in response["choices"]}) == 3
    assert response["usage"]["completion_tokens"] == 18


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_change_the_output(untrained: Any, field: str) -> None:
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 30}
    assert content(untrained.predict({**request, field: 2.0})) != content(untrained.predict(request))


@pytest.mark.parametrize("bias", [100, 100.0], ids=["int-bias", "float-bias"])
def test_logit_bias_forces_a_token(trained: Any, trained_model: Path, bias: float) -> None:
    """OpenAI clients send integer biases ({"50256": -100}); both int and float must reach the engine."""
    tok = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    fox = tok.convert_tokens_to_ids("Ġfox")
    response = trained.predict(
        {"messages": HELLO, "temperature": 0, "max_tokens": 3, "logit_bias": {str(fox): bias}}
    )
    assert content(response) == " fox fox fox"


def test_chat_logprobs_shapes(trained: Any) -> None:
    response = trained.predict(
        {"messages": HELLO, "temperature": 0, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    )
    tokens = response["choices"][0]["logprobs"]["content"]
    assert len(tokens) == 4
    assert "".join(t["token"] for t in tokens) == content(response)
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)


def test_completions_echo_logprobs_and_stop(saved: Saver, trained_model: Path) -> None:
    model = saved(trained_model, COMPLETIONS)
    prompt = "The quick brown"
    response = model.predict(
        {"prompt": prompt, "temperature": 0, "max_tokens": 5, "echo": True, "logprobs": 2}
    )
    assert response["object"] == "text_completion"
    choice = response["choices"][0]
    assert choice["text"].startswith(prompt + " fox")
    # The echoed prompt's tokens are scored too (the first one is not: null), then the 5 generated ones.
    prompt_tokens = response["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["tokens"]) == prompt_tokens + 5
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert choice["logprobs"]["text_offset"][prompt_tokens] == len(prompt)
    stopped = model.predict({"prompt": prompt, "temperature": 0, "max_tokens": 20, "stop": ["lazy"]})
    assert stopped["choices"][0]["text"] == " fox jumps over the "
    assert stopped["choices"][0]["finish_reason"] == "stop"


# vLLM's fields through pyfunc: MLflow's schema enforcement keeps them (the signature declares them), and
# each answer is the engine's own answer to the same request (tests/engine/test_vllm_fields.py: what it is).
PYFUNC_VLLM_FIELDS = [  # (id, model, task, the request without vLLM's fields, vLLM's fields)
    ("min_tokens", "trained", CHAT, {"max_tokens": 40}, {"min_tokens": 40}),
    ("ignore_eos", "trained", CHAT, {"max_tokens": 40}, {"ignore_eos": True}),
    ("stop_token_ids", "trained", CHAT, {}, {"stop_token_ids": [268]}),
    ("include_stop_str_in_output", "trained", CHAT, {"stop": ["fox"]}, {"include_stop_str_in_output": True}),
    ("prompt_logprobs", "trained", CHAT, {}, {"prompt_logprobs": 1}),
    ("truncate_prompt_tokens", "trained", CHAT, {}, {"truncate_prompt_tokens": 3}),
    ("add_generation_prompt", "trained", CHAT, {}, {"add_generation_prompt": False}),
    (
        "continue_final_message",
        "trained",
        CHAT,
        {"messages": [*HELLO, {"role": "assistant", "content": "The quick"}]},
        {"continue_final_message": True},
    ),
    ("min_p", "untrained", CHAT, {"temperature": 1.5, "seed": 3}, {"min_p": 1.0}),
    ("repetition_penalty", "untrained", CHAT, {}, {"repetition_penalty": 3.0}),
    ("completions-prompt_logprobs", "trained", COMPLETIONS, {}, {"prompt_logprobs": 2}),
    (
        "completions-truncate_prompt_tokens",
        "trained",
        COMPLETIONS,
        {"echo": True},
        {"truncate_prompt_tokens": 2},
    ),
]


@pytest.mark.parametrize(
    ("which", "task", "common", "fields"),
    [c[1:] for c in PYFUNC_VLLM_FIELDS],
    ids=[c[0] for c in PYFUNC_VLLM_FIELDS],
)
def test_vllm_fields_through_pyfunc(
    saved: Saver,
    trained_model: Path,
    tiny_gpt2: Path,
    which: str,
    task: str,
    common: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    model = saved(trained_model if which == "trained" else tiny_gpt2, task)
    base = {"messages": HELLO} if task == CHAT else {"prompt": "The quick brown fox"}
    base |= {"temperature": 0, "max_tokens": 12, **common}
    got = model.predict({**base, **fields})
    engine = model.get_raw_model()
    (direct,) = engine.run([engine.parse({**base, **fields})])
    expected = direct.model_dump(exclude_none=True)
    assert (got["choices"], got["usage"]) == (expected["choices"], expected["usage"])
    assert got.get("prompt_logprobs") == expected.get("prompt_logprobs")
    without = model.predict(base)
    assert (got["choices"], got["usage"], got.get("prompt_logprobs")) != (
        without["choices"],
        without["usage"],
        without.get("prompt_logprobs"),
    )


def test_spec_fields_and_template_kwargs_through_pyfunc(trained: Any) -> None:
    spec_no_ops = {
        "store": False,
        "metadata": {"team": "search"},
        "service_tier": "auto",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "safety_identifier": "u-1",
        "prompt_cache_key": "k",
    }
    answer = trained.predict({"messages": HELLO, "temperature": 0, **spec_no_ops})
    assert content(answer) == TRAINED_ANSWER and answer["service_tier"] == "default"
    with pytest.raises(InvalidRequestError) as info:
        trained.predict({"messages": HELLO, "store": True})
    assert info.value.param == "store"
    # A renderer parameter among the template kwargs is refused: the nested map arrived intact.
    with pytest.raises(InvalidRequestError) as info:
        trained.predict({"messages": HELLO, "chat_template_kwargs": {"tokenize": True, "x": {"y": [1]}}})
    assert info.value.param == "chat_template_kwargs"


def test_tools_reach_a_template_that_renders_them(saved: Saver, bos_model: Path, trained: Any) -> None:
    # MLflow's own tools schema (kept in our signature) requires parameters.properties.
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    bos = saved(bos_model)
    without = bos.predict({"messages": HELLO, "max_tokens": 1})
    with_tools = bos.predict({"messages": HELLO, "max_tokens": 1, "tools": tools})
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def test_structured_outputs_and_tool_calls_through_pyfunc(
    saved: Saver, bos_model: Path, trained: Any
) -> None:
    import jsonschema

    parameters = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "count", "parameters": parameters}}]
    bos = saved(bos_model)
    body = {"messages": HELLO, "max_tokens": 60, "tools": tools, "tool_choice": "required", "temperature": 0}
    answer = bos.predict(body)
    (call,) = answer["choices"][0]["message"]["tool_calls"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and call["function"]["name"] == "count"
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
    streamed = [c["choices"][0]["delta"] for c in bos.predict_stream(body) if c["choices"]]
    arguments = "".join(
        p["function"].get("arguments") or "" for d in streamed for p in d.get("tool_calls") or []
    )
    assert arguments == call["function"]["arguments"]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": parameters}}
    text = trained.predict({"messages": HELLO, "max_tokens": 30, "response_format": fmt})["choices"][0][
        "message"
    ]
    jsonschema.validate(json.loads(text["content"]), parameters)


def test_bos_tokenizer_usage_is_exact(saved: Saver, bos_model: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(bos_model))
    ids = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    assert ids.count(tok.bos_token_id) == 1
    response = saved(bos_model).predict({"messages": HELLO, "max_tokens": 5, "temperature": 0.5})
    assert response["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 5,
        "total_tokens": len(ids) + 5,
        "prompt_tokens_details": {"cached_tokens": 0},  # a prompt under 16 tokens is never cached
    }
    assert response["choices"][0]["finish_reason"] == "length"


# --- errors name the parameter, through MLflow's enforcement --------------------------------------

PYFUNC_ERRORS = [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "temperature": 3.0}, "temperature"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HELLO, "logit_bias": {"99999": 1.0}}, "logit_bias"),
    ({"messages": HELLO, "n": 0}, "n"),
]


@pytest.mark.parametrize(("request_body", "param"), PYFUNC_ERRORS, ids=[p for _, p in PYFUNC_ERRORS])
def test_pyfunc_errors_name_the_parameter(trained: Any, request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        trained.predict(request_body)
    assert info.value.param == param


def test_context_overflow_is_a_clear_error_with_both_numbers(untrained: Any) -> None:
    with pytest.raises(ContextLengthError) as info:
        untrained.predict({"messages": HELLO, "max_tokens": 250})
    assert info.value.param == "max_tokens"
    assert "256" in info.value.message and "250" in info.value.message
    with pytest.raises(ContextLengthError) as info:
        untrained.predict({"messages": [{"role": "user", "content": "fox " * 300}]})
    assert info.value.param == "messages"
    assert "256" in info.value.message


def test_what_mlflow_enforcement_does_before_our_code(trained: Any) -> None:
    """Documented MLflow behaviour, not ours: wrong types fail its schema check, unknown fields are dropped
    with only a warning (so they cannot reach our engine, which would refuse them).

    `stop` keeps MLflow's own type, an array of strings, so the OpenAI form `"stop": "lazy"` (one string)
    fails MLflow's check through pyfunc; our engine and HTTP server accept it.
    """
    with pytest.raises(MlflowException, match="enforce schema"):
        trained.predict({"messages": HELLO, "stop": [1, 2]})
    with pytest.raises(MlflowException, match="enforce schema"):
        trained.predict({"messages": HELLO, "stop": "lazy"})
    response = trained.predict({"messages": HELLO, "max_tokens": 1, "frobnicate": True})
    assert response["usage"]["completion_tokens"] == 1


# --- several requests in one predict call ---------------------------------------------------------


def test_each_row_keeps_its_own_params(trained: Any) -> None:
    """Rows with different parameters in one call, each answered with its own.

    MLflow's schema enforcement rejects a *list of dicts* whose keys differ: a missing array field (stop)
    becomes NaN and fails the array check. A DataFrame whose missing cells are None works for array and
    double columns. Integer columns (max_tokens, n, seed) must be given in every row: a missing integer
    turns the column into floats, which MLflow refuses for a `long` field.
    """
    frame = pd.DataFrame(
        {
            "messages": [HELLO, HELLO, HELLO, HELLO],
            "max_tokens": [100, 100, 6, 3],
            "n": [1, 2, 1, 1],
            "temperature": [0.0, 0.0, 0.0, None],
            "stop": [None, ["fox"], None, None],
            "presence_penalty": [None, None, 2.0, None],
            "logprobs": [None, True, None, None],
        }
    )
    r0, r1, r2, r3 = trained.predict(frame)
    assert content(r0) == TRAINED_ANSWER and r0["choices"][0]["finish_reason"] == "stop"
    assert [c["message"]["content"] for c in r1["choices"]] == ["The quick brown "] * 2
    assert all(c["logprobs"] is not None for c in r1["choices"]) and r0["choices"][0]["logprobs"] is None
    assert r2["usage"]["completion_tokens"] == 6 and r2["choices"][0]["finish_reason"] == "length"
    assert r3["usage"]["completion_tokens"] == 3
    with pytest.raises(MlflowException):
        trained.predict([{"messages": HELLO, "stop": ["fox"]}, {"messages": HELLO}])


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_32_requests_in_one_call_equal_their_one_at_a_time_answers(
    saved: Saver, arch: str, request: pytest.FixtureRequest
) -> None:
    """Continuous batching with left padding keeps every row's answer (different prompts and limits)."""
    model = saved(request.getfixturevalue(arch))
    requests = [
        {
            "messages": [
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))}
            ],
            "temperature": 0.0,
            "max_tokens": 1 + (i * 5) % 17,
        }
        for i in range(32)
    ]
    stats = model.get_raw_model().stats
    steps_before = len(stats.batch_sizes)
    together = model.predict(requests)
    steps = stats.batch_sizes[steps_before:]
    assert len(together) == 32
    # Generated together: forward steps carried many sequences at once (how many exactly depends on
    # when the scheduler thread picks the requests up).
    assert max(steps) > 1 and len(steps) < sum(r["usage"]["completion_tokens"] for r in together)
    for body, response in zip(requests, together, strict=True):
        alone = model.predict(body)
        assert response["choices"] == alone["choices"], body
        # Equal but for the prefix cache: the second time a prompt comes, its KV is reused.
        assert without_cached(response["usage"]) == without_cached(alone["usage"]), body
        assert response["usage"]["completion_tokens"] <= body["max_tokens"]
    assert len({r["usage"]["prompt_tokens"] for r in together}) > 4  # really different prompt lengths


# --- streaming ------------------------------------------------------------------------------------


def test_predict_stream_joins_to_the_predict_text_with_usage_last(trained: Any) -> None:
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 100, "stop": ["STOP"]}
    whole = trained.predict(request)
    chunks = list(trained.predict_stream(request))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == content(whole) == TRAINED_ANSWER[: TRAINED_ANSWER.find("STOP")]
    assert len([c for c in chunks if c["choices"]]) > 3
    assert chunks[-1]["usage"] == whole["usage"]
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "stop"


def test_predict_stream_completions_and_no_usage_when_asked(saved: Saver, trained_model: Path) -> None:
    model = saved(trained_model, COMPLETIONS)
    request = {"prompt": "The quick", "temperature": 0, "max_tokens": 5}
    chunks = list(model.predict_stream(request))
    assert (
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        == model.predict(request)["choices"][0]["text"]
    )
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    quiet = list(
        model.predict_stream({**request, "stream": True, "stream_options": {"include_usage": False}})
    )
    assert all("usage" not in c for c in quiet)


def test_predict_answers_whole_even_when_asked_to_stream(trained: Any) -> None:
    """pyfunc predict returns one response; stream flags in the request do not break it."""
    request = {"messages": HELLO, "temperature": 0, "max_tokens": 3}
    expected = trained.predict(request)
    for flags in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}):
        response = trained.predict({**request, **flags})
        assert response["object"] == "chat.completion", flags
        assert content(response) == content(expected) and response["usage"] == expected["usage"], flags


# --- a fresh process ------------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import mlflow
    out = []
    for uri in sys.argv[1:]:
        model = mlflow.pyfunc.load_model(uri)
        response = model.predict({"messages": [{"role": "user", "content": "Hello"}], "temperature": 0})
        out.append({"engine": type(model.get_raw_model()).__name__, "response": response})
    print(json.dumps(out))
    """
)


def test_a_fresh_process_loads_by_models_and_runs_uri(
    trained_model: Path, mlflow_store: str, tmp_path: Path
) -> None:
    with mlflow.start_run() as run:
        llmadapter.log_model(
            text_pipeline(trained_model), name="model", task=CHAT, registered_model_name="fresh"
        )
    uris = ["models:/fresh/1", f"runs:/{run.info.run_id}/model"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *uris],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for result in results:
        assert result["engine"] == "GenerationEngine"
        assert content(result["response"]) == TRAINED_ANSWER
        assert result["response"]["choices"][0]["finish_reason"] == "stop"
