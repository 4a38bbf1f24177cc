"""llmadapter.validation: signature conformance and sample predictions, on real logged tiny models."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pytest
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Schema

import llmadapter
from llmadapter.catalog import build_signature
from llmadapter.errors import ValidationFailedError
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT, build_tiny_model
from llmadapter.validation import (
    CheckResult,
    ValidationReport,
    ValidationSample,
    check_signature,
    log_report,
    predict_samples,
    raise_for_report,
    validate_model,
)

CHAT, COMPLETIONS, EMBEDDINGS = "llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"
GENERATION_CHECKS = {
    "signature",
    "flavor-metadata",
    "fresh-process-load",
    "usage-arithmetic",
    "finish-reason",
    "stop-handling",
    "context-limit",
    "determinism",
    "latency",
}


# --- pure logic ---------------------------------------------------------------------------------------


def _report(*checks: CheckResult) -> ValidationReport:
    status = "passed" if all(c.passed for c in checks) else "failed"
    return ValidationReport(model_uri="models:/m/1", task=CHAT, status=status, checks=list(checks))


def test_report_summary_markdown_and_tags() -> None:
    report = _report(
        CheckResult(name="signature", passed=True, detail="ok"),
        CheckResult(name="sample:a", passed=True, latency_s=0.2),
        CheckResult(name="sample:b", passed=False, detail="answer | had a pipe", latency_s=0.4),
    )

    assert not report.passed
    assert report.summary() == (
        "failed: 2/3 checks passed, sample latency p50 0.300 s, max 0.400 s; failed: sample:b"
    )
    markdown = report.to_markdown()
    assert "## Validation FAILED: `models:/m/1`" in markdown
    assert "| sample:b | **FAIL** | 0.400 | answer \\| had a pipe |" in markdown
    assert report.to_tags() == {
        "validation_status": "failed",
        "validation_checks": "2/3",
        "validation_p50_latency_s": "0.3000",
        "validation_max_latency_s": "0.4000",
        "validation_failed": "sample:b",
    }
    with pytest.raises(ValidationFailedError, match="sample:b: answer"):
        raise_for_report(report)
    raise_for_report(_report(CheckResult(name="signature", passed=True)))  # a passing report does not raise


@pytest.mark.parametrize(
    ("drop", "retype", "problem"),
    [
        (None, None, None),
        ("stop", None, "inputs.stop missing"),
        (None, ("temperature", DataType.long), "inputs.temperature is"),
        (None, ("max_tokens", None), "inputs.max_tokens is"),
    ],
    ids=["ours-is-complete", "missing-field", "wrong-type", "wrong-requiredness"],
)
def test_signature_must_contain_every_mlflow_field(
    drop: str | None, retype: tuple[str, DataType | None] | None, problem: str | None
) -> None:
    ours = build_signature(CHAT)
    inputs = []
    for spec in ours.inputs.inputs:
        if spec.name == drop:
            continue
        if retype is not None and spec.name == retype[0]:
            # A new type keeps requiredness; no new type flips requiredness.
            kind = retype[1] or spec.type
            spec = ColSpec(kind, spec.name, required=spec.required if retype[1] else not spec.required)
        inputs.append(spec)
    result = check_signature(ModelSignature(Schema(inputs), ours.outputs), CHAT)

    assert result.passed is (problem is None)
    if problem:
        assert problem in result.detail


def test_a_model_without_signature_fails_the_signature_check() -> None:
    assert not check_signature(None, CHAT).passed


# --- real models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One SQLite store for the module (creating MLflow's tables costs seconds)."""
    root = tmp_path_factory.mktemp("validation")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("validation", (root / "art").as_uri()))
        yield root
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def _log(source: Path | str, task: str, **kwargs: object) -> str:
    with mlflow.start_run():
        return llmadapter.log_model(str(source), name="model", task=task, **kwargs).model_uri  # type: ignore[arg-type]


def test_chat_model_passes_in_a_fresh_process(store: Path, trained_model: Path) -> None:
    uri = _log(trained_model, CHAT)
    sample = ValidationSample(
        name="learned",
        request={
            "messages": [{"role": "user", "content": TRAINED_PROMPT}],
            "temperature": 0,
            "max_tokens": 12,
        },
        expect=TRAINED_ANSWER[:15],
    )

    report = validate_model(uri, samples=[sample])

    assert report.passed, report.to_markdown()
    names = {c.name for c in report.checks}
    assert GENERATION_CHECKS | {"sample:chat-greedy", "sample:chat-n2-seed", "sample:learned"} <= names
    assert report.load_s is not None and report.load_s > 0
    assert all(c.latency_s is not None for c in report.checks if c.name.startswith("sample:"))
    stop = next(c for c in report.checks if c.name == "stop-handling")
    assert "cut the greedy answer" in stop.detail
    context = next(c for c in report.checks if c.name == "context-limit")
    assert "over-long prompt refused" in context.detail

    # The same model answers samples side by side (what the promote flow shows a person).
    (answer,) = predict_samples(uri, [sample], fresh_process=False)
    assert answer.ok and answer.answer.startswith(TRAINED_ANSWER[:15])


def test_completions_model_passes(store: Path, tiny_llama: Path) -> None:
    report = validate_model(_log(tiny_llama, COMPLETIONS), fresh_process=False)

    assert report.passed, report.to_markdown()
    assert "sample:completion-greedy" in {c.name for c in report.checks}


def test_embeddings_model_passes_with_dimension_and_norm_checks(store: Path, minilm: Path) -> None:
    report = validate_model(_log(minilm, EMBEDDINGS), fresh_process=False)

    assert report.passed, report.to_markdown()
    checks = {c.name: c for c in report.checks}
    assert "384 dimensions" in checks["embeddings-dimension"].detail
    assert checks["embeddings-norm"].passed and checks["determinism"].passed


def test_a_wrong_expected_answer_fails_and_names_the_sample(store: Path, tiny_gpt2: Path) -> None:
    uri = _log(tiny_gpt2, CHAT)
    sample = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 4}

    report = validate_model(
        uri, samples=[ValidationSample(name="zebra", request=sample, expect="zebra")], fresh_process=False
    )

    assert not report.passed
    assert [c.name for c in report.failed_checks] == ["sample:zebra"]
    with pytest.raises(ValidationFailedError, match="sample:zebra"):
        raise_for_report(report)


def test_too_small_a_context_window_fails_the_samples(store: Path, model_cache: Path) -> None:
    short = build_tiny_model(model_cache / "short-context-gpt2", "gpt2", n_positions=24)

    report = validate_model(_log(short, CHAT), fresh_process=False)

    assert not report.passed
    failed = {c.name: c.detail for c in report.failed_checks}
    assert "ContextLengthError" in failed["sample:chat-greedy"]


def test_mlflow_native_pyfunc_fails_validation(store: Path, tiny_gpt2: Path) -> None:
    """MLflow's own llm/v1 pyfunc, on the same model: the checks catch its defects (DESIGN.md)."""
    report = validate_model(_log(tiny_gpt2, CHAT, native_pyfunc=True), fresh_process=False)

    assert not report.passed
    failed = {c.name for c in report.failed_checks}
    assert {"flavor-metadata", "context-limit"} <= failed, report.to_markdown()


def test_a_model_that_cannot_load_in_a_fresh_process_fails_cleanly(store: Path, tiny_gpt2: Path) -> None:
    uri = _log(tiny_gpt2, CHAT)
    # Break the stored artifact itself: its weights are gone.
    artifact_root = Path(
        mlflow.MlflowClient()
        .get_logged_model(uri.removeprefix("models:/"))
        .artifact_location.removeprefix("file://")
    )
    shutil.rmtree(artifact_root / "model")

    report = validate_model(uri)

    assert not report.passed
    (load,) = [c for c in report.checks if c.name == "fresh-process-load"]
    assert not load.passed
    assert "model" in load.detail  # the loader's own error, e.g. the missing weights folder


def test_log_report_attaches_json_markdown_and_a_tag_to_the_run(store: Path) -> None:
    report = _report(CheckResult(name="sample:a", passed=True, latency_s=0.5))
    with mlflow.start_run() as run:
        pass

    log_report(report, run.info.run_id)

    saved = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/validation/report.json")
    assert ValidationReport.model_validate(saved) == report
    assert "## Validation passed" in mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/validation/report.md"
    )
    finished = mlflow.get_run(run.info.run_id)
    assert finished.data.tags["validation_status"] == "passed"
    assert finished.data.metrics["validation_p50_latency_s"] == 0.5


# --- answers the engine never gives, from a real pyfunc model that returns them ------------------------


class ScriptedAnswers(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """A logged pyfunc model whose answers have one known defect (`flaw`); every generation uses all
    of max_tokens."""

    def __init__(self, flaw: str) -> None:
        self.flaw = flaw

    # No type hints: MLflow would read them as an input schema (and warn that it cannot).
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        if "input" in model_input:
            embedding: list[float] | str = "!!not base64!!" if self.flaw == "bad-base64" else [0.6, 0.8]
            return {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                "model": "scripted",
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        n, max_tokens = model_input.get("n") or 1, model_input.get("max_tokens") or 16
        prompt_tokens: int | str = "3" if self.flaw == "string-tokens" else 3
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "scripted",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "word " * max_tokens},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n * max_tokens,
                "total_tokens": 3 + n * max_tokens,
            },
        }
        if self.flaw == "no-id":
            del answer["id"]
        return answer


def _log_scripted(flaw: str, task: str = CHAT, model_config: dict[str, Any] | None = None) -> str:
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ScriptedAnswers(flaw),
            metadata={"task": task},
            model_config=model_config,
        )
    return str(info.model_uri)


def test_stop_after_all_max_tokens_without_a_stop_string_fails_the_finish_reason_check(store: Path) -> None:
    uri = _log_scripted("stop-at-limit")
    with_stop = ValidationSample(
        name="with-stop",
        request={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stop": ["."]},
    )

    report = validate_model(uri, samples=[with_stop], fresh_process=False)

    (finish,) = [c for c in report.checks if c.name == "finish-reason"]
    assert not finish.passed
    assert "chat-length: 'stop' after all max_tokens=2 tokens without a stop string" in finish.detail
    assert "chat-n2-seed: 'stop'" in finish.detail  # 2 choices, 2 * 8 tokens: both hit the limit
    # A stop string may match in the last allowed token: "stop" at the limit is right there.
    assert "with-stop" not in finish.detail


def test_stop_at_the_limit_is_right_when_the_model_config_has_stop_strings(store: Path) -> None:
    # The logged model_config's stop strings apply to every request, so any answer may end on one.
    report = validate_model(_log_scripted("stop-at-limit", model_config={"stop": ["."]}), fresh_process=False)

    (finish,) = [c for c in report.checks if c.name == "finish-reason"]
    assert finish.passed, finish.detail


@pytest.mark.parametrize(
    ("flaw", "problem"),
    [
        ("no-id", "lacks id"),
        ("string-tokens", "usage.prompt_tokens: Input should be a valid integer"),
    ],
    ids=["missing-required-field", "string-for-integer"],
)
def test_answers_are_checked_strictly_against_the_openai_schema(store: Path, flaw: str, problem: str) -> None:
    report = validate_model(_log_scripted(flaw), fresh_process=False)

    assert not report.passed
    (greedy,) = [c for c in report.checks if c.name == "sample:chat-greedy"]
    assert not greedy.passed
    assert problem in greedy.detail


def test_a_check_that_raises_on_a_malformed_answer_fails_that_check(store: Path) -> None:
    # A base64 embedding that is not base64: the schema allows a string, decoding it raises.
    report = validate_model(_log_scripted("bad-base64", EMBEDDINGS), fresh_process=False)

    assert not report.passed
    failed = {c.name: c.detail for c in report.failed_checks}
    assert failed["embeddings"].startswith("the check raised binascii.Error")


@pytest.mark.parametrize("from_setting", [False, True], ids=["argument", "LLMADAPTER_VALIDATION_TIMEOUT_S"])
def test_a_validation_that_runs_past_its_timeout_fails_and_stops_the_process(
    store: Path, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch, from_setting: bool
) -> None:
    uri = _log(tiny_gpt2, CHAT)
    # 0.5 s is far less than a fresh process needs to load a model.
    if from_setting:
        monkeypatch.setenv("LLMADAPTER_VALIDATION_TIMEOUT_S", "0.5")

    report = validate_model(uri) if from_setting else validate_model(uri, timeout_s=0.5)

    (load,) = [c for c in report.checks if c.name == "fresh-process-load"]
    assert not report.passed
    assert "timed out" in load.detail
