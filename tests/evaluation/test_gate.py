"""The gate as pure functions: bootstrap interval over rows, minimums, allowed regression, renderings."""

from __future__ import annotations

import pytest

from llmadapter.evaluation import GateResult, ScorerSpec, bootstrap_difference, decide

SPEC = ScorerSpec(name="contains", min_score=0.5, max_regression=0.0)


def test_the_interval_brackets_the_mean_difference_and_is_seeded() -> None:
    champion = [1.0] * 20
    challenger = [1.0] * 10 + [0.0] * 10
    mean, low, high = bootstrap_difference(challenger, champion, confidence=0.95, resamples=2000, seed=0)
    assert mean == -0.5 and low < mean < high < 0
    assert (mean, low, high) == bootstrap_difference(
        challenger, champion, confidence=0.95, resamples=2000, seed=0
    )
    wider = bootstrap_difference(challenger, champion, confidence=0.99, resamples=2000, seed=0)
    assert wider[1] <= low and wider[2] >= high


def test_identical_scores_differ_by_nothing() -> None:
    assert bootstrap_difference([1.0, 0.0], [1.0, 0.0], confidence=0.95, resamples=500, seed=0) == (
        0.0,
        0.0,
        0.0,
    )


def test_unpaired_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="pair"):
        bootstrap_difference([1.0], [1.0, 0.0], confidence=0.95, resamples=100, seed=0)


def test_three_rows_of_twenty_worse_is_not_a_regression() -> None:
    champion = [1.0] * 20
    challenger = [0.0] * 3 + [1.0] * 17
    [outcome] = decide([SPEC], ["contains"], {"contains": challenger}, {"contains": champion})
    assert outcome.passed and outcome.difference == pytest.approx(-0.15)
    assert outcome.low is not None and outcome.high is not None and outcome.low < -0.15 and outcome.high >= 0
    assert "within the interval's noise" in outcome.reason


def test_a_clear_regression_is_blocked() -> None:
    champion = [1.0] * 20
    challenger = [0.0] * 8 + [1.0] * 12
    [outcome] = decide([SPEC], ["contains"], {"contains": challenger}, {"contains": champion})
    assert not outcome.passed and "worse than the champion by 0.400" in outcome.reason


def test_an_allowance_lets_a_small_regression_through() -> None:
    champion = [1.0] * 20
    challenger = [0.0] * 8 + [1.0] * 12
    lenient = SPEC.model_copy(update={"max_regression": 0.8})
    [outcome] = decide([lenient], ["contains"], {"contains": challenger}, {"contains": champion})
    assert outcome.passed


def test_below_the_minimum_fails_even_without_a_champion() -> None:
    [outcome] = decide([SPEC], ["contains"], {"contains": [0.0, 1.0, 0.0]}, None)
    assert not outcome.passed and "below the minimum 0.500" in outcome.reason
    assert outcome.champion is None and outcome.difference is None and outcome.max_regression is None


def test_no_comparison_when_max_regression_is_none() -> None:
    spec = ScorerSpec(name="contains", max_regression=None)
    [outcome] = decide([spec], ["contains"], {"contains": [0.0] * 10}, {"contains": [1.0] * 10})
    assert outcome.passed and outcome.difference == -1.0


def test_table_markdown_and_tags() -> None:
    outcomes = decide(
        [SPEC, ScorerSpec(name="regex_match")],
        ["contains", "regex_match"],
        {"contains": [0.0] * 10, "regex_match": [1.0] * 10},
        {"contains": [1.0] * 10, "regex_match": [1.0] * 10},
    )
    result = GateResult(
        passed=False,
        status="failed",
        dataset="set@abc",
        confidence=0.95,
        rows=10,
        outcomes=outcomes,
        challenger_uri="models:/m/2",
        champion_uri="models:/m/1",
        challenger_run="run2",
        champion_run="run1",
    )
    table = result.to_table()
    assert [(r["scorer"], r["champion"], r["challenger"], r["difference"], r["gate"]) for r in table] == [
        ("contains", "1.000", "0.000", "-1.000", "FAIL"),
        ("regex_match", "1.000", "1.000", "+0.000", "pass"),
    ]
    markdown = result.to_markdown({"run2": "http://mlflow/#/runs/run2"})
    assert "| contains | 1.000 | 0.000 | -1.000 | [-1.000, -1.000] |" in markdown
    assert "[run2](http://mlflow/#/runs/run2)" in markdown and "`run1`" in markdown
    tags = result.version_tags()
    assert tags["quality.contains"] == "0.000 (champion 1.000, diff -1.000 [-1.000, -1.000]) FAIL"
    assert tags["quality.gate"] == "failed" and tags["quality.compared_with"] == "models:/m/1"
    assert result.summary().startswith(
        "quality gate FAILED on set@abc (10 rows): contains 0.000, regex_match 1.000"
    )
