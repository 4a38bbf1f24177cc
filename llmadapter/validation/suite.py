"""The checks run after the samples (the catalog lists which per task), the one guard around each, run_checks.

A step makes the predictions its check needs through `ask` and calls the pure check (checks.py);
`guard` turns a step that raises (on an answer malformed beyond what the schema catches) into a failed
check naming the exception, so validate_model reports instead of crashing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmadapter.catalog import TaskSpec
from llmadapter.protocol import EmbeddingResponse
from llmadapter.validation.checks import (
    Generation,
    check_context_limit,
    check_determinism,
    check_embeddings_dimension,
    check_embeddings_norm,
    check_finish_reasons,
    check_latency,
    check_sample,
    check_stop,
    check_usage,
    context_probes,
    embedding_size,
    plan_stop,
)
from llmadapter.validation.report import CheckResult
from llmadapter.validation.samples import ValidationSample
from llmadapter.validation.schema import Answer, Response
from llmadapter.validation.worker import ModelFacts

Ask = Callable[[Mapping[str, Any]], Answer]  # one more prediction, read once into a typed Answer
_UNKNOWN_WINDOW = 32_768  # without the engine's number: far beyond any window a CPU model here has


@dataclass(frozen=True)
class Evidence:
    """What the checks after the samples judge: the samples, their typed answers, the model's facts."""

    spec: TaskSpec
    samples: tuple[ValidationSample, ...]
    greedy: ValidationSample  # the task's first built-in sample (temperature 0), reused by later checks
    answers: Mapping[str, Response]  # by sample name, for the samples whose answer passed the schema
    sample_checks: tuple[CheckResult, ...]
    facts: ModelFacts
    max_latency_s: float | None

    def generations(self) -> dict[str, Generation]:
        return {k: v for k, v in self.answers.items() if isinstance(v, Generation)}

    def embeddings(self) -> dict[str, EmbeddingResponse]:
        return {k: v for k, v in self.answers.items() if isinstance(v, EmbeddingResponse)}


Step = Callable[[Evidence, Ask], Iterable[CheckResult]]


def _usage(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    yield check_usage(ev.spec, ev.answers)


def _finish_reasons(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    yield check_finish_reasons(ev.samples, ev.generations(), bool(ev.facts.default_stops))


def _stop(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    greedy = ev.generations().get(ev.greedy.name)
    if greedy is None:
        yield CheckResult.of(
            "stop-handling", [f"no answer from {ev.greedy.name} to derive a stop string from"], ""
        )
        return
    probe = plan_stop(greedy)
    yield check_stop(probe, ask({**ev.greedy.request, "stop": [probe.stop]}))


def _context_limit(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    window = ev.facts.context_window or _UNKNOWN_WINDOW
    yield check_context_limit(
        window, [(what, ask(req)) for what, req in context_probes(ev.spec, ev.greedy, window)]
    )


def _determinism(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    yield check_determinism(ev.spec, ev.greedy.name, ev.answers.get(ev.greedy.name), ask(ev.greedy.request))


def _embeddings(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    yield check_embeddings_dimension(ev.embeddings())
    size = embedding_size(ev.embeddings())
    if size is not None:
        want = max(1, size // 2)
        yield check_embeddings_norm(want, ask({"input": ["Hello", "Paris"], "dimensions": want}))


def _latency(ev: Evidence, ask: Ask) -> Iterator[CheckResult]:
    yield check_latency(ev.sample_checks, ev.max_latency_s)


# Every check a task may list in its catalog entry (TaskSpec.checks), by name; a step that raises fails
# under that name.
STEPS: dict[str, Step] = {
    "usage-arithmetic": _usage,
    "finish-reason": _finish_reasons,
    "stop-handling": _stop,
    "context-limit": _context_limit,
    "determinism": _determinism,
    "embeddings": _embeddings,
    "latency": _latency,
}


def _raised(name: str, exc: Exception) -> CheckResult:
    kind = type(exc).__qualname__
    if type(exc).__module__ != "builtins":
        kind = f"{type(exc).__module__}.{kind}"
    return CheckResult(name=name, passed=False, detail=f"the check raised {kind}: {str(exc)[:300]}")


def guard(
    name: str, check: Callable[..., CheckResult | Iterable[CheckResult]], *args: Any
) -> list[CheckResult]:
    """What `check(*args)` found; if it raises, what it found so far and `name` failed, naming the exception.

    The checks read answers the model shaped: one malformed beyond what the schema catches must fail
    that check in the report, not abort validate_model (which never raises for a bad model).
    """
    results: list[CheckResult] = []
    try:
        found = check(*args)
        for result in [found] if isinstance(found, CheckResult) else found:
            results.append(result)
    except Exception as exc:
        results.append(_raised(name, exc))
    return results


def run_checks(
    spec: TaskSpec,
    samples: Sequence[ValidationSample],
    facts: ModelFacts,
    ask: Ask,
    max_latency_s: float | None = None,
) -> list[CheckResult]:
    """Each sample's check, then the task's checks over the answers (the first sample is the greedy one)."""
    answered = [(sample, ask(sample.request)) for sample in samples]
    fmt = facts.default_response_format
    sample_checks = [r for s, a in answered for r in guard(f"sample:{s.name}", check_sample, s, a, fmt)]
    evidence = Evidence(
        spec=spec,
        samples=tuple(samples),
        greedy=samples[0],
        answers={s.name: a.response for s, a in answered if a.response is not None},
        sample_checks=tuple(sample_checks),
        facts=facts,
        max_latency_s=max_latency_s,
    )
    results = list(sample_checks)
    for name in spec.checks:
        results += guard(name, STEPS[name], evidence, ask)
    return results
