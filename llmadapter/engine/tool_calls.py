"""Tool calls in model output: the parsers for the common formats (Hermes/Qwen `<tool_call>`, Llama-3 JSON,
Mistral `[TOOL_CALLS]`, plain JSON), the constraint that forces a valid call, and the generic prompt for
chat templates that cannot render tools (llama.cpp's generic handler).

A parser reads the text generated so far and says which part is content and which calls it holds (a
call's name once complete, its raw arguments JSON as far as generated), so that the whole answer and the
stream come from the same reading: streamed argument fragments join into the whole answer's arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmadapter.engine.grammar import Constraint

_ARG_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    """A tool call's id, shaped as OpenAI's (`call_` and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str | None = None  # None until the name string is complete
    arguments: str = ""  # the raw arguments JSON generated so far (all of it once `done`)
    done: bool = False


@dataclass
class Parsed:
    content: str = ""  # text that is certainly content
    calls: list[ParsedCall] = field(default_factory=list)


def _scan_call(text: str, start: int) -> tuple[ParsedCall, int | None]:
    """Read the call object that opens at text[start] ('{'): its name and raw arguments so far, and the
    index after its closing brace (None while it is open)."""
    call = ParsedCall()
    depth, in_str, esc, str_start = 0, False, False, 0
    key: str | None = None
    expect = "key"  # what comes next at depth 1: key, colon, value, comma
    value_key: str | None = None
    value_start = -1

    def close_value(end: int) -> None:
        if value_key in _ARG_KEYS and not call.done and value_start >= 0:
            raw = text[value_start:end].rstrip()
            call.arguments, call.done = _string_arguments(raw), True

    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 1:
                    try:
                        value = json.loads(text[str_start : i + 1])
                    except ValueError:
                        value = None
                    if expect == "colon":
                        key = value
                    elif value_key == "name" and value_start == str_start and isinstance(value, str):
                        call.name = value
            continue
        if c.isspace():
            continue
        if depth == 1 and expect == "value":
            value_key, value_start, expect = key, i, "comma"
        elif depth == 1 and expect == "key" and c == '"':
            expect = "colon"
        if c == '"':
            in_str, str_start = True, i
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 1 and value_key in _ARG_KEYS and not call.done:
                call.arguments, call.done = text[value_start : i + 1], True
            if depth == 0:
                close_value(i)
                return _finish(call), i + 1
        elif c == ":" and depth == 1:
            expect = "value"
        elif c == "," and depth == 1:
            close_value(i)
            expect = "key"
    if value_key in _ARG_KEYS and not call.done and value_start >= 0 and text[value_start] == "{":
        call.arguments = text[value_start:]  # partial: only an object's raw text streams as it grows
    return call, None


def _string_arguments(raw: str) -> str:
    """Arguments some models write as a JSON string holding the JSON: the string's content."""
    if raw.startswith('"'):
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        return value if isinstance(value, str) else raw
    return raw


def _finish(call: ParsedCall) -> ParsedCall:
    if not call.done:  # a call without arguments takes none
        call.arguments, call.done = "{}", True
    return call


def valid(call: ParsedCall) -> bool:
    """A complete call: a name and arguments that are a JSON object."""
    if not (call.done and call.name):
        return False
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def _scan_sequence(text: str, i: int) -> tuple[list[ParsedCall], int | None]:
    """Call objects from text[i]: one, several separated by ',' or ';', or a JSON array of them; returns
    the calls and the index after the last one (None while one is open)."""
    calls: list[ParsedCall] = []
    n = len(text)
    while i < n and text[i] in " \t\r\n[,;":
        i += 1
    while i < n and text[i] == "{":
        call, end = _scan_call(text, i)
        calls.append(call)
        if end is None:
            return calls, None
        i = end
        while i < n and text[i] in " \t\r\n,;":
            i += 1
    if i < n and text[i] == "]":
        i += 1
    return calls, i


def _holdback(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _partial_string(raw: str) -> str:
    """The decoded prefix of a JSON string's raw content (an escape cut in half is left out)."""
    for cut in range(len(raw), max(-1, len(raw) - 7), -1):
        try:
            value = json.loads('"' + raw[:cut] + '"')
        except ValueError:
            continue
        return str(value)
    return ""


class ToolParser(ABC):
    """One tool-call format: how its calls are read and how a forced call is constrained."""

    name: ClassVar[str]
    args_key: ClassVar[str] = "arguments"

    @abstractmethod
    def parse(self, text: str, final: bool) -> Parsed:
        """Content and calls of `text`; `final`: nothing more will be generated."""

    @abstractmethod
    def constraint(self, calls: dict[str, Any], parallel: bool, allow_text: bool) -> Constraint:
        """Output that is a valid call of one of `calls` (a JSON schema of one call, anyOf the tools)."""

    def call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        function = tool["function"]
        params = function.get("parameters") or {"type": "object", "properties": {}}
        return {
            "type": "object",
            "properties": {"name": {"const": function["name"]}, self.args_key: params},
            "required": ["name", self.args_key],
        }


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _json_calls(text: str, final: bool, start: int) -> Parsed | None:
    """Calls when `text` from `start` is JSON (object, list, or {"tool_calls": [...]}); None if not."""
    wrapped = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[').match(text, start)
    if wrapped:
        calls, _ = _scan_sequence(text, wrapped.end())
        return Parsed("", calls)
    answer = re.compile(r'\s*\{\s*"response"\s*:\s*"').match(text, start)
    if answer:  # the generic format's text answer: its string is the content
        raw = text[answer.end() :]
        try:
            return Parsed(str(json.loads(text[start:])["response"]), [])
        except (ValueError, KeyError, TypeError):
            return Parsed(_partial_string(raw.rstrip('"} \n')) if final else _partial_string(raw), [])
    rest = text[start:].lstrip()
    if rest.startswith(("{", "[")):
        calls, _ = _scan_sequence(text, start)
        return Parsed("", calls)
    return None


def _settle(text: str, parsed: Parsed | None, final: bool) -> Parsed:
    """Held-back JSON that did not turn out to be calls is content once the output is complete."""
    if parsed is None:
        return Parsed(text, [])
    if final and parsed.calls and not all(valid(c) for c in parsed.calls):
        return Parsed(text, [])
    if final and not parsed.calls and not parsed.content:
        return Parsed(text, [])
    return parsed


class JsonParser(ToolParser):
    """Plain JSON: `{"tool_calls": [{"name", "arguments"}]}`, a call object, or a list of them; the
    generic format for templates without tool support (also `{"response": "..."}` for a text answer)."""

    name = "json"

    def parse(self, text: str, final: bool) -> Parsed:
        start = len(text) - len(text.lstrip())
        if not text[start:]:
            return Parsed("", [])
        return _settle(text, _json_calls(text, final, start), final)

    def constraint(self, calls: dict[str, Any], parallel: bool, allow_text: bool) -> Constraint:
        items: dict[str, Any] = {"type": "array", "items": _one_of(list(calls.values())), "minItems": 1}
        if not parallel:
            items["maxItems"] = 1
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {"tool_calls": items},
            "required": ["tool_calls"],
        }
        if allow_text:
            answer = {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
            }
            schema = {"anyOf": [schema, answer]}
        return Constraint.json(schema)


class Llama3JsonParser(JsonParser):
    """Llama 3.x: `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`, which decoding drops),
    several separated by ';'."""

    name = "llama3_json"
    args_key = "parameters"

    def constraint(self, calls: dict[str, Any], parallel: bool, allow_text: bool) -> Constraint:
        return Constraint.json(_one_of(list(calls.values())))


class MistralParser(JsonParser):
    """Mistral: `[TOOL_CALLS]` then a JSON list of calls (the marker is a special token decoding drops)."""

    name = "mistral"
    marker = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> Parsed:
        at = text.find(self.marker)
        if at >= 0:
            calls, _ = _scan_sequence(text, at + len(self.marker))
            return _settle(text, Parsed(text[:at], calls), final)
        return super().parse(text, final)

    def constraint(self, calls: dict[str, Any], parallel: bool, allow_text: bool) -> Constraint:
        items: dict[str, Any] = {"type": "array", "items": _one_of(list(calls.values())), "minItems": 1}
        if not parallel:
            items["maxItems"] = 1
        return Constraint.json(items)


class HermesParser(ToolParser):
    """Hermes / Qwen: text, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks."""

    name = "hermes"
    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        at = text.find(self.open_tag)
        if at < 0:
            keep = 0 if final else _holdback(text, self.open_tag)
            return Parsed(text[: len(text) - keep], [])
        calls: list[ParsedCall] = []
        while at >= 0:
            brace = text.find("{", at)
            if brace < 0:
                break
            found, _ = _scan_sequence(text, brace)
            calls.extend(found)
            at = text.find(self.open_tag, brace)
        return _settle(text, Parsed(text[: text.find(self.open_tag)], calls), final)

    def constraint(self, calls: dict[str, Any], parallel: bool, allow_text: bool) -> Constraint:
        return Constraint.json(
            _one_of(list(calls.values())), prefix=f"{self.open_tag}\n", suffix=f"\n{self.close_tag}"
        )


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, JsonParser)
}


def parser_for_template(source: str, override: str = "auto") -> ToolParser:
    """The parser a chat template's tool format calls for (`override`: model_config's tool_call_parser)."""
    if override != "auto":
        return PARSERS[override]()
    if "<tool_call>" in source:
        return HermesParser()
    if "[TOOL_CALLS]" in source:
        return MistralParser()
    if "<|python_tag|>" in source or "ipython" in source:
        return Llama3JsonParser()
    return JsonParser()


def generic_prompt(tools: list[dict[str, Any]], allow_text: bool) -> str:
    """The system text that describes the tools and the JSON answer, for templates without tools."""
    described = [
        {k: v for k, v in tool["function"].items() if k in ("name", "description", "parameters")}
        for tool in tools
    ]
    lines = [
        f"Tools: {json.dumps(described)}",
        'To call a tool, answer in JSON: {"tool_calls": [{"name": "<tool>", "arguments": {<parameters>}}]}',
    ]
    if allow_text:
        lines.append('To answer without a tool: {"response": "<your answer>"}')
    return "\n".join(lines)


def assistant_call_text(calls: list[dict[str, Any]]) -> str:
    """An earlier assistant turn's tool calls, as the generic format writes them."""
    return json.dumps(
        {
            "tool_calls": [
                {"name": c["function"]["name"], "arguments": _loads_or_text(c["function"]["arguments"])}
                for c in calls
            ]
        }
    )


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
