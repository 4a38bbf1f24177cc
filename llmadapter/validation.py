"""Validation of a logged llm/v1 model: signature conformance and sample predictions -> ValidationReport.

Sample predictions run in a fresh Python process by default (`python -m llmadapter.validation`), which
loads the model with `mlflow.pyfunc.load_model(uri)` exactly as a user or `mlflow models serve` would:
a model that only works in the process that logged it (missing code, unpicklable state, a tokenizer
read from a folder that is gone) fails here, before registration. The parent drives the worker with
one JSON line per request, so checks can build on earlier answers (the stop check cuts a real answer).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS, get_task
from llmadapter.errors import ConfigError, LLMAdapterError, ValidationFailedError
from llmadapter.protocol import ChatCompletionResponse, CompletionResponse, EmbeddingResponse
from llmadapter.settings import get_settings

__all__ = [
    "CheckResult",
    "SampleAnswer",
    "ValidationReport",
    "ValidationSample",
    "log_report",
    "predict_samples",
    "raise_for_report",
    "validate_model",
]

Status = Literal["passed", "failed"]
_RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    CHAT: ChatCompletionResponse,
    COMPLETIONS: CompletionResponse,
    EMBEDDINGS: EmbeddingResponse,
}
_GENERATION_FINISH = frozenset({"stop", "length", "tool_calls"})
_PROTOCOL_PREFIX = "@@llmadapter-validation@@ "
_NORM_TOLERANCE = 1e-3
REPORT_ARTIFACT_DIR = "validation"


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


class CheckResult(BaseModel):
    """One check: a name, whether it passed, what was seen, and the prediction latency if it ran one."""

    model_config = ConfigDict(frozen=True)

    name: str
    passed: bool
    detail: str = ""
    latency_s: float | None = None


class ValidationReport(BaseModel):
    """The typed result of validate_model; saved on the MLflow run, the version tags and in Prefect."""

    model_uri: str
    task: str | None
    status: Status
    checks: list[CheckResult]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    duration_s: float = 0.0
    load_s: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def sample_latencies(self) -> list[float]:
        return [c.latency_s for c in self.checks if c.latency_s is not None and c.name.startswith("sample:")]

    @property
    def p50_latency_s(self) -> float | None:
        lat = self.sample_latencies
        return statistics.median(lat) if lat else None

    @property
    def max_latency_s(self) -> float | None:
        lat = self.sample_latencies
        return max(lat) if lat else None

    def summary(self) -> str:
        """One line: status, checks passed, sample latency."""
        n_ok = sum(c.passed for c in self.checks)
        line = f"{self.status}: {n_ok}/{len(self.checks)} checks passed"
        if self.p50_latency_s is not None:
            line += f", sample latency p50 {self.p50_latency_s:.3f} s, max {self.max_latency_s:.3f} s"
        if self.failed_checks:
            line += "; failed: " + ", ".join(c.name for c in self.failed_checks)
        return line

    def to_markdown(self) -> str:
        head = "passed" if self.passed else "FAILED"
        lines = [
            f"## Validation {head}: `{self.model_uri}`",
            "",
            f"Task `{self.task}`. {self.summary()}. Took {self.duration_s:.1f} s"
            + (f" (model load {self.load_s:.1f} s in a fresh process)." if self.load_s is not None else "."),
            "",
            "| check | result | latency (s) | detail |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            latency = f"{c.latency_s:.3f}" if c.latency_s is not None else ""
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {latency} | {detail} |")
        return "\n".join(lines) + "\n"

    def to_table(self) -> list[dict[str, Any]]:
        """Rows for a Prefect table artifact."""
        return [
            {"check": c.name, "passed": c.passed, "latency_s": c.latency_s, "detail": c.detail}
            for c in self.checks
        ]

    def to_tags(self) -> dict[str, str]:
        """Registry version tags (strings; MLflow caps tag values at 5000 characters)."""
        tags = {
            "validation_status": self.status,
            "validation_checks": f"{sum(c.passed for c in self.checks)}/{len(self.checks)}",
        }
        if self.p50_latency_s is not None:
            tags["validation_p50_latency_s"] = f"{self.p50_latency_s:.4f}"
        if self.max_latency_s is not None:
            tags["validation_max_latency_s"] = f"{self.max_latency_s:.4f}"
        if self.failed_checks:
            tags["validation_failed"] = ", ".join(c.name for c in self.failed_checks)[:4000]
        return tags


class ValidationSample(BaseModel):
    """A request to predict during validation; `expect` is text the answer must contain."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=80)
    request: dict[str, Any]
    expect: str | None = None


def _as_samples(samples: Sequence[ValidationSample | Mapping[str, Any]] | None) -> list[ValidationSample]:
    out: list[ValidationSample] = []
    for i, raw in enumerate(samples or ()):
        if isinstance(raw, ValidationSample):
            out.append(raw)
            continue
        if not isinstance(raw, Mapping):
            raise ConfigError(f"samples[{i}] must be a mapping, got {type(raw).__name__}.", param="samples")
        # A bare request body is accepted too: {"messages": [...]} instead of {"name", "request"}.
        data = dict(raw) if "request" in raw else {"name": f"user-{i}", "request": dict(raw)}
        data.setdefault("name", f"user-{i}")
        try:
            out.append(ValidationSample.model_validate(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(f"Invalid samples[{i}].{where}: {first.get('msg')}.", param="samples") from None
    return out


# Built-in samples per task. Greedy (temperature 0) where a later check reuses the answer.
_BUILTIN: dict[str, list[ValidationSample]] = {
    CHAT: [
        ValidationSample(
            name="chat-greedy",
            request={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 24,
            },
        ),
        ValidationSample(
            name="chat-system",
            request={
                "messages": [
                    {"role": "system", "content": "You answer in one short sentence."},
                    {"role": "user", "content": "Name a colour."},
                ],
                "temperature": 0,
                "max_tokens": 8,
            },
        ),
        ValidationSample(
            name="chat-length",
            request={"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 2},
        ),
        ValidationSample(
            name="chat-n2-seed",
            request={
                "messages": [{"role": "user", "content": "Say something."}],
                "n": 2,
                "seed": 7,
                "temperature": 0.8,
                "max_tokens": 8,
            },
        ),
    ],
    COMPLETIONS: [
        ValidationSample(
            name="completion-greedy",
            request={"prompt": "The capital of France is", "temperature": 0, "max_tokens": 24},
        ),
        ValidationSample(name="completion-length", request={"prompt": "One, two, three,", "max_tokens": 2}),
        ValidationSample(
            name="completion-n2-seed",
            request={"prompt": "Once upon a time", "n": 2, "seed": 7, "temperature": 0.8, "max_tokens": 8},
        ),
    ],
    EMBEDDINGS: [
        ValidationSample(name="embed-pair", request={"input": ["Hello", "Hello, how are you?"]}),
        ValidationSample(name="embed-one", request={"input": "The capital of France is Paris."}),
    ],
}


# ---------------------------------------------------------------------------------------------
# Worker (the fresh process) and the in-process variant
# ---------------------------------------------------------------------------------------------


class _Outcome(BaseModel):
    """What one predict call gave: a response, or the error it raised (never a stack trace)."""

    ok: bool
    response: Any = None
    latency_s: float = 0.0
    error_type: str | None = None
    error_types: list[str] = Field(default_factory=list)
    message: str | None = None
    code: str | None = None
    status_code: int | None = None


def _error_outcome(exc: BaseException, latency_s: float) -> _Outcome:
    # MLflow may wrap our exception; look through the chain for the llmadapter error.
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    ours = next((e for e in chain if isinstance(e, LLMAdapterError)), None)
    shown = ours or exc
    return _Outcome(
        ok=False,
        latency_s=latency_s,
        error_type=type(shown).__name__,
        error_types=[c.__name__ for e in chain for c in type(e).__mro__ if c is not object],
        message=str(shown)[:2000],
        code=getattr(shown, "code", None) if ours is not None else None,
        status_code=ours.status_code if ours is not None else None,
    )


def _jsonable(value: Any) -> Any:
    """Predictions may come back as pydantic models, numpy arrays or one-row lists: make them JSON."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _context_window(loaded: Any) -> int | None:
    """The engine's context window, if the loaded pyfunc exposes it (ours does through its engine)."""
    impl = getattr(loaded, "_model_impl", None)
    for obj in (impl, getattr(impl, "engine", None), getattr(impl, "_engine", None)):
        value = getattr(obj, "context_window", None) if obj is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


class _LoadedModel:
    """A pyfunc model loaded in this process, answering one request at a time."""

    def __init__(self, model_uri: str) -> None:
        import mlflow.pyfunc

        start = time.perf_counter()
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.load_s = time.perf_counter() - start
        self.context_window = _context_window(self.model)

    def predict(self, request: Mapping[str, Any]) -> _Outcome:
        start = time.perf_counter()
        try:
            raw = self.model.predict(dict(request))
        except Exception as exc:  # the worker reports any failure of the model as data
            return _error_outcome(exc, time.perf_counter() - start)
        latency = time.perf_counter() - start
        result = _jsonable(raw)
        if isinstance(result, list) and len(result) == 1:
            result = result[0]
        return _Outcome(ok=True, response=result, latency_s=latency)


def _worker_main(model_uri: str) -> int:
    """Entry point of the fresh process: JSON lines in (requests), JSON lines out (outcomes)."""
    # Libraries print to stdout (progress bars, warnings): keep the protocol channel private.
    proto: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(_PROTOCOL_PREFIX + json.dumps(obj) + "\n")
        proto.flush()

    try:
        model = _LoadedModel(model_uri)
    except Exception as exc:  # a model that cannot load is a validation result, not a crash
        send({"ready": False, **_error_outcome(exc, 0.0).model_dump()})
        return 1
    send({"ready": True, "load_s": model.load_s, "context_window": model.context_window})
    for line in sys.stdin:
        if not line.strip():
            continue
        send(model.predict(json.loads(line)).model_dump(mode="json"))
    return 0


class _Session:
    """Predictions for the checks: in a fresh subprocess (default) or in this process."""

    load_s: float | None = None
    context_window: int | None = None
    load_error: _Outcome | None = None

    def predict(self, request: Mapping[str, Any]) -> _Outcome:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _InProcessSession(_Session):
    def __init__(self, model_uri: str) -> None:
        try:
            self._model: _LoadedModel | None = _LoadedModel(model_uri)
        except Exception as exc:  # reported as the fresh-process-load check
            self._model = None
            self.load_error = _error_outcome(exc, 0.0)
            return
        self.load_s = self._model.load_s
        self.context_window = self._model.context_window

    def predict(self, request: Mapping[str, Any]) -> _Outcome:
        assert self._model is not None
        return self._model.predict(request)


def _child_env() -> dict[str, str]:
    import mlflow

    env = dict(os.environ)
    # The child must see the same stores this process uses, even when they were set in code.
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["MLFLOW_REGISTRY_URI"] = mlflow.get_registry_uri()
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class _SubprocessSession(_Session):
    def __init__(self, model_uri: str, timeout_s: float) -> None:
        self._deadline = time.monotonic() + timeout_s
        # Lives as long as the session (closed in close()), so no context manager.
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmadapter.validation", "--worker", model_uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
            env=_child_env(),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self._receive()
        if not hello.get("ready"):
            hello.pop("ready", None)
            self.load_error = _Outcome.model_validate(hello)
            self._stop_process()
            return
        self.load_s = float(hello["load_s"])
        self.context_window = hello.get("context_window")

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_PROTOCOL_PREFIX):
                self._lines.put(line[len(_PROTOCOL_PREFIX) :])
        self._lines.put(None)

    def _stderr_tail(self, n: int = 1500) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-n:]

    def _receive(self) -> dict[str, Any]:
        remaining = self._deadline - time.monotonic()
        try:
            line = self._lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            # Hung (or far too slow): later predictions answer "exited" at once instead of waiting again.
            self._proc.kill()
            self._proc.wait()
            return {"ok": False, "error_type": "TimeoutError", "message": "validation process timed out"}
        if line is None:
            self._proc.wait()
            return {
                "ok": False,
                "error_type": "ProcessExited",
                "message": f"validation process exited with code {self._proc.returncode}: "
                + self._stderr_tail(),
            }
        result: dict[str, Any] = json.loads(line)
        return result

    def predict(self, request: Mapping[str, Any]) -> _Outcome:
        if self._proc.poll() is not None:
            return _Outcome(ok=False, error_type="ProcessExited", message=self._stderr_tail())
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(dict(request)) + "\n")
            self._proc.stdin.flush()
        except OSError:  # the process died between the poll and the write
            return _Outcome(ok=False, error_type="ProcessExited", message=self._stderr_tail())
        return _Outcome.model_validate(self._receive())

    def close(self) -> None:
        self._stop_process()
        self._stderr.close()

    def _stop_process(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _colspec_dict(spec: Any) -> dict[str, Any]:
    return dict(spec.to_dict())


def check_signature(logged: Any, task: str) -> CheckResult:
    """The logged signature holds every field of MLflow's own llm/v1 signature, same type/requiredness."""
    from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK

    native = _SIGNATURE_FOR_LLM_INFERENCE_TASK.get(task)
    if native is None:
        return CheckResult(name="signature", passed=False, detail=f"no MLflow signature for task '{task}'")
    if logged is None:
        return CheckResult(name="signature", passed=False, detail="the model was logged without a signature")
    problems: list[str] = []
    for part in ("inputs", "outputs"):
        want_schema = getattr(native, part)
        have_schema = getattr(logged, part)
        if want_schema is None:
            continue
        have = {s.name: s for s in (have_schema.inputs if have_schema is not None else [])}
        for want in want_schema.inputs:
            got = have.get(want.name)
            if got is None:
                problems.append(f"{part}.{want.name} missing")
            elif _colspec_dict(got) != _colspec_dict(want):
                problems.append(
                    f"{part}.{want.name} is {_colspec_dict(got)}, MLflow has {_colspec_dict(want)}"
                )
    n_in = len(native.inputs.inputs)
    extra = len(logged.inputs.inputs) - n_in if logged.inputs is not None else 0
    detail = "; ".join(problems) or f"all {n_in} MLflow input fields present, {extra} optional extra fields"
    return CheckResult(name="signature", passed=not problems, detail=detail)


def check_flavor_metadata(info: Any, task: str) -> CheckResult:
    """flavors.transformers.task/inference_task and metadata.task as MLflow writes them; our pyfunc loader."""
    spec = get_task(task)
    flavor = info.flavors.get("transformers")
    problems: list[str] = []
    if flavor is None:
        problems.append("no transformers flavor")
    else:
        if flavor.get("task") not in spec.native_tasks:
            problems.append(
                f"transformers.task is {flavor.get('task')!r}, expected one of {spec.native_tasks}"
            )
        if flavor.get("inference_task") != task:
            problems.append(f"transformers.inference_task is {flavor.get('inference_task')!r}")
    meta_task = (info.metadata or {}).get("task")
    if meta_task != task:
        problems.append(f"metadata.task is {meta_task!r}")
    loader = info.flavors.get("python_function", {}).get("loader_module", "")
    if not str(loader).startswith("llmadapter"):
        problems.append(f"python_function loader is {loader!r}, not llmadapter's engine")
    detail = "; ".join(problems) or f"task {flavor.get('task') if flavor else None}, inference_task {task}"
    return CheckResult(name="flavor-metadata", passed=not problems, detail=detail)


def _raised(name: str, exc: Exception) -> CheckResult:
    """A check that raised fails, naming the exception (validation reports; it does not crash)."""
    kind = type(exc).__qualname__
    if type(exc).__module__ != "builtins":
        kind = f"{type(exc).__module__}.{kind}"
    return CheckResult(name=name, passed=False, detail=f"the check raised {kind}: {str(exc)[:300]}")


def _checked(name: str, check: Callable[..., CheckResult], *args: Any) -> CheckResult:
    try:
        return check(*args)
    except Exception as exc:
        return _raised(name, exc)


class _Runner:
    """Runs the prediction checks for one task against a session, collecting CheckResults."""

    def __init__(
        self, session: _Session, task: str, max_latency_s: float | None, default_stops: bool = False
    ) -> None:
        self.session = session
        self.task = task
        self.max_latency_s = max_latency_s
        # The model_config's own stop strings apply to every sample, as the request's would.
        self.default_stops = default_stops
        self.checks: list[CheckResult] = []
        self.responses: dict[str, Any] = {}

    def add(self, name: str, problems: list[str], ok_detail: str, latency_s: float | None = None) -> None:
        self.checks.append(
            CheckResult(
                name=name, passed=not problems, detail="; ".join(problems) or ok_detail, latency_s=latency_s
            )
        )

    def guard(self, name: str, check: Callable[..., None], *args: Any) -> None:
        """Run one check; if it raises, record a failed check naming the exception.

        The checks read answers the model shaped: one malformed beyond what the schema catches must fail
        that check in the report, not abort validate_model (which never raises for a bad model).
        """
        try:
            check(*args)
        except Exception as exc:
            self.checks.append(_raised(name, exc))

    def run_sample(self, sample: ValidationSample) -> None:
        outcome = self.session.predict(sample.request)
        name = f"sample:{sample.name}"
        if not outcome.ok:
            self.add(name, [f"{outcome.error_type}: {outcome.message}"], "", outcome.latency_s)
            return
        problems = _schema_problems(self.task, outcome.response)
        if not problems:
            self.responses[sample.name] = outcome.response
            n = int(sample.request.get("n") or 1)
            if self.task != EMBEDDINGS and len(outcome.response["choices"]) != n:
                problems.append(f"{len(outcome.response['choices'])} choices for n={n}")
            if sample.expect is not None and not any(sample.expect in t for t in _texts(outcome.response)):
                problems.append(f"answer does not contain {sample.expect!r}: {_texts(outcome.response)!r}")
        self.add(
            name, problems, _describe(self.task, outcome.response) if not problems else "", outcome.latency_s
        )

    # -- aggregate checks over the successful sample responses --------------------------------

    def check_usage(self) -> None:
        problems = []
        for name, resp in self.responses.items():
            usage = resp["usage"]
            completion = usage.get("completion_tokens", 0)
            if usage["total_tokens"] != usage["prompt_tokens"] + completion:
                problems.append(
                    f"{name}: total {usage['total_tokens']} != {usage['prompt_tokens']} + {completion}"
                )
            if usage["prompt_tokens"] <= 0:
                problems.append(f"{name}: prompt_tokens {usage['prompt_tokens']}")
        what = "prompt" if self.task == EMBEDDINGS else "prompt + completion"
        self.add("usage-arithmetic", problems, f"total = {what} in {len(self.responses)} answers")

    def check_finish_reasons(self, samples: list[ValidationSample]) -> None:
        """Each finish_reason is an OpenAI one and agrees with the token counts.

        "length" must come with max_tokens tokens (single choice; usage is summed over choices). And an
        answer that used all its tokens must say "length" unless the request had stop strings: without
        them the only other end is the end-of-sequence token, which llmadapter's engine (the loader
        flavor-metadata requires) never counts as a completion token, so "stop" there is wrong. With
        stop strings, one can match in the very last token, and "stop" at the limit is right. With n
        choices, n * max_tokens completion tokens mean that every choice hit the limit.
        """
        problems = []
        seen: set[str] = set()
        for sample in samples:
            resp = self.responses.get(sample.name)
            if resp is None:
                continue
            max_tokens = sample.request.get("max_tokens") or sample.request.get("max_completion_tokens")
            n_choices = max(len(resp["choices"]), 1)
            completion = resp["usage"]["completion_tokens"]
            per_choice = completion / n_choices
            all_at_limit = (
                max_tokens is not None
                and not (sample.request.get("stop") or self.default_stops)
                and completion == max_tokens * n_choices
            )
            for choice in resp["choices"]:
                reason = choice.get("finish_reason")
                seen.add(str(reason))
                if reason not in _GENERATION_FINISH:
                    problems.append(f"{sample.name}: finish_reason {reason!r}")
                single = len(resp["choices"]) == 1
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
        self.add("finish-reason", problems, f"finish reasons seen: {', '.join(sorted(seen)) or 'none'}")

    def check_stop(self, greedy: ValidationSample) -> None:
        base = self.responses.get(greedy.name)
        if base is None:
            self.add("stop-handling", [f"no answer from {greedy.name} to derive a stop string from"], "")
            return
        text = _texts(base)[0]
        core = text.strip()
        if len(text) < 2:
            # Nothing to cut: still the stop string must never be returned.
            stop, expected = "\n\n", None
        else:
            # A stop string taken from the middle of the real answer (of its visible part when it has
            # one): the output must end right before its first occurrence (generated text only,
            # earliest match, trimmed).
            mid = text.index(core) + len(core) // 2 if len(core) >= 2 else len(text) // 2
            stop = text[mid : mid + 2] if mid + 2 <= len(text) else text[-2:]
            expected = text[: text.find(stop)]
        outcome = self.session.predict({**greedy.request, "stop": [stop]})
        problems: list[str] = []
        if not outcome.ok:
            problems.append(f"{outcome.error_type}: {outcome.message}")
        else:
            problems += _schema_problems(self.task, outcome.response)
            if not problems:
                got = _texts(outcome.response)[0]
                reason = outcome.response["choices"][0].get("finish_reason")
                if stop in got:
                    problems.append(f"output contains the stop string {stop!r}: {got!r}")
                if expected is not None and got != expected:
                    problems.append(f"with stop {stop!r} expected {expected!r}, got {got!r}")
                if expected is not None and reason != "stop":
                    problems.append(f"finish_reason {reason!r} after a stop string, expected 'stop'")
        self.add(
            "stop-handling",
            problems,
            f"stop {stop!r} cut the greedy answer exactly before it, finish_reason 'stop'",
            outcome.latency_s,
        )

    def check_determinism(self, greedy: ValidationSample) -> None:
        base = self.responses.get(greedy.name)
        outcome = self.session.predict(greedy.request)
        problems: list[str] = []
        if base is None or not outcome.ok:
            problems.append(f"no answer to compare: {outcome.message if not outcome.ok else greedy.name}")
        else:
            first, second = _payload(self.task, base), _payload(self.task, outcome.response)
            if first != second:
                problems.append(
                    f"two runs at temperature 0 differ: {str(first)[:200]!r} vs {str(second)[:200]!r}"
                )
        what = "vectors" if self.task == EMBEDDINGS else "answers (temperature 0)"
        self.add("determinism", problems, f"two runs gave identical {what}", outcome.latency_s)

    def check_context_limit(self, greedy: ValidationSample) -> None:
        window = self.session.context_window
        problems: list[str] = []
        if window is None:
            # Without the engine's number, far beyond any window a CPU model here would have.
            window = 32_768
        long_text = "hello " * (window + 64)
        field = "messages" if self.task == CHAT else "prompt"
        long_req = dict(greedy.request)
        long_req[field] = [{"role": "user", "content": long_text}] if self.task == CHAT else long_text
        overflow_req = {**greedy.request, "max_tokens": window + 1}
        latency = 0.0
        refusals: list[str] = []
        for what, req in (("over-long prompt", long_req), (f"max_tokens={window + 1}", overflow_req)):
            outcome = self.session.predict(req)
            latency = max(latency, outcome.latency_s)
            message = (outcome.message or "")[:300]
            if outcome.ok:
                problems.append(f"{what} was answered instead of refused (window {window})")
            elif not _is_clear_refusal(outcome):
                problems.append(f"{what}: unclear error {outcome.error_type}: {message}")
            else:
                refusals.append(f"{what} refused ({outcome.error_type}: {message})")
        detail = "; ".join(refusals)
        self.add("context-limit", problems, detail, latency)

    def check_embeddings(self) -> None:
        problems: list[str] = []
        dims: set[int] = set()
        vectors: dict[str, list[list[float]]] = {}
        for name, resp in self.responses.items():
            vecs = [_vector(d["embedding"]) for d in resp["data"]]
            vectors[name] = vecs
            for i, vec in enumerate(vecs):
                dims.add(len(vec))
                if not vec or not all(math.isfinite(x) for x in vec):
                    problems.append(f"{name}[{i}]: empty or non-finite vector")
                elif _norm(vec) == 0.0:
                    problems.append(f"{name}[{i}]: zero vector")
        if len(dims) > 1:
            problems.append(f"vectors of different sizes: {sorted(dims)}")
        pair = vectors.get("embed-pair")
        if pair is not None and len(pair) == 2 and _cosine(pair[0], pair[1]) > 0.9999:
            problems.append("'Hello' and 'Hello, how are you?' got the same vector (no pooling?)")
        dim = next(iter(dims)) if len(dims) == 1 else None
        self.add("embeddings-dimension", problems, f"{dim} dimensions, finite, distinct texts distinct")
        if dim is None:
            return
        want = max(1, dim // 2)
        outcome = self.session.predict({"input": ["Hello", "Paris"], "dimensions": want})
        norm_problems: list[str] = []
        if not outcome.ok:
            norm_problems.append(f"dimensions={want}: {outcome.error_type}: {outcome.message}")
        else:
            norm_problems += _schema_problems(self.task, outcome.response)
            for d in outcome.response.get("data", []) if not norm_problems else []:
                vec = _vector(d["embedding"])
                if len(vec) != want:
                    norm_problems.append(f"dimensions={want} gave {len(vec)} values")
                elif abs(_norm(vec) - 1.0) > _NORM_TOLERANCE:
                    norm_problems.append(f"dimensions={want} gave norm {_norm(vec):.5f}, expected 1")
        self.add(
            "embeddings-norm",
            norm_problems,
            f"dimensions={want} gives unit vectors of that size",
            outcome.latency_s,
        )

    def check_latency(self) -> None:
        lat = [c.latency_s for c in self.checks if c.name.startswith("sample:") and c.latency_s is not None]
        if not lat:
            self.add("latency", ["no sample answered"], "")
            return
        worst = max(lat)
        problems = []
        if self.max_latency_s is not None and worst > self.max_latency_s:
            problems.append(f"slowest sample took {worst:.3f} s > max_latency_s {self.max_latency_s}")
        self.add(
            "latency",
            problems,
            f"p50 {statistics.median(lat):.3f} s, max {worst:.3f} s over {len(lat)} samples",
        )


# Fields OpenAI always sends, by path ("[]" walks a list). The response models fill some of them with
# defaults (id, object, created, role) for building responses; a checked answer must carry them itself.
_REQUIRED_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    CHAT: {
        "": ("id", "object", "created", "model", "choices", "usage"),
        "choices[]": ("index", "message", "finish_reason"),
        "choices[].message": ("role",),
    },
    COMPLETIONS: {
        "": ("id", "object", "created", "model", "choices", "usage"),
        "choices[]": ("index", "text", "finish_reason"),
    },
    EMBEDDINGS: {
        "": ("object", "data", "model", "usage"),
        "data[]": ("object", "index", "embedding"),
    },
}


def _at(response: Mapping[str, Any], path: str) -> list[tuple[str, Any]]:
    """The objects at `path` ("choices[].message") with their concrete locations ("choices.0.message")."""
    found: list[tuple[str, Any]] = [("", response)]
    for step in path.split(".") if path else []:
        key, many = step.removesuffix("[]"), step.endswith("[]")
        nxt: list[tuple[str, Any]] = []
        for where, obj in found:
            value = obj.get(key) if isinstance(obj, Mapping) else None
            loc = f"{where}.{key}" if where else key
            if many and isinstance(value, list):
                nxt += [(f"{loc}.{i}", item) for i, item in enumerate(value)]
            elif not many and value is not None:
                nxt.append((loc, value))
        found = nxt
    return found


def _schema_problems(task: str, response: Any) -> list[str]:
    """Problems with an answer as an OpenAI object: required fields present, JSON types exact."""
    model = _RESPONSE_MODELS[task]
    if not isinstance(response, Mapping):
        return [f"response is a {type(response).__name__}, not an OpenAI object"]
    for path, fields in _REQUIRED_FIELDS[task].items():
        for where, obj in _at(response, path):
            missing = [f for f in fields if not isinstance(obj, Mapping) or f not in obj]
            if missing:
                return [f"not a valid {model.__name__}: {where or 'response'} lacks {', '.join(missing)}"]
    try:
        # Strict: "prompt_tokens": "3" or "index": true is a wrong answer, not something to coerce.
        model.model_validate(response, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return [f"not a valid {model.__name__}: {where}: {first.get('msg')}"]
    return []


def _texts(response: Mapping[str, Any]) -> list[str]:
    out = []
    for choice in response.get("choices", []):
        if "message" in choice:
            out.append(choice["message"].get("content") or "")
        else:
            out.append(choice.get("text") or "")
    return out


def _payload(task: str, response: Mapping[str, Any]) -> Any:
    """What must be equal between two greedy runs (ids and timestamps differ by design)."""
    if task == EMBEDDINGS:
        return [d["embedding"] for d in response["data"]]
    return [(c.get("finish_reason"), t) for c, t in zip(response["choices"], _texts(response), strict=True)]


def _describe(task: str, response: Mapping[str, Any]) -> str:
    if task == EMBEDDINGS:
        return f"{len(response['data'])} vectors, usage {response['usage']}"
    text = _texts(response)[0]
    reason = response["choices"][0].get("finish_reason")
    return f"{text[:80]!r} ({reason}, {response['usage']['completion_tokens']} tokens)"


def _is_clear_refusal(outcome: _Outcome) -> bool:
    message = (outcome.message or "").lower()
    return (
        outcome.status_code is not None
        and 400 <= outcome.status_code < 500
        and (outcome.code == "context_length_exceeded" or "context" in message)
    )


def _vector(embedding: Any) -> list[float]:
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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _timeout(timeout_s: float | None) -> float:
    """The given limit, else LLMADAPTER_VALIDATION_TIMEOUT_S (900 s unless set)."""
    return timeout_s if timeout_s is not None else get_settings().validation_timeout_s


@contextlib.contextmanager
def _open_session(model_uri: str, fresh_process: bool, timeout_s: float) -> Iterator[_Session]:
    session: _Session = (
        _SubprocessSession(model_uri, timeout_s) if fresh_process else _InProcessSession(model_uri)
    )
    try:
        yield session
    finally:
        session.close()


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
    LLMADAPTER_VALIDATION_TIMEOUT_S). max_latency_s, when given,
    fails the report if any sample took longer.
    """
    import mlflow.models

    user_samples = _as_samples(samples)
    start = time.perf_counter()
    info = mlflow.models.get_model_info(model_uri)
    task = (info.metadata or {}).get("task") or info.flavors.get("transformers", {}).get("inference_task")
    if task not in _RESPONSE_MODELS:
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
        _checked("signature", check_signature, info.signature, task),
        _checked("flavor-metadata", check_flavor_metadata, info, task),
    ]
    load_s: float | None = None
    with _open_session(model_uri, fresh_process, _timeout(timeout_s)) as session:
        if session.load_error is not None:
            err = session.load_error
            checks.append(
                CheckResult(
                    name="fresh-process-load", passed=False, detail=f"{err.error_type}: {err.message}"
                )
            )
        else:
            load_s = session.load_s
            where = "a fresh process" if fresh_process else "this process"
            checks.append(
                CheckResult(
                    name="fresh-process-load", passed=True, detail=f"loaded in {where}", latency_s=load_s
                )
            )
            stops = bool(_stored_config(info).get("stop"))
            checks += _prediction_checks(session, task, user_samples, max_latency_s, stops)
    passed = all(c.passed for c in checks)
    return ValidationReport(
        model_uri=model_uri,
        task=task,
        status="passed" if passed else "failed",
        checks=checks,
        duration_s=time.perf_counter() - start,
        load_s=load_s,
    )


def _stored_config(info: Any) -> dict[str, Any]:
    """The model_config logged with the model (MLflow keeps the pyfunc's under "config")."""
    pyfunc = info.flavors.get("python_function", {})
    return dict(pyfunc.get("config") or pyfunc.get("model_config") or {})


def _prediction_checks(
    session: _Session,
    task: str,
    user_samples: list[ValidationSample],
    max_latency_s: float | None,
    default_stops: bool = False,
) -> list[CheckResult]:
    runner = _Runner(session, task, max_latency_s, default_stops)
    builtin = _BUILTIN[task]
    samples = [*builtin, *user_samples]
    greedy = builtin[0]
    for sample in samples:
        runner.guard(f"sample:{sample.name}", runner.run_sample, sample)
    runner.guard("usage-arithmetic", runner.check_usage)
    if task == EMBEDDINGS:
        runner.guard("embeddings", runner.check_embeddings)
    else:
        runner.guard("finish-reason", runner.check_finish_reasons, samples)
        runner.guard("stop-handling", runner.check_stop, greedy)
        runner.guard("context-limit", runner.check_context_limit, greedy)
    runner.guard("determinism", runner.check_determinism, greedy)
    runner.guard("latency", runner.check_latency)
    return runner.checks


class SampleAnswer(BaseModel):
    """One sample's answer from one model, for side-by-side comparison (promotion)."""

    name: str
    ok: bool
    latency_s: float
    answer: str


def predict_samples(
    model_uri: str,
    samples: Sequence[ValidationSample | Mapping[str, Any]],
    *,
    fresh_process: bool = True,
    timeout_s: float | None = None,
) -> list[SampleAnswer]:
    """Answer samples with one model (in a fresh process by default): text or error, and latency."""
    wanted = _as_samples(samples)
    with _open_session(model_uri, fresh_process, _timeout(timeout_s)) as session:
        if session.load_error is not None:
            err = f"load failed: {session.load_error.error_type}: {session.load_error.message}"
            return [SampleAnswer(name=s.name, ok=False, latency_s=0.0, answer=err) for s in wanted]
        out = []
        for sample in wanted:
            outcome = session.predict(sample.request)
            if not outcome.ok:
                answer = f"{outcome.error_type}: {outcome.message}"
            elif isinstance(outcome.response, Mapping) and "choices" in outcome.response:
                answer = " | ".join(_texts(outcome.response))
            else:
                answer = json.dumps(outcome.response)[:200]
            out.append(
                SampleAnswer(name=sample.name, ok=outcome.ok, latency_s=outcome.latency_s, answer=answer)
            )
        return out


def raise_for_report(report: ValidationReport) -> None:
    """Raise ValidationFailedError naming the failed checks; do nothing for a passing report."""
    if report.passed:
        return
    failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failed_checks)
    raise ValidationFailedError(
        f"Validation of {report.model_uri} failed: {failed}"[:4000], param="model_uri"
    )


def log_report(report: ValidationReport, run_id: str) -> None:
    """Attach the report to an MLflow run: JSON + markdown artifacts, a status tag, latency metrics."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_dict(run_id, report.model_dump(mode="json"), f"{REPORT_ARTIFACT_DIR}/report.json")
    client.log_text(run_id, report.to_markdown(), f"{REPORT_ARTIFACT_DIR}/report.md")
    client.set_tag(run_id, "validation_status", report.status)
    if report.p50_latency_s is not None:
        client.log_metric(run_id, "validation_p50_latency_s", report.p50_latency_s)
    if report.load_s is not None:
        client.log_metric(run_id, "validation_load_s", report.load_s)


def _main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--worker":
        return _worker_main(args[1])
    if len(args) == 1 and not args[0].startswith("-"):
        report = validate_model(args[0])
        print(report.to_markdown())
        return 0 if report.passed else 1
    print("usage: python -m llmadapter.validation MODEL_URI", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main())
