"""Constrained decoding: JSON Schemas checked for what the grammar engine enforces, compiled once per
(tokenizer, schema) by xgrammar, and one matcher per constrained sequence that masks its next token.

xgrammar (used by vLLM and SGLang) was chosen over llguidance after bench/structured.py: on SmolLM2's
49k vocabulary its per-token mask is about 20x faster at batch 1 and 5x at batch 32 on CPU. xgrammar
silently ignores the keywords it cannot enforce, so `check_schema` refuses those up front: a 400 naming
the keyword beats an answer that does not validate.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmadapter.errors import InvalidRequestError

# Keywords the compiled grammar enforces (each checked against a violating instance when chosen).
_ENFORCED = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
        "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions", "pattern", "format",
        "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "multipleOf", "contains", "patternProperties", "propertyNames", "minProperties", "maxProperties",
        "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems",
    }
)  # fmt: skip
# Keywords that describe and never constrain (JSON Schema's annotations and identifiers).
_ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
        "readOnly", "writeOnly", "contentMediaType", "contentEncoding", "$anchor",
    }
)  # fmt: skip
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = (
    "items",
    "additionalProperties",
    "propertyNames",
    "contains",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")

if TYPE_CHECKING:
    import torch


def _walk(schema: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema (a dict) with its JSON pointer."""
    if not isinstance(schema, dict):
        return
    yield where, schema
    for key in _ONE:
        yield from _walk(schema.get(key), f"{where}/{key}")
    for key in _LIST:
        for i, sub in enumerate(schema.get(key) or []):
            yield from _walk(sub, f"{where}/{key}/{i}")
    for key in _MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _walk(sub, f"{where}/{key}/{name}")


def check_schema(schema: Any, param: str) -> None:
    """InvalidRequestError naming `param` when `schema` is not valid JSON Schema (2020-12) or uses a
    keyword constrained decoding cannot enforce."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise InvalidRequestError(
            f"Invalid value for '{param}': a JSON Schema must be an object.", param=param
        )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        raise InvalidRequestError(
            f"Invalid value for '{param}': not a valid JSON Schema ({exc.message} at #/{at}).", param=param
        ) from None
    for where, sub in _walk(schema, "#"):
        for key in sub:
            if key not in _ENFORCED and key not in _ANNOTATIONS:
                raise InvalidRequestError(
                    f"Invalid value for '{param}': the schema uses '{key}' (at {where}), which constrained "
                    "decoding cannot enforce.",
                    param=param,
                    code="unsupported_value",
                )
        ref = sub.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise InvalidRequestError(
                f"Invalid value for '{param}': the schema refers to '{ref}' (at {where}); only references "
                "inside the schema ('#/...') are followed.",
                param=param,
                code="unsupported_value",
            )


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must be: a JSON value of `schema`, between a literal prefix and suffix
    (a tagged tool call: `<tool_call>` ... `</tool_call>`)."""

    schema: str  # JSON text of the schema
    prefix: str = ""
    suffix: str = ""

    @classmethod
    def json(cls, schema: dict[str, Any], **kwargs: Any) -> Constraint:
        return cls(json.dumps(schema), **kwargs)  # key order kept: xgrammar writes properties in it


def _literal(text: str) -> str:
    return json.dumps(text)  # an EBNF string literal: JSON's escapes are xgrammar's


class GrammarCompiler:
    """One tokenizer's xgrammar compiler and an LRU cache of compiled constraints (bounded by count)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int], *, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._compiler: Any = None
        self._unusable: str | None = None
        self._lock = threading.Lock()
        self.compiled = 0  # cache misses, for tests and the bench

    def _xgr(self, param: str) -> Any:
        import xgrammar as xg

        if self._compiler is None and self._unusable is None:
            try:
                info = xg.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids or None
                )
                self._compiler = xg.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            except Exception as exc:  # a tokenizer xgrammar cannot read: every constrained request is a 400
                self._unusable = str(exc)
        if self._compiler is None:
            raise InvalidRequestError(
                f"'{param}' needs constrained decoding, and this model's tokenizer cannot be used by the "
                f"grammar engine: {self._unusable}",
                param=param,
            )
        return self._compiler

    def compile(self, constraint: Constraint, param: str) -> Any:
        """The compiled grammar (cached); InvalidRequestError naming `param` when it does not compile."""
        with self._lock:
            hit = self._cache.get(constraint)
            if hit is not None:
                self._cache.move_to_end(constraint)
                return hit
            compiled = self._compile(self._xgr(param), constraint, param)
            self.compiled += 1
            self._cache[constraint] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return compiled

    @staticmethod
    def _compile(compiler: Any, constraint: Constraint, param: str) -> Any:
        import xgrammar as xg

        errors: list[str] = []
        # strict_mode (no properties or items beyond the schema's) keeps a small model on the schema's
        # keys; some valid schemas (minItems without items) have no strict instance, so try lax second.
        for strict in (True, False):
            try:
                grammar = xg.Grammar.from_json_schema(
                    constraint.schema, any_whitespace=False, strict_mode=strict
                )
                parts = [
                    *(
                        [xg.Grammar.from_ebnf(f"root ::= {_literal(constraint.prefix)}")]
                        if constraint.prefix
                        else []
                    ),
                    grammar,
                    *(
                        [xg.Grammar.from_ebnf(f"root ::= {_literal(constraint.suffix)}")]
                        if constraint.suffix
                        else []
                    ),
                ]
                if len(parts) > 1:
                    grammar = xg.Grammar.concat(*parts)
                return compiler.compile_grammar(grammar)
            except Exception as exc:  # xgrammar raises RuntimeError with its converter's message
                errors.append(str(exc).splitlines()[-1])
        raise InvalidRequestError(
            f"Invalid value for '{param}': the schema cannot be compiled for constrained decoding "
            f"({errors[-1]}).",
            param=param,
        )


class Matcher:
    """One sequence's grammar state: the mask of tokens that keep the output valid, and its progress."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xg

        self._matcher = xg.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar accepted the output and a stop token: nothing more may follow."""
        return bool(self._matcher.is_terminated())


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, Matcher]]) -> None:
    """Set to -inf, in `logits` [rows, vocab], every token the row's matcher forbids."""
    if not rows:
        return
    import xgrammar as xg

    bitmask = xg.allocate_token_bitmask(len(rows), logits.shape[-1])
    for slot, (_, matcher) in enumerate(rows):
        matcher.fill(bitmask, slot)
    bitmask = bitmask.to(logits.device)  # filled on the CPU; applied where the logits are
    indices = [i for i, _ in rows]
    if indices == list(range(logits.shape[0])):
        xg.apply_token_bitmask_inplace(logits, bitmask)
    else:
        view = logits[indices]
        xg.apply_token_bitmask_inplace(view, bitmask)
        logits[indices] = view
