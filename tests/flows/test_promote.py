"""The promote flow: a person approves, rejects or never answers through Prefect's typed run input."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import mlflow
import pytest
from prefect.flow_runs import resume_flow_run

from flows.log_and_validate import log_and_validate
from flows.promote import promote
from llmadapter import registry
from llmadapter.config import ModelConfig
from llmadapter.errors import ValidationFailedError
from llmadapter.follow import ModelHost
from llmadapter.server.app import build_app
from llmadapter.testing import HubCache
from tasks.validate import ValidationOptions
from tests.server.conftest import serve, settings

pytestmark = pytest.mark.usefixtures("prefect_harness")

NAME = "tiny-promote"
IN_PROCESS = ValidationOptions(fresh_process=False)


@pytest.fixture(scope="module")
def versions(prefect_harness: None, module_store: str, tiny_gpt2: Path) -> tuple[int, int]:
    """Two validated versions of one model (two model_configs), registered once for the module."""
    first = log_and_validate(source=str(tiny_gpt2), model_name=NAME, validation=IN_PROCESS)
    second = log_and_validate(
        source=str(tiny_gpt2), model_name=NAME, config=ModelConfig(temperature=0.5), validation=IN_PROCESS
    )
    return first.version, second.version


@pytest.fixture()
def champion_v1(versions: tuple[int, int]) -> tuple[int, int]:
    """Version 1 is @champion, version 2 @challenger, at the start of each test."""
    v1, v2 = versions
    registry.set_alias(NAME, registry.CHAMPION, v1)
    registry.set_alias(NAME, registry.CHALLENGER, v2)
    return v1, v2


def _paused_run_id(timeout_s: float = 120) -> UUID:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                return runs[0].id
            time.sleep(0.3)
    raise AssertionError("the promote flow never paused for approval")


@pytest.fixture()
def in_background() -> Iterator[Callable[..., dict[str, Any]]]:
    """Run the promote flow in a thread (it blocks while paused); returns a dict filled with its state."""
    threads: list[threading.Thread] = []

    def start(**params: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: out.update(state=promote(**params, return_state=True)))
        thread.start()
        threads.append(thread)
        out["thread"] = thread
        return out

    yield start
    for thread in threads:
        thread.join(timeout=120)


def test_approval_moves_champion_and_records_who_and_why(
    champion_v1: tuple[int, int], in_background: Any
) -> None:
    v1, v2 = champion_v1
    run = in_background(model_name=NAME, poll_interval_s=1, timeout_s=120)
    flow_run_id = _paused_run_id()

    # Nothing moves while the run waits for a person.
    assert registry.get_alias(NAME, "champion").version == v1  # type: ignore[union-attr]
    resume_flow_run(
        flow_run_id, run_input={"approve": True, "approver": "alice", "comment": "better latency"}
    )
    run["thread"].join(timeout=120)

    decision = run["state"].result()
    assert (decision.outcome, decision.version, decision.previous) == ("approved", v2, v1)
    champion = registry.get_alias(NAME, "champion")
    assert champion is not None and champion.version == v2
    assert champion.tags["approved_by"] == "alice"
    assert champion.tags["approval_comment"] == "better latency"
    assert champion.tags["replaced_version"] == str(v1)


def test_rejection_changes_nothing(champion_v1: tuple[int, int], in_background: Any) -> None:
    v1, v2 = champion_v1
    tags_before = registry.get_version(NAME, v2).tags
    run = in_background(model_name=NAME, poll_interval_s=1, timeout_s=120)
    resume_flow_run(_paused_run_id(), run_input={"approve": False, "approver": "bob", "comment": "not yet"})
    run["thread"].join(timeout=120)

    assert run["state"].result().outcome == "rejected"
    assert registry.get_alias(NAME, "champion").version == v1  # type: ignore[union-attr]
    assert registry.get_version(NAME, v2).tags == tags_before


def test_timeout_changes_nothing_and_fails_the_run(champion_v1: tuple[int, int], in_background: Any) -> None:
    v1, _ = champion_v1
    run = in_background(model_name=NAME, poll_interval_s=1, timeout_s=2)
    run["thread"].join(timeout=120)

    assert run["state"].is_failed()
    assert registry.get_alias(NAME, "champion").version == v1  # type: ignore[union-attr]


def test_resume_input_is_validated_against_the_typed_form(
    champion_v1: tuple[int, int], in_background: Any
) -> None:
    v1, _ = champion_v1
    run = in_background(model_name=NAME, poll_interval_s=1, timeout_s=60)
    flow_run_id = _paused_run_id()
    with pytest.raises(Exception, match="approve"):
        resume_flow_run(flow_run_id, run_input={"approve": "definitely"})
    # An approval must say who approves: the server refuses it and the run stays paused.
    for nameless in (
        {"approve": True},
        {"approve": True, "approver": ""},
        {"approve": True, "approver": "  "},
    ):
        with pytest.raises(Exception, match="approver"):
            resume_flow_run(flow_run_id, run_input=nameless)
    assert _paused_run_id(timeout_s=5) == flow_run_id
    resume_flow_run(flow_run_id, run_input={"approve": False})
    run["thread"].join(timeout=120)
    assert registry.get_alias(NAME, "champion").version == v1  # type: ignore[union-attr]


def test_a_promotion_without_approval_is_recorded_as_automatic(champion_v1: tuple[int, int]) -> None:
    _, v2 = champion_v1

    decision = promote(model_name=NAME, require_approval=False)

    assert (decision.outcome, decision.version, decision.approver) == ("approved", v2, "automatic")
    champion = registry.get_alias(NAME, "champion")
    assert champion is not None and champion.version == v2
    assert champion.tags["approved_by"] == "automatic"


def test_rollback_to_a_version_number(champion_v1: tuple[int, int], in_background: Any) -> None:
    v1, v2 = champion_v1
    registry.set_alias(NAME, "champion", v2)
    run = in_background(model_name=NAME, version=v1, poll_interval_s=1, timeout_s=120)
    resume_flow_run(
        _paused_run_id(), run_input={"approve": True, "approver": "carol", "comment": "v2 regressed"}
    )
    run["thread"].join(timeout=120)

    assert run["state"].result().outcome == "approved"
    champion = registry.get_alias(NAME, "champion")
    assert champion is not None and champion.version == v1
    assert champion.tags["rollback_from_version"] == str(v2)
    assert champion.tags["approval_comment"] == "v2 regressed"


def test_a_version_that_failed_validation_cannot_be_promoted(champion_v1: tuple[int, int]) -> None:
    v1, v2 = champion_v1
    mlflow.MlflowClient().set_model_version_tag(NAME, str(v2), "validation_status", "failed")
    try:
        with pytest.raises(ValidationFailedError, match="validation_status"):
            promote(model_name=NAME, require_approval=False)
    finally:
        mlflow.MlflowClient().set_model_version_tag(NAME, str(v2), "validation_status", "passed")
    assert registry.get_alias(NAME, "champion").version == v1  # type: ignore[union-attr]


def test_hub_reference_gets_its_weights_before_becoming_champion(
    versions: tuple[int, int], hub_cache: HubCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    result = log_and_validate(
        source=hub_cache.repo_id, model_name="hub-ref", save_pretrained=False, validation=IN_PROCESS
    )
    assert registry.get_version("hub-ref", result.version).tags["weights"] == "hub-reference"
    assert not registry.weights_stored(f"models:/hub-ref/{result.version}")

    decision = promote(model_name="hub-ref", require_approval=False)

    assert decision.outcome == "approved"
    assert registry.get_alias("hub-ref", "champion").tags["weights"] == "stored"  # type: ignore[union-attr]
    assert registry.weights_stored("models:/hub-ref@champion")
    # Production no longer needs the hub (or its cache): an empty cache still loads the champion.
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty))
    answer = mlflow.pyfunc.load_model("models:/hub-ref@champion").predict(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    )
    assert answer["usage"]["completion_tokens"] <= 2


@contextmanager
def _following_server(**host_options: Any) -> Iterator[tuple[str, ModelHost]]:
    """A real server of models:/NAME@champion that follows the alias (polling every 0.2 s)."""
    app = build_app({}, settings(), loading=[NAME])
    host = ModelHost(app.state.models, NAME, f"models:/{NAME}@champion", poll_s=0.2, **host_options)
    with serve(app) as running:
        host.load()
        host.follow()
        try:
            yield running.url, host
        finally:
            host.close()


@pytest.mark.slow
def test_a_promotion_waits_until_the_servers_answer_with_the_new_version(
    champion_v1: tuple[int, int],
) -> None:
    _, v2 = champion_v1
    with _following_server() as (url, _):
        decision = promote(model_name=NAME, require_approval=False, serving_urls=[f"{url}/v1"])
        assert (decision.outcome, decision.version) == ("approved", v2)
        (line,) = decision.serving
        assert line.startswith(f"{url}/v1: version {v2} answers (")
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert answer.headers["x-llmadapter-model-version"] == str(v2)
    tags = registry.get_version(NAME, v2).tags
    assert tags[registry.TAG_SERVING_CONFIRMED].startswith(f"{url}/v1 (")
    assert registry.TAG_SERVING_MISSED not in tags


@pytest.mark.slow
def test_a_server_that_cannot_load_the_version_fails_the_run_naming_it(champion_v1: tuple[int, int]) -> None:
    from llmadapter.errors import ServingNotConfirmedError

    v1, v2 = champion_v1
    with _following_server() as (good, _), _following_server() as (bad, host):

        def out_of_memory(target: Any, name: str) -> Any:
            raise MemoryError("simulated: no room for a second copy")

        host.swapper._loader = out_of_memory  # this host can load nothing more
        state = promote(
            model_name=NAME,
            require_approval=False,
            serving_urls=[good, bad],
            serving_timeout_s=60,
            return_state=True,
        )
        assert state.is_failed()
        with pytest.raises(ServingNotConfirmedError) as failure:
            state.result()
        message = str(failure.value)
        assert f"{bad}: did not switch to version {v2}" in message and "MemoryError" in message
        assert good not in message.replace(bad, "")
        assert "stays moved" in message
        # The bad server still answers with the version it had.
        card = httpx.get(f"{bad}/v1/models/{NAME}").json()
        assert card["version"] == str(v1) and card["swap_failure"].startswith(f"version {v2}:")
    assert registry.get_alias(NAME, "champion").version == v2  # type: ignore[union-attr]
    tags = registry.get_version(NAME, v2).tags
    assert tags[registry.TAG_SERVING_MISSED] == bad
    assert tags[registry.TAG_SERVING_CONFIRMED].startswith(f"{good} (")
