"""Validation of a logged llm/v1 model: signature conformance and sample predictions -> ValidationReport.

Modules: `report` (the report, its renderings, `log_report`), `samples` (built-in and user samples),
`worker` (the model loaded in a fresh process or this one), `schema` (answers read into the task's
typed response), `checks` (pure checks over typed answers and the table of checks per task), `logged`
(signature and flavor metadata of the artifact), `runner` (validate_model, predict_samples).
`python -m llmadapter.validation MODEL_URI` prints a model's report.
"""

from llmadapter.validation.logged import check_signature
from llmadapter.validation.report import CheckResult, ValidationReport, log_report, raise_for_report
from llmadapter.validation.runner import SampleAnswer, predict_samples, validate_model
from llmadapter.validation.samples import ValidationSample

__all__ = [
    "CheckResult",
    "SampleAnswer",
    "ValidationReport",
    "ValidationSample",
    "check_signature",
    "log_report",
    "predict_samples",
    "raise_for_report",
    "validate_model",
]
