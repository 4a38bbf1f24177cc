"""Serving follows the registry: a real MLflow registry, real servers on loopback, the openai client.

Two versions of the trained tiny model answer differently (v2's model_config stops at "fox"), so each
answer shows which version produced it; its X-LLMAdapter-Model-Version header must agree.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest
from mlflow.tracking import MlflowClient
from mlflow.webhooks.delivery import _generate_hmac_signature

import llmadapter
from llmadapter import registry
from llmadapter.follow import ModelHost
from llmadapter.server.app import build_app
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from llmadapter.validation import CheckResult, ValidationReport
from tests.conftest import shared_store
from tests.server.conftest import RunningServer, serve, settings, wait_until

pytestmark = pytest.mark.slow
CHAT = "llm/v1/chat"
NAME = "follow-chat"
V2_ANSWER = TRAINED_ANSWER.split("fox")[0]  # v2 stops at "fox"
HEADER = "x-llmadapter-model-version"
SECRET_ENV = "LLMADAPTER_TEST_WEBHOOK_SECRET"
SECRET = "s3cr3t-" + uuid.uuid4().hex


@dataclass
class Versions:
    v1: str
    v2: str
    broken: str  # its weights were removed from the artifact store after registration
    failed: str  # its registry tag says validation failed
    other_task: str  # a completions model registered under the same name


def _log(folder: Path, task: str = CHAT, **config: Any) -> str:
    with mlflow.start_run():
        info = llmadapter.log_model(str(folder), name="model", task=task, model_config=config or None)
    return info.model_uri


def _register(uri: str, revision: str, task: str = CHAT) -> str:
    report = ValidationReport(
        model_uri=uri, task=task, status="passed", checks=[CheckResult(name="signature", passed=True)]
    )
    version, _ = registry.register_version(
        uri, NAME, source="trained", revision=revision, task=task, config_hash=revision, report=report
    )
    return str(version.version)


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory, trained_model: Path, _mlflow_db_template: Path
) -> Iterator[Versions]:
    with shared_store(tmp_path_factory.mktemp("follow"), _mlflow_db_template, "follow"):
        v1 = _register(_log(trained_model), "r1")
        v2 = _register(_log(trained_model, stop=["fox"]), "r2")
        broken_uri = _log(trained_model, stop=["dog"])
        broken = _register(broken_uri, "r3")
        model_id = broken_uri.removeprefix("models:/")
        weights = Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))
        removed = [p.unlink() or p for p in weights.rglob("*.safetensors")]
        assert removed, "the broken version's weights were not found to remove"
        failed = _register(_log(trained_model, stop=["lazy"]), "r4")
        MlflowClient().set_model_version_tag(NAME, failed, registry.TAG_VALIDATION, "failed")
        other = _register(_log(trained_model, task="llm/v1/completions"), "r5", task="llm/v1/completions")
        yield Versions(v1, v2, broken, failed, other)


def _move(version: str) -> None:
    MlflowClient().set_registered_model_alias(NAME, "champion", version)


@dataclass
class Follower:
    server: RunningServer
    host: ModelHost

    def models(self) -> dict[str, Any]:
        card: dict[str, Any] = httpx.get(f"{self.server.url}/v1/models/{NAME}").json()
        return card

    def serving(self) -> str | None:
        return self.models().get("version")

    def ready(self) -> dict[str, Any]:
        detail: dict[str, Any] = httpx.get(f"{self.server.url}/ready").json()["serving"][NAME]
        return detail


@contextmanager
def following(versions: Versions, **overrides: Any) -> Iterator[Follower]:
    """A server of models:/NAME@champion (alias at v1 first) that follows the alias."""
    _move(versions.v1)
    config = settings(**{"alias_poll_s": 0.2, "swap_retry_s": 3600, **overrides})
    app = build_app({}, config, loading=[NAME])
    host = ModelHost(
        app.state.models,
        NAME,
        f"models:/{NAME}@champion",
        poll_s=config.alias_poll_s,
        retry_s=config.swap_retry_s,
        strategy=config.swap_strategy,
    )
    with serve(app) as running:
        host.load()
        host.follow()
        try:
            yield Follower(running, host)
        finally:
            host.close()


def _wait_serving(server: Follower, version: str) -> None:
    wait_until(lambda: server.serving() == version, message=f"version {version} to serve")


def _ask(client: openai.OpenAI) -> tuple[str, str]:
    """(version header, answer) of one greedy chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": TRAINED_PROMPT}], temperature=0
    )
    answer = raw.parse()
    assert answer.model == NAME  # the registered name, whatever version answers
    return raw.headers[HEADER], answer.choices[0].message.content or ""


@dataclass
class Load:
    """Closed-loop clients asking throughout; every answer recorded with its header."""

    server: RunningServer
    clients: int = 4
    answers: list[tuple[float, str, str]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        client = self.server.client()
        while not self._stop.is_set():
            try:
                version, text = _ask(client)
                self.answers.append((time.monotonic(), version, text))
            except Exception as exc:
                self.failures.append(exc)

    @contextmanager
    def running(self) -> Iterator[Load]:
        threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=30)

    def answered_by(self, version: str, after: float) -> int:
        return sum(1 for t, v, _ in list(self.answers) if v == version and t >= after)

    def first_answer_by(self, version: str, after: float) -> float:
        return min(t for t, v, _ in self.answers if v == version and t >= after)


def _expected(versions: Versions) -> dict[str, str]:
    return {versions.v1: TRAINED_ANSWER, versions.v2: V2_ANSWER}


@pytest.mark.parametrize("strategy", ["overlap", "drain"])
def test_alias_moves_swap_versions_under_load_with_zero_failed_requests(
    versions: Versions, strategy: str
) -> None:
    with following(versions, swap_strategy=strategy) as server:
        assert server.serving() == versions.v1
        load = Load(server.server)
        switches = []
        with load.running():
            wait_until(lambda: len(load.answers) > 20, message="answers from v1")
            for target in (versions.v2, versions.v1):  # promotion, then rollback: both alias moves
                moved = time.monotonic()
                _move(target)
                wait_until(lambda t=target: server.serving() == t, message=f"version {target} to serve")
                wait_until(lambda t=target, m=moved: load.answered_by(t, m) >= 8, message="new answers")
                switches.append(load.first_answer_by(target, moved) - moved)
        assert load.failures == []
        expected = _expected(versions)
        # Every answer shows the behaviour of the version its header names.
        mismatched = [(v, text) for _, v, text in load.answers if expected.get(v) != text]
        assert mismatched == []
        assert {v for _, v, _ in load.answers} == {versions.v1, versions.v2}
        print(f"{strategy}: {len(load.answers)} answers; alias move -> first new answer: {switches}")
        state = server.ready()
        assert state["version"] == versions.v1 and state["alias"] == "champion" and state["following"]
        assert "swap_failure" not in state
        assert server.server.metric("llmadapter_model_swaps_total", model=NAME, outcome="swapped") == 2
        assert server.server.metric("llmadapter_model_version_info", model=NAME, version=versions.v1) == 1


def test_a_broken_version_is_refused_while_the_current_one_keeps_answering(versions: Versions) -> None:
    with following(versions) as server:
        load = Load(server.server, clients=2)
        with load.running():
            _move(versions.broken)
            wait_until(lambda: "swap_failure" in server.ready(), message="the swap to fail")
            time.sleep(0.5)
        assert load.failures == []
        assert {v for _, v, _ in load.answers} == {versions.v1}
        assert server.serving() == versions.v1
        failure = server.models()["swap_failure"]
        assert failure.startswith(f"version {versions.broken}:")
        assert server.ready()["swap_failure"] == failure
        assert server.server.metric("llmadapter_model_swaps_total", model=NAME, outcome="failed") == 1
        assert server.server.metric("llmadapter_model_swap_failing", model=NAME) == 1
        # Not retried on every poll (swap_retry_s is an hour here): still one failure after more polls.
        time.sleep(1.0)
        assert server.server.metric("llmadapter_model_swaps_total", model=NAME, outcome="failed") == 1
        # The alias moving on to a good version swaps at once and clears the failure.
        _move(versions.v2)
        wait_until(lambda: server.serving() == versions.v2, message="v2 to serve")
        assert "swap_failure" not in server.models()
        assert _ask(server.server.client()) == (versions.v2, V2_ANSWER)


@pytest.mark.parametrize("which", ["failed", "other_task"])
def test_a_version_the_registry_marks_unservable_is_refused_without_loading(
    versions: Versions, which: str
) -> None:
    with following(versions) as server:
        _move(getattr(versions, which))
        wait_until(lambda: "swap_failure" in server.ready(), message="the refusal")
        failure = server.ready()["swap_failure"]
        assert ("validation failed" if which == "failed" else "serves llm/v1/completions") in failure
        assert server.server.metric("llmadapter_model_swaps_total", model=NAME, outcome="refused") == 1
        assert _ask(server.server.client()) == (versions.v1, TRAINED_ANSWER)


def test_streams_open_across_a_swap_complete_on_the_version_they_started_on(versions: Versions) -> None:
    with following(versions) as server:
        client = server.server.client()
        # EOS and <|im_end|> forbidden: each stream generates max_tokens tokens.
        streams = [
            client.chat.completions.with_raw_response.create(
                model=NAME,
                messages=[{"role": "user", "content": TRAINED_PROMPT}],
                temperature=0,
                max_tokens=200,
                logit_bias={"0": -100, "2": -100},
                stream=True,
                stream_options={"include_usage": True},
            )
            for _ in range(64)
        ]
        assert {s.headers[HEADER] for s in streams} == {versions.v1}
        iterators = [iter(s.parse()) for s in streams]
        firsts = [next(it) for it in iterators]
        assert all(f.choices for f in firsts)
        _move(versions.v2)
        wait_until(lambda: server.serving() == versions.v2, message="v2 to serve")
        assert _ask(client) == (versions.v2, V2_ANSWER)  # new requests get v2 while the streams are open
        for first, it in zip(firsts, iterators, strict=True):
            chunks = [first, *it]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text.startswith(TRAINED_ANSWER)  # v1's answer (v2 would stop at "fox")
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 200
        # The old engine is closed once its streams are done.
        wait_until(lambda: server.host.swapper._retiring[-1].is_alive() is False, message="v1 to close")


def test_a_deleted_alias_keeps_the_version_serving_and_says_so(versions: Versions) -> None:
    with following(versions) as server:
        MlflowClient().delete_registered_model_alias(NAME, "champion")
        wait_until(lambda: "alias_problem" in server.ready(), message="the missing alias to show")
        assert "does not exist" in server.ready()["alias_problem"]
        assert _ask(server.server.client()) == (versions.v1, TRAINED_ANSWER)
        _move(versions.v2)
        wait_until(lambda: server.serving() == versions.v2, message="v2 to serve")
        assert "alias_problem" not in server.ready()


def test_a_fixed_version_uri_and_following_off_never_change(versions: Versions, tmp_path: Path) -> None:
    _move(versions.v1)
    for uri, poll in ((f"models:/{NAME}/{versions.v1}", 0.1), (f"models:/{NAME}@champion", 0)):
        app = build_app({}, settings(alias_poll_s=poll), loading=[NAME])
        host = ModelHost(app.state.models, NAME, uri, poll_s=poll)
        assert host.follower is None
        with serve(app) as running:
            host.load()
            host.follow()
            _move(versions.v2)
            time.sleep(0.5)
            assert _ask(running.client()) == (versions.v1, TRAINED_ANSWER)
            host.close()
        _move(versions.v1)


# -- webhooks: deliveries signed with MLflow's own signing function ----------------------------------


def _delivery(
    body: dict[str, Any],
    *,
    secret: str | None = SECRET,
    stamp: int | None = None,
    delivery: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A delivery as MLflow sends it: the JSON body and its headers, signed with `secret`."""
    payload = json.dumps(body)
    delivery_id = delivery or str(uuid.uuid4())
    timestamp = str(int(time.time()) if stamp is None else stamp)
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
    }
    if secret is not None:
        headers["X-MLflow-Signature"] = _generate_hmac_signature(secret, delivery_id, timestamp, payload)
    return payload.encode(), headers


def _alias_moved(version: str, name: str = NAME) -> dict[str, Any]:
    return {
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "2026-12-03T00:00:00+00:00",
        "data": {"name": name, "alias": "champion", "version": version},
    }


def test_signed_deliveries_swap_at_once_and_bad_ones_change_nothing(
    versions: Versions, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    # Polling every hour: only a delivery can make this server see the alias move.
    with following(versions, alias_poll_s=3600, webhook_secret_env=SECRET_ENV) as server:
        hook = f"{server.server.url}/webhooks/mlflow"
        _move(versions.v2)
        bad = {
            "unsigned": (_delivery(_alias_moved(versions.v2), secret=None), 401, "missing_signature"),
            "wrong secret": (_delivery(_alias_moved(versions.v2), secret="guess"), 401, "invalid_signature"),
            "stale": (
                _delivery(_alias_moved(versions.v2), stamp=int(time.time()) - 3600),
                400,
                "stale_timestamp",
            ),
        }
        for what, ((body, headers), status, code) in bad.items():
            answer = httpx.post(hook, content=body, headers=headers)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), what
        tampered_body, headers = _delivery(_alias_moved(versions.v2))
        answer = httpx.post(hook, content=tampered_body.replace(b"champion", b"champio2"), headers=headers)
        assert answer.status_code == 401
        time.sleep(0.5)
        assert server.serving() == versions.v1  # nothing re-resolved

        body, headers = _delivery(_alias_moved(versions.v2))
        answer = httpx.post(hook, content=body, headers=headers)
        assert answer.status_code == 200 and answer.json()["status"] == "accepted"
        assert answer.json()["models"] == [NAME]
        _wait_serving(server, versions.v2)
        # MLflow retries a delivery it thinks failed: the same id again is acknowledged, not acted on.
        again = httpx.post(hook, content=body, headers=headers)
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        other = httpx.post(
            hook, content=(d := _delivery(_alias_moved("1", name="someone-else")))[0], headers=d[1]
        )
        assert other.json()["status"] == "ignored"
    assert SECRET not in caplog.text


def test_webhooks_are_off_without_a_secret(versions: Versions) -> None:
    with following(versions, webhook_secret_env="LLMADAPTER_TEST_NO_SUCH_SECRET") as server:
        body, headers = _delivery(_alias_moved(versions.v2))
        answer = httpx.post(f"{server.server.url}/webhooks/mlflow", content=body, headers=headers)
        assert answer.status_code == 404
        assert "LLMADAPTER_TEST_NO_SUCH_SECRET" in answer.json()["error"]["message"]
