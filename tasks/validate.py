"""Prefect tasks over llmadapter.validation: validate a logged model and publish the report."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from llmadapter.validation import (
    SampleAnswer,
    ValidationReport,
    ValidationSample,
    log_report,
    predict_samples,
    validate_model,
)
from tasks._retry import transient_task


class ValidationOptions(BaseModel):
    """How log-and-validate validates a model (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")

    samples: list[ValidationSample] = Field(
        default_factory=list,
        description="Extra requests to predict (OpenAI request bodies), with optional expected text.",
    )
    fresh_process: bool = Field(
        default=True, description="Load and predict in a fresh Python process, as a server would."
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=24 * 3600,
        description="Limit for the whole validation (default: LLMADAPTER_VALIDATION_TIMEOUT_S, 900 s).",
    )
    max_latency_s: float | None = Field(
        default=None, gt=0, description="Fail when any sample takes longer than this many seconds."
    )


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free text."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100] or "artifact"


@task(name="validate", task_run_name="validate {model_uri}")
def validate_logged_model(model_uri: str, options: ValidationOptions) -> ValidationReport:
    """Run llmadapter's validation; a failing model gives a failing report, not an exception."""
    return validate_model(
        model_uri,
        samples=options.samples,
        fresh_process=options.fresh_process,
        timeout_s=options.timeout_s,
        max_latency_s=options.max_latency_s,
    )


@transient_task(name="publish-report", retry_delay_seconds=5)
def publish_report(report: ValidationReport, run_id: str, model_name: str) -> None:
    """The report on the MLflow run (JSON + markdown) and on the Prefect flow run (markdown + table)."""
    log_report(report, run_id)
    key = artifact_key("validation", model_name)
    create_markdown_artifact(
        markdown=report.to_markdown(), key=key, description=f"Validation of {model_name}: {report.summary()}"
    )
    rows: list[dict[str, Any]] = report.to_table()
    create_table_artifact(table=rows, key=f"{key}-checks", description=f"Validation checks of {model_name}")


@task(name="answer-samples", task_run_name="answer samples with {model_uri}")
def answer_samples(
    model_uri: str, samples: list[ValidationSample], fresh_process: bool = True
) -> list[SampleAnswer]:
    """Each sample's answer and latency from one model, for a side-by-side comparison."""
    return predict_samples(model_uri, samples, fresh_process=fresh_process)
