"""llmadapter.runs: run owners (real processes) and ending stale runs in a real MLflow SQLite store."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from llmadapter.runs import TAG_KILLED_REASON, RunOwner, end_stale_runs, owner_tags


@pytest.fixture(scope="module")
def dead_owner() -> RunOwner:
    """The owner record of a process that has exited (and been reaped)."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return RunOwner(
        flow_run_id="dead-flow-run", host=RunOwner.this_process().host, pid=proc.pid, started=started
    )


def test_an_owner_is_gone_only_when_its_process_on_this_host_is(dead_owner: RunOwner) -> None:
    me = RunOwner.this_process(flow_run_id="r", api="http://api")

    assert not me.process_gone()
    assert dead_owner.process_gone()
    # The same pid, started at another time: another process took the number.
    assert me.model_copy(update={"started": me.started - 3600}).process_gone()
    # Another machine's process cannot be looked at: it may be running.
    assert not dead_owner.model_copy(update={"host": "elsewhere"}).process_gone()


def test_an_owner_survives_its_tags_and_a_run_without_them_has_none() -> None:
    me = RunOwner.this_process(flow_run_id="r", api="http://api")
    tags = owner_tags("chat", me)

    assert tags["llmadapter.registered_name"] == "chat"
    assert RunOwner.from_tags({**tags, "other": "x"}) == me
    assert RunOwner.from_tags({"source": "s"}) is None
    assert RunOwner.from_tags({**tags, "llmadapter.owner.pid": "not a pid"}) is None


def _run(name: str | None, owner: RunOwner | None, *, running: bool = True) -> str:
    tags = {} if name is None else {"llmadapter.registered_name": name}
    if owner is not None and name is not None:
        tags = owner_tags(name, owner)
    run = MlflowClient().create_run(mlflow.get_experiment_by_name("tests").experiment_id, tags=tags)
    if not running:
        MlflowClient().set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_only_running_runs_of_the_name_whose_owner_is_over_are_killed(
    mlflow_store: str, dead_owner: RunOwner
) -> None:
    alive = RunOwner.this_process(flow_run_id="live-flow-run")
    stale = _run("chat", dead_owner)
    still_running = _run("chat", alive)
    other_name = _run("embeddings", dead_owner)
    finished = _run("chat", dead_owner, running=False)
    unowned = _run("chat", None)
    asked: list[RunOwner] = []

    def reason_over(owner: RunOwner) -> str | None:
        asked.append(owner)
        return "its process is gone" if owner.process_gone() else None

    ended = end_stale_runs("chat", reason_over)

    assert [(e.run_id, e.reason, e.owner) for e in ended] == [(stale, "its process is gone", dead_owner)]
    client = MlflowClient()
    killed = client.get_run(stale)
    assert killed.info.status == "KILLED"
    assert killed.data.tags[TAG_KILLED_REASON] == "its process is gone"
    statuses = {run_id: client.get_run(run_id).info.status for run_id in (still_running, other_name, unowned)}
    assert statuses == dict.fromkeys((still_running, other_name, unowned), "RUNNING")
    assert client.get_run(finished).info.status == "FINISHED"
    assert sorted(o.flow_run_id or "" for o in asked) == ["dead-flow-run", "live-flow-run"]
    assert end_stale_runs("chat", reason_over) == []  # nothing is left to end
