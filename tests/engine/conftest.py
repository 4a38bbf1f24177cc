"""Engines on the tiny models, shared by the engine tests (module-scoped: each test module gets its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers

from llmadapter.catalog import CHAT, COMPLETIONS, get_task
from llmadapter.config import ModelConfig
from llmadapter.engine.generation import GenerationEngine


def make_engine(folder: Path, task: str = CHAT, **config: Any) -> GenerationEngine:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return GenerationEngine(
        model, tokenizer, spec=get_task(task), config=ModelConfig(**config), model_name=folder.name
    )


def _closing(engine: GenerationEngine) -> Iterator[GenerationEngine]:
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def chat(trained_model: Path) -> Iterator[GenerationEngine]:
    yield from _closing(make_engine(trained_model, temperature=0.0))


@pytest.fixture(scope="module")
def completions(trained_model: Path) -> Iterator[GenerationEngine]:
    yield from _closing(make_engine(trained_model, COMPLETIONS, temperature=0.0))


@pytest.fixture(scope="module")
def bos(bos_model: Path) -> Iterator[GenerationEngine]:
    yield from _closing(make_engine(bos_model, temperature=0.0))


@pytest.fixture(scope="module")
def sampled(tiny_gpt2: Path) -> Iterator[GenerationEngine]:
    """Untrained model with OpenAI defaults (temperature 1): near-uniform, so sampling shows."""
    yield from _closing(make_engine(tiny_gpt2))
