"""validate_model and predict_samples on real logged tiny models, and on a scripted pyfunc's defects."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmadapter.catalog import CHAT, COMPLETIONS, EMBEDDINGS
from llmadapter.errors import ValidationFailedError
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT, build_tiny_model
from llmadapter.validation import ValidationSample, predict_samples, raise_for_report, validate_model
from tests.validation.models import log_scripted, log_source

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


def test_chat_model_passes_in_a_fresh_process(store: Path, trained_model: Path) -> None:
    uri = log_source(trained_model, CHAT)
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
    report = validate_model(log_source(tiny_llama, COMPLETIONS), fresh_process=False)

    assert report.passed, report.to_markdown()
    assert "sample:completion-greedy" in {c.name for c in report.checks}


def test_embeddings_model_passes_with_dimension_and_norm_checks(store: Path, minilm: Path) -> None:
    uri = log_source(minilm, EMBEDDINGS)
    report = validate_model(uri, fresh_process=False)

    assert report.passed, report.to_markdown()
    checks = {c.name: c for c in report.checks}
    assert "384 dimensions" in checks["embeddings-dimension"].detail
    assert checks["embeddings-norm"].passed and checks["determinism"].passed
    # An answer that is not text is shown as the start of its JSON.
    (answer,) = predict_samples(uri, [{"input": "Hello"}], fresh_process=False)
    assert answer.ok and answer.answer.startswith('{"object": "list", "data": [{"object": "embedding"')


def test_a_wrong_expected_answer_fails_and_names_the_sample(store: Path, tiny_gpt2: Path) -> None:
    uri = log_source(tiny_gpt2, CHAT)
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

    report = validate_model(log_source(short, CHAT), fresh_process=False)

    assert not report.passed
    failed = {c.name: c.detail for c in report.failed_checks}
    assert "ContextLengthError" in failed["sample:chat-greedy"]


def test_mlflow_native_pyfunc_fails_validation(store: Path, tiny_gpt2: Path) -> None:
    """MLflow's own llm/v1 pyfunc, on the same model: the checks catch its defects (DESIGN.md)."""
    report = validate_model(log_source(tiny_gpt2, CHAT, native_pyfunc=True), fresh_process=False)

    assert not report.passed
    failed = {c.name for c in report.failed_checks}
    assert {"flavor-metadata", "context-limit"} <= failed, report.to_markdown()


def test_a_model_without_an_llm_task_fails_without_loading(store: Path) -> None:
    report = validate_model(log_scripted("no-id", task="text-classification"), fresh_process=False)

    assert [(c.name, c.detail) for c in report.checks] == [
        ("flavor-metadata", "no llm/v1 task in the model: 'text-classification'")
    ]
    assert report.task == "text-classification" and not report.passed


def test_a_model_that_cannot_load_answers_every_sample_with_the_load_error(store: Path) -> None:
    answers = predict_samples(
        "models:/no-such-model/1", [{"messages": []}, {"messages": []}], fresh_process=False
    )

    assert [(a.name, a.ok) for a in answers] == [("user-0", False), ("user-1", False)]
    assert all(a.answer.startswith("load failed: ") for a in answers)


# --- answers the engine never gives, from a real pyfunc model that returns them ------------------------


def test_stop_after_all_max_tokens_without_a_stop_string_fails_the_finish_reason_check(store: Path) -> None:
    uri = log_scripted("stop-at-limit")
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
    # The engine applies the model_config's stop strings to every request, so any answer may end on one.
    report = validate_model(log_scripted("stop-at-limit", model_config={"stop": ["."]}), fresh_process=False)

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
    report = validate_model(log_scripted(flaw), fresh_process=False)

    assert not report.passed
    (greedy,) = [c for c in report.checks if c.name == "sample:chat-greedy"]
    assert not greedy.passed
    assert problem in greedy.detail


def test_a_check_that_raises_on_a_malformed_answer_fails_that_check(store: Path) -> None:
    # A base64 embedding that is not base64: the schema allows a string, decoding it raises.
    report = validate_model(log_scripted("bad-base64", EMBEDDINGS), fresh_process=False)

    assert not report.passed
    failed = {c.name: c.detail for c in report.failed_checks}
    assert failed["embeddings"].startswith("the check raised binascii.Error")
