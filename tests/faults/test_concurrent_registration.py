"""Identical registrations at the same moment from separate processes, against a real `mlflow server`.

Each trial hands a fresh registered name to PROCESSES processes that wait at one barrier and then all
call llmadapter.registry.register_version with the same model, revision, task and config hash: no
lock, so most trials race (every process finds nothing and registers). Every trial must end with one
version, returned by every process, created by exactly one of them.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest

import llmadapter
from llmadapter import registry
from llmadapter.validation import CheckResult, ValidationReport
from tests.faults.conftest import MlflowServer

pytestmark = pytest.mark.slow

PROCESSES = 4
TRIALS = 20
CHAT = "llm/v1/chat"
TWIN = {"source": "acme/tiny", "revision": "a" * 40, "task": CHAT, "config_hash": "c1"}


def _report(model_uri: str) -> ValidationReport:
    check = CheckResult(name="sample:chat-greedy", passed=True, latency_s=0.1)
    return ValidationReport(model_uri=model_uri, task=CHAT, status="passed", checks=[check])


def _registrar(jobs: Any, barrier: Any, results: Any) -> None:
    """A child process: given the store and model, then each name in turn, wait for the others at the
    barrier and register (until None)."""
    uri, model_uri = jobs.get()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    report = _report(model_uri)
    registry.list_versions("warm-up")  # the first connection, outside the measured race
    results.put(("ready", os.getpid(), None, None, None))
    while (name := jobs.get()) is not None:
        barrier.wait()
        try:
            version, created = registry.register_version(model_uri, name, report=report, **TWIN)
            results.put((name, os.getpid(), version.version, created, None))
        except Exception as exc:  # reported to the test, which fails on it
            results.put((name, os.getpid(), None, None, f"{type(exc).__name__}: {exc}"))


@dataclass
class Registrars:
    jobs: list[Any]
    results: Any

    def send(self, message: object) -> None:
        for q in self.jobs:
            q.put(message)

    def receive(self) -> list[tuple[Any, ...]]:
        return [self.results.get(timeout=180) for _ in self.jobs]


@pytest.fixture(scope="module")
def registrars() -> Iterator[Registrars]:
    """PROCESSES spawned processes, started first so that their imports overlap the server's start."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    jobs = [ctx.Queue() for _ in range(PROCESSES)]
    procs = [ctx.Process(target=_registrar, args=(q, barrier, results), daemon=True) for q in jobs]
    for proc in procs:
        proc.start()
    try:
        yield Registrars(jobs=jobs, results=results)
    finally:
        for q in jobs:
            q.put(None)
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _registrations(db: Path, name: str) -> int:
    """Versions ever registered under `name`, deleted ones included (MLflow keeps their rows)."""
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM model_versions WHERE name=?", (name,)).fetchone()[0])


@pytest.fixture()
def model_uri(mlflow_server: MlflowServer, tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tiny model logged once through the tracking server (its artifacts proxied by it)."""
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(variable, mlflow_server.uri)
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    mlflow.set_experiment("race")
    with mlflow.start_run():
        uri = llmadapter.log_model(str(tiny_gpt2), name="model", task=CHAT).model_uri
    yield uri
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


def test_identical_registrations_at_the_same_moment_leave_one_version(
    registrars: Registrars, mlflow_server: MlflowServer, model_uri: str
) -> None:
    registrars.send((mlflow_server.uri, model_uri))
    assert {kind for kind, *_ in registrars.receive()} == {"ready"}
    raced = 0
    started = time.monotonic()
    for trial in range(TRIALS):
        name = f"race-{trial}"
        registrars.send(name)
        outcomes = registrars.receive()

        assert [error for *_, error in outcomes if error] == [], f"trial {trial}"
        assert len({pid for _, pid, *_ in outcomes}) == PROCESSES and {n for n, *_ in outcomes} == {name}
        versions = {version for _, _, version, _, _ in outcomes}
        assert versions == {1}, f"trial {trial}: the processes returned {sorted(versions)}"
        assert sum(created for *_, created, _ in outcomes) == 1, f"trial {trial}"
        assert [v.version for v in registry.list_versions(name)] == [1], f"trial {trial}"
        raced += _registrations(mlflow_server.db, name) > 1
    print(f"{raced} of {TRIALS} trials raced, {time.monotonic() - started:.1f} s for all of them")
    # The barrier must make them collide, or this test would prove nothing about the race.
    assert raced >= TRIALS // 4  # the race itself was exercised, not only the sequential path
