"""Flow `model-refresh`: for each configured model, re-run log-and-validate when upstream moved."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from flows._params import ModelSpec
from flows.log_and_validate import log_and_validate
from llmadapter.catalog import get_task
from llmadapter.errors import LLMAdapterError
from llmadapter.settings import configure_mlflow
from llmadapter.source import parse_source
from tasks.download import check_latest_revision
from tasks.register import find_registered_version


class RefreshOutcome(BaseModel):
    """What the refresh did for one model."""

    model_name: str
    source: str
    latest_revision: str | None
    outcome: str  # "up to date" | "registered vN" | "unknown upstream" | "failed: ..."


@flow(name="model-refresh", log_prints=True)
def model_refresh(models: list[ModelSpec]) -> list[RefreshOutcome]:
    """Check each model's upstream revision; run log-and-validate (a subflow) only where it changed.

    Args:
        models: The models to keep registered: source, task, model_name, revision (branch) and config.
    """
    logger = get_run_logger()
    configure_mlflow()
    outcomes: list[RefreshOutcome] = []
    for spec in models:
        try:
            outcomes.append(_refresh_one(spec))
        except Exception as exc:
            # One bad model (a config for the wrong task, a store or hub error after its retries) must
            # not hide the others: record it, go on, and fail the run below once the table is written.
            logger.error("%s: refresh failed: %s: %s", spec.registered_name(), type(exc).__name__, exc)
            outcomes.append(
                RefreshOutcome(
                    model_name=spec.registered_name(),
                    source=spec.source,
                    latest_revision=None,
                    outcome=f"failed: {type(exc).__name__}: {exc}"[:500],
                )
            )
    create_table_artifact(
        table=[o.model_dump() for o in outcomes],
        key="model-refresh",
        description="What the refresh did per model",
    )
    failed = [o for o in outcomes if o.outcome.startswith("failed")]
    if failed:
        raise LLMAdapterError(
            f"Refresh failed for {', '.join(o.model_name for o in failed)}; the others are done."
        )
    return outcomes


def _refresh_one(spec: ModelSpec) -> RefreshOutcome:
    """Check one model's upstream revision and run log-and-validate for it when it moved."""
    logger = get_run_logger()
    name = spec.registered_name()
    model_config = get_task(spec.task).parse_config(spec.config)
    latest = check_latest_revision(spec.source, spec.revision)
    if latest is None:
        logger.warning(
            "%s: the upstream revision of %s cannot be known (offline, not cached).", name, spec.source
        )
        return RefreshOutcome(
            model_name=name, source=spec.source, latest_revision=None, outcome="unknown upstream"
        )
    existing = find_registered_version(name, latest, spec.task, model_config.digest())
    if existing is not None:
        logger.info(
            "%s is up to date: version %d holds %s at %s.", name, existing.version, spec.source, latest
        )
        return RefreshOutcome(
            model_name=name, source=spec.source, latest_revision=latest, outcome="up to date"
        )
    logger.info("%s: %s moved to %s; running log-and-validate.", name, spec.source, latest)
    state = log_and_validate(
        source=spec.source,
        task=spec.task,
        model_name=name,
        # Pinned to what was just seen upstream, so the subflow logs exactly that commit.
        revision=latest if _is_hub_branch(spec) else spec.revision,
        config=model_config,
        save_pretrained=spec.save_pretrained,
        validation=spec.validation,
        return_state=True,
    )
    outcome = f"registered v{state.result().version}" if state.is_completed() else f"failed: {state.message}"
    return RefreshOutcome(model_name=name, source=spec.source, latest_revision=latest, outcome=outcome)


def _is_hub_branch(spec: ModelSpec) -> bool:
    """A hub source that follows a branch or tag and pins none itself, so `revision` may pin it."""
    parsed = parse_source(spec.source)
    return parsed.follows_branch and parsed.revision is None
