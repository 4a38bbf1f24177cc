"""Chat request pieces: messages by role (the spec's per-role rules), content parts, tools, functions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from llmadapter.protocol.base import WireRequest, unsupported


class TextContentPart(WireRequest):
    type: Literal["text"]
    text: str
    # A prompt-caching hint ({"mode": "explicit"}); the text is the same with or without it.
    prompt_cache_breakpoint: dict[str, Literal["explicit"]] | None = None


class RefusalContentPart(WireRequest):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextContentPart | RefusalContentPart, Field(discriminator="type")]
# The spec: a string, or at least one content part.
Content = str | Annotated[list[ContentPart], Field(min_length=1)]


class FunctionCall(WireRequest):
    name: str
    arguments: str


class ToolCall(WireRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# Roles whose content the spec requires; an assistant message may carry tool calls (or nothing) instead.
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


class ChatMessage(WireRequest):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # validate_default: the per-role rules below also run when the field is left out, so an error names
    # the field itself (messages[1].tool_call_id), as OpenAI's do.
    content: Content | None = Field(default=None, validate_default=True)
    name: str | None = Field(default=None, validate_default=True)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)
    refusal: str | None = None
    function_call: FunctionCall | None = None  # deprecated form of tool_calls (assistant)
    audio: dict[str, Any] | None = None  # a reference to an earlier audio answer (assistant)

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role in _CONTENT_REQUIRED:
            raise PydanticCustomError("missing", f"a '{role}' message needs 'content'")
        if role != "assistant" and isinstance(value, list) and any(p.type == "refusal" for p in value):
            raise ValueError("only 'assistant' messages may hold 'refusal' content parts")
        return value

    @field_validator("name", "tool_call_id")
    @classmethod
    def _required_by_role(cls, value: Any, info: ValidationInfo) -> Any:
        needs = {"tool": "tool_call_id", "function": "name"}.get(str(info.data.get("role")))
        if value is None and needs == info.field_name:
            raise PydanticCustomError("missing", f"a '{info.data['role']}' message needs '{needs}'")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("audio", "audio conversation turns")
        return value

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""  # an earlier refusal is what the assistant said
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if part.type == "text" else part.refusal for part in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (content flattened to a string)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        calls = self.tool_calls or (
            [ToolCall(id="call_0", function=self.function_call)] if self.function_call else None
        )
        if calls:
            out["tool_calls"] = [call.model_dump() for call in calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(WireRequest):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(WireRequest):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(WireRequest):
    name: str


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]
FunctionCallChoice = Literal["none", "auto"] | NamedFunction
