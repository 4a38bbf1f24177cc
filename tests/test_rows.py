"""Rows to requests, shared by pyfunc predict and POST /invocations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS, get_task
from llmadapter.errors import InvalidRequestError
from llmadapter.rows import plain_rows, request_rows

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("data", "rows"),
    [
        ({"messages": HI, "n": None}, [{"messages": HI}]),
        ([{"prompt": "a"}, {"prompt": "b", "n": 2}], [{"prompt": "a"}, {"prompt": "b", "n": 2}]),
        (
            pd.DataFrame({"prompt": ["a", "b"], "max_tokens": [4, np.nan]}),
            [{"prompt": "a", "max_tokens": 4.0}, {"prompt": "b"}],
        ),
        (
            pd.DataFrame({"input": [np.array(["x", "y"])], "dimensions": [np.int64(8)]}),
            [{"input": ["x", "y"], "dimensions": 8}],
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": None}]}, [{"messages": HI}]),
    ],
    ids=["dict-null-cell", "records", "frame-nan-cell", "frame-numpy-cells", "nested-null"],
)
def test_plain_rows_leave_missing_cells_out(data: Any, rows: list[dict[str, Any]]) -> None:
    got = plain_rows(data)
    assert got == rows
    assert all(type(v) is not np.int64 for row in got for v in row.values())


def test_plain_rows_refuse_other_inputs() -> None:
    with pytest.raises(InvalidRequestError, match="got str"):
        plain_rows("hello")


@pytest.mark.parametrize(
    ("task", "rows", "params", "streaming", "requests"),
    [
        (
            COMPLETIONS,
            [{"prompt": "a"}, {"prompt": "b", "n": 3}],
            {"n": 2, "temperature": None},
            False,
            [{"prompt": "a", "n": 2}, {"prompt": "b", "n": 3}],
        ),
        (
            EMBEDDINGS,
            [{"input": "a", "model": "m"}, {"input": "b", "model": "m"}],
            {"dimensions": 8},
            False,
            [{"input": ["a", "b"], "model": "m", "dimensions": 8}],
        ),
        (
            EMBEDDINGS,
            [{"input": "a"}, {"input": "b", "dimensions": 8}],
            None,
            False,
            [{"input": "a"}, {"input": "b", "dimensions": 8}],
        ),
        (
            CHAT,
            [{"messages": HI, "stream": True, "stream_options": {"include_usage": True}}],
            None,
            False,
            [{"messages": HI}],
        ),
        (
            CHAT,
            [{"messages": HI, "stream": False, "stream_options": {"include_usage": False}}],
            {"stream": False},
            True,
            [{"messages": HI, "stream": True, "stream_options": {"include_usage": False}}],
        ),
        (CHAT, [{"messages": HI, "custom_inputs": {"k": 1}}], None, False, [{"messages": HI}]),
    ],
    ids=[
        "params-fill-gaps",
        "embeddings-split-texts",
        "embeddings-rows",
        "predict-answers-whole",
        "predict-stream-streams",
        "custom-inputs",
    ],
)
def test_request_rows(
    task: str,
    rows: list[dict[str, Any]],
    params: dict[str, Any] | None,
    streaming: bool,
    requests: list[dict[str, Any]],
) -> None:
    assert request_rows(rows, params, get_task(task), streaming=streaming) == requests
