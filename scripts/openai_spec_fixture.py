"""Cut the test fixture tests/spec/openapi-fragments.json out of OpenAI's published `openapi.yaml`.

    python scripts/openai_spec_fixture.py PATH/TO/openapi.yaml --source "openai/openai-openapi@<commit>"

Keeps the chat and completions request, response and stream schemas, the error schema and every schema
they reference, under `components.schemas` (so their `$ref`s resolve inside the file); descriptions,
examples, titles and vendor `x-` keys are dropped (they are prose for people, not rules). The spec's
version and the `--source` note are written beside them. Needs PyYAML (installed with MLflow).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionRequest",
    "CreateCompletionResponse",
    "ErrorResponse",
)
_PROSE = frozenset({"description", "example", "examples", "title"})


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _PROSE and not k.startswith("x-")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"].rsplit("/", 1)[-1]} if "$ref" in node else set()
        return own.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def fragments(spec: dict[str, Any], source: str) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    keep: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(_refs(schemas[name]) - keep)
    return {
        "x-source": f"{source}: openapi.yaml, OpenAI API version {spec['info']['version']}",
        "x-note": "Schemas cut by scripts/openai_spec_fixture.py; prose (descriptions, examples) dropped.",
        "components": {"schemas": {name: _strip(schemas[name]) for name in sorted(keep)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--source", required=True, help="where the file came from (repo@commit)")
    parser.add_argument("--out", type=Path, default=Path("tests/spec/openapi-fragments.json"))
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    args.out.write_text(json.dumps(fragments(spec, args.source), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
