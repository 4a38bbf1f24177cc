"""An embeddings request's `input`: its items checked one by one (texts or token-id lists) and counted."""

from __future__ import annotations

from typing import Any

from llmadapter.errors import InvalidRequestError

Item = str | list[int]


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(value: Any, *, max_inputs: int, vocab_size: int) -> list[Item]:
    """The request's inputs as a list of texts or of token-id lists, each checked (InvalidRequestError
    names `input`)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "'input' must be a non-empty string, a list of strings, a list of token ids, "
            "or a list of token-id lists.",
            param="input",
        )
    if all(_is_token(v) for v in value):
        value = [value]
    if len(value) > max_inputs:
        raise InvalidRequestError(
            f"'input' has {len(value)} items; this model accepts at most {max_inputs} per request.",
            param="input",
        )
    items: list[Item] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"input[{i}] is an empty string.", param="input")
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            bad = next((t for t in item if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{i}] holds token id {bad}, outside this model's vocabulary "
                    f"(0..{vocab_size - 1}).",
                    param="input",
                )
        elif isinstance(item, list) and not item:
            raise InvalidRequestError(f"input[{i}] is an empty list of token ids.", param="input")
        else:
            raise InvalidRequestError(
                f"input[{i}] is a {type(item).__name__}; every item must be a string, or every item "
                "a list of token ids.",
                param="input",
            )
        items.append(item)
    if len({isinstance(item, str) for item in items}) > 1:
        raise InvalidRequestError(
            "'input' mixes strings and token-id lists; send one kind per request.", param="input"
        )
    return items


def count_inputs(value: Any) -> int:
    """How many inputs an unchecked `input` holds (a string or one token-id list is one)."""
    if isinstance(value, list) and value and not all(_is_token(v) for v in value):
        return len(value)
    return 1
