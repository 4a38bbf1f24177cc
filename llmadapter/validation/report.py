"""The validation report: CheckResult, ValidationReport, its renderings, and where it is recorded (MLflow)."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmadapter.errors import ValidationFailedError

Status = Literal["passed", "failed"]
REPORT_ARTIFACT_DIR = "validation"


class CheckResult(BaseModel):
    """One check: a name, whether it passed, what was seen, and the prediction latency if it ran one."""

    model_config = ConfigDict(frozen=True)

    name: str
    passed: bool
    detail: str = ""
    latency_s: float | None = None

    @classmethod
    def of(
        cls, name: str, problems: list[str], ok_detail: str, latency_s: float | None = None
    ) -> CheckResult:
        """Passed when there are no problems (the detail says what was seen), else failed naming them."""
        return cls(
            name=name, passed=not problems, detail="; ".join(problems) or ok_detail, latency_s=latency_s
        )


class ValidationReport(BaseModel):
    """The typed result of validate_model; saved on the MLflow run, the version tags and in Prefect."""

    model_uri: str
    task: str | None
    status: Status
    checks: list[CheckResult]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    duration_s: float = 0.0
    load_s: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    @property
    def sample_latencies(self) -> list[float]:
        return [c.latency_s for c in self.checks if c.latency_s is not None and c.name.startswith("sample:")]

    @property
    def p50_latency_s(self) -> float | None:
        lat = self.sample_latencies
        return statistics.median(lat) if lat else None

    @property
    def max_latency_s(self) -> float | None:
        lat = self.sample_latencies
        return max(lat) if lat else None

    def summary(self) -> str:
        """One line: status, checks passed, sample latency."""
        n_ok = sum(c.passed for c in self.checks)
        line = f"{self.status}: {n_ok}/{len(self.checks)} checks passed"
        if self.p50_latency_s is not None:
            line += f", sample latency p50 {self.p50_latency_s:.3f} s, max {self.max_latency_s:.3f} s"
        if self.failed_checks:
            line += "; failed: " + ", ".join(c.name for c in self.failed_checks)
        return line

    def to_markdown(self) -> str:
        head = "passed" if self.passed else "FAILED"
        lines = [
            f"## Validation {head}: `{self.model_uri}`",
            "",
            f"Task `{self.task}`. {self.summary()}. Took {self.duration_s:.1f} s"
            + (f" (model load {self.load_s:.1f} s in a fresh process)." if self.load_s is not None else "."),
            "",
            "| check | result | latency (s) | detail |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            latency = f"{c.latency_s:.3f}" if c.latency_s is not None else ""
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {latency} | {detail} |")
        return "\n".join(lines) + "\n"

    def to_table(self) -> list[dict[str, Any]]:
        """Rows for a Prefect table artifact."""
        return [
            {"check": c.name, "passed": c.passed, "latency_s": c.latency_s, "detail": c.detail}
            for c in self.checks
        ]

    def to_tags(self) -> dict[str, str]:
        """Registry version tags (strings; MLflow caps tag values at 5000 characters)."""
        tags = {
            "validation_status": self.status,
            "validation_checks": f"{sum(c.passed for c in self.checks)}/{len(self.checks)}",
        }
        if self.p50_latency_s is not None:
            tags["validation_p50_latency_s"] = f"{self.p50_latency_s:.4f}"
        if self.max_latency_s is not None:
            tags["validation_max_latency_s"] = f"{self.max_latency_s:.4f}"
        if self.failed_checks:
            tags["validation_failed"] = ", ".join(c.name for c in self.failed_checks)[:4000]
        return tags


def raise_for_report(report: ValidationReport) -> None:
    """Raise ValidationFailedError naming the failed checks; do nothing for a passing report."""
    if report.passed:
        return
    failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failed_checks)
    raise ValidationFailedError(
        f"Validation of {report.model_uri} failed: {failed}"[:4000], param="model_uri"
    )


def log_report(report: ValidationReport, run_id: str) -> None:
    """Attach the report to an MLflow run: JSON + markdown artifacts, a status tag, latency metrics."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_dict(run_id, report.model_dump(mode="json"), f"{REPORT_ARTIFACT_DIR}/report.json")
    client.log_text(run_id, report.to_markdown(), f"{REPORT_ARTIFACT_DIR}/report.md")
    client.set_tag(run_id, "validation_status", report.status)
    if report.p50_latency_s is not None:
        client.log_metric(run_id, "validation_p50_latency_s", report.p50_latency_s)
    if report.load_s is not None:
        client.log_metric(run_id, "validation_load_s", report.load_s)
