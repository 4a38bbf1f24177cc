"""Task catalog: native-task inference, refusals that name `task`, signatures that keep MLflow's fields."""

from __future__ import annotations

from typing import get_args

import pytest
from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK
from mlflow.types.schema import AnyType, Array, ColSpec, Map

from llmadapter.catalog import (
    CATALOG,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LLMTask,
    build_signature,
    get_task,
    resolve_task,
    spec_of,
)
from llmadapter.errors import ConfigError

TASKS = [CHAT, COMPLETIONS, EMBEDDINGS]


@pytest.mark.parametrize(
    ("task", "native_task", "expected"),
    [
        (None, "text-generation", ("text-generation", CHAT)),
        ("text-generation", None, ("text-generation", CHAT)),
        ("text-generation", "text-generation", ("text-generation", CHAT)),
        (CHAT, "text-generation", ("text-generation", CHAT)),
        (CHAT, None, ("text-generation", CHAT)),
        (COMPLETIONS, "text-generation", ("text-generation", COMPLETIONS)),
        (None, "feature-extraction", ("feature-extraction", EMBEDDINGS)),
        ("feature-extraction", None, ("feature-extraction", EMBEDDINGS)),
        (EMBEDDINGS, "feature-extraction", ("feature-extraction", EMBEDDINGS)),
        (EMBEDDINGS, "sentence-similarity", ("sentence-similarity", EMBEDDINGS)),
        (EMBEDDINGS, None, ("feature-extraction", EMBEDDINGS)),
    ],
    ids=lambda v: str(v),
)
def test_resolve_task(task: str | None, native_task: str | None, expected: tuple[str, str]) -> None:
    native, spec = resolve_task(task, native_task)
    assert (native, spec.inference_task) == expected


@pytest.mark.parametrize(
    ("task", "native_task", "fragment"),
    [
        (EMBEDDINGS, "text-generation", "feature-extraction"),
        (CHAT, "feature-extraction", "text-generation"),
        (COMPLETIONS, "text-classification", "text-generation"),
        (None, "text-classification", "no llm/v1 interface"),
        ("summarization", None, "no llm/v1 interface"),
        ("text-generation", "feature-extraction", "does not match"),
        (None, None, "cannot be inferred"),
        ("llm/v1/images", None, "no llm/v1 interface"),
    ],
    ids=lambda v: str(v),
)
def test_unsupported_task_is_refused_naming_task(
    task: str | None, native_task: str | None, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_task(task, native_task)
    assert info.value.param == "task"
    assert fragment in info.value.message


def test_get_task_unknown_names_task_and_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("llm/v2/chat")
    assert info.value.param == "task"
    for task in TASKS:
        assert task in info.value.message


@pytest.mark.parametrize("task", TASKS)
def test_catalog_entries(task: str) -> None:
    spec = get_task(task)
    assert spec.inference_task == task
    assert spec.is_generation == (task != EMBEDDINGS)
    # The catalog's tables agree with the protocol models they name.
    objects = {"chat.completion", "text_completion", "list"}
    assert spec.response_model.model_fields["object"].default in objects
    assert spec.route.startswith("/v1/")
    assert spec.name_suffix in task
    assert isinstance(spec.parse_config({}), spec.config_model)


def test_the_task_literal_is_the_catalogs_keys() -> None:
    # The Literal types the flows' `task` parameter (a choice in the Prefect UI): one entry per task.
    assert list(get_args(LLMTask)) == list(CATALOG) == TASKS


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (CHAT, CHAT),
        (COMPLETIONS, COMPLETIONS),
        (EMBEDDINGS, EMBEDDINGS),
        ("text-generation", CHAT),
        ("feature-extraction", EMBEDDINGS),
        ("sentence-similarity", EMBEDDINGS),
        ("summarization", None),
        ("llm/v1/images", None),
    ],
    ids=lambda v: str(v),
)
def test_spec_of_an_llm_v1_or_native_task(task: str, expected: str | None) -> None:
    spec = spec_of(task)
    assert (spec.inference_task if spec else None) == expected


def test_task_tables_chat_template_and_requirements() -> None:
    assert [t for t in TASKS if get_task(t).needs_chat_template] == [CHAT]
    assert {t: get_task(t).requirements for t in TASKS} == {
        CHAT: ("xgrammar", "jsonschema", "torchao"),  # constrained decoding, its schema checks, int8/int4
        COMPLETIONS: ("xgrammar", "jsonschema", "torchao"),
        EMBEDDINGS: ("sentence-transformers",),
    }


def _cols(signature_inputs: object) -> dict[str, ColSpec]:
    return {col.name: col for col in signature_inputs.inputs}  # type: ignore[attr-defined]


@pytest.mark.parametrize("task", TASKS)
def test_signature_keeps_every_mlflow_field_with_same_type_and_requiredness(task: str) -> None:
    ours = _cols(build_signature(task).inputs)
    native = _cols(_SIGNATURE_FOR_LLM_INFERENCE_TASK[task].inputs)
    for name, col in native.items():
        assert name in ours, name
        # `tools` is widened: MLflow's type refuses parameter schemas beyond description/enum/items/type.
        widened = ours[name].type == Array(Map(AnyType())) and name == "tools"
        assert ours[name].type == col.type or widened, name
        assert ours[name].required == col.required, name
    assert build_signature(task).outputs == _SIGNATURE_FOR_LLM_INFERENCE_TASK[task].outputs


@pytest.mark.parametrize("task", TASKS)
def test_signature_declares_every_request_field_and_extras_are_optional(task: str) -> None:
    """MLflow's schema enforcement drops any field the signature lacks, so every request field is declared."""
    spec = CATALOG[task]
    ours = _cols(build_signature(task).inputs)
    native = _cols(_SIGNATURE_FOR_LLM_INFERENCE_TASK[task].inputs)
    accepted = set(spec.request_model.model_fields)
    assert accepted <= set(ours), sorted(accepted - set(ours))
    for name in set(ours) - set(native):
        assert not ours[name].required, name
