"""The real instruct model SmolLM2-135M-Instruct (GGUF from PyPI, converted once), answered through pyfunc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
import transformers

import llmadapter
from llmadapter.testing import without_cached

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("smollm2") / "model"
    pipe = transformers.pipeline("text-generation", model=str(smollm2))
    llmadapter.save_model(pipe, path, task=llmadapter.CHAT, model_config={"temperature": 0, "max_tokens": 40})
    return mlflow.pyfunc.load_model(str(path))


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(smollm2))


def template_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(out["input_ids"] if not isinstance(out, list) else out)


def content(response: dict[str, Any]) -> str:
    return str(response["choices"][0]["message"]["content"])


def test_capital_of_france_is_paris(smol: Any, tokenizer: Any) -> None:
    response = smol.predict({"messages": FRANCE})
    assert "Paris" in content(response)
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"]["prompt_tokens"] == template_tokens(tokenizer, FRANCE)
    assert response["usage"]["completion_tokens"] == len(
        tokenizer(content(response), add_special_tokens=False)["input_ids"]
    )
    assert response["model"] == "model"


def test_stop_strings_cut_exactly_on_real_text(smol: Any) -> None:
    full = content(smol.predict({"messages": FRANCE}))
    assert "Paris" in full
    stops = ["Paris", "capital", " of", "is P", "aris.", "ance", full[-3:]]
    for stop in stops:
        assert stop in full, stop
        response = smol.predict({"messages": FRANCE, "stop": [stop]})
        assert content(response) == full[: full.find(stop)], stop
        assert response["choices"][0]["finish_reason"] == "stop"
    several = smol.predict({"messages": FRANCE, "stop": ["Paris", "capital"]})
    assert content(several) == full[: min(full.find("Paris"), full.find("capital"))]


def test_length_limit_on_real_text(smol: Any) -> None:
    response = smol.predict({"messages": FRANCE, "max_tokens": 3})
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 3


def test_a_batch_of_questions_equals_one_at_a_time(smol: Any) -> None:
    """Left-padded batching on a real model gives every row its solo greedy answer."""
    questions = [
        "What is the capital of France?",
        "Name a color.",
        "What is 2 + 2? Answer with a number only, please, and nothing else at all.",
        "Say hello.",
    ]
    requests = [
        {"messages": [{"role": "user", "content": q}], "max_tokens": 12 + 4 * i}
        for i, q in enumerate(questions)
    ]
    together = smol.predict(requests)
    for request, response in zip(requests, together, strict=True):
        alone = smol.predict(request)
        assert response["choices"] == alone["choices"], request
        assert without_cached(response["usage"]) == without_cached(alone["usage"]), request
        # The same prompt again: all of it but its last token comes from the prefix cache.
        assert alone["usage"]["prompt_tokens_details"]["cached_tokens"] == alone["usage"]["prompt_tokens"] - 1
