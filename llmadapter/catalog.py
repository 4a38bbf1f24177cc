"""The task catalog: each llm/v1 task's native pipeline tasks, request model, config and signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from llmadapter.config import EmbeddingsConfig, ModelConfig, StoredConfig, TaskConfig, validate_config
from llmadapter.errors import ConfigError
from llmadapter.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mlflow.models import ModelSignature

# The llm/v1 tasks, spelled as a Literal for typed parameters (the Prefect UI renders it as a choice);
# mypy holds each constant to it, and tests/test_catalog.py holds it to the catalog's keys.
LLMTask = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
CHAT: Final[LLMTask] = "llm/v1/chat"
COMPLETIONS: Final[LLMTask] = "llm/v1/completions"
EMBEDDINGS: Final[LLMTask] = "llm/v1/embeddings"

# (name, mlflow type) of the optional request fields our engine accepts beyond MLflow's own schema.
# MLflow's schema enforcement drops any field a signature lacks, so these must be declared.
# vLLM's fields, on both generation tasks (`chat_template_kwargs` and the prompt switches: chat only).
_VLLM_EXTRA = (
    ("min_p", "double"),
    ("repetition_penalty", "double"),
    ("min_tokens", "long"),
    ("ignore_eos", "boolean"),
    ("stop_token_ids", "array_long"),
    ("include_stop_str_in_output", "boolean"),
    ("prompt_logprobs", "long"),
    ("truncate_prompt_tokens", "long"),
)
_CHAT_EXTRA = (
    ("max_completion_tokens", "long"),
    ("seed", "long"),
    ("logprobs", "boolean"),
    ("top_logprobs", "long"),
    ("tool_choice", "any"),
    ("parallel_tool_calls", "boolean"),
    ("functions", "array_map"),
    ("function_call", "any"),
    ("logit_bias", "map_any"),
    ("stream_options", "stream_options"),
    ("user", "string"),
    ("model", "string"),
    # the spec's optional fields (llmadapter.protocol.optional: which values are accepted)
    ("store", "boolean"),
    ("metadata", "map_string"),
    ("service_tier", "string"),
    ("modalities", "array_string"),
    ("verbosity", "string"),
    ("reasoning_effort", "string"),
    ("response_format", "map_any"),
    ("audio", "map_any"),
    ("moderation", "map_any"),
    ("web_search_options", "map_any"),
    ("prediction", "map_any"),
    ("prompt_cache_key", "string"),
    ("prompt_cache_options", "map_any"),
    ("prompt_cache_retention", "string"),
    ("safety_identifier", "string"),
    *_VLLM_EXTRA,
    ("chat_template_kwargs", "map_any"),
    ("add_generation_prompt", "boolean"),
    ("continue_final_message", "boolean"),
)
_COMPLETIONS_EXTRA = (
    ("top_p", "double"),
    ("top_k", "long"),
    ("frequency_penalty", "double"),
    ("presence_penalty", "double"),
    ("seed", "long"),
    ("logprobs", "long"),
    ("echo", "boolean"),
    ("response_format", "map_any"),
    ("best_of", "long"),
    ("suffix", "string"),
    ("logit_bias", "map_any"),
    ("stream_options", "stream_options"),
    ("user", "string"),
    ("model", "string"),
    *_VLLM_EXTRA,
)
_EMBEDDINGS_EXTRA = (
    ("encoding_format", "string"),
    ("dimensions", "long"),
    ("user", "string"),
    ("model", "string"),
)

# Constrained decoding (response_format, forced tool calls) and its schema checks.
_GENERATION_REQUIREMENTS = ("xgrammar", "jsonschema", "torchao")  # torchao: the int8 / int4 kernels
_GENERATION_CHECKS = (
    "usage-arithmetic",
    "finish-reason",
    "stop-handling",
    "context-limit",
    "determinism",
    "latency",
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything that differs between the llm/v1 tasks, so that callers look it up instead of branching."""

    inference_task: str
    native_tasks: tuple[str, ...]
    request_model: type[Any]
    response_model: type[Any]
    chunk_model: type[Any] | None  # None: the task does not stream
    config_model: type[ModelConfig] | type[EmbeddingsConfig]
    route: str  # the OpenAI route that answers it
    name_suffix: str  # appended to default registered model names
    extra_fields: tuple[tuple[str, str], ...]
    checks: tuple[str, ...]  # validation's checks after the samples, by name (llmadapter.validation.suite)
    needs_chat_template: bool = False  # refused at log time when the tokenizer has none
    requirements: tuple[str, ...] = ()  # pip packages a logged model needs beyond the common ones

    @property
    def default_native_task(self) -> str:
        return self.native_tasks[0]

    @property
    def is_generation(self) -> bool:
        return self.chunk_model is not None

    def parse_config(self, data: Mapping[str, Any] | StoredConfig | None) -> TaskConfig:
        """This task's model_config from a mapping or a config model (unknown keys and bad values raise
        ConfigError); one already of this task's config model is returned unchanged."""
        return validate_config(self.config_model, data)


CATALOG: dict[str, TaskSpec] = {
    CHAT: TaskSpec(
        inference_task=CHAT,
        native_tasks=("text-generation",),
        request_model=ChatCompletionRequest,
        response_model=ChatCompletionResponse,
        chunk_model=ChatCompletionChunk,
        config_model=ModelConfig,
        route="/v1/chat/completions",
        name_suffix="chat",
        extra_fields=_CHAT_EXTRA,
        checks=_GENERATION_CHECKS,
        needs_chat_template=True,
        requirements=_GENERATION_REQUIREMENTS,
    ),
    COMPLETIONS: TaskSpec(
        inference_task=COMPLETIONS,
        native_tasks=("text-generation",),
        request_model=CompletionRequest,
        response_model=CompletionResponse,
        chunk_model=CompletionChunk,
        config_model=ModelConfig,
        route="/v1/completions",
        name_suffix="completions",
        extra_fields=_COMPLETIONS_EXTRA,
        checks=_GENERATION_CHECKS,
        requirements=_GENERATION_REQUIREMENTS,
    ),
    EMBEDDINGS: TaskSpec(
        inference_task=EMBEDDINGS,
        native_tasks=("feature-extraction", "sentence-similarity"),
        request_model=EmbeddingRequest,
        response_model=EmbeddingResponse,
        chunk_model=None,
        config_model=EmbeddingsConfig,
        route="/v1/embeddings",
        name_suffix="embeddings",
        extra_fields=_EMBEDDINGS_EXTRA,
        checks=("usage-arithmetic", "embeddings", "determinism", "latency"),
        requirements=("sentence-transformers",),
    ),
}


def get_task(inference_task: str) -> TaskSpec:
    try:
        return CATALOG[inference_task]
    except KeyError:
        raise ConfigError(
            f"Unknown task '{inference_task}'. Choose one of: {', '.join(CATALOG)}.", param="task"
        ) from None


def resolve_task(task: str | None, native_task: str | None) -> tuple[str, TaskSpec]:
    """(native pipeline task, llm/v1 spec) for a requested task and the pipeline's own task.

    `task` may be an llm/v1 task, or a native task (then the llm/v1 task follows from the catalog:
    text-generation -> chat, feature-extraction -> embeddings).
    """
    if task is None and native_task is None:
        raise ConfigError("The pipeline's task cannot be inferred; pass task=...", param="task")
    if task is not None and task in CATALOG:
        spec = CATALOG[task]
        native = native_task or spec.default_native_task
        if native not in spec.native_tasks:
            raise ConfigError(
                f"Task '{task}' needs a {' or '.join(spec.native_tasks)} pipeline; "
                f"this pipeline's task is '{native}'.",
                param="task",
            )
        return native, spec
    native = str(task or native_task)
    if native_task is not None and task is not None and task != native_task:
        raise ConfigError(
            f"task='{task}' does not match the pipeline's own task '{native_task}'.", param="task"
        )
    answered = spec_of(native)
    if answered is not None:
        return native, answered
    raise ConfigError(
        f"Pipeline task '{native}' has no llm/v1 interface; supported: text-generation "
        "(llm/v1/chat, llm/v1/completions) and feature-extraction (llm/v1/embeddings).",
        param="task",
    )


def spec_of(task: str) -> TaskSpec | None:
    """The spec an llm/v1 task stands for, or the one a native pipeline task answers by default
    (text-generation: chat, feature-extraction: embeddings); None for anything else."""
    if task in CATALOG:
        return CATALOG[task]
    return next((spec for spec in CATALOG.values() if task in spec.native_tasks), None)


def _extra_type(kind: str) -> Any:
    """The MLflow type of an extra field's kind (the second column of the _*_EXTRA tables)."""
    from mlflow.types.schema import AnyType, Array, DataType, Map, Object, Property

    # Maps and `any` take AnyType values: OpenAI clients send integer logit biases, which a double map
    # would refuse, and objects whose shape the request model checks, not MLflow.
    types = {
        "map_any": lambda: Map(AnyType()),
        "map_string": lambda: Map(DataType.string),
        "array_long": lambda: Array(DataType.long),
        "array_string": lambda: Array(DataType.string),
        "array_map": lambda: Array(Map(AnyType())),
        "any": AnyType,
        "stream_options": lambda: Object([Property("include_usage", DataType.boolean, required=False)]),
    }
    return types[kind]() if kind in types else DataType[kind]


def widened_colspec(name: str) -> Any:
    """Our colspec of an MLflow field this signature widens (WIDENED_FIELDS)."""
    return _extra_colspec(name, WIDENED_FIELDS[name])


def _extra_colspec(name: str, kind: str) -> Any:
    from mlflow.types.schema import ColSpec

    return ColSpec(_extra_type(kind), name, required=False)


# MLflow fields whose own type is narrower than what the request model takes: MLflow's `tools` allows
# only description/enum/items/type in a parameter's schema, and tool parameters are any JSON Schema.
WIDENED_FIELDS = {"tools": "array_map"}


def build_signature(inference_task: str) -> ModelSignature:
    """MLflow's own llm/v1 signature, extended with optional fields for every other engine parameter."""
    from mlflow.models import ModelSignature
    from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK
    from mlflow.types.schema import Schema

    spec = get_task(inference_task)
    native = _SIGNATURE_FOR_LLM_INFERENCE_TASK[inference_task]
    names = set(native.inputs.input_names())
    inputs = [
        widened_colspec(col.name) if col.name in WIDENED_FIELDS else col for col in native.inputs.inputs
    ] + [_extra_colspec(name, kind) for name, kind in spec.extra_fields if name not in names]
    return ModelSignature(inputs=Schema(inputs), outputs=native.outputs, params=native.params)
