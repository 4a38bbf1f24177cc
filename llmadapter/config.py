"""Persisted model_config (validated at log time, with its registry digest) and the merged per-request
generation parameters.

Merge order: OpenAI defaults < model_config < request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmadapter.errors import ConfigError, first_error

# OpenAI's documented defaults, applied explicitly so that a pipeline's own generation_config
# (transformers 5 samples with temperature 0.7 by default) never leaks into answers.
OPENAI_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
DEFAULT_MAX_TOKENS = 256
# Temperatures below this are greedy decoding (see GenerationParams.greedy).
GREEDY_BELOW = 1e-5


# model_config keys added after the first digests (key -> default).
_LATER_KEYS: dict[str, Any] = {
    "response_format": None,
    "tool_call_parser": "auto",
    "dtype": "auto",
    "quantization": "auto",
    "prefix_cache_mb": 256,
}

# Weight formats (llmadapter.engine.weights applies them); "auto" means "not set here".
DtypeName: TypeAlias = Literal["auto", "float32", "bfloat16", "float16"]
QuantizationName: TypeAlias = Literal["auto", "none", "int8", "int4"]
DTYPE_HELP = (
    "Weights and activations dtype: auto (bfloat16 on CUDA, float32 on CPU, bfloat16 when quantized), "
    "float32, bfloat16, float16 (CUDA only)."
)
QUANTIZATION_HELP = (
    "Weight-only quantization with torchao kernels: auto (the GGUF source's own blocks, Q4_x -> int4, "
    "Q8_0 -> int8; else none), none, int8, int4 (bfloat16 activations)."
)


@dataclass(frozen=True)
class WeightFormat:
    """A weight format as asked for (server setting, model_config); 'auto' in a field: not set there."""

    dtype: str = "auto"
    quantization: str = "auto"
    device: str = "auto"

    def over(self, lower: WeightFormat) -> WeightFormat:
        """Each field of self unless it is 'auto', else lower's (server settings over model_config)."""
        return WeightFormat(
            dtype=self.dtype if self.dtype != "auto" else lower.dtype,
            quantization=self.quantization if self.quantization != "auto" else lower.quantization,
            device=self.device if self.device != "auto" else lower.device,
        )


class StoredConfig(BaseModel):
    """What every task's model_config shares: unknown keys refused, immutable, and a registry digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """A short stable hash of every value, defaults filled in (so {} and the defaults agree).

        The registry's `model_config_hash` tag. The task is not part of it: the registry keys versions
        on the task tag beside it, and chat and completions share one config model.
        """
        values = self.model_dump(mode="json")
        # Keys added after digests were first recorded count only when set: an existing config's digest
        # (and so its registry tag) stays what it was.
        for key, default in _LATER_KEYS.items():
            if values.get(key, default) == default:
                values.pop(key, None)
        payload = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ModelConfig(StoredConfig):
    """Defaults for chat and completions requests, stored with the model; every request may override."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")] = (
        1.0
    )
    top_p: Annotated[
        float, Field(ge=0.0, le=1.0, description="Nucleus sampling mass; 0 keeps the top token.")
    ] = 1.0
    top_k: Annotated[int, Field(ge=0, description="Keep the k most likely tokens; 0 disables.")] = 0
    max_tokens: Annotated[
        int, Field(ge=1, description="Default completion length when a request gives none.")
    ] = DEFAULT_MAX_TOKENS
    stop: list[str] = Field(default_factory=list, description="Default stop sequences.")
    n: Annotated[int, Field(ge=1, le=128, description="Default number of choices (the spec's bound).")] = 1
    seed: int | None = Field(
        default=None, ge=-(2**63), le=2**63 - 1, description="Default seed for sampling (64-bit)."
    )
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    max_batch_size: Annotated[
        int, Field(ge=1, le=512, description="Most sequences generated together in one batch.")
    ] = 32
    context_window: Annotated[
        int | None, Field(ge=1, description="Override the model's context window (tokens).")
    ] = None
    prefix_cache_mb: Annotated[
        int,
        Field(
            ge=0,
            le=1_048_576,
            description="Memory for the KV cache of prompt prefixes reused by later requests (MiB); 0 turns "
            "prefix caching off.",
        ),
    ] = 256

    response_format: dict[str, Any] | None = Field(
        default=None,
        description="Default response_format of chat and completions requests (the OpenAI shape).",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral", "json"] = Field(
        default="auto",
        description="How tool calls are read from the output; auto: from the chat template.",
    )
    dtype: DtypeName = Field(default="auto", description=DTYPE_HELP + " A server's --dtype wins.")
    quantization: QuantizationName = Field(
        default="auto", description=QUANTIZATION_HELP + " A server's --quantization wins."
    )

    def weight_format(self) -> WeightFormat:
        return WeightFormat(dtype=self.dtype, quantization=self.quantization)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from llmadapter.engine.grammar import check_schema
        from llmadapter.errors import InvalidRequestError
        from llmadapter.protocol.optional import ResponseFormat

        fmt = ResponseFormat.model_validate(value)  # a ValidationError names the key
        schema = fmt.schema_of()
        if schema is not None:
            try:
                check_schema(schema, "response_format")
            except InvalidRequestError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(not isinstance(s, str) or s == "" for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value


class EmbeddingsConfig(StoredConfig):
    """Defaults for embeddings requests, stored with the model."""

    dimensions: Annotated[int | None, Field(ge=1, description="Truncate vectors to this size.")] = None
    encoding_format: Literal["float", "base64"] = "float"
    truncate: bool = Field(
        default=True, description="Cut inputs at the model's max length (False: refuse them)."
    )
    max_inputs: Annotated[int, Field(ge=1, le=100_000, description="Most inputs in one request.")] = 2048
    max_batch_size: Annotated[int, Field(ge=1, le=4096, description="Texts per forward pass.")] = 64


# A model_config validated for its task (the catalog's TaskSpec.config_model says which).
TaskConfig: TypeAlias = ModelConfig | EmbeddingsConfig
ConfigT = TypeVar("ConfigT", bound=StoredConfig)


def validate_config(cls: type[ConfigT], data: Mapping[str, Any] | StoredConfig | None) -> ConfigT:
    """Validate a model_config as `cls`; unknown keys and out-of-range values raise ConfigError.

    An instance of `cls` is returned as it is (validated when it was made). Another task's config counts
    as the keys set on it: a Prefect parameter typed as either config may hold the other one.
    The catalog calls this with the task's config model (`TaskSpec.parse_config`).
    """
    if isinstance(data, cls):
        return data
    if isinstance(data, StoredConfig):
        data = data.model_dump(exclude_unset=True)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"model_config must be a mapping, got {type(data).__name__}.", param="model_config")
    try:
        return cls.model_validate(dict(data or {}))
    except ValidationError as exc:
        first = first_error(exc)
        key = first.where or None
        if first.kind == "extra_forbidden":
            raise ConfigError(f"Unknown model_config key '{key}'.", param=key) from None
        raise ConfigError(f"Invalid model_config value for '{key}': {first.message}.", param=key) from None


# Where an artifact's python_function flavor holds its model_config: MLflow's key (save_model writes
# it through mlflow.transformers.save_model), then the one the first llmadapter versions read.
_STORED_CONFIG_KEYS = ("config", "model_config")


def stored_config(config: StoredConfig) -> dict[str, Any] | None:
    """The model_config as an artifact stores it: the values that differ from the defaults."""
    return config.model_dump(exclude_defaults=True) or None


def read_stored_config(
    cls: type[ConfigT], pyfunc_conf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ConfigT:
    """The model_config an artifact stored (see stored_config) with `overrides` on top, as `cls`."""
    stored: Mapping[str, Any] = next((pyfunc_conf[k] for k in _STORED_CONFIG_KEYS if pyfunc_conf.get(k)), {})
    return validate_config(cls, {**stored, **(overrides or {})})


@dataclass(frozen=True)
class GenerationParams:
    """One request's resolved generation parameters, as the engine consumes them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    # vLLM's extensions, with vLLM's meaning (llmadapter.protocol.requests documents each field).
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str: bool = False
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: prompt not scored

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32 and sampling would divide into inf/NaN;
        # the distribution is a point mass anyway (vLLM uses the same cut-off).
        return self.temperature < GREEDY_BELOW
