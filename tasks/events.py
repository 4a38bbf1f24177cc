"""Prefect events from the registry side, so that users (and prefect.yaml's trigger) can automate on them.

Every event's resource is the registered model, `mlflow.registered_model.<name>`:

- `mlflow.model_version.registered`: a new version was registered (payload: version, run_id, source,
  revision, task). prefect.yaml's trigger on `promote/default` starts a promotion for it, which pauses
  for approval in the UI.
- `mlflow.model_version.alias_moved`: an alias now points at a version (payload: alias, version,
  previous, run_id).

Emitting never fails the caller: without a reachable Prefect API the event is dropped (Prefect logs it).
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from llmadapter.registry import RegisteredVersion

REGISTERED = "mlflow.model_version.registered"
ALIAS_MOVED = "mlflow.model_version.alias_moved"


def resource(name: str) -> dict[str, str]:
    """The Prefect resource of a registered model."""
    return {"prefect.resource.id": f"mlflow.registered_model.{name}", "prefect.resource.name": name}


def _emit(event: str, version: RegisteredVersion, payload: dict[str, Any]) -> None:
    emit_event(
        event=event,
        resource=resource(version.name),
        payload={"version": version.version, "run_id": version.run_id or "", **payload},
    )


def emit_registered(version: RegisteredVersion) -> None:
    tags = version.tags
    _emit(
        REGISTERED,
        version,
        {
            "source": tags.get("source", ""),
            "revision": tags.get("revision", ""),
            "task": tags.get("task", ""),
        },
    )


def emit_alias_moved(version: RegisteredVersion, alias: str, previous: int | None) -> None:
    _emit(ALIAS_MOVED, version, {"alias": alias, "previous": previous})
