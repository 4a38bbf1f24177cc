"""llmadapter.engine.embedding_inputs: an embeddings `input` checked item by item, and counted."""

from __future__ import annotations

from typing import Any

import pytest

from llmadapter.engine.embedding_inputs import check_inputs, count_inputs
from llmadapter.errors import InvalidRequestError

LIMITS = {"max_inputs": 4, "vocab_size": 100}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Hello", ["Hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [99]], [[1, 2], [99]]),
        ([0], [[0]]),
    ],
    ids=["one-text", "texts", "one-token-list", "token-lists", "token-zero"],
)
def test_inputs_become_a_list_of_items(value: Any, expected: list[Any]) -> None:
    assert check_inputs(value, **LIMITS) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "input[0] is an empty string"),
        ([], "non-empty"),
        (None, "non-empty"),
        (["a", "b", "c", "d", "e"], "'input' has 5 items; this model accepts at most 4 per request."),
        ([[1, 100]], "input[0] holds token id 100, outside this model's vocabulary (0..99)."),
        ([-1], "token id -1"),
        ([[1], []], "input[1] is an empty list of token ids"),
        (["a", 3], "input[1] is a int"),
        ([True, 1], "input[0] is a bool"),
        ([[1], "a"], "mixes strings and token-id lists"),
    ],
    ids=[
        "empty-text",
        "empty-list",
        "null",
        "too-many",
        "outside-vocab",
        "negative-token",
        "empty-token-list",
        "number-among-texts",
        "bool-is-no-token",
        "mixed-kinds",
    ],
)
def test_bad_inputs_name_input_and_say_why(value: Any, words: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        check_inputs(value, **LIMITS)
    assert err.value.param == "input"
    assert words in err.value.message


@pytest.mark.parametrize(
    ("value", "count"),
    [("Hello", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1], [2]], 2), ([], 1), (None, 1)],
    ids=["text", "texts", "token-list", "token-lists", "empty", "null"],
)
def test_count_inputs(value: Any, count: int) -> None:
    assert count_inputs(value) == count
