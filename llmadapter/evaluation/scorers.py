"""The scorers: deterministic ones built as MLflow scorers, mlflow.genai's by class name, the LLM judge.

Every score is a number in [0, 1] (a yes/no rating or a bool reads as 1 / 0), so a scorer's mean over
the rows and the difference between two models mean the same thing for every scorer. What a scorer sees
of an answer (`outputs`) is its text, or for a chat answer with tool calls `{"content", "tool_calls"}`,
or for embeddings `{"similarities"}` (cosine of each candidate to the query); a failed prediction is
`{"error": ...}` and scores 0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmadapter.errors import EvaluationError, first_error
from llmadapter.evaluation.dataset import EvaluationSet
from llmadapter.evaluation.options import JudgeOptions, ScorerSpec

TEXT_TASKS = frozenset({"llm/v1/chat", "llm/v1/completions"})
EMBEDDINGS_TASKS = frozenset({"llm/v1/embeddings"})


def answer_text(outputs: Any) -> str:
    """The text of an answer as scorers read it ('' for a failed prediction or a bare tool call)."""
    if isinstance(outputs, dict):
        return str(outputs.get("content") or "")
    return "" if outputs is None else str(outputs)


def normalise(text: str) -> str:
    """Casefolded, accents and punctuation dropped, whitespace collapsed: 'Paris.' == ' paris'."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _result(ok: bool, why: str) -> tuple[float, str]:
    return (1.0 if ok else 0.0), why


def score_exact_match(outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    got, want = answer_text(outputs).strip(), str(expectations["expected"]).strip()
    return _result(got == want, f"answer {got[:80]!r} vs expected {want[:80]!r}")


def score_contains(outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    got, want = normalise(answer_text(outputs)), normalise(str(expectations["expected"]))
    found = bool(want) and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", got) is not None
    return _result(found, f"{want!r} {'found' if found else 'not found'} in the answer")


def score_regex(outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    found = re.search(expectations["regex"], answer_text(outputs)) is not None
    return _result(found, f"/{expectations['regex']}/ {'matches' if found else 'does not match'}")


def _json_text(text: str) -> str:
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    return (fenced.group(1) if fenced else text).strip()


def score_json_schema(outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    import jsonschema

    try:
        value = json.loads(_json_text(answer_text(outputs)))
    except json.JSONDecodeError as exc:
        return 0.0, f"not JSON: {exc.msg}"
    errors = sorted(
        jsonschema.Draft202012Validator(expectations["expected_json"]).iter_errors(value), key=str
    )
    if errors:
        return 0.0, f"against the schema: {errors[0].message}"
    return 1.0, "valid against the schema"


def score_tool_call(outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    want = expectations["expected_tool_call"]
    calls = outputs.get("tool_calls") if isinstance(outputs, dict) else None
    if not calls:
        return 0.0, "no tool call"
    function = calls[0].get("function") or {}
    if function.get("name") != want["name"]:
        return 0.0, f"called {function.get('name')!r}, expected {want['name']!r}"
    if want.get("arguments") is None:
        return 1.0, f"called {want['name']!r}"
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        return 0.0, "arguments are not JSON"
    same = arguments == want["arguments"]
    return _result(same, f"arguments {'match' if same else 'differ: ' + json.dumps(arguments)[:120]}")


def _similarities(inputs: dict[str, Any], outputs: Any) -> tuple[list[str], list[float]]:
    candidates = list(inputs["input"][1:])
    sims = outputs.get("similarities") if isinstance(outputs, dict) else None
    return candidates, list(sims) if sims else [0.0] * len(candidates)


def score_cosine(inputs: dict[str, Any], outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
    candidates, sims = _similarities(inputs, outputs)
    wanted = [sims[candidates.index(n)] for n in expectations["expected_neighbours"]]
    mean = max(0.0, min(1.0, sum(wanted) / len(wanted)))
    return mean, f"mean cosine to the expected neighbours {mean:.3f}"


def recall_at_k(k: int | None) -> Callable[[dict[str, Any], Any, dict[str, Any]], tuple[float, str]]:
    def score(inputs: dict[str, Any], outputs: Any, expectations: dict[str, Any]) -> tuple[float, str]:
        candidates, sims = _similarities(inputs, outputs)
        wanted = set(expectations["expected_neighbours"])
        top = k or len(wanted)
        ranked = [c for _, c in sorted(zip(sims, candidates, strict=True), key=lambda p: -p[0])][:top]
        recall = len(wanted & set(ranked)) / len(wanted)
        return recall, f"top {top}: {ranked}"

    return score


def answer_length(min_chars: int, max_chars: int | None) -> Callable[[Any], tuple[float, str]]:
    def score(outputs: Any) -> tuple[float, str]:
        n = len(answer_text(outputs))
        ok = n >= min_chars and (max_chars is None or n <= max_chars)
        return _result(ok, f"{n} characters (allowed {min_chars}..{max_chars if max_chars else '-'})")

    return score


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _RecallParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(default=None, ge=1, description="Top k (default: the number expected).")


class _LengthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_chars: int = Field(default=1, ge=0)
    max_chars: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class ScorerKind:
    """One built-in deterministic scorer: the expectation it needs, the tasks it scores, its function."""

    needs: str | None
    tasks: frozenset[str]
    params: type[BaseModel]
    function: Callable[[Any], Callable[..., tuple[float, str]]]  # params -> score function


SCORERS: dict[str, ScorerKind] = {
    "exact_match": ScorerKind("expected", TEXT_TASKS, _NoParams, lambda p: score_exact_match),
    "contains": ScorerKind("expected", TEXT_TASKS, _NoParams, lambda p: score_contains),
    "regex": ScorerKind("regex", TEXT_TASKS, _NoParams, lambda p: score_regex),
    "json_schema": ScorerKind("expected_json", TEXT_TASKS, _NoParams, lambda p: score_json_schema),
    "tool_call": ScorerKind(
        "expected_tool_call", frozenset({"llm/v1/chat"}), _NoParams, lambda p: score_tool_call
    ),
    "cosine": ScorerKind("expected_neighbours", EMBEDDINGS_TASKS, _NoParams, lambda p: score_cosine),
    "recall_at_k": ScorerKind(
        "expected_neighbours", EMBEDDINGS_TASKS, _RecallParams, lambda p: recall_at_k(p.k)
    ),
    "answer_length": ScorerKind(
        None, TEXT_TASKS, _LengthParams, lambda p: answer_length(p.min_chars, p.max_chars)
    ),
}
JUDGE = "judge"


def _as_mlflow_scorer(name: str, score: Callable[..., tuple[float, str]]) -> Any:
    """An mlflow.genai scorer calling `score` with the arguments its signature names."""
    import inspect

    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    wanted = list(inspect.signature(score).parameters)

    def run(inputs: Any, outputs: Any, expectations: Any) -> Feedback:
        given = {"inputs": inputs, "outputs": outputs, "expectations": expectations or {}}
        if isinstance(outputs, dict) and "error" in outputs:
            return Feedback(value=0.0, rationale=f"prediction failed: {outputs['error']}"[:500])
        value, why = score(**{k: given[k] for k in wanted})
        return Feedback(value=float(value), rationale=why)

    return scorer(run, name=name)


def _params(spec: ScorerSpec, model: type[BaseModel], where: str) -> Any:
    try:
        return model.model_validate(spec.params)
    except ValidationError as exc:
        err = first_error(exc)
        raise EvaluationError(f"{where}: params.{err.where}: {err.message}", param=where) from None


def _mlflow_scorer(spec: ScorerSpec, where: str) -> Any:
    """An mlflow.genai scorer class (or registered scorer) by name, constructed with `params`."""
    import mlflow.genai.scorers as genai_scorers

    cls = getattr(genai_scorers, spec.name, None)
    if not (isinstance(cls, type) and issubclass(cls, genai_scorers.Scorer)) or spec.name == "Scorer":
        ours = ", ".join([*SCORERS, JUDGE])
        theirs = ", ".join(
            n
            for n in sorted(dir(genai_scorers))
            if isinstance(getattr(genai_scorers, n), type)
            and issubclass(getattr(genai_scorers, n), genai_scorers.Scorer)
            and n != "Scorer"
        )
        raise EvaluationError(
            f"{where}: no scorer named {spec.name!r}; ours: {ours}; mlflow.genai's: {theirs}.", param=where
        )
    try:
        return cls(**spec.params)
    except Exception as exc:  # pydantic or the scorer's own checks: the message names the bad argument
        raise EvaluationError(f"{where}: {spec.name}({spec.params}): {exc}", param=where) from None


@dataclass(frozen=True)
class PlannedScorer:
    """A scorer of the gate, ready to pass to mlflow.genai.evaluate."""

    spec: ScorerSpec
    name: str  # the name MLflow records its assessments under
    scorer: Any
    judge_model: str | None = None


def build_scorers(
    specs: list[ScorerSpec], dataset: EvaluationSet, task: str, judge: JudgeOptions | None
) -> list[PlannedScorer]:
    """Every scorer checked against the task and the rows (each row has what it needs), then built."""
    from llmadapter.evaluation.judge import build_judge

    built = []
    for index, spec in enumerate(specs):
        where = f"quality.scorers[{index}]"
        kind = SCORERS.get(spec.name)
        if kind is not None:
            if task not in kind.tasks:
                raise EvaluationError(
                    f"{where}: {spec.name} scores {', '.join(sorted(kind.tasks))} models; "
                    f"this one is {task}.",
                    param=where,
                )
            _require(dataset, kind.needs, spec.name, where)
            score = kind.function(_params(spec, kind.params, where))
            built.append(PlannedScorer(spec, spec.name, _as_mlflow_scorer(spec.name, score)))
        elif spec.name == JUDGE:
            if judge is None:
                raise EvaluationError(
                    f"{where}: the judge scorer needs quality.judge (url, model).", param=where
                )
            if task not in TEXT_TASKS:
                raise EvaluationError(
                    f"{where}: the judge scores text answers; this model is {task}.", param=where
                )
            built.append(PlannedScorer(spec, JUDGE, build_judge(judge, where), judge_model=judge.model))
        else:
            found = _mlflow_scorer(spec, where)
            built.append(PlannedScorer(spec, found.name, found))
    return built


def _require(dataset: EvaluationSet, needs: str | None, scorer: str, where: str) -> None:
    if needs is None:
        return
    lacking = [r.id for r in dataset.rows if getattr(r.expectations, needs) is None]
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise EvaluationError(
            f"{where}: {scorer} needs `{needs}` on every row of {dataset.name}; rows without it: {shown}.",
            param=where,
        )


def score_value(value: Any) -> float | None:
    """A recorded assessment value as a number in [0, 1]; None when the scorer gave none (it failed)."""
    import math

    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str):
        rating = value.strip().lower()
        if rating in ("yes", "no"):
            return 1.0 if rating == "yes" else 0.0
        try:
            return float(rating)
        except ValueError:
            return None
    return None
