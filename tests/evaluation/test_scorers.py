"""Scorers on fixed answers: each one passes a right answer and fails a wrong one."""

from __future__ import annotations

from typing import Any

import pytest

from llmadapter.errors import EvaluationError
from llmadapter.evaluation import EvaluationSet, ScorerSpec
from llmadapter.evaluation.dataset import parse_row
from llmadapter.evaluation.scorers import build_scorers, score_value

ASK = {"messages": [{"role": "user", "content": "q"}]}
NEIGHBOURS = {"input": ["cat", "kitten", "truck", "car"]}
TOOL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def _call(tool: str, arguments: str) -> dict[str, Any]:
    return {
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": tool, "arguments": arguments}}],
    }


CASES = [
    ("exact_match", {"expected": "Paris"}, " Paris\n", "Paris is"),
    ("contains", {"expected": "Paris"}, "The capital is paris.", "The capital is Parisville."),
    ("contains", {"expected": "12"}, "The answer is 12.", "The answer is 112."),
    ("contains", {"expected": "Café"}, "un cafe noir", "un caf noir"),
    ("regex", {"regex": r"^\d+$"}, "42", "forty-two"),
    (
        "json_schema",
        {"expected_json": {"type": "object", "required": ["a"]}},
        '```json\n{"a": 1}\n```',
        '{"b": 1}',
    ),
    ("json_schema", {"expected_json": {"type": "object"}}, '{"a": 1}', "not json"),
    (
        "tool_call",
        {"expected_tool_call": TOOL},
        _call("get_weather", '{"city": "Paris"}'),
        _call("get_weather", '{"city": "Rome"}'),
    ),
    (
        "tool_call",
        {"expected_tool_call": {"name": "get_weather"}},
        _call("get_weather", "{}"),
        "It is sunny.",
    ),
    ("answer_length", {}, "short", ""),
    ("exact_match", {"expected": "Paris"}, "Paris", {"error": "GenerationError: boom"}),
]


@pytest.mark.parametrize(
    ("name", "expectations", "right", "wrong"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_text_scorers_pass_right_and_fail_wrong(
    name: str, expectations: dict[str, Any], right: Any, wrong: Any
) -> None:
    planned = build_scorers([ScorerSpec(name=name)], _set({**ASK, **expectations}), "llm/v1/chat", None)[0]
    for answer, value in ((right, 1.0), (wrong, 0.0)):
        feedback = planned.scorer(inputs=ASK, outputs=answer, expectations=expectations)
        assert feedback.value == value, feedback.rationale


@pytest.mark.parametrize(
    ("name", "params", "similarities", "value"),
    [
        ("cosine", {}, [0.9, 0.1, 0.3], 0.9),
        ("cosine", {}, [0.2, 0.8, 0.3], 0.2),
        ("recall_at_k", {}, [0.9, 0.1, 0.3], 1.0),
        ("recall_at_k", {}, [0.2, 0.8, 0.3], 0.0),
        ("recall_at_k", {"k": 2}, [0.3, 0.8, 0.2], 1.0),
    ],
    ids=["cosine-near", "cosine-far", "recall-first", "recall-missed", "recall-top2"],
)
def test_embedding_scorers(
    name: str, params: dict[str, Any], similarities: list[float], value: float
) -> None:
    row = {"input": "cat", "candidates": ["kitten", "truck", "car"], "expected_neighbours": ["kitten"]}
    planned = build_scorers([ScorerSpec(name=name, params=params)], _set(row), "llm/v1/embeddings", None)[0]
    feedback = planned.scorer(
        inputs=NEIGHBOURS,
        outputs={"similarities": similarities},
        expectations={"expected_neighbours": ["kitten"]},
    )
    assert feedback.value == pytest.approx(value)


def test_an_mlflow_genai_scorer_by_name() -> None:
    planned = build_scorers(
        [ScorerSpec(name="RegexMatch", params={"pattern": "Paris"})],
        _set({**ASK, "expected": "x"}),
        "llm/v1/chat",
        None,
    )[0]
    assert planned.name == "regex_match"
    assert score_value(planned.scorer(outputs="Paris").value) == 1.0
    assert score_value(planned.scorer(outputs="Rome").value) == 0.0


@pytest.mark.parametrize(
    ("spec", "task", "row", "message"),
    [
        (
            ScorerSpec(name="Exactness"),
            "llm/v1/chat",
            ASK,
            r"no scorer named 'Exactness'; ours: exact_match.*RegexMatch",
        ),
        (ScorerSpec(name="exact_match"), "llm/v1/chat", ASK, r"exact_match needs `expected` on every row"),
        (
            ScorerSpec(name="cosine"),
            "llm/v1/chat",
            ASK,
            r"cosine scores llm/v1/embeddings models; this one is llm/v1/chat",
        ),
        (
            ScorerSpec(name="tool_call"),
            "llm/v1/completions",
            {"prompt": "x"},
            r"tool_call scores llm/v1/chat",
        ),
        (
            ScorerSpec(name="answer_length", params={"max": 3}),
            "llm/v1/chat",
            ASK,
            r"params.max: Extra inputs",
        ),
        (ScorerSpec(name="RegexMatch"), "llm/v1/chat", ASK, r"RegexMatch\(\{\}\)"),
        (ScorerSpec(name="judge"), "llm/v1/chat", ASK, r"the judge scorer needs quality.judge"),
    ],
    ids=[
        "unknown",
        "missing-expectation",
        "wrong-task",
        "tool-call-on-completions",
        "bad-params",
        "mlflow-bad-kwargs",
        "judge-unset",
    ],
)
def test_scorer_problems_are_named(spec: ScorerSpec, task: str, row: dict[str, Any], message: str) -> None:
    with pytest.raises(EvaluationError, match=message) as raised:
        build_scorers([spec], _set(row), task, None)
    assert raised.value.param == "quality.scorers[0]"


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("yes", 1.0),
        ("no", 0.0),
        (True, 1.0),
        (False, 0.0),
        (0.25, 0.25),
        (3, 3.0),
        ("0.5", 0.5),
        (None, None),
        (float("nan"), None),
        ("maybe", None),
    ],
)
def test_recorded_values_as_numbers(value: Any, number: float | None) -> None:
    assert score_value(value) == number


def _set(row: dict[str, Any]) -> EvaluationSet:
    return EvaluationSet(
        name="s", source="s", source_type="local", digest="d", rows=[parse_row(row, "row 1")]
    )
