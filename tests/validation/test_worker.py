"""llmadapter.validation.worker: the model loaded in a fresh worker process (or this one), its facts,
deaths and timeouts, on real logged models."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest

from llmadapter.catalog import CHAT, EMBEDDINGS
from llmadapter.errors import ContextLengthError
from llmadapter.validation import validate_model
from llmadapter.validation.worker import (
    InProcessSession,
    ModelFacts,
    Outcome,
    WorkerSession,
    child_env,
    error_outcome,
    read_facts,
)
from tests.validation.models import log_scripted, log_source

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


class _Loaded:
    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def get_raw_model(self) -> Any:
        if self.raw is None:
            raise NotImplementedError("`get_raw_model` is not implemented by the underlying model")
        return self.raw


@pytest.mark.parametrize(
    ("raw", "facts"),
    [
        (
            SimpleNamespace(inference_task=CHAT, context_window=64, config=SimpleNamespace(stop=["###"])),
            ModelFacts(task=CHAT, context_window=64, default_stops=["###"]),
        ),
        (
            SimpleNamespace(
                inference_task=EMBEDDINGS, context_window=512, config=SimpleNamespace(dimensions=None)
            ),
            ModelFacts(task=EMBEDDINGS, context_window=512),
        ),
        (SimpleNamespace(task="text-generation"), ModelFacts()),
        (None, ModelFacts()),
    ],
    ids=["generation-engine", "embeddings-engine", "not-our-engine", "no-raw-model"],
)
def test_the_facts_come_from_the_engine_behind_get_raw_model(raw: Any, facts: ModelFacts) -> None:
    assert read_facts(_Loaded(raw)) == facts


def test_an_error_outcome_names_our_error_behind_a_wrapper() -> None:
    try:
        try:
            raise ContextLengthError("prompt over the window")
        except ContextLengthError as ours:
            raise RuntimeError("MLflow failed to predict") from ours
    except RuntimeError as wrapped:
        outcome = error_outcome(wrapped, 0.5)

    assert (outcome.ok, outcome.error_type, outcome.status_code) == (False, "ContextLengthError", 400)
    assert (outcome.code, outcome.error) == (
        "context_length_exceeded",
        "ContextLengthError: prompt over the window",
    )


def test_non_finite_numbers_cross_the_channel_as_numbers() -> None:
    sent = Outcome(ok=True, response={"embedding": [math.nan, math.inf]})

    got = Outcome.model_validate_json(sent.model_dump_json())

    assert math.isnan(got.response["embedding"][0]) and got.response["embedding"][1] == math.inf


def test_the_worker_gets_our_mlflow_http_limits_unless_the_user_set_mlflows_own(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("LLMADAPTER_MLFLOW_HTTP_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own MLflow setting

    env = child_env()

    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # a dead tracking server fails the load fast
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


def test_a_fresh_worker_loads_the_model_and_reports_the_engines_facts(store: Path, tiny_gpt2: Path) -> None:
    uri = log_source(tiny_gpt2, CHAT, model_config={"stop": ["###"]})
    expected = ModelFacts(
        task=CHAT,
        context_window=256,
        default_stops=["###"],
        weight_format={"dtype": "float32", "quantization": "none", "device": "cpu"},
    )

    worker = WorkerSession(uri, timeout_s=600)
    try:
        assert worker.loaded.error is None, worker.loaded.error
        assert worker.loaded.facts == expected
        assert worker.loaded.load_s is not None and worker.loaded.load_s > 0
        outcome = worker.predict(HELLO)
        assert outcome.ok and outcome.response["object"] == "chat.completion"
        assert outcome.latency_s > 0
    finally:
        worker.close()
    in_process = InProcessSession(uri)
    assert in_process.loaded.facts == expected  # the same facts, read the same way, in this process


def test_a_worker_that_dies_is_reported_with_the_end_of_its_output(store: Path) -> None:
    worker = WorkerSession(log_scripted("exit"), timeout_s=600)
    try:
        assert worker.loaded.error is None, worker.loaded.error
        first, second = worker.predict(HELLO), worker.predict(HELLO)
    finally:
        worker.close()

    for outcome in (first, second):
        assert (outcome.ok, outcome.error_type) == (False, "ProcessExited")
        assert "exited with code 3" in str(outcome.message)
        assert "scripted model: exiting with code 3" in str(outcome.message)


def test_a_model_that_cannot_load_in_a_fresh_process_fails_cleanly(store: Path, tiny_gpt2: Path) -> None:
    uri = log_source(tiny_gpt2, CHAT)
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


@pytest.mark.parametrize("from_setting", [False, True], ids=["argument", "LLMADAPTER_VALIDATION_TIMEOUT_S"])
def test_a_validation_that_runs_past_its_timeout_fails_and_stops_the_process(
    store: Path, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch, from_setting: bool
) -> None:
    uri = log_source(tiny_gpt2, CHAT)
    # 0.5 s is far less than a fresh process needs to load a model.
    if from_setting:
        monkeypatch.setenv("LLMADAPTER_VALIDATION_TIMEOUT_S", "0.5")

    report = validate_model(uri) if from_setting else validate_model(uri, timeout_s=0.5)

    (load,) = [c for c in report.checks if c.name == "fresh-process-load"]
    assert not report.passed
    assert "timed out" in load.detail


def test_a_worker_past_its_deadline_is_killed(store: Path) -> None:
    worker = WorkerSession(log_scripted("no-id"), timeout_s=0.5)
    try:
        assert worker.loaded.error is not None and worker.loaded.error.error_type == "TimeoutError"
        after = worker.predict(HELLO)  # answered at once: the worker is gone
    finally:
        worker.close()

    assert after.error_type == "ProcessExited" and "exited with code -9" in str(after.message)
