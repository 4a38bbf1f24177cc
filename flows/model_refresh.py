"""Flow `model-refresh`: for each configured model, re-run log-and-validate when upstream moved."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from flows._params import ModelSpec, config_dict
from flows.log_and_validate import log_and_validate
from llmadapter.errors import LLMAdapterError
from llmadapter.registry import config_hash
from llmadapter.settings import configure_mlflow
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
        name = spec.registered_name()
        model_config = config_dict(spec.task, spec.config)
        latest = check_latest_revision(spec.source, spec.revision)
        if latest is None:
            logger.warning(
                "%s: the upstream revision of %s cannot be known (offline, not cached).", name, spec.source
            )
            outcomes.append(
                RefreshOutcome(
                    model_name=name, source=spec.source, latest_revision=None, outcome="unknown upstream"
                )
            )
            continue
        existing = find_registered_version(name, latest, spec.task, config_hash(spec.task, model_config))
        if existing is not None:
            logger.info(
                "%s is up to date: version %d holds %s at %s.", name, existing.version, spec.source, latest
            )
            outcomes.append(
                RefreshOutcome(
                    model_name=name, source=spec.source, latest_revision=latest, outcome="up to date"
                )
            )
            continue
        logger.info("%s: %s moved to %s; running log-and-validate.", name, spec.source, latest)
        state = log_and_validate(
            source=spec.source,
            task=spec.task,
            model_name=name,
            # Pinned to what was just seen upstream, so the subflow logs exactly that commit.
            revision=latest if _is_hub_branch(spec) else spec.revision,
            config=spec.config,
            save_pretrained=spec.save_pretrained,
            validation=spec.validation,
            return_state=True,
        )
        if state.is_completed():
            result = state.result()
            outcomes.append(
                RefreshOutcome(
                    model_name=name,
                    source=spec.source,
                    latest_revision=latest,
                    outcome=f"registered v{result.version}",
                )
            )
        else:
            outcomes.append(
                RefreshOutcome(
                    model_name=name,
                    source=spec.source,
                    latest_revision=latest,
                    outcome=f"failed: {state.message}",
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


def _is_hub_branch(spec: ModelSpec) -> bool:
    """A hub source that follows a branch or tag (not a local path, not pinned with '@')."""
    from pathlib import Path

    return "@" not in spec.source and not Path(spec.source).expanduser().exists()
