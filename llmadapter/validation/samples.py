"""The requests validation predicts: ValidationSample, the built-in samples per task, and user samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS
from llmadapter.errors import ConfigError, first_error


class ValidationSample(BaseModel):
    """A request to predict during validation; `expect` is text the answer must contain."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80)
    request: dict[str, Any]
    expect: str | None = None


def parse_samples(samples: Sequence[ValidationSample | Mapping[str, Any]] | None) -> list[ValidationSample]:
    """User samples as ValidationSamples; a bare request body ({"messages": [...]}) is accepted too."""
    out: list[ValidationSample] = []
    for i, raw in enumerate(samples or ()):
        if isinstance(raw, ValidationSample):
            out.append(raw)
            continue
        if not isinstance(raw, Mapping):
            raise ConfigError(f"samples[{i}] must be a mapping, got {type(raw).__name__}.", param="samples")
        data = dict(raw) if "request" in raw else {"name": f"user-{i}", "request": dict(raw)}
        data.setdefault("name", f"user-{i}")
        try:
            out.append(ValidationSample.model_validate(data))
        except ValidationError as exc:
            first = first_error(exc)
            raise ConfigError(
                f"Invalid samples[{i}].{first.where}: {first.message}.", param="samples"
            ) from None
    return out


def _chat(name: str, *messages: tuple[str, str], **params: Any) -> ValidationSample:
    """A chat sample from (role, content) messages and request parameters."""
    chat = [{"role": role, "content": content} for role, content in messages]
    return ValidationSample(name=name, request={"messages": chat, **params})


# Built-in samples per task; the first is the greedy one (temperature 0) that later checks reuse.
BUILTIN_SAMPLES: dict[str, tuple[ValidationSample, ...]] = {
    CHAT: (
        _chat("chat-greedy", ("user", "What is the capital of France?"), temperature=0, max_tokens=24),
        _chat(
            "chat-system",
            ("system", "You answer in one short sentence."),
            ("user", "Name a colour."),
            temperature=0,
            max_tokens=8,
        ),
        _chat("chat-length", ("user", "Count to ten."), max_tokens=2),
        _chat("chat-n2-seed", ("user", "Say something."), n=2, seed=7, temperature=0.8, max_tokens=8),
    ),
    COMPLETIONS: (
        ValidationSample(
            name="completion-greedy",
            request={"prompt": "The capital of France is", "temperature": 0, "max_tokens": 24},
        ),
        ValidationSample(name="completion-length", request={"prompt": "One, two, three,", "max_tokens": 2}),
        ValidationSample(
            name="completion-n2-seed",
            request={"prompt": "Once upon a time", "n": 2, "seed": 7, "temperature": 0.8, "max_tokens": 8},
        ),
    ),
    EMBEDDINGS: (
        ValidationSample(name="embed-pair", request={"input": ["Hello", "Hello, how are you?"]}),
        ValidationSample(name="embed-one", request={"input": "The capital of France is Paris."}),
    ),
}
