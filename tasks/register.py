"""Prefect tasks over llmadapter.registry: find, register (under the name's lock), aliases, promotion;
each change is also a Prefect event (tasks.events)."""

from __future__ import annotations

from llmadapter import registry
from llmadapter.registry import PromotionResult, RegisteredVersion
from llmadapter.validation import ValidationReport
from tasks._lock import registration_lock
from tasks._retry import transient_task
from tasks.events import emit_alias_moved, emit_registered
from tasks.log import LoggedModel


@transient_task(name="find-registered-version")
def find_registered_version(
    model_name: str, revision: str, task: str, config_hash: str
) -> RegisteredVersion | None:
    """The version already registered from this revision, task and model_config, if any."""
    return registry.find_version(model_name, revision=revision, task=task, config_hash=config_hash)


@transient_task(name="register", task_run_name="register {model_name}")
def register_model(
    logged: LoggedModel, model_name: str, report: ValidationReport
) -> tuple[RegisteredVersion, bool]:
    """Register a validated logged model with its provenance tags (idempotent); (version, created).

    Under the registration lock of `model_name`, so that flow runs registering the same name (on any
    worker) find and register one at a time; a run that finds the version another registered reuses it.
    """
    with registration_lock(model_name):
        version, created = registry.register_version(
            logged.model_uri,
            model_name,
            source=logged.source,
            revision=logged.revision,
            task=logged.task,
            config_hash=logged.config_hash,
            report=report,
        )
    if created:
        emit_registered(version)
    return version, created


@transient_task(name="set-alias", task_run_name="set @{alias} on {model_name}")
def set_alias(model_name: str, alias: str, version: int) -> RegisteredVersion:
    before = registry.get_alias(model_name, alias)
    moved = registry.set_alias(model_name, alias, version)
    if before is None or before.version != version:
        emit_alias_moved(moved, alias, before.version if before else None)
    return moved


@transient_task(name="get-alias")
def get_alias(model_name: str, alias: str) -> RegisteredVersion | None:
    return registry.get_alias(model_name, alias)


@transient_task(name="get-version")
def get_version(model_name: str, version: int) -> RegisteredVersion:
    return registry.get_version(model_name, version)


@transient_task(name="promote-version", task_run_name="move @{alias} of {model_name} to v{version}")
def promote_version(
    model_name: str, version: int, alias: str, approver: str | None = None, comment: str | None = None
) -> PromotionResult:
    """Move `alias` to `version` through the gates (a rollback when it is older), recording who and why."""
    result = registry.move_alias(model_name, version, alias, approver=approver, comment=comment)
    if result.previous != version:
        emit_alias_moved(result.version, alias, result.previous)
    return result
