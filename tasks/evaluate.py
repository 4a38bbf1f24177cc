"""Prefect tasks over llmadapter.evaluation: check the quality settings, evaluate, publish the gate."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from llmadapter.evaluation import (
    EvaluationPlan,
    GateResult,
    ModelEvaluation,
    QualityOptions,
    compare,
    evaluate_model,
    prepare_evaluation,
    tag_version,
)
from llmadapter.runs import owner_tags
from tasks._owners import current_owner
from tasks._retry import transient_task
from tasks.validate import artifact_key

# The plan holds built MLflow scorers: not an input Prefect can hash for a cache key, nor one to cache.


@task(name="prepare-evaluation", cache_policy=NO_CACHE)
def prepare_quality(
    options: QualityOptions, model_uris: list[str] | None = None, model_task: str | None = None
) -> EvaluationPlan:
    """Read and check the evaluation set, scorers and judge before any model loads (EvaluationError)."""
    return prepare_evaluation(options, model_uris or [], task=model_task)


@task(name="evaluate", task_run_name="evaluate {model_uri}", cache_policy=NO_CACHE)
def evaluate_version(plan: EvaluationPlan, model_uri: str, model_name: str) -> ModelEvaluation:
    """One version's answers (fresh process, one batch) scored in an MLflow evaluation run."""
    tags = owner_tags(model_name, current_owner())
    result = evaluate_model(plan, model_uri, run_name=f"evaluate {model_uri}", tags=tags)
    get_run_logger().info(
        "Evaluation run %s: %s on %d rows (%.2f rows/s, %d failed predictions): %s",
        result.run_id,
        model_uri,
        result.rows,
        result.rows_per_s,
        result.failed_predictions,
        ", ".join(f"{name} {mean:.3f}" for name, mean in result.means.items()),
    )
    return result


@task(name="quality-gate", cache_policy=NO_CACHE)
def quality_gate(
    plan: EvaluationPlan, challenger: ModelEvaluation, champion: ModelEvaluation | None
) -> GateResult:
    """The gate's decision: minimums, and no regression beyond the allowance vs the champion."""
    return compare(plan, challenger, champion)


def _run_links(result: GateResult) -> dict[str, str]:
    """MLflow UI links to the evaluation runs, when the tracking store is a server."""
    import mlflow

    base = mlflow.get_tracking_uri().rstrip("/")
    if not base.startswith(("http://", "https://")):
        return {}
    links = {}
    for run_id in (result.challenger_run, result.champion_run):
        if run_id:
            experiment = mlflow.get_run(run_id).info.experiment_id
            links[run_id] = f"{base}/#/experiments/{experiment}/runs/{run_id}"
    return links


@transient_task(name="publish-quality", retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_quality(result: GateResult, model_name: str, version: int | None = None) -> str:
    """The comparison as Prefect markdown and table artifacts, and as quality.* tags on the version
    (when registered); returns the markdown."""
    markdown = result.to_markdown(_run_links(result))
    key = artifact_key("quality", model_name)
    create_markdown_artifact(
        markdown=markdown, key=key, description=f"Quality of {model_name}: {result.summary()}"
    )
    create_table_artifact(
        table=result.to_table(),
        key=f"{key}-gate",
        description=f"Quality gate of {model_name} v{version or '-'}",
    )
    if version is not None:
        tag_version(model_name, version, result.version_tags())
    return markdown


@transient_task(name="record-override", retry_delay_seconds=5)
def record_override(model_name: str, version: int, approver: str, comment: str) -> None:
    """A person promoted past a failed gate: who and why, on the version."""
    tag_version(
        model_name,
        version,
        {"quality.gate": "overridden", "quality.override_by": approver, "quality.override_comment": comment},
    )
