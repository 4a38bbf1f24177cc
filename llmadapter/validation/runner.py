"""The entry points: validate_model (the report on a logged model) and predict_samples (answers to show)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from llmadapter.catalog import CATALOG, TaskSpec
from llmadapter.settings import get_settings
from llmadapter.validation.checks import check_load, texts
from llmadapter.validation.logged import check_flavor_metadata, check_signature, logged_task
from llmadapter.validation.report import CheckResult, ValidationReport
from llmadapter.validation.samples import BUILTIN_SAMPLES, ValidationSample, parse_samples
from llmadapter.validation.schema import Answer, read_answer
from llmadapter.validation.suite import Ask, guard, run_checks
from llmadapter.validation.worker import Outcome, Session, open_session


def _timeout(timeout_s: float | None) -> float:
    """The given limit, else LLMADAPTER_VALIDATION_TIMEOUT_S (900 s unless set)."""
    return timeout_s if timeout_s is not None else get_settings().validation_timeout_s


def _spec(task: str | None) -> TaskSpec | None:
    return CATALOG.get(task) if task is not None else None


def validate_model(
    model_uri: str,
    *,
    samples: Sequence[ValidationSample | Mapping[str, Any]] | None = None,
    fresh_process: bool = True,
    timeout_s: float | None = None,
    max_latency_s: float | None = None,
) -> ValidationReport:
    """Validate a logged llm/v1 model; never raises for a bad model (the report says what failed).

    samples: extra requests (ValidationSample, or bare OpenAI request bodies) predicted after the
    built-in ones for the task. timeout_s bounds the whole fresh process (default the setting
    LLMADAPTER_VALIDATION_TIMEOUT_S). max_latency_s, when given, fails the report if any sample took
    longer.
    """
    import mlflow.models

    user_samples = parse_samples(samples)
    start = time.perf_counter()
    info = mlflow.models.get_model_info(model_uri)
    task = logged_task(info)
    spec = _spec(task)
    if spec is None:
        check = CheckResult(
            name="flavor-metadata", passed=False, detail=f"no llm/v1 task in the model: {task!r}"
        )
        return ValidationReport(
            model_uri=model_uri,
            task=task,
            status="failed",
            checks=[check],
            duration_s=time.perf_counter() - start,
        )
    checks = [
        *guard("signature", check_signature, info.signature, spec.inference_task),
        *guard("flavor-metadata", check_flavor_metadata, info, spec),
    ]
    with open_session(model_uri, fresh_process=fresh_process, timeout_s=_timeout(timeout_s)) as session:
        loaded = session.loaded
        checks.append(check_load(loaded, fresh_process))
        if loaded.error is None:
            samples_to_run = (*BUILTIN_SAMPLES[spec.inference_task], *user_samples)
            checks += run_checks(spec, samples_to_run, loaded.facts, _asker(spec, session), max_latency_s)
    return ValidationReport(
        model_uri=model_uri,
        task=task,
        status="passed" if all(c.passed for c in checks) else "failed",
        checks=checks,
        duration_s=time.perf_counter() - start,
        load_s=loaded.load_s,
    )


def _asker(spec: TaskSpec, session: Session) -> Ask:
    """One more prediction from the session, read once into the task's typed response."""

    def ask(request: Mapping[str, Any]) -> Answer:
        return read_answer(spec, session.predict(request))

    return ask


class SampleAnswer(BaseModel):
    """One sample's answer from one model, for side-by-side comparison (promotion)."""

    name: str
    ok: bool
    latency_s: float
    answer: str


def _shown(spec: TaskSpec | None, outcome: Outcome) -> str:
    """What a person reads of an answer: the error, the choices' texts, or the start of its JSON."""
    if not outcome.ok:
        return outcome.error
    found = texts(read_answer(spec, outcome).response) if spec is not None else []
    return " | ".join(found) if found else json.dumps(outcome.response)[:200]


def predict_samples(
    model_uri: str,
    samples: Sequence[ValidationSample | Mapping[str, Any]],
    *,
    fresh_process: bool = True,
    timeout_s: float | None = None,
) -> list[SampleAnswer]:
    """Answer samples with one model (in a fresh process by default): text or error, and latency."""
    wanted = parse_samples(samples)
    with open_session(model_uri, fresh_process=fresh_process, timeout_s=_timeout(timeout_s)) as session:
        loaded = session.loaded
        if loaded.error is not None:
            err = f"load failed: {loaded.error.error}"
            return [SampleAnswer(name=s.name, ok=False, latency_s=0.0, answer=err) for s in wanted]
        spec = _spec(loaded.facts.task)
        out = []
        for sample in wanted:
            outcome = session.predict(sample.request)
            out.append(
                SampleAnswer(
                    name=sample.name, ok=outcome.ok, latency_s=outcome.latency_s, answer=_shown(spec, outcome)
                )
            )
        return out
