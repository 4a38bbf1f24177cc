"""llmadapter.validation.report: the report's renderings, raise_for_report, and log_report on a real run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from llmadapter.errors import ValidationFailedError
from llmadapter.validation import CheckResult, ValidationReport, log_report, raise_for_report


def _report(*checks: CheckResult) -> ValidationReport:
    status = "passed" if all(c.passed for c in checks) else "failed"
    return ValidationReport(model_uri="models:/m/1", task="llm/v1/chat", status=status, checks=list(checks))


def test_report_summary_markdown_and_tags() -> None:
    report = _report(
        CheckResult(name="signature", passed=True, detail="ok"),
        CheckResult(name="sample:a", passed=True, latency_s=0.2),
        CheckResult(name="sample:b", passed=False, detail="answer | had a pipe", latency_s=0.4),
    )

    assert not report.passed
    assert report.summary() == (
        "failed: 2/3 checks passed, sample latency p50 0.300 s, max 0.400 s; failed: sample:b"
    )
    markdown = report.to_markdown()
    assert "## Validation FAILED: `models:/m/1`" in markdown
    assert "| sample:b | **FAIL** | 0.400 | answer \\| had a pipe |" in markdown
    assert report.to_tags() == {
        "validation_status": "failed",
        "validation_checks": "2/3",
        "validation_p50_latency_s": "0.3000",
        "validation_max_latency_s": "0.4000",
        "validation_failed": "sample:b",
    }
    assert report.to_table()[2] == {
        "check": "sample:b",
        "passed": False,
        "latency_s": 0.4,
        "detail": "answer | had a pipe",
    }
    with pytest.raises(ValidationFailedError, match="sample:b: answer"):
        raise_for_report(report)
    raise_for_report(_report(CheckResult(name="signature", passed=True)))  # a passing report does not raise


@pytest.mark.parametrize(
    ("problems", "passed", "detail"),
    [([], True, "all fine"), (["a", "b"], False, "a; b")],
    ids=["no-problems-passes-with-ok-detail", "problems-fail-and-are-named"],
)
def test_check_result_of(problems: list[str], passed: bool, detail: str) -> None:
    result = CheckResult.of("x", problems, "all fine", 0.5)

    assert (result.passed, result.detail, result.latency_s) == (passed, detail, 0.5)


def test_log_report_attaches_json_markdown_and_a_tag_to_the_run(store: Path) -> None:
    report = _report(CheckResult(name="sample:a", passed=True, latency_s=0.5))
    with mlflow.start_run() as run:
        pass

    log_report(report, run.info.run_id)

    saved = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/validation/report.json")
    assert ValidationReport.model_validate(saved) == report
    assert "## Validation passed" in mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/validation/report.md"
    )
    finished = mlflow.get_run(run.info.run_id)
    assert finished.data.tags["validation_status"] == "passed"
    assert finished.data.metrics["validation_p50_latency_s"] == 0.5
