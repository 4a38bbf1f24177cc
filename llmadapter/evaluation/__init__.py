"""Quality evaluation of logged llm/v1 models: evaluation sets, scorers, challenger vs champion, the gate.

Modules: `options` (QualityOptions, the flows' `quality` parameter), `dataset` (rows from JSONL, CSV or
an MLflow evaluation dataset, checked), `scorers` (deterministic MLflow scorers, mlflow.genai's by
name), `judge` (an LLM judge at an OpenAI-compatible URL), `runner` (prepare_evaluation, evaluate_model
in a fresh process and an MLflow evaluation run, compare), `gate` (bootstrap interval, decision, table).
`data/` holds the embedded default's evaluation set for SmolLM2.
"""

from pathlib import Path

from llmadapter.evaluation.dataset import EvaluationRow, EvaluationSet, load_dataset
from llmadapter.evaluation.gate import GateResult, ScorerOutcome, bootstrap_difference, decide
from llmadapter.evaluation.options import JudgeOptions, QualityOptions, ScorerSpec
from llmadapter.evaluation.runner import (
    EvaluationPlan,
    ModelEvaluation,
    compare,
    evaluate_model,
    predict_rows,
    prepare_evaluation,
    tag_version,
)
from llmadapter.evaluation.scorers import SCORERS

DATA_DIR = Path(__file__).parent / "data"
SMOLLM2_EVAL_SET = DATA_DIR / "smollm2_basics.jsonl"

__all__ = [
    "DATA_DIR",
    "SCORERS",
    "SMOLLM2_EVAL_SET",
    "EvaluationPlan",
    "EvaluationRow",
    "EvaluationSet",
    "GateResult",
    "JudgeOptions",
    "ModelEvaluation",
    "QualityOptions",
    "ScorerOutcome",
    "ScorerSpec",
    "bootstrap_difference",
    "compare",
    "decide",
    "evaluate_model",
    "load_dataset",
    "predict_rows",
    "prepare_evaluation",
    "tag_version",
]
