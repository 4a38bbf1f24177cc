"""The `quality` parameter and the override form as the Prefect UI renders them (their JSON schemas)."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from flows.log_and_validate import log_and_validate
from flows.promote import GateOverrideInput, promote
from llmadapter.evaluation import QualityOptions, ScorerSpec


@pytest.mark.parametrize("flow", [promote, log_and_validate], ids=["promote", "log-and-validate"])
def test_both_flows_take_a_typed_quality_form(flow: object) -> None:
    schema = parameter_schema(flow).model_dump()  # type: ignore[arg-type]
    assert "quality" in schema["properties"]
    options = schema["definitions"]["QualityOptions"]
    assert {"dataset", "scorers", "sample_size", "judge", "confidence"} <= set(options["properties"])
    scorer = schema["definitions"]["ScorerSpec"]["properties"]
    assert scorer["min_score"]["anyOf"][0]["maximum"] == 1
    assert "max_regression" in scorer


def test_the_override_form_requires_override_gate_to_approve() -> None:
    schema = GateOverrideInput.model_json_schema()
    assert "override_gate" in schema["properties"]
    assert any("override_gate" in str(rule) for rule in schema["allOf"])
    assert any("approver" in str(rule) for rule in schema["allOf"])
    with pytest.raises(ValidationError, match="override_gate"):
        GateOverrideInput(approve=True, approver="dave")
    assert GateOverrideInput(approve=True, approver="dave", override_gate=True).override_gate
    assert not GateOverrideInput(approve=False).approve


def test_quality_options_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="scorers are named twice: contains"):
        QualityOptions(dataset="d.jsonl", scorers=[ScorerSpec(name="contains"), ScorerSpec(name="contains")])
    with pytest.raises(ValidationError, match="scorers"):
        QualityOptions(dataset="d.jsonl", scorers=[])
    with pytest.raises(ValidationError, match="min_score"):
        ScorerSpec(name="contains", min_score=1.5)
    with pytest.raises(ValidationError, match="unknown"):
        QualityOptions.model_validate({"dataset": "d.jsonl", "scorers": [{"name": "x"}], "unknown": 1})
