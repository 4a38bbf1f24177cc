"""The gate, as pure functions: per-scorer difference with a bootstrap interval, the pass/fail decision,
and its renderings (table rows, markdown, version tags).

The interval is a paired percentile bootstrap over rows of mean(challenger - champion): both models
answered the same rows, so resampling rows keeps each row's pair together. A scorer regresses only when
the whole interval lies below -max_regression, so a few rows' difference on a small set, which the
interval spans zero for, is not called a regression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from llmadapter.evaluation.options import ScorerSpec


def bootstrap_difference(
    challenger: Sequence[float], champion: Sequence[float], *, confidence: float, resamples: int, seed: int
) -> tuple[float, float, float]:
    """mean(challenger - champion) over paired rows and its (low, high) percentile bootstrap interval."""
    import numpy as np

    if len(challenger) != len(champion) or not challenger:
        raise ValueError("the two score lists must pair the same, non-empty rows")
    diffs = np.asarray(challenger, dtype=float) - np.asarray(champion, dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(low), float(high)


class ScorerOutcome(BaseModel):
    """One row of the comparison table."""

    scorer: str
    challenger: float
    champion: float | None = None
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    min_score: float | None = None
    max_regression: float | None = None
    passed: bool
    reason: str


class GateResult(BaseModel):
    """The decision and every scorer's row; runs and dataset name what it was computed on."""

    passed: bool
    dataset: str
    confidence: float
    rows: int
    outcomes: list[ScorerOutcome]
    challenger_uri: str
    champion_uri: str | None = None
    challenger_run: str | None = None
    champion_run: str | None = None
    judge_model: str | None = None
    status: Literal["passed", "failed", "overridden"] = "passed"

    @property
    def failures(self) -> list[str]:
        return [f"{o.scorer}: {o.reason}" for o in self.outcomes if not o.passed]

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        scores = ", ".join(f"{o.scorer} {o.challenger:.3f}" for o in self.outcomes)
        head = f"quality gate {verdict} on {self.dataset} ({self.rows} rows): {scores}"
        return head if self.passed else f"{head}; " + "; ".join(self.failures)

    def to_table(self) -> list[dict[str, str]]:
        return [
            {
                "scorer": o.scorer,
                "champion": _num(o.champion),
                "challenger": _num(o.challenger),
                "difference": _signed(o.difference),
                f"{self.confidence:.0%} interval": _interval(o.low, o.high),
                "min": _num(o.min_score),
                "max regression": _num(o.max_regression),
                "gate": "pass" if o.passed else "FAIL",
                "why": o.reason,
            }
            for o in self.outcomes
        ]

    def to_markdown(self, run_link: dict[str, str] | None = None) -> str:
        """The table, with links to both evaluation runs (`run_link`: run id -> URL) when known."""
        table = self.to_table()
        head = list(table[0])
        lines = [
            f"### Quality gate: {'passed' if self.passed else 'FAILED'} ({self.status})",
            "",
            f"Evaluation set `{self.dataset}`, {self.rows} rows; interval: paired bootstrap over rows.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *("| " + " | ".join(_cell(r[h]) for h in head) + " |" for r in table),
            "",
            f"- challenger `{self.challenger_uri}`: evaluation run {_link(self.challenger_run, run_link)}",
        ]
        if self.champion_uri is not None:
            lines.append(
                f"- champion `{self.champion_uri}`: evaluation run {_link(self.champion_run, run_link)}"
            )
        if self.judge_model:
            lines.append(f"- judge model: `{self.judge_model}`")
        return "\n".join(lines) + "\n"

    def version_tags(self) -> dict[str, str]:
        """Tags for the challenger's version: quality.<scorer> and how the gate went."""
        tags = {f"quality.{o.scorer}": _version_tag(o) for o in self.outcomes}
        tags |= {
            "quality.gate": self.status,
            "quality.dataset": self.dataset,
            "quality.run_id": self.challenger_run or "",
        }
        if self.champion_uri is not None:
            tags["quality.compared_with"] = self.champion_uri
        if self.judge_model:
            tags["quality.judge_model"] = self.judge_model
        return tags


def _version_tag(o: ScorerOutcome) -> str:
    text = f"{o.challenger:.3f}"
    if o.champion is not None:
        text += f" (champion {o.champion:.3f}, diff {_signed(o.difference)} {_interval(o.low, o.high)})"
    return f"{text} {'pass' if o.passed else 'FAIL'}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link(run_id: str | None, links: dict[str, str] | None) -> str:
    if run_id is None:
        return "-"
    url = (links or {}).get(run_id)
    return f"[{run_id}]({url})" if url else f"`{run_id}`"


def decide(
    specs: Sequence[ScorerSpec],
    names: Sequence[str],
    challenger: dict[str, list[float]],
    champion: dict[str, list[float]] | None,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> list[ScorerOutcome]:
    """Every scorer above its minimum and, against a champion, no regression beyond its allowance.

    `names` are the scorers' recorded names in the order of `specs`; the score lists are per row.
    """
    outcomes = []
    for spec, name in zip(specs, names, strict=True):
        mine = challenger[name]
        mean = sum(mine) / len(mine)
        reasons, passed = [], True
        if spec.min_score is not None and mean < spec.min_score:
            passed = False
            reasons.append(f"{mean:.3f} is below the minimum {spec.min_score:.3f}")
        diff = low = high = champ = None
        theirs = champion.get(name) if champion is not None else None
        if theirs is not None:
            champ = sum(theirs) / len(theirs)
            diff, low, high = bootstrap_difference(
                mine, theirs, confidence=confidence, resamples=resamples, seed=seed
            )
            if spec.max_regression is not None and high < -spec.max_regression:
                passed = False
                reasons.append(
                    f"worse than the champion by {-diff:.3f}: the whole interval is below the allowed "
                    f"regression {spec.max_regression:.3f}"
                )
            elif spec.max_regression is not None and diff < 0:
                reasons.append(f"{diff:+.3f} vs the champion: within the interval's noise or the allowance")
        if passed and not reasons:
            reasons.append("above the minimum" if spec.min_score is not None else "no minimum set")
        outcomes.append(
            ScorerOutcome(
                scorer=name,
                challenger=mean,
                champion=champ,
                difference=diff,
                low=low,
                high=high,
                min_score=spec.min_score,
                max_regression=spec.max_regression if theirs is not None else None,
                passed=passed,
                reason="; ".join(reasons),
            )
        )
    return outcomes
