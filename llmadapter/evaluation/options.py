"""The quality gate's settings: evaluation set, scorers with their limits, judge (the flows' `quality`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScorerSpec(BaseModel):
    """One scorer of the gate and its limits (scores are in [0, 1]: a mean over the rows)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        description=(
            "exact_match, contains, regex, json_schema, tool_call, cosine, recall_at_k, answer_length, "
            "judge, or an mlflow.genai scorer class by name (RegexMatch, ResponseLength, Correctness, ...)."
        ),
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The scorer's parameters (answer_length: max_chars; recall_at_k: k; mlflow: its kwargs).",
    )
    min_score: float | None = Field(
        default=None, ge=0, le=1, description="The lowest mean score that passes (none: no minimum)."
    )
    max_regression: float | None = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "How far the challenger may fall below the champion: fails when the whole confidence "
            "interval of (challenger - champion) lies below -max_regression. None: not compared."
        ),
    )


class JudgeOptions(BaseModel):
    """An LLM judge at an OpenAI-compatible URL (our own `llmadapter serve` included)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, description="Base URL of the API, e.g. http://127.0.0.1:8080/v1.")
    model: str = Field(min_length=1, description="The judge model's name at that URL (named in results).")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key (never the key itself)."
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Limit for one judge call.")


class QualityOptions(BaseModel):
    """Challenger vs champion on an evaluation set: what to evaluate and when the gate passes."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        min_length=1,
        description="A .jsonl or .csv file, or the name of an MLflow evaluation dataset.",
    )
    scorers: list[ScorerSpec] = Field(
        min_length=1, description="The scorers, each with its minimum and allowed regression."
    )
    sample_size: int | None = Field(
        default=None, ge=1, description="Evaluate this many rows (a seeded sample, the same for both)."
    )
    judge: JudgeOptions | None = Field(default=None, description="Needed by the `judge` scorer.")
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="Confidence level of the bootstrap interval."
    )
    resamples: int = Field(default=2000, ge=100, le=100_000, description="Bootstrap resamples.")
    seed: int = Field(default=0, description="Seed of the row sample and of the bootstrap.")
    fresh_process: bool = Field(
        default=True, description="Load each model version in a fresh Python process, as a server would."
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=24 * 3600,
        description="Limit for one model's predictions (default: LLMADAPTER_VALIDATION_TIMEOUT_S).",
    )

    @model_validator(mode="after")
    def _scorer_names_unique(self) -> QualityOptions:
        names = [s.name for s in self.scorers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scorers are named twice: {', '.join(repeated)}")
        return self
