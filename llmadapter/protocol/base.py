"""What every wire model shares: strict requests, responses that keep the keys OpenAI sends as null."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class WireRequest(BaseModel):
    # Unknown fields are refused: a silently ignored parameter is a wrong answer nobody notices.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class WireResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


def keep_null(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Put back `keys` that a dump with exclude_none dropped: the spec requires them, null included
    (`finish_reason` until a choice ends, `logprobs` when not asked, `message.refusal`)."""
    for key in keys:
        data.setdefault(key, None)
    return data


def unsupported(param: str, asks_for: str) -> PydanticCustomError:
    """The error for a spec value that asks for behaviour this server lacks (code unsupported_value)."""
    return PydanticCustomError(
        "unsupported_value",
        "'{param}' with this value asks for {asks_for}, which this server does not do",
        {"param": param, "asks_for": asks_for},
    )
