"""`python -m llmadapter.validation`: the report of a model on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmadapter.validation.__main__ import main
from tests.validation.models import log_scripted


def test_usage_without_a_model_uri(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: python -m llmadapter.validation MODEL_URI" in capsys.readouterr().err


def test_a_failing_model_prints_its_report_and_exits_1(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([log_scripted("no-id")]) == 1
    out = capsys.readouterr().out
    assert "## Validation FAILED" in out and "lacks id" in out
