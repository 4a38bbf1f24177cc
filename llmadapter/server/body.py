"""Request bodies: at most `max_body_bytes` however they are sent (413), strict UTF-8 JSON objects (400)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from llmadapter.errors import InvalidRequestError
from llmadapter.server.errors import PayloadTooLargeError, invalid_json


async def read_body(request: Request, limit: int) -> bytes:
    """The request body: at most `limit` bytes (413), however it is sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:  # chunked bodies declare no length
            raise PayloadTooLargeError(limit)
    return bytes(body)


async def read_object(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: at most `limit` bytes (413), else as `parse_object`."""
    return parse_object(await read_body(request, limit))


def parse_object(body: bytes) -> dict[str, Any]:
    """A JSON object: strict UTF-8, no NaN/Infinity, no lone surrogates (400 otherwise)."""
    if not body.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        _check_text(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid_json(exc) from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_text(value: Any) -> None:
    """Refuse lone surrogates ("\\ud800"): valid JSON escapes, but no text, and tokenizers choke on them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
