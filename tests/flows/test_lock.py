"""The registration lock (a Prefect global concurrency limit per registered name) under a real Prefect
API: the flow registers inside it, and a slot its holder abandoned is freed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect import get_client
from prefect.concurrency.sync import concurrency
from prefect.variables import Variable

from flows.log_and_validate import log_and_validate
from llmadapter import registry
from llmadapter.runs import RunOwner
from llmadapter.validation import CheckResult, ValidationReport
from tasks import _lock
from tasks._lock import registration_lock, registration_lock_name
from tasks.validate import ValidationOptions

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _limit(model_name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(registration_lock_name(model_name))


def _wait_for_task_run(name: str, timeout_s: float = 120) -> None:
    """Until a task run called `name` is running (for the register task: waiting for the lock)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))
            if any(r.state is not None and r.state.type == StateType.RUNNING for r in runs):
                return
            time.sleep(0.2)
    raise AssertionError(f"no task run {name!r} started")


def _register_like_the_flow(model_name: str) -> tuple[registry.RegisteredVersion, bool]:
    """Register what the flow run logged for `model_name` (same revision, task, config), as another
    caller that got there first would."""
    (run,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`llmadapter.registered_name` = '{model_name}'",
        output_format="list",
    )
    (model,) = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    )
    tags = run.data.tags
    check = CheckResult(name="sample:chat-greedy", passed=True, latency_s=0.1)
    report = ValidationReport(model_uri=model.model_uri, task=tags["task"], status="passed", checks=[check])
    return registry.register_version(
        model.model_uri,
        model_name,
        source=tags["source"],
        revision=tags["revision"],
        task=tags["task"],
        config_hash=tags["model_config_hash"],
        report=report,
    )


def test_the_flow_finds_and_registers_inside_the_names_lock(store: str, tiny_gpt2: Path) -> None:
    name = "tiny-locked"
    out: dict[str, Any] = {}
    flow_run = threading.Thread(
        target=lambda: out.update(
            result=log_and_validate(
                source=str(tiny_gpt2), model_name=name, validation=ValidationOptions(fresh_process=False)
            )
        )
    )
    with registration_lock(name):
        assert RunOwner.model_validate(Variable.get(registration_lock_name(name))).pid == os.getpid()
        flow_run.start()
        _wait_for_task_run(f"register {name}")
        # The flow has logged and validated and waits for the lock: another caller registers meanwhile.
        assert registry.list_versions(name) == []
        theirs, created = _register_like_the_flow(name)
        assert created
    flow_run.join(timeout=120)

    result = out["result"]
    assert (result.version, result.created) == (theirs.version, False)
    assert [v.version for v in registry.list_versions(name)] == [theirs.version]
    assert result.aliases == ["challenger"]
    limit = _limit(name)
    assert (limit.limit, limit.active_slots) == (1, 0)
    assert Variable.get(registration_lock_name(name)) is None  # no holder recorded once it is free


def test_a_slot_held_by_a_killed_process_is_freed_by_the_next_registration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect.settings import get_current_settings

    name = "killed-holder"
    api = {"PREFECT_API_URL": str(get_current_settings().api.url)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom tasks._lock import registration_lock\n"
            f"with registration_lock({name!r}):\n    print('held', flush=True)\n    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, **api},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    finally:
        holder.kill()
        holder.wait()
    assert _limit(name).active_slots == 1  # killed while holding: the slot stays taken
    started = time.monotonic()

    with caplog.at_level(logging.WARNING), registration_lock(name):
        waited = time.monotonic() - started
        assert _limit(name).active_slots == 1

    assert waited < _lock.TAKEOVER_S / 2
    assert f"its process (pid {holder.pid} on " in caplog.text and "freeing its slot" in caplog.text


def test_a_slot_held_past_the_takeover_time_is_taken_over(caplog: pytest.LogCaptureFixture) -> None:
    name = "held-too-long"
    with registration_lock(name):
        pass  # creates the limit
    taken, release = threading.Event(), threading.Event()

    def hold_without_a_record() -> None:
        # As a holder killed between taking the slot and recording itself would leave it.
        with concurrency(registration_lock_name(name), occupy=1, strict=True):
            taken.set()
            release.wait(timeout=120)

    other = threading.Thread(target=hold_without_a_record)
    other.start()
    try:
        assert taken.wait(timeout=60)
        with caplog.at_level(logging.WARNING), registration_lock(name, takeover_after_s=1):
            assert _limit(name).active_slots == 1
    finally:
        release.set()
        other.join(timeout=60)

    assert "held for more than 1 s by a holder that left no record; freeing its slot" in caplog.text


def test_a_disabled_limit_turns_the_lock_off() -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    name = "unlocked"
    with registration_lock(name):
        pass  # creates the limit
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            registration_lock_name(name), GlobalConcurrencyLimitUpdate(active=False)
        )
    started = time.monotonic()

    with registration_lock(name), registration_lock(name, takeover_after_s=60):
        entered = time.monotonic() - started

    assert entered < _lock.ATTEMPT_S  # the inner one did not wait for the outer one
