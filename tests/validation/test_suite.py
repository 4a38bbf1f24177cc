"""llmadapter.validation.suite: the steps the catalog names, the guard, run_checks with a scripted ask."""

from __future__ import annotations

import binascii
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from llmadapter.catalog import CATALOG, CHAT, EMBEDDINGS, get_task
from llmadapter.errors import ContextLengthError
from llmadapter.validation import CheckResult
from llmadapter.validation.samples import BUILTIN_SAMPLES
from llmadapter.validation.schema import Answer, read_answer
from llmadapter.validation.suite import STEPS, guard, run_checks
from llmadapter.validation.worker import ModelFacts, Outcome, error_outcome

WINDOW = 64
GREEDY_TEXT = "Paris is nice"


def test_every_check_the_catalog_lists_has_a_step() -> None:
    for spec in CATALOG.values():
        assert spec.checks and set(spec.checks) <= set(STEPS), spec.inference_task
    assert set(STEPS) == {name for spec in CATALOG.values() for name in spec.checks}
    assert list(get_task(CHAT).checks) == [
        "usage-arithmetic",
        "finish-reason",
        "stop-handling",
        "context-limit",
        "determinism",
        "latency",
    ]
    assert list(get_task(EMBEDDINGS).checks) == ["usage-arithmetic", "embeddings", "determinism", "latency"]


def _ok(name: str) -> CheckResult:
    return CheckResult(name=name, passed=True)


def _two_then_raise() -> Iterator[CheckResult]:
    yield _ok("first")
    raise binascii.Error("Incorrect padding")


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        (lambda: _ok("x"), [("x", True, "")]),
        (lambda: [_ok("x"), _ok("y")], [("x", True, ""), ("y", True, "")]),
        (lambda: 1 / 0, [("name", False, "the check raised ZeroDivisionError: division by zero")]),
        (
            _two_then_raise,
            [("first", True, ""), ("name", False, "the check raised binascii.Error: Incorrect padding")],
        ),
    ],
    ids=["one-result", "several-results", "raises-builtin", "raises-after-a-result"],
)
def test_guard_turns_a_check_that_raises_into_a_failed_check_naming_the_exception(
    check: Any, expected: list[tuple[str, bool, str]]
) -> None:
    assert [(r.name, r.passed, r.detail) for r in guard("name", check)] == expected


class ScriptedChat:
    """Answers as a correct chat engine would: `text` greedy, cut at stop strings, refusing past WINDOW."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail  # the request kind to answer with an error
        self.asked: list[Mapping[str, Any]] = []

    def __call__(self, request: Mapping[str, Any]) -> Answer:
        self.asked.append(request)
        prompt = str(request["messages"])
        max_tokens = request.get("max_tokens", 16)
        if len(prompt) > WINDOW * 4 or max_tokens > WINDOW or self.fail == "all":
            return read_answer(
                get_task(CHAT), error_outcome(ContextLengthError("over the context window"), 0.01)
            )
        text, finish = GREEDY_TEXT, "stop"
        for stop in request.get("stop") or []:
            text = text[: text.find(stop)] if stop in text else text
        if max_tokens < 3:
            text, finish = text[:max_tokens], "length"
        n = request.get("n", 1)
        tokens = min(3, max_tokens)
        raw = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": n * tokens, "total_tokens": 5 + n * tokens},
        }
        return read_answer(get_task(CHAT), Outcome(ok=True, response=raw, latency_s=0.01))


def test_a_correct_chat_model_passes_every_check_in_order() -> None:
    ask = ScriptedChat()

    results = run_checks(get_task(CHAT), BUILTIN_SAMPLES[CHAT], ModelFacts(context_window=WINDOW), ask)

    assert all(r.passed for r in results), [r for r in results if not r.passed]
    samples = [f"sample:{s.name}" for s in BUILTIN_SAMPLES[CHAT]]
    assert [r.name for r in results] == [*samples, *get_task(CHAT).checks]
    # The stop check cut the greedy answer: its request carried a stop string from that answer.
    (stopped,) = [r for r in ask.asked if "stop" in r]
    assert stopped["stop"][0] in GREEDY_TEXT
    assert any(r.get("max_tokens") == WINDOW + 1 for r in ask.asked)


def test_the_checks_that_reuse_the_greedy_answer_fail_without_it() -> None:
    results = run_checks(get_task(CHAT), BUILTIN_SAMPLES[CHAT], ModelFacts(), ScriptedChat(fail="all"))

    failed = {r.name: r.detail for r in results if not r.passed}
    assert failed["stop-handling"] == "no answer from chat-greedy to derive a stop string from"
    assert failed["determinism"].startswith("no answer to compare")
    assert "ContextLengthError" in failed["sample:chat-greedy"]
