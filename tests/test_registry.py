"""llmadapter.registry against a real MLflow SQLite registry and real model_uri tiny models."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

import llmadapter
from llmadapter import registry
from llmadapter.errors import NotFoundError, ValidationFailedError
from llmadapter.testing import HubCache
from llmadapter.validation import CheckResult, ValidationReport
from tests.conftest import shared_store

CHAT = "llm/v1/chat"


def _report(uri: str, status: str = "passed") -> ValidationReport:
    check = CheckResult(name="sample:chat-greedy", passed=status == "passed", latency_s=0.25)
    return ValidationReport(model_uri=uri, task=CHAT, status=status, checks=[check])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _mlflow_db_template: Path) -> Iterator[str]:
    """One SQLite store for the module (creating MLflow's tables costs seconds); tests use own names."""
    with shared_store(tmp_path_factory.mktemp("registry"), _mlflow_db_template, "registry") as uri:
        yield uri


@pytest.fixture(scope="module")
def model_uri(store: str, tiny_gpt2: Path) -> str:
    with mlflow.start_run():
        return llmadapter.log_model(str(tiny_gpt2), name="model", task=CHAT).model_uri


@pytest.fixture()
def name(request: pytest.FixtureRequest) -> str:
    """A registered-model name of the test's own, so tests share the store but not the registry entries."""
    return request.node.name.removeprefix("test_")[:60]


def _register_twin(
    uri: str, name: str, revision: str = "a" * 40, chash: str = "c1"
) -> tuple[registry.RegisteredVersion, bool]:
    return registry.register_version(
        uri, name, source="acme/tiny", revision=revision, task=CHAT, config_hash=chash, report=_report(uri)
    )


def _register(uri: str, name: str, revision: str = "a" * 40, chash: str = "c1") -> registry.RegisteredVersion:
    return _register_twin(uri, name, revision, chash)[0]


def test_register_is_idempotent_per_revision_task_and_config(model_uri: str, name: str) -> None:
    first, created = registry.register_version(
        model_uri,
        name,
        source="acme/tiny",
        revision="a" * 40,
        task=CHAT,
        config_hash="c1",
        report=_report(model_uri),
    )
    again, created_again = registry.register_version(
        model_uri,
        name,
        source="acme/tiny",
        revision="a" * 40,
        task=CHAT,
        config_hash="c1",
        report=_report(model_uri),
    )
    other_revision = _register(model_uri, name, revision="b" * 40)
    other_config = _register(model_uri, name, chash="c2")

    assert (created, created_again) == (True, False)
    assert again.version == first.version == 1
    assert (other_revision.version, other_config.version) == (2, 3)
    assert first.tags | {} == {
        "source": "acme/tiny",
        "revision": "a" * 40,
        "task": CHAT,
        "model_config_hash": "c1",
        "weights": "stored",
        "validation_status": "passed",
        "validation_checks": "1/1",
        "validation_p50_latency_s": "0.2500",
        "validation_max_latency_s": "0.2500",
    }
    found = registry.find_version(name, revision="b" * 40, task=CHAT, config_hash="c1")
    assert found is not None and found.version == 2
    assert registry.find_version(name, revision="c" * 40, task=CHAT, config_hash="c1") is None


def test_a_failed_report_registers_nothing(model_uri: str, name: str) -> None:
    with pytest.raises(ValidationFailedError, match="Refusing to register"):
        registry.register_version(
            model_uri,
            name,
            source="s",
            revision="r",
            task=CHAT,
            config_hash="c",
            report=_report(model_uri, "failed"),
        )
    assert registry.list_versions(name) == []


def test_promote_moves_the_alias_and_records_approver_and_comment(model_uri: str, name: str) -> None:
    v1, v2 = _register(model_uri, name, revision="1" * 40), _register(model_uri, name, revision="2" * 40)
    registry.move_alias(name, v1.version)

    result = registry.move_alias(name, v2.version, approver="alice", comment="faster")

    assert (result.previous, result.version.version, result.version.aliases) == (1, 2, ["champion"])
    assert result.version.tags["approved_by"] == "alice"
    assert result.version.tags["approval_comment"] == "faster"
    assert result.version.tags["replaced_version"] == "1"
    assert "rollback_from_version" not in result.version.tags  # a newer version: not a rollback
    assert registry.get_version(name, 1).aliases == []
    assert [v.aliases for v in registry.list_versions(name)] == [["champion"], []]


def test_promotion_gate_refuses_a_version_that_did_not_pass(model_uri: str, name: str) -> None:
    v1 = _register(model_uri, name)
    mlflow.MlflowClient().set_model_version_tag(name, "1", "validation_status", "failed")

    with pytest.raises(ValidationFailedError, match="validation_status") as info:
        registry.move_alias(name, v1.version)
    assert info.value.param == "version"
    assert registry.get_alias(name, "champion") is None


def test_moving_the_alias_to_an_earlier_version_is_a_rollback(model_uri: str, name: str) -> None:
    for n in "123":
        _register(model_uri, name, revision=n * 40)
    registry.move_alias(name, 3)

    result = registry.move_alias(name, 1, approver="bob")

    assert (result.previous, result.version.version, result.version.aliases) == (3, 1, ["champion"])
    assert result.version.tags["rollback_from_version"] == "3"
    assert result.version.tags["replaced_version"] == "3"
    assert result.version.tags["approved_by"] == "bob"
    assert result.version.tags["approval_comment"] == "rollback from version 3"
    forward = registry.move_alias(name, 2, approver="bob", comment="fixed")
    assert (forward.previous, forward.version.version) == (1, 2)
    assert "rollback_from_version" not in forward.version.tags


@pytest.mark.parametrize(
    ("version", "current", "comment", "expected"),
    [
        (1, None, None, {"approval_comment": ""}),
        (2, 1, "faster", {"approval_comment": "faster", "replaced_version": "1"}),
        (2, 2, None, {"approval_comment": ""}),
        (
            1,
            3,
            None,
            {
                "approval_comment": "rollback from version 3",
                "replaced_version": "3",
                "rollback_from_version": "3",
            },
        ),
        (
            1,
            3,
            "v3 regressed",
            {"approval_comment": "v3 regressed", "replaced_version": "3", "rollback_from_version": "3"},
        ),
    ],
    ids=["first-holder", "newer", "same-version", "older-is-a-rollback", "rollback-keeps-its-comment"],
)
def test_move_tags_record_what_the_move_replaced(
    version: int, current: int | None, comment: str | None, expected: dict[str, str]
) -> None:
    holder = None if current is None else registry.RegisteredVersion(name="m", version=current, source="s")

    tags = registry._move_tags("champion", version, holder, "alice", comment)

    assert tags.pop("promoted_at")
    assert tags == {"promoted_to": "champion", "approved_by": "alice", **expected}


def test_unknown_model_version_and_alias(model_uri: str, name: str) -> None:
    _register(model_uri, name)
    with pytest.raises(NotFoundError) as no_model:
        registry.get_version("nope", 1)
    with pytest.raises(NotFoundError) as no_version:
        registry.get_version(name, 9)
    assert (no_model.value.param, no_version.value.param) == ("model_name", "version")
    assert registry.get_alias(name, "champion") is None
    assert registry.get_alias("nope", "champion") is None
    assert registry.list_versions("nope") == []


def test_persist_weights_copies_a_hub_reference_into_the_artifact(
    store: str, name: str, hub_cache: HubCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    with mlflow.start_run():
        uri = llmadapter.log_model(
            hub_cache.repo_id, name="model", task=CHAT, save_pretrained=False
        ).model_uri
    version = _register(uri, name, revision=hub_cache.sha)
    assert version.tags["weights"] == "hub-reference"
    assert not registry.weights_stored(version.uri)

    persisted = registry.persist_weights(name, version.version)

    assert persisted.tags["weights"] == "stored"
    assert registry.weights_stored(version.uri)
    assert registry.persist_weights(name, version.version).tags["weights"] == "stored"  # idempotent
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))
    answer = mlflow.pyfunc.load_model(version.uri).predict(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    )
    assert answer["object"] == "chat.completion"


# --- registrations racing each other (the processes themselves: tests/faults/test_concurrent_registration.py)


def _set_status(store: str, name: str, version: int, status: str) -> None:
    """What a registry whose versions take time to become READY shows (MLflow's SQL store has no API)."""
    with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE model_versions SET status=? WHERE name=? AND version=?", (status, name, version))


@pytest.fixture()
def raced(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_version's first look finds nothing, as when a twin is registered between that look and
    its own registration (two callers at the same moment)."""
    monkeypatch.setattr(registry, "find_version", lambda *args, **kwargs: None)
    monkeypatch.setattr(registry, "_PENDING_POLL_S", 0.05)


@pytest.mark.usefixtures("raced")
def test_a_caller_whose_twin_registered_first_deletes_its_own_and_returns_the_twin(
    model_uri: str, name: str
) -> None:
    first = _register(model_uri, name)

    again, created = _register_twin(model_uri, name)

    assert (again.version, created) == (first.version, False)
    assert [v.version for v in registry.list_versions(name)] == [first.version]
    with pytest.raises(NotFoundError):  # its own version 2 is gone
        registry.get_version(name, first.version + 1)


def test_the_lowest_twin_wins_and_a_higher_one_is_left_to_its_creator(
    model_uri: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_model = mlflow.register_model

    def and_another_caller_right_after(uri: str, model_name: str, **kwargs: object) -> object:
        ours = register_model(uri, model_name, **kwargs)  # type: ignore[arg-type]
        register_model(uri, model_name, **kwargs)  # type: ignore[arg-type]
        return ours

    monkeypatch.setattr(mlflow, "register_model", and_another_caller_right_after)
    version, created = _register_twin(model_uri, name)

    assert (version.version, created) == (1, True)
    # Version 2 is the other caller's: it deletes it when it looks again, never this caller.
    assert [v.version for v in registry.list_versions(name)] == [2, 1]
    found = registry.find_version(name, revision="a" * 40, task=CHAT, config_hash="c1")
    assert found is not None and found.version == 1


def test_a_failed_registration_never_counts(store: str, model_uri: str, name: str) -> None:
    failed = _register(model_uri, name)
    _set_status(store, name, failed.version, "FAILED_REGISTRATION")

    assert registry.find_version(name, revision="a" * 40, task=CHAT, config_hash="c1") is None
    version, created = _register_twin(model_uri, name)

    assert (version.version, created) == (2, True)


@pytest.mark.usefixtures("raced")
@pytest.mark.parametrize(
    ("outcome", "winner", "created"),
    [("READY", 1, False), ("FAILED_REGISTRATION", 2, True)],
    ids=["twin-becomes-ready", "twin-fails"],
)
def test_a_lower_twin_still_pending_is_waited_for(
    store: str, model_uri: str, name: str, outcome: str, winner: int, created: bool
) -> None:
    pending = _register(model_uri, name)
    _set_status(store, name, pending.version, "PENDING_REGISTRATION")
    # The other caller's registration finishes while this one is deciding: deleting its own version
    # before then would leave no version at all if the twin then failed.
    timer = threading.Timer(1.0, _set_status, (store, name, pending.version, outcome))
    timer.start()
    try:
        version, was_created = _register_twin(model_uri, name)
    finally:
        timer.join()

    assert (version.version, was_created) == (winner, created)
    assert registry.get_version(name, winner).version == winner
    if winner == 1:
        with pytest.raises(NotFoundError):
            registry.get_version(name, 2)
