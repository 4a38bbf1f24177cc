"""Request rows: what pyfunc `predict` and POST /invocations receive, as one OpenAI request dict per row.

Both entry points take the same inputs (a DataFrame after MLflow's schema enforcement, a dict, a list of
dicts, plus `params`) and must answer alike, because `mlflow models serve` answers /invocations through
our pyfunc: `plain_rows` turns the input into plain rows, `request_rows` turns rows into requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llmadapter.errors import InvalidRequestError

if TYPE_CHECKING:
    from llmadapter.catalog import TaskSpec

# Fields of an embeddings row that MLflow's schema enforcement produces when it splits a list of texts
# into one row per text.
_SPLIT_TEXT_FIELDS = frozenset({"input", "model"})


def _plain(value: Any) -> Any:
    """DataFrame cells back to JSON-like Python: numpy arrays -> lists, NaN/None -> None."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _plain(v) is not None}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def plain_rows(data: Any) -> list[dict[str, Any]]:
    """Rows of a DataFrame, a dict or a list of dicts, as plain Python with missing cells left out
    (pandas writes a missing value as NaN or None: both mean "not given")."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        records = data.to_dict(orient="records")
    elif isinstance(data, Mapping):
        records = [dict(data)]
    elif isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
        records = [dict(r) for r in data]
    else:
        raise InvalidRequestError(
            f"Expected an OpenAI request dict, a list of them or a DataFrame; got {type(data).__name__}.",
            param=None,
        )
    out = []
    for record in records:
        row = {str(k): _plain(v) for k, v in record.items()}
        out.append({k: v for k, v in row.items() if v is not None})
    return out


def request_rows(
    rows: list[dict[str, Any]], params: Mapping[str, Any] | None, spec: TaskSpec, *, streaming: bool = False
) -> list[dict[str, Any]]:
    """One request dict per row for `spec`'s request model; `params` fill what a row leaves out.

    Embeddings rows holding only `input` (and `model`) are one request: MLflow's schema enforcement
    splits a list of texts into one row per text. `predict` answers whole and `predict_stream` streams,
    whatever a row's `stream` says (`streaming` decides; `stream_options` matter only when streaming).
    """
    defaults = {k: v for k, v in (params or {}).items() if v is not None}
    if not spec.is_generation and len(rows) > 1 and all(set(r) <= _SPLIT_TEXT_FIELDS for r in rows):
        rows = [{**rows[0], "input": [r.get("input") for r in rows]}]
    requests = []
    for row in rows:
        request = {**defaults, **row}
        request.pop("stream", None)
        if streaming:
            request["stream"] = True
        else:
            request.pop("stream_options", None)
        if spec.is_generation:
            # MLflow's own chat types carry `custom_inputs`; generation has no use for it.
            request.pop("custom_inputs", None)
        requests.append(request)
    return requests
