"""OpenAI's published API specification as test oracles: the schemas of tests/spec/openapi-fragments.json
(cut from openai/openai-openapi's openapi.yaml by scripts/openai_spec_fixture.py; its `x-source` says
which commit) as JSON Schema validators, for requests (is this a spec rule?) and answers (is this answer
what a client generated from the spec reads?).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

FRAGMENTS = Path(__file__).with_name("openapi-fragments.json")


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (still used throughout the 3.1 spec) as JSON Schema: or null."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _widen_to_openai(schemas: dict[str, Any]) -> None:
    """The two places the spec's text is loosened, each to what OpenAI's own API sends (and vLLM's):

    - with `echo` and `logprobs` the first prompt token has no log probability: its `token_logprobs` and
      `top_logprobs` entries are null, where the spec types those items as number and object;
    - a streamed completion is a series of CreateCompletionResponse objects (the spec says so), whose
      `finish_reason` is null until the choice ends, where the spec's schema requires a string: the
      stream is checked against `x-CompletionStreamChunk`, that schema with a nullable finish_reason.
    """
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    logprobs = choice["logprobs"]["anyOf"][0]["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs[key]["items"] = _or_null(logprobs[key]["items"])
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    chunk_choice = chunk["properties"]["choices"]["items"]["properties"]
    chunk_choice["finish_reason"] = _or_null(chunk_choice["finish_reason"])
    schemas["x-CompletionStreamChunk"] = chunk


@cache
def _document() -> dict[str, Any]:
    doc = json.loads(FRAGMENTS.read_text())
    schemas = copy.deepcopy(doc["components"]["schemas"])
    _widen_to_openai(schemas)
    return {"components": {"schemas": _nullable(schemas)}}


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({**_document(), "$ref": f"#/components/schemas/{name}"})


def violations(name: str, instance: Any) -> list[str]:
    """Where `instance` breaks the spec's schema `name` ([] when it conforms)."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message[:300]}"
        for error in _validator(name).iter_errors(instance)
    ]


def assert_conforms(name: str, instance: Any) -> None:
    problems = violations(name, instance)
    assert not problems, f"not a valid {name}:\n" + "\n".join(problems)


def source() -> str:
    """Where the fragments came from (repository, commit, spec version)."""
    return str(json.loads(FRAGMENTS.read_text())["x-source"])
