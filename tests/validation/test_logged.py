"""llmadapter.validation.logged: the logged task, signature conformance and flavor metadata of an artifact."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Schema

from llmadapter.catalog import CHAT, EMBEDDINGS, build_signature, get_task
from llmadapter.validation import check_signature
from llmadapter.validation.logged import check_flavor_metadata, logged_task


@pytest.mark.parametrize(
    ("drop", "retype", "problem"),
    [
        (None, None, None),
        ("stop", None, "inputs.stop missing"),
        (None, ("temperature", DataType.long), "inputs.temperature is"),
        (None, ("max_tokens", None), "inputs.max_tokens is"),
    ],
    ids=["ours-is-complete", "missing-field", "wrong-type", "wrong-requiredness"],
)
def test_signature_must_contain_every_mlflow_field(
    drop: str | None, retype: tuple[str, DataType | None] | None, problem: str | None
) -> None:
    ours = build_signature(CHAT)
    inputs = []
    for spec in ours.inputs.inputs:
        if spec.name == drop:
            continue
        if retype is not None and spec.name == retype[0]:
            # A new type keeps requiredness; no new type flips requiredness.
            kind = retype[1] or spec.type
            spec = ColSpec(kind, spec.name, required=spec.required if retype[1] else not spec.required)
        inputs.append(spec)
    result = check_signature(ModelSignature(Schema(inputs), ours.outputs), CHAT)

    assert result.passed is (problem is None)
    if problem:
        assert problem in result.detail


def test_a_model_without_signature_fails_the_signature_check() -> None:
    assert not check_signature(None, CHAT).passed


def _info(metadata: dict[str, Any] | None, flavors: dict[str, Any]) -> Any:
    return SimpleNamespace(metadata=metadata, flavors=flavors)


OURS = {
    "transformers": {"task": "text-generation", "inference_task": CHAT},
    "python_function": {"loader_module": "llmadapter.mlflow_model"},
}


@pytest.mark.parametrize(
    ("info", "task"),
    [
        (_info({"task": CHAT}, {}), CHAT),
        (_info(None, {"transformers": {"inference_task": EMBEDDINGS}}), EMBEDDINGS),
        (_info(None, {}), None),
    ],
    ids=["metadata", "flavor-inference-task", "none"],
)
def test_logged_task(info: Any, task: str | None) -> None:
    assert logged_task(info) == task


@pytest.mark.parametrize(
    ("metadata", "flavors", "problem"),
    [
        ({"task": CHAT}, OURS, None),
        ({"task": CHAT}, {**OURS, "python_function": {"loader_module": "mlflow.transformers"}}, "loader is"),
        (
            {"task": CHAT},
            {**OURS, "transformers": {"task": "fill-mask", "inference_task": CHAT}},
            "fill-mask",
        ),
        ({"task": CHAT}, {"python_function": OURS["python_function"]}, "no transformers flavor"),
        (None, OURS, "metadata.task is None"),
    ],
    ids=["ours", "mlflow-loader", "wrong-native-task", "no-transformers-flavor", "no-metadata-task"],
)
def test_flavor_metadata(
    metadata: dict[str, Any] | None, flavors: dict[str, Any], problem: str | None
) -> None:
    result = check_flavor_metadata(_info(metadata, flavors), get_task(CHAT))

    assert result.passed is (problem is None)
    assert problem is None or problem in result.detail
