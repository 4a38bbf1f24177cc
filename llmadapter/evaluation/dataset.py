"""Evaluation sets: rows read from JSONL, CSV or an MLflow evaluation dataset, checked before any model loads.

A row holds its input as an OpenAI request body (`request`) or just `messages` / `prompt` / `input`
(embeddings: `input` is the query and `candidates` the texts ranked against it), and its expectations:
`expected` (text), `expected_json` (a JSON Schema the answer must satisfy), `expected_tool_call`
(`{"name", "arguments"}`), `regex`, `expected_neighbours` (candidates that should rank first). The set's
digest is computed over the parsed rows, so the same rows give the same digest whatever file held them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmadapter.errors import EvaluationError, first_error

_INPUT_KEYS = ("request", "messages", "prompt", "input")
_EXPECTATION_KEYS = ("expected", "expected_json", "expected_tool_call", "regex", "expected_neighbours")
_OTHER_KEYS = ("id", "candidates")
# CSV cells holding JSON rather than text.
_JSON_COLUMNS = frozenset({"request", "messages", "expected_json", "expected_tool_call", "candidates"})
_JSON_COLUMNS_LIST = frozenset({"expected_neighbours"})
# MLflow's own expectation names, read as ours.
_MLFLOW_EXPECTATIONS = {"expected_response": "expected"}


class ToolCallExpectation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    arguments: dict[str, Any] | None = None


class Expectations(BaseModel):
    """What a row expects of the answer; each scorer reads the one it needs."""

    model_config = ConfigDict(extra="forbid")

    expected: str | None = None
    expected_json: dict[str, Any] | None = None
    expected_tool_call: ToolCallExpectation | None = None
    regex: str | None = None
    expected_neighbours: list[str] | None = None

    def given(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class EvaluationRow(BaseModel):
    """One row: the request sent to the model and what its answer should be."""

    id: str
    request: dict[str, Any]
    expectations: Expectations


class EvaluationSet(BaseModel):
    """The rows of one evaluation set, with the name, source and digest MLflow records for it."""

    name: str
    source: str
    source_type: str
    digest: str
    rows: list[EvaluationRow]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.digest}"

    def sample(self, size: int | None, seed: int) -> EvaluationSet:
        """`size` rows chosen with `seed` (kept in file order), with the digest of what is kept."""
        if size is None or size >= len(self.rows):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.rows)), size))
        rows = [self.rows[i] for i in keep]
        return self.model_copy(update={"rows": rows, "digest": _digest(rows)})


def _digest(rows: list[EvaluationRow]) -> str:
    text = json.dumps([r.model_dump(mode="json", exclude_none=True) for r in rows], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_row(raw: Any, where: str) -> EvaluationRow:
    """One row from its stored form; `where` names it in errors (`data.jsonl line 3`)."""
    if not isinstance(raw, dict):
        raise EvaluationError(f"{where}: a row is a JSON object, got {type(raw).__name__}.", param="dataset")
    given = {k: v for k, v in raw.items() if v is not None and v != ""}
    unknown = sorted(set(given) - {*_INPUT_KEYS, *_EXPECTATION_KEYS, *_OTHER_KEYS})
    if unknown:
        raise EvaluationError(
            f"{where}: unknown field(s) {', '.join(unknown)}; a row has one of {', '.join(_INPUT_KEYS)}, "
            f"expectations among {', '.join(_EXPECTATION_KEYS)}, and optionally id, candidates.",
            param="dataset",
        )
    inputs = [k for k in _INPUT_KEYS if k in given]
    if len(inputs) != 1:
        found = f"found {', '.join(inputs)}" if inputs else "found none"
        raise EvaluationError(
            f"{where}: a row needs exactly one input ({', '.join(_INPUT_KEYS)}); {found}.", param="dataset"
        )
    request = _request(inputs[0], given[inputs[0]], given.get("candidates"), where)
    try:
        expectations = Expectations.model_validate({k: given[k] for k in _EXPECTATION_KEYS if k in given})
    except ValidationError as exc:
        err = first_error(exc)
        raise EvaluationError(f"{where}: {err.where}: {err.message}", param="dataset") from None
    if expectations.regex is not None:
        try:
            re.compile(expectations.regex)
        except re.error as exc:
            raise EvaluationError(f"{where}: regex {expectations.regex!r}: {exc}", param="dataset") from None
    if expectations.expected_neighbours is not None:
        candidates = given.get("candidates") or []
        missing = [n for n in expectations.expected_neighbours if n not in candidates]
        if missing or not expectations.expected_neighbours:
            raise EvaluationError(
                f"{where}: expected_neighbours must be among the row's candidates; not found: {missing}.",
                param="dataset",
            )
    return EvaluationRow(id=str(given.get("id", where)), request=request, expectations=expectations)


def _request(key: str, value: Any, candidates: Any, where: str) -> dict[str, Any]:
    if key == "request":
        if not isinstance(value, dict) or not any(k in value for k in _INPUT_KEYS[1:]):
            raise EvaluationError(
                f"{where}: request must be an OpenAI request body with messages, prompt or input.",
                param="dataset",
            )
        return dict(value)
    if key == "messages" and not (isinstance(value, list) and value):
        raise EvaluationError(f"{where}: messages must be a non-empty list of messages.", param="dataset")
    if key == "prompt" and not isinstance(value, str):
        raise EvaluationError(f"{where}: prompt must be a string.", param="dataset")
    if candidates is not None:
        if key != "input" or not isinstance(value, str):
            raise EvaluationError(
                f"{where}: candidates go with a text `input` (embeddings).", param="dataset"
            )
        if not (isinstance(candidates, list) and candidates and all(isinstance(c, str) for c in candidates)):
            raise EvaluationError(f"{where}: candidates must be a non-empty list of texts.", param="dataset")
        return {"input": [value, *candidates]}
    return {key: value}


def _jsonl_rows(path: Path) -> list[EvaluationRow]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{where}: not JSON: {exc.msg}.", param="dataset") from None
        rows.append(parse_row(raw, where))
    return rows


def _csv_rows(path: Path) -> list[EvaluationRow]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for number, record in enumerate(csv.DictReader(f), start=2):
            where = f"{path.name} line {number}"
            raw: dict[str, Any] = {}
            for key, cell in record.items():
                if key is None:
                    raise EvaluationError(f"{where}: more cells than columns.", param="dataset")
                raw[key] = _csv_cell(key, cell, where)
            rows.append(parse_row(raw, where))
    return rows


def _csv_cell(key: str, cell: str | None, where: str) -> Any:
    if cell is None or cell == "" or key not in _JSON_COLUMNS | _JSON_COLUMNS_LIST:
        return cell
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        if key in _JSON_COLUMNS_LIST:
            return [cell]
        raise EvaluationError(
            f"{where}: column {key} holds JSON; could not read {cell!r}.", param="dataset"
        ) from None


def _mlflow_rows(name: str) -> tuple[list[EvaluationRow], str, str]:
    """Rows of an MLflow evaluation dataset (inputs = the request or its fields, expectations)."""
    from mlflow.exceptions import MlflowException
    from mlflow.genai.datasets import get_dataset

    try:
        dataset = get_dataset(name=name)
    except MlflowException as exc:
        raise EvaluationError(
            f"dataset {name!r} is neither a .jsonl/.csv file nor an MLflow evaluation dataset: {exc.message}",
            param="dataset",
        ) from None
    rows = []
    for index, record in enumerate(dataset.to_df().to_dict(orient="records")):
        inputs = record.get("inputs") or {}
        expectations = {
            _MLFLOW_EXPECTATIONS.get(k, k): v for k, v in (record.get("expectations") or {}).items()
        }
        raw = {**(inputs if isinstance(inputs, dict) else {"input": inputs}), **expectations}
        rows.append(parse_row(raw, f"dataset {name!r} record {index}"))
    return rows, str(dataset.dataset_id), str(dataset.digest)


def load_dataset(dataset: str) -> EvaluationSet:
    """Read and check every row of a .jsonl / .csv file, or of the MLflow evaluation dataset so named."""
    path = Path(dataset).expanduser()
    if path.suffix.lower() in (".jsonl", ".csv"):
        if not path.is_file():
            raise EvaluationError(f"dataset file {dataset} does not exist.", param="dataset")
        rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)
        name, source, source_type = path.stem, str(path.absolute()), "local"
    else:
        rows, dataset_id, _ = _mlflow_rows(dataset)
        name, source, source_type = dataset, dataset_id, "mlflow_evaluation_dataset"
    if not rows:
        raise EvaluationError(f"dataset {dataset} has no rows.", param="dataset")
    ids = [r.id for r in rows]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise EvaluationError(
            f"dataset {dataset}: row ids given twice: {', '.join(repeated)}.", param="dataset"
        )
    return EvaluationSet(name=name, source=source, source_type=source_type, digest=_digest(rows), rows=rows)
