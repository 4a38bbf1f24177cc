"""Who owns what a flow leaves behind (MLflow runs, the registration lock), and whether that owner is over.

A flow run killed with SIGKILL (or whose machine died) never reports an end: Prefect shows it Running
until a worker notices that its process exited (and marks it Crashed). A flow run started without a
worker (a local run on the ephemeral API or against a server) is never marked. So an owner is over
when Prefect says its flow run ended or does not know it, or, while Prefect still shows it running,
when it ran on this host and its process is gone.
"""

from __future__ import annotations

from uuid import UUID

from llmadapter.runs import RunOwner


def api_identity() -> str:
    """Where this process's flow runs are recorded: the API URL, or the ephemeral API's home."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return str(settings.api.url) if settings.api.url else f"ephemeral:{settings.home}"


def current_owner() -> RunOwner:
    """This process, and the flow run it is in (None outside a flow run)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return RunOwner.this_process(flow_run_id=str(run_id) if run_id else None, api=api_identity())


def reason_over(owner: RunOwner) -> str | None:
    """Why `owner`'s flow run is over, or None while it may still be running (this flow run never is)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    here = current_owner()
    if owner.flow_run_id is not None and (owner.flow_run_id, owner.api) == (here.flow_run_id, here.api):
        return None
    shown = ""
    if owner.flow_run_id is not None and owner.api == here.api:
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(owner.flow_run_id)).state
        except (ObjectNotFound, ValueError):
            return f"its Prefect flow run {owner.flow_run_id} no longer exists"
        if state is not None and state.is_final():
            return f"its Prefect flow run {owner.flow_run_id} ended {state.name}"
        shown = (
            f"; Prefect still shows flow run {owner.flow_run_id} {state.name if state else 'without a state'}"
        )
    if owner.process_gone():
        return f"its process (pid {owner.pid} on {owner.host}) is gone{shown}"
    return None
