"""Who owns an MLflow run the pipeline creates (tags), and ending runs whose owner died while they ran.

A process killed while it logs leaves its MLflow run RUNNING forever. Runs created for a registered
model carry the owner's identity as tags: the orchestrator's run id (a Prefect flow run id for the
flows), where that id can be looked up, and the process (host, pid and its start time, so a reused
pid is not mistaken for the owner). `end_stale_runs` ends the RUNNING runs of a registered name whose
owner a caller-given predicate declares over: status KILLED and the tag `llmadapter.killed_reason`,
so the MLflow UI shows what happened. The predicate is the caller's because only the orchestrator
knows whether its run is over (this module imports no Prefect).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from llmadapter.registry import _quote

if TYPE_CHECKING:
    from mlflow.entities import Run

__all__ = [
    "TAG_KILLED_REASON",
    "TAG_REGISTERED_NAME",
    "EndedRun",
    "RunOwner",
    "end_stale_runs",
    "owner_tags",
]

TAG_REGISTERED_NAME = "llmadapter.registered_name"
TAG_KILLED_REASON = "llmadapter.killed_reason"
_TAG_PREFIX = "llmadapter.owner."
# A pid whose process started more than this far from the recorded start time is another process.
_START_TIME_SLACK_S = 1.0


class RunOwner(BaseModel):
    """The process (and orchestrator run) that created something: an MLflow run, a held lock."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str | None = None  # the orchestrator's run id (Prefect: the flow run id)
    api: str | None = None  # where flow_run_id can be looked up (Prefect: the API URL, or the ephemeral home)
    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch)

    def __str__(self) -> str:
        where = f"pid {self.pid} on {self.host}"
        return f"flow run {self.flow_run_id} ({where})" if self.flow_run_id else where

    @classmethod
    def this_process(cls, flow_run_id: str | None = None, api: str | None = None) -> RunOwner:
        import os

        import psutil

        return cls(
            flow_run_id=flow_run_id,
            api=api,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=psutil.Process().create_time(),
        )

    def process_gone(self) -> bool:
        """True when the owner ran on this host and its process no longer exists (or is a zombie).

        On another host nothing can be known: False.
        """
        import psutil

        if self.host != socket.gethostname():
            return False
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
            return abs(process.create_time() - self.started) > _START_TIME_SLACK_S
        except psutil.NoSuchProcess:
            return True

    def tags(self) -> dict[str, str]:
        fields = self.model_dump(exclude_none=True)
        return {f"{_TAG_PREFIX}{key}": str(value) for key, value in fields.items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RunOwner | None:
        """The owner recorded in a run's tags; None when the run does not say (or says it badly)."""
        fields = {key.removeprefix(_TAG_PREFIX): v for key, v in tags.items() if key.startswith(_TAG_PREFIX)}
        try:
            return cls.model_validate(fields)
        except ValueError:
            return None


def owner_tags(registered_name: str, owner: RunOwner) -> dict[str, str]:
    """The tags a run created for `registered_name` by `owner` carries (see end_stale_runs)."""
    return {TAG_REGISTERED_NAME: registered_name, **owner.tags()}


class EndedRun(BaseModel):
    """A stale run that end_stale_runs marked KILLED, and why."""

    run_id: str
    owner: RunOwner
    reason: str


def end_stale_runs(registered_name: str, reason_over: Callable[[RunOwner], str | None]) -> list[EndedRun]:
    """Mark KILLED every RUNNING run created for `registered_name` whose owner is over.

    `reason_over(owner)` says why the owner is over (its flow run ended or is gone, its process died),
    or None while it may still be running: such runs are left alone, as are runs that record no owner.
    The reason goes into the tag `llmadapter.killed_reason` before the status changes, so a sweep
    killed half-way is finished by the next one.
    """
    import mlflow
    from mlflow import MlflowClient

    found: list[Run] = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{TAG_REGISTERED_NAME}` = {_quote(registered_name)}"
        ),
        output_format="list",
    )
    client = MlflowClient()
    ended = []
    for run in found:
        owner = RunOwner.from_tags(run.data.tags)
        reason = None if owner is None else reason_over(owner)
        if owner is None or reason is None:
            continue
        client.set_tag(run.info.run_id, TAG_KILLED_REASON, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(EndedRun(run_id=run.info.run_id, owner=owner, reason=reason))
    return ended
