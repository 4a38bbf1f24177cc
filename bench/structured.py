"""Constrained decoding: the grammar engines compared, and what a constraint costs our engine per token.

    python bench/structured.py [--quick] [--skip-engines] [--skip-throughput] [--check] [--data-dir DIR]

1. xgrammar vs llguidance on our tokenizers (the tiny byte-level BPE test tokenizer and SmolLM2's 49k
   vocabulary): tokenizer setup, compile time per schema, per-token mask time at batch 1 and 32 (mask
   filled and applied to the logits), and which JSON Schema keywords each refuses or silently ignores.
2. Our engine on SmolLM2-135M-Instruct, 32 requests in one batch: all free vs half constrained by a
   json_schema, tok/s of each and their ratio (target >= 0.9); schema compile time cold and cached.
3. --check: the issue's acceptance run on SmolLM2 (20 json_schema requests over varied schemas at
   temperature 0 and 1, json_object, required and named tool calls): how many parse and validate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMAS: dict[str, dict[str, Any]] = {
    "string": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    "int-bounds": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["age"],
    },
    "enum": {"type": "object", "properties": {"c": {"enum": ["red", "green", "blue"]}}, "required": ["c"]},
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "tags"],
            }
        },
        "required": ["user"],
    },
    "array-of-objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
}
SAMPLES: dict[str, Any] = {
    "string": {"name": "Ada Lovelace"},
    "int-bounds": {"age": 36},
    "enum": {"c": "green"},
    "nested": {"user": {"name": "x", "tags": ["a", "bb", "ccc"]}},
    "array-of-objects": [{"id": 1, "ok": True}, {"id": 22, "ok": False}],
}
# Keywords beyond the common ones, with an instance that breaks each: does the engine refuse the schema,
# enforce it, or accept the schema and then the breaking instance (ignored)?
FEATURES: dict[str, tuple[dict[str, Any], str]] = {
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    "allOf": ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "{}"),
    "if-then": ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "0"),
    "not": ({"not": {"type": "string"}}, '"s"'),
    "format-date": ({"type": "string", "format": "date"}, '"hello"'),
    "pattern": ({"type": "string", "pattern": "^[a-z]{3}$"}, '"ABCD"'),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "3"),
}


def _folders(data_dir: Path) -> dict[str, Path]:
    from llmadapter.demo_models import smollm2_folder
    from llmadapter.testing import build_tiny_model

    return {
        "tiny": build_tiny_model(data_dir / "bench-tiny-gpt2", "gpt2"),
        "smollm2": smollm2_folder(data_dir),
    }


def _mask_us(tok: Any, vocab: int, matcher: Any, fill: Any, consume: Any, batch: int) -> float:
    """Microseconds per decoding step to fill and apply `batch` rows' masks, over the sample answers."""
    import torch

    total, steps = 0.0, 0
    for name in SCHEMAS:
        ids = tok(json.dumps(SAMPLES[name], separators=(",", ":")), add_special_tokens=False)["input_ids"]
        rows = [matcher(name) for _ in range(batch)]
        logits = torch.zeros(batch, vocab)
        for token in ids:
            start = time.perf_counter()
            fill(rows, logits)
            total += time.perf_counter() - start
            steps += 1
            for row in rows:
                assert consume(row, token)
    return total / steps * 1e6


def _result(
    setup: float, compile_ms: dict[str, float], mask: dict[int, float], found: dict[str, str]
) -> dict:
    return {
        "setup_ms": setup * 1000,
        "compile_ms": compile_ms,
        "mask_us": mask,
        "refused": [k for k, v in found.items() if v == "refused"],
        "ignored": [k for k, v in found.items() if v == "ignored"],
    }


def bench_xgrammar(tok: Any, vocab: int) -> dict[str, Any]:
    import xgrammar as xg

    start = time.perf_counter()
    compiler = xg.GrammarCompiler(xg.TokenizerInfo.from_huggingface(tok, vocab_size=vocab), max_threads=1)
    setup = time.perf_counter() - start
    grammars, compile_ms = {}, {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        grammars[name] = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        compile_ms[name] = (time.perf_counter() - start) * 1000

    def fill(rows: list[Any], logits: Any) -> None:
        bitmask = xg.allocate_token_bitmask(len(rows), vocab)
        for i, m in enumerate(rows):
            m.fill_next_token_bitmask(bitmask, i)
        xg.apply_token_bitmask_inplace(logits, bitmask)

    def matcher(name: str) -> Any:
        return xg.GrammarMatcher(grammars[name])

    mask = {b: _mask_us(tok, vocab, matcher, fill, lambda m, t: m.accept_token(t), b) for b in (1, 32)}
    found = {}
    for name, (schema, breaking) in FEATURES.items():
        try:
            grammar = compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":")
            )
            m = xg.GrammarMatcher(grammar)
        except RuntimeError:
            found[name] = "refused"
            continue
        if m.accept_string(breaking) and m.accept_token(int(tok.eos_token_id)):
            found[name] = "ignored"
    return _result(setup, compile_ms, mask, found)


def bench_llguidance(tok: Any, vocab: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt
    import torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    setup = time.perf_counter() - start
    options: Any = {"whitespace_flexible": False}
    grammars, compile_ms = {}, {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        grammars[name] = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        assert not llguidance.LLMatcher(lltok, grammars[name]).is_error()
        compile_ms[name] = (time.perf_counter() - start) * 1000
    shifts = torch.arange(32, dtype=torch.int32)

    def fill(rows: list[Any], logits: Any) -> None:
        bitmask = lt.allocate_token_bitmask(len(rows), vocab)
        for i, m in enumerate(rows):
            lt.fill_next_token_bitmask(m, bitmask, i)
        bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # its own kernel needs torch.compile; unpacked here
        logits.masked_fill_(bits.reshape(len(rows), -1)[:, :vocab] == 0, float("-inf"))

    def matcher(name: str) -> Any:
        return llguidance.LLMatcher(lltok, grammars[name])

    mask = {b: _mask_us(tok, vocab, matcher, fill, lambda m, t: m.consume_token(t), b) for b in (1, 32)}
    found = {}
    for name, (schema, breaking) in FEATURES.items():
        m = llguidance.LLMatcher(
            lltok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        )
        if m.is_error():
            found[name] = "refused"
        elif m.consume_tokens(tok(breaking, add_special_tokens=False)["input_ids"]) and m.is_accepting():
            found[name] = "ignored"
    return _result(setup, compile_ms, mask, found)


def compare_engines(folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    print("== grammar engines (CPU, this machine) ==")
    for label, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(str(folder))
        vocab = len(tok)
        results = {"xgrammar": bench_xgrammar(tok, vocab)}
        try:
            results["llguidance"] = bench_llguidance(tok, vocab)
        except ImportError:
            print("   (llguidance not installed: pip install llguidance to compare)")
        for name, r in results.items():
            compile_ms = sum(r["compile_ms"].values()) / len(r["compile_ms"])
            print(
                f"{label:8} {name:10} setup {r['setup_ms']:7.1f} ms  compile {compile_ms:5.2f} ms/schema  "
                f"mask {r['mask_us'][1]:7.0f} us/token (batch 1)  "
                f"{r['mask_us'][32]:8.0f} us/step (batch 32)  "
                f"refuses {r['refused'] or '-'}  ignores {r['ignored'] or '-'}"
            )
        if "llguidance" in results:
            x, g = results["xgrammar"]["mask_us"], results["llguidance"]["mask_us"]
            print(
                f"{label:8} mask time llguidance / xgrammar: {g[1] / x[1]:.1f}x (batch 1), "
                f"{g[32] / x[32]:.1f}x (batch 32)"
            )


def throughput(folder: Path, quick: bool) -> None:
    from llmadapter.engine.grammar import Constraint
    from tests.engine.conftest import make_engine

    tokens = 24 if quick else 48
    engine = make_engine(folder, max_batch_size=32)
    # A string it must keep writing: the constrained rows run to max_tokens like the free ones.
    long = {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 2000}},
        "required": ["story"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "story", "schema": long}}
    ask = [{"role": "user", "content": "Write a long story about a fox."}]
    base = {"messages": ask, "temperature": 0, "max_tokens": tokens, "ignore_eos": True}

    def run(n_constrained: int) -> float:
        requests = [
            engine.parse({**base, "response_format": fmt} if i < n_constrained else base) for i in range(32)
        ]
        start = time.perf_counter()
        answers = engine.run(requests)
        elapsed = time.perf_counter() - start
        return sum(a.usage.completion_tokens for a in answers) / elapsed

    run(0)  # warm-up; the grammar of `fmt` compiled, so the tokenizer is set up before the timings below
    run(16)
    fresh = {
        "type": "object",
        "properties": {"k": {"type": "integer"}, "s": {"type": "string"}},
        "required": ["k"],
    }
    start = time.perf_counter()
    engine.grammars.compile(Constraint.json(fresh), "response_format")
    cold = time.perf_counter() - start
    start = time.perf_counter()
    engine.grammars.compile(Constraint.json(fresh), "response_format")
    cached = time.perf_counter() - start
    # Alternated, so that a change in the machine's load shows as spread rather than as a ratio.
    free, half = [], []
    for _ in range(2 if quick else 3):
        free.append(run(0))
        half.append(run(16))
    ratio = statistics.median(half) / statistics.median(free)
    print("== engine, SmolLM2-135M-Instruct, 32 requests in one batch ==")
    print(
        f"schema compile (tokenizer already set up): cold {cold * 1000:.2f} ms, cached {cached * 1e6:.1f} us"
    )
    print(
        f"free {' / '.join(f'{x:.1f}' for x in free)} tok/s; half constrained "
        f"{' / '.join(f'{x:.1f}' for x in half)} tok/s; median ratio {ratio:.2f}x (target >= 0.9)"
    )
    engine.close()


def check(folder: Path) -> None:
    import jsonschema

    from tests.engine.conftest import make_engine

    engine = make_engine(folder, max_tokens=120)
    variants = [
        SCHEMAS["string"],
        SCHEMAS["int-bounds"],
        SCHEMAS["enum"],
        SCHEMAS["nested"],
        {"type": "object", "properties": {"items": SCHEMAS["array-of-objects"]}, "required": ["items"]},
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            },
            "required": ["title", "year"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "why": {"type": "string"}},
            "required": ["ok", "why"],
        },
        {
            "type": "object",
            "properties": {"colors": {"type": "array", "items": {"enum": ["red", "blue"]}}},
            "required": ["colors"],
        },
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "pop": {"type": "integer", "minimum": 0}},
            "required": ["city", "pop"],
        },
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {
                        "b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]}
                    },
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
    ]
    ask = [{"role": "user", "content": "Answer as JSON about a book, a city or a person."}]
    requests = [
        engine.parse(
            {
                "messages": ask,
                "temperature": t,
                "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": s}},
            }
        )
        for i, s in enumerate(variants)
        for t in (0, 1)
    ]
    answers = engine.run(requests)
    good = 0
    for request, answer in zip(requests, answers, strict=True):
        try:
            jsonschema.validate(
                json.loads(answer.choices[0].message.content), request.response_format.schema_of()
            )  # type: ignore[union-attr]
            good += answer.choices[0].finish_reason == "stop"
        except (ValueError, jsonschema.ValidationError):
            pass
    objects = engine.run(
        [
            engine.parse(
                {"messages": ask, "temperature": 1, "seed": i, "response_format": {"type": "json_object"}}
            )
            for i in range(5)
        ]
    )
    n_objects = 0
    for a in objects:
        with contextlib.suppress(ValueError):
            n_objects += isinstance(json.loads(a.choices[0].message.content), dict)
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
    }
    ask_tool = [{"role": "user", "content": "What is the weather in Paris?"}]
    calls = engine.run(
        [
            engine.parse(
                {"messages": ask_tool, "tools": [weather], "tool_choice": choice, "temperature": t, "seed": 1}
            )
            for choice in ("required", {"type": "function", "function": {"name": "get_weather"}})
            for t in (0, 1)
        ]
    )
    n_calls = 0
    for a in calls:
        for call in a.choices[0].message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
            n_calls += 1
    print("== acceptance check, SmolLM2-135M-Instruct ==")
    print(
        f"json_schema: {good}/{len(requests)} parse, validate, stop; json_object: {n_objects}/{len(objects)} "
        f"objects; forced tool calls: {n_calls}/{len(calls)} valid"
    )
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-engines", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    args = parser.parse_args()
    folders = _folders(args.data_dir)
    if not args.skip_engines:
        compare_engines(folders)
    if not args.skip_throughput:
        throughput(folders["smollm2"], args.quick)
    if args.check:
        check(folders["smollm2"])


if __name__ == "__main__":
    main()
