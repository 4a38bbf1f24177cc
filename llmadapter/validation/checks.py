"""The checks: pure functions from typed answers (and the model's own facts) to a CheckResult.

A check judges only its arguments: the samples' typed answers, and for the checks that need one more
prediction (stop strings, the context limit, determinism, `dimensions`) the answer to a request derived
from an earlier answer (`plan_stop`, `context_probes`). llmadapter.validation.suite makes those
predictions and decides which checks run for which task.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmadapter.catalog import CHAT, COMPLETIONS, TaskSpec
from llmadapter.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    EmbeddingResponse,
    Usage,
)
from llmadapter.validation.report import CheckResult
from llmadapter.validation.samples import ValidationSample
from llmadapter.validation.schema import Answer, Response
from llmadapter.validation.worker import Loaded, Outcome

Generation = ChatCompletionResponse | CompletionResponse

_GENERATION_FINISH = frozenset({"stop", "length", "tool_calls"})
_NORM_TOLERANCE = 1e-3


# --- reading typed answers ----------------------------------------------------------------------


def choice_text(choice: ChatChoice | CompletionChoice) -> str:
    return (choice.message.content or "") if isinstance(choice, ChatChoice) else choice.text


def texts(response: Response | None) -> list[str]:
    """The text of each choice of a generation answer; none for anything else."""
    if isinstance(response, Generation):
        return [choice_text(c) for c in response.choices]
    return []


def _payload(response: Response) -> Any:
    """What must be equal between two greedy runs (ids and timestamps differ by design)."""
    if isinstance(response, EmbeddingResponse):
        return [d.embedding for d in response.data]
    return [(c.finish_reason, choice_text(c)) for c in response.choices]


def _describe(response: Response) -> str:
    if isinstance(response, EmbeddingResponse):
        return f"{len(response.data)} vectors, usage {response.usage.model_dump()}"
    first = response.choices[0]
    return f"{choice_text(first)[:80]!r} ({first.finish_reason}, {response.usage.completion_tokens} tokens)"


def vector(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, str):
        import numpy as np

        return [float(x) for x in np.frombuffer(base64.b64decode(embedding), dtype="<f4")]
    return [float(x) for x in embedding]


def _norm(vec: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in vec))


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    na, nb = _norm(a), _norm(b)
    if na == 0 or nb == 0 or len(a) != len(b):
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


# --- the pure checks ------------------------------------------------------------------------------


def check_load(loaded: Loaded, fresh_process: bool) -> CheckResult:
    if loaded.error is not None:
        return CheckResult(name="fresh-process-load", passed=False, detail=loaded.error.error)
    where = "a fresh process" if fresh_process else "this process"
    fmt = loaded.facts.weight_format
    # The format it was validated in is the one it serves in (llmadapter.engine.weights).
    served = ""
    if fmt:
        quantized = fmt["quantization"] not in ("none", "")
        served = (
            f" as {fmt['quantization'] + ' weights, ' if quantized else ''}{fmt['dtype']} on {fmt['device']}"
        )
    return CheckResult(
        name="fresh-process-load", passed=True, detail=f"loaded in {where}{served}", latency_s=loaded.load_s
    )


def _structure_problems(
    request: Mapping[str, Any],
    choice: ChatChoice | CompletionChoice,
    default_format: Mapping[str, Any] | None,
) -> list[str]:
    """What a choice breaks of the request's response_format (else model_config's) or its tools: an
    answer that does not validate against the schema, a tool call whose arguments do not validate
    against the tool's parameters. A choice cut at max_tokens ("length") is incomplete by design."""
    import jsonschema

    if choice.finish_reason == "length":
        return []
    fmt = request.get("response_format") or default_format or {}
    schema = {"json_object": {"type": "object"}}.get(str(fmt.get("type")))
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema", {})
    calls = choice.message.tool_calls if isinstance(choice, ChatChoice) else None
    if calls:
        tools = request.get("tools") or [{"function": f} for f in request.get("functions") or []]
        params = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
        problems = []
        for call in calls:
            if call.function.name not in params:
                problems.append(f"a call of '{call.function.name}', which is not one of the tools")
                continue
            try:
                jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
            except (ValueError, jsonschema.ValidationError) as exc:
                problems.append(
                    f"'{call.function.name}' arguments do not validate: {str(exc).splitlines()[0]}"
                )
        return problems
    if schema is None:
        return []
    text = choice_text(choice)
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return [f"the answer does not match response_format: {str(exc).splitlines()[0]}: {text[:80]!r}"]
    return []


def check_sample(
    sample: ValidationSample, answer: Answer, default_format: Mapping[str, Any] | None = None
) -> CheckResult:
    """A valid OpenAI answer, with `n` choices, containing the expected text; with response_format or
    tools, every choice validates against the schema or the called tool's parameters."""
    name, latency = f"sample:{sample.name}", answer.outcome.latency_s
    if answer.response is None:
        return CheckResult.of(name, [str(answer.problem)], "", latency)
    problems = []
    n = int(sample.request.get("n") or 1)
    if isinstance(answer.response, Generation) and len(answer.response.choices) != n:
        problems.append(f"{len(answer.response.choices)} choices for n={n}")
    if isinstance(answer.response, Generation):
        for choice in answer.response.choices:
            problems += _structure_problems(sample.request, choice, default_format)
    found = texts(answer.response)
    if sample.expect is not None and not any(sample.expect in t for t in found):
        problems.append(f"answer does not contain {sample.expect!r}: {found!r}")
    return CheckResult.of(name, problems, "" if problems else _describe(answer.response), latency)


def check_usage(spec: TaskSpec, answers: Mapping[str, Response]) -> CheckResult:
    """total_tokens = prompt_tokens (+ completion_tokens), and every prompt counted some tokens."""
    problems = []
    for name, resp in answers.items():
        usage = resp.usage
        completion = usage.completion_tokens if isinstance(usage, Usage) else 0
        if usage.total_tokens != usage.prompt_tokens + completion:
            problems.append(f"{name}: total {usage.total_tokens} != {usage.prompt_tokens} + {completion}")
        if usage.prompt_tokens <= 0:
            problems.append(f"{name}: prompt_tokens {usage.prompt_tokens}")
    what = "prompt + completion" if spec.is_generation else "prompt"
    return CheckResult.of("usage-arithmetic", problems, f"total = {what} in {len(answers)} answers")


def check_finish_reasons(
    samples: Sequence[ValidationSample], answers: Mapping[str, Generation], default_stops: bool
) -> CheckResult:
    """Each finish_reason is an OpenAI one and agrees with the token counts.

    "length" must come with max_tokens tokens (single choice; usage is summed over choices). And an
    answer that used all its tokens must say "length" unless stop strings applied (the request's, or
    the model_config's `default_stops`): without them the only other end is the end-of-sequence token,
    which llmadapter's engine (the loader flavor-metadata requires) never counts as a completion token,
    so "stop" there is wrong. With stop strings, one can match in the very last token, and "stop" at the
    limit is right. With n choices, n * max_tokens completion tokens mean that every choice hit the limit.
    """
    problems = []
    seen: set[str] = set()
    for sample in samples:
        resp = answers.get(sample.name)
        if resp is None:
            continue
        max_tokens = sample.request.get("max_tokens") or sample.request.get("max_completion_tokens")
        n_choices = max(len(resp.choices), 1)
        completion = resp.usage.completion_tokens
        per_choice = completion / n_choices
        all_at_limit = (
            max_tokens is not None
            and not (sample.request.get("stop") or default_stops)
            and completion == max_tokens * n_choices
        )
        for choice in resp.choices:
            reason = choice.finish_reason
            seen.add(str(reason))
            if reason not in _GENERATION_FINISH:
                problems.append(f"{sample.name}: finish_reason {reason!r}")
            single = len(resp.choices) == 1
            if reason == "length" and max_tokens is not None and single and per_choice != max_tokens:
                problems.append(
                    f"{sample.name}: 'length' after {per_choice:g} tokens, max_tokens {max_tokens}"
                )
            if all_at_limit and reason == "stop":
                problems.append(
                    f"{sample.name}: 'stop' after all max_tokens={max_tokens} tokens without a stop "
                    "string, expected 'length'"
                )
        if max_tokens is not None and per_choice > max_tokens:
            problems.append(f"{sample.name}: {per_choice:g} completion tokens > max_tokens {max_tokens}")
    return CheckResult.of(
        "finish-reason", problems, f"finish reasons seen: {', '.join(sorted(seen)) or 'none'}"
    )


@dataclass(frozen=True)
class StopProbe:
    """A stop string to send with the greedy request, and the text the answer must then be."""

    stop: str
    expected: str | None  # None: nothing to cut, the stop string must only never be returned


def plan_stop(greedy: Generation) -> StopProbe:
    """A stop string from the middle of the greedy answer (of its visible part when it has one)."""
    text = texts(greedy)[0]
    core = text.strip()
    if len(text) < 2:
        return StopProbe("\n\n", None)
    mid = text.index(core) + len(core) // 2 if len(core) >= 2 else len(text) // 2
    stop = text[mid : mid + 2] if mid + 2 <= len(text) else text[-2:]
    # Generated text only, earliest match, trimmed: the answer ends right before the first occurrence.
    return StopProbe(stop, text[: text.find(stop)])


def check_stop(probe: StopProbe, answer: Answer) -> CheckResult:
    problems: list[str] = []
    if not isinstance(answer.response, Generation):
        problems.append(str(answer.problem))
    else:
        got = texts(answer.response)[0]
        reason = answer.response.choices[0].finish_reason
        if probe.stop in got:
            problems.append(f"output contains the stop string {probe.stop!r}: {got!r}")
        if probe.expected is not None and got != probe.expected:
            problems.append(f"with stop {probe.stop!r} expected {probe.expected!r}, got {got!r}")
        if probe.expected is not None and reason != "stop":
            problems.append(f"finish_reason {reason!r} after a stop string, expected 'stop'")
    ok = f"stop {probe.stop!r} cut the greedy answer exactly before it, finish_reason 'stop'"
    return CheckResult.of("stop-handling", problems, ok, answer.outcome.latency_s)


# How a generation task's request carries a prompt of the given text.
_PROMPT_FIELD: dict[str, Callable[[str], dict[str, Any]]] = {
    CHAT: lambda text: {"messages": [{"role": "user", "content": text}]},
    COMPLETIONS: lambda text: {"prompt": text},
}


def context_probes(spec: TaskSpec, greedy: ValidationSample, window: int) -> list[tuple[str, dict[str, Any]]]:
    """Two requests over the window, each named: an over-long prompt, and max_tokens past the window."""
    long_prompt = _PROMPT_FIELD[spec.inference_task]("hello " * (window + 64))
    return [
        ("over-long prompt", {**greedy.request, **long_prompt}),
        (f"max_tokens={window + 1}", {**greedy.request, "max_tokens": window + 1}),
    ]


def _is_clear_refusal(outcome: Outcome) -> bool:
    message = (outcome.message or "").lower()
    return (
        outcome.status_code is not None
        and 400 <= outcome.status_code < 500
        and (outcome.code == "context_length_exceeded" or "context" in message)
    )


def check_context_limit(window: int, answers: Sequence[tuple[str, Answer]]) -> CheckResult:
    """Each request over the window is refused with a clear 4xx error, never answered."""
    problems: list[str] = []
    refusals: list[str] = []
    for what, answer in answers:
        outcome = answer.outcome
        message = (outcome.message or "")[:300]
        if outcome.ok:
            problems.append(f"{what} was answered instead of refused (window {window})")
        elif not _is_clear_refusal(outcome):
            problems.append(f"{what}: unclear error {outcome.error_type}: {message}")
        else:
            refusals.append(f"{what} refused ({outcome.error_type}: {message})")
    latency = max((a.outcome.latency_s for _, a in answers), default=0.0)
    return CheckResult.of("context-limit", problems, "; ".join(refusals), latency)


def check_determinism(spec: TaskSpec, greedy: str, base: Response | None, again: Answer) -> CheckResult:
    """The greedy sample asked twice gives the same answer (`base` is the first, `again` the second)."""
    problems: list[str] = []
    if base is None or again.response is None:
        problems.append(f"no answer to compare: {again.outcome.message if not again.outcome.ok else greedy}")
    else:
        first, second = _payload(base), _payload(again.response)
        if first != second:
            problems.append(
                f"two runs at temperature 0 differ: {str(first)[:200]!r} vs {str(second)[:200]!r}"
            )
    what = "answers (temperature 0)" if spec.is_generation else "vectors"
    return CheckResult.of("determinism", problems, f"two runs gave identical {what}", again.outcome.latency_s)


def embedding_size(answers: Mapping[str, EmbeddingResponse]) -> int | None:
    """The one vector size of all answers; None when there are none or they disagree."""
    sizes = {len(vector(d.embedding)) for resp in answers.values() for d in resp.data}
    return next(iter(sizes)) if len(sizes) == 1 else None


def check_embeddings_dimension(answers: Mapping[str, EmbeddingResponse]) -> CheckResult:
    """Vectors of one size, finite, non-zero, and different for different texts (the model pools)."""
    problems: list[str] = []
    sizes: set[int] = set()
    vectors: dict[str, list[list[float]]] = {}
    for name, resp in answers.items():
        vectors[name] = [vector(d.embedding) for d in resp.data]
        for i, vec in enumerate(vectors[name]):
            sizes.add(len(vec))
            if not vec or not all(math.isfinite(x) for x in vec):
                problems.append(f"{name}[{i}]: empty or non-finite vector")
            elif _norm(vec) == 0.0:
                problems.append(f"{name}[{i}]: zero vector")
    if len(sizes) > 1:
        problems.append(f"vectors of different sizes: {sorted(sizes)}")
    pair = vectors.get("embed-pair")
    if pair is not None and len(pair) == 2 and _cosine(pair[0], pair[1]) > 0.9999:
        problems.append("'Hello' and 'Hello, how are you?' got the same vector (no pooling?)")
    ok = f"{embedding_size(answers)} dimensions, finite, distinct texts distinct"
    return CheckResult.of("embeddings-dimension", problems, ok)


def check_embeddings_norm(want: int, answer: Answer) -> CheckResult:
    """A request for `want` dimensions gives unit vectors of that size."""
    problems: list[str] = []
    if not answer.outcome.ok:
        problems.append(f"dimensions={want}: {answer.problem}")
    elif not isinstance(answer.response, EmbeddingResponse):
        problems.append(str(answer.problem))
    else:
        for d in answer.response.data:
            vec = vector(d.embedding)
            if len(vec) != want:
                problems.append(f"dimensions={want} gave {len(vec)} values")
            elif abs(_norm(vec) - 1.0) > _NORM_TOLERANCE:
                problems.append(f"dimensions={want} gave norm {_norm(vec):.5f}, expected 1")
    ok = f"dimensions={want} gives unit vectors of that size"
    return CheckResult.of("embeddings-norm", problems, ok, answer.outcome.latency_s)


def check_latency(sample_checks: Sequence[CheckResult], max_latency_s: float | None) -> CheckResult:
    lat = [c.latency_s for c in sample_checks if c.latency_s is not None]
    if not lat:
        return CheckResult.of("latency", ["no sample answered"], "")
    worst = max(lat)
    problems = []
    if max_latency_s is not None and worst > max_latency_s:
        problems.append(f"slowest sample took {worst:.3f} s > max_latency_s {max_latency_s}")
    ok = f"p50 {statistics.median(lat):.3f} s, max {worst:.3f} s over {len(lat)} samples"
    return CheckResult.of("latency", problems, ok)
