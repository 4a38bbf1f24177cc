"""Evaluation sets: every row checked, with an error naming the file, line and problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmadapter.errors import EvaluationError
from llmadapter.evaluation import SMOLLM2_EVAL_SET, load_dataset

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def _jsonl(tmp_path: Path, *rows: object, name: str = "set.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_each_input_form_becomes_a_request(tmp_path: Path) -> None:
    found = load_dataset(
        _jsonl(
            tmp_path,
            {"id": "a", **CHAT, "expected": "Paris"},
            {"request": {**CHAT, "temperature": 0}, "regex": "Par"},
            {"prompt": "2 + 2 =", "expected": "4"},
            {"input": "a cat", "candidates": ["a kitten", "a truck"], "expected_neighbours": ["a kitten"]},
        )
    )
    assert [r.id for r in found.rows] == ["a", "set.jsonl line 2", "set.jsonl line 3", "set.jsonl line 4"]
    assert found.rows[1].request == {**CHAT, "temperature": 0}
    assert found.rows[2].request == {"prompt": "2 + 2 ="}
    assert found.rows[3].request == {"input": ["a cat", "a kitten", "a truck"]}
    assert (found.name, found.source_type) == ("set", "local") and len(found.digest) == 16


def test_the_digest_names_the_rows_not_the_file(tmp_path: Path) -> None:
    row = {"id": "a", **CHAT, "expected": "Paris"}
    one = load_dataset(_jsonl(tmp_path, row, name="one.jsonl"))
    two = load_dataset(_jsonl(tmp_path, row, name="two.jsonl"))
    other = load_dataset(_jsonl(tmp_path, {**row, "expected": "Lyon"}, name="three.jsonl"))
    assert one.digest == two.digest != other.digest


def test_csv_cells_holding_json(tmp_path: Path) -> None:
    path = tmp_path / "set.csv"
    path.write_text(
        'id,messages,expected,expected_json\nq1,"[{""role"": ""user"", ""content"": ""Hi""}]",Hello,\n'
        'q2,"[{""role"": ""user"", ""content"": ""JSON""}]",,"{""type"": ""object""}"\n'
    )
    found = load_dataset(str(path))
    assert found.rows[0].request == {"messages": [{"role": "user", "content": "Hi"}]}
    assert found.rows[1].expectations.expected_json == {"type": "object"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"expected": "x"}], r"line 1: a row needs exactly one input .*found none"),
        ([{**CHAT, "prompt": "x"}], r"line 1: a row needs exactly one input .*found messages, prompt"),
        ([{**CHAT, "expectd": "x"}], r"line 1: unknown field\(s\) expectd"),
        ([{**CHAT}, "{not json"], r"line 2: not JSON"),
        ([{**CHAT, "regex": "("}], r"line 1: regex '\(':"),
        (
            [{**CHAT, "expected_tool_call": {"arguments": {}}}],
            r"line 1: expected_tool_call.name: Field required",
        ),
        ([{"request": {"temperature": 0}}], r"request must be an OpenAI request body"),
        ([{"messages": []}], r"messages must be a non-empty list"),
        ([{"input": "a", "candidates": ["b"], "expected_neighbours": ["c"]}], r"not found: \['c'\]"),
        ([{"id": "a", **CHAT}, {"id": "a", **CHAT}], r"row ids given twice: a"),
        ([], r"has no rows"),
    ],
    ids=[
        "no-input",
        "two-inputs",
        "unknown-field",
        "bad-json",
        "bad-regex",
        "tool-call-without-name",
        "request-without-input",
        "empty-messages",
        "neighbour-not-a-candidate",
        "duplicate-ids",
        "empty",
    ],
)
def test_bad_rows_are_named(tmp_path: Path, rows: list[object], message: str) -> None:
    with pytest.raises(EvaluationError, match=message) as raised:
        load_dataset(_jsonl(tmp_path, *rows) if rows else str(_empty(tmp_path)))
    assert raised.value.param == "dataset"


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    return path


def test_a_missing_file_and_an_unknown_dataset_name(tmp_path: Path, mlflow_store: str) -> None:
    with pytest.raises(EvaluationError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(
        EvaluationError, match=r"neither a \.jsonl/\.csv file nor an MLflow evaluation dataset"
    ):
        load_dataset("no-such-dataset")


def test_an_mlflow_evaluation_dataset_by_name(mlflow_store: str) -> None:
    import mlflow
    from mlflow.genai.datasets import create_dataset

    mlflow.set_experiment("evalsets")
    dataset = create_dataset(name="capitals")
    dataset.merge_records([{"inputs": CHAT, "expectations": {"expected_response": "Paris"}}])

    found = load_dataset("capitals")
    assert (found.name, found.source_type, found.source) == (
        "capitals",
        "mlflow_evaluation_dataset",
        dataset.dataset_id,
    )
    assert found.rows[0].request == CHAT and found.rows[0].expectations.expected == "Paris"


def test_the_shipped_smollm2_set() -> None:
    found = load_dataset(str(SMOLLM2_EVAL_SET))
    assert len(found.rows) == 20 and all(r.expectations.expected for r in found.rows)
    sample = found.sample(5, seed=1)
    assert len(sample.rows) == 5 and sample.digest != found.digest
    assert sample == found.sample(5, seed=1)
