"""Prefect tasks over llmadapter.registry: find, register, alias, promote, persist weights."""

from __future__ import annotations

from prefect import task

from llmadapter import registry
from llmadapter.registry import PromotionResult, RegisteredVersion
from llmadapter.validation import ValidationReport
from tasks._retry import retry_on_transient
from tasks.log import LoggedModel

# Registry calls are cheap and idempotent: retry store hiccups quickly.
_DELAYS = [2, 10]


@task(
    name="find-registered-version",
    retries=2,
    retry_delay_seconds=_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def find_registered_version(
    model_name: str, revision: str, task: str, config_hash: str
) -> RegisteredVersion | None:
    """The version already registered from this revision, task and model_config, if any."""
    return registry.find_version(model_name, revision=revision, task=task, config_hash=config_hash)


@task(
    name="register",
    task_run_name="register {model_name}",
    retries=2,
    retry_delay_seconds=_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def register_model(
    logged: LoggedModel, model_name: str, report: ValidationReport
) -> tuple[RegisteredVersion, bool]:
    """Register a validated logged model with its provenance tags (idempotent); (version, created)."""
    return registry.register_version(
        logged.model_uri,
        model_name,
        source=logged.source,
        revision=logged.revision,
        task=logged.task,
        config_hash=logged.config_hash,
        report=report,
    )


@task(
    name="set-alias",
    task_run_name="set @{alias} on {model_name}",
    retries=2,
    retry_delay_seconds=_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def set_alias(model_name: str, alias: str, version: int) -> RegisteredVersion:
    return registry.set_alias(model_name, alias, version)


@task(name="get-alias", retries=2, retry_delay_seconds=_DELAYS, retry_condition_fn=retry_on_transient)
def get_alias(model_name: str, alias: str) -> RegisteredVersion | None:
    return registry.get_alias(model_name, alias)


@task(name="get-version", retries=2, retry_delay_seconds=_DELAYS, retry_condition_fn=retry_on_transient)
def get_version(model_name: str, version: int) -> RegisteredVersion:
    return registry.get_version(model_name, version)


@task(
    name="persist-weights",
    task_run_name="persist weights of {model_name} v{version}",
    retries=2,
    retry_delay_seconds=_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def persist_weights(model_name: str, version: int) -> RegisteredVersion:
    """Copy hub-referenced weights into the artifact store (no-op when they are stored)."""
    return registry.persist_weights(model_name, version)


@task(
    name="promote-version",
    task_run_name="move @{alias} of {model_name} to v{version}",
    retries=2,
    retry_delay_seconds=_DELAYS,
    retry_condition_fn=retry_on_transient,
)
def promote_version(
    model_name: str,
    version: int,
    alias: str,
    approver: str | None = None,
    comment: str | None = None,
    rollback: bool = False,
) -> PromotionResult:
    """Move `alias` to `version` through the gates, recording approver and comment as version tags."""
    move = registry.rollback if rollback else registry.promote
    return move(model_name, version, alias=alias, approver=approver, comment=comment)
