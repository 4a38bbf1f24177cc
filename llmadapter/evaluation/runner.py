"""prepare_evaluation (every check before a model loads) and evaluate_model (one version, one MLflow run).

A model version is evaluated in a fresh process (the validation worker, `llmadapter.validation.worker`):
all rows in one predict call, so the engine answers them as one batch. The answers are then scored in
this process by `mlflow.genai.evaluate` in an evaluation run linked to the version's LoggedModel, with
the evaluation set logged as the run's dataset input (its name, source and digest).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from llmadapter.errors import EvaluationError, QualityGateError
from llmadapter.evaluation.dataset import EvaluationRow, EvaluationSet, load_dataset
from llmadapter.evaluation.gate import GateResult, decide
from llmadapter.evaluation.options import QualityOptions
from llmadapter.evaluation.scorers import EMBEDDINGS_TASKS, PlannedScorer, build_scorers, score_value
from llmadapter.validation.worker import Outcome, open_session

# MLflow scores rows on 10 threads by default; a SQLite store then runs out of pooled connections.
_EVAL_WORKERS = "4"


@dataclass(frozen=True)
class EvaluationPlan:
    """What both versions are evaluated on: the rows, the task, and the scorers built for them."""

    options: QualityOptions
    dataset: EvaluationSet
    task: str
    scorers: list[PlannedScorer]


def _task_of(model_uri: str) -> str:
    import mlflow.models
    from mlflow.exceptions import MlflowException

    from llmadapter.validation.logged import logged_task

    try:
        task = logged_task(mlflow.models.get_model_info(model_uri))
    except MlflowException as exc:
        raise EvaluationError(f"cannot read {model_uri}: {exc.message}", param="model") from None
    if task is None:
        raise EvaluationError(f"{model_uri} has no llm/v1 task to evaluate.", param="model")
    return task


def prepare_evaluation(
    options: QualityOptions, model_uris: Sequence[str] = (), *, task: str | None = None
) -> EvaluationPlan:
    """Read and check the set, the scorers (against the task and the rows) and the judge.

    The task is `task`, else the one the models' metadata names (they must agree); nothing loads, so
    every bad input fails here, with EvaluationError, before any model is loaded.
    """
    dataset = load_dataset(options.dataset).sample(options.sample_size, options.seed)
    tasks = {uri: _task_of(uri) for uri in model_uris}
    if task is not None:
        tasks["the task given"] = task
    if not tasks:
        raise ValueError("prepare_evaluation needs model_uris or task")
    if len(set(tasks.values())) > 1:
        raise EvaluationError(f"the versions compared answer different tasks: {tasks}.", param="model")
    task = next(iter(tasks.values()))
    for row in dataset.rows:
        _check_row_for_task(row, task)
    scorers = build_scorers(options.scorers, dataset, task, options.judge)
    return EvaluationPlan(options, dataset, task, scorers)


def _check_row_for_task(row: EvaluationRow, task: str) -> None:
    wanted = {"llm/v1/chat": "messages", "llm/v1/completions": "prompt", "llm/v1/embeddings": "input"}[task]
    if wanted not in row.request:
        raise EvaluationError(
            f"dataset row {row.id}: a {task} model needs `{wanted}`; the row has {', '.join(row.request)}.",
            param="dataset",
        )
    if task in EMBEDDINGS_TASKS and not (
        isinstance(row.request["input"], list) and len(row.request["input"]) > 1
    ):
        raise EvaluationError(
            f"dataset row {row.id}: an embeddings row needs `input` and `candidates`.", param="dataset"
        )


class ModelEvaluation(BaseModel):
    """One version's scores on the plan's rows (in row order) and the MLflow run that holds them."""

    model_uri: str
    model_id: str | None = None
    run_id: str
    dataset: str = Field(description="name@digest of the evaluation set")
    rows: int
    scores: dict[str, list[float]]
    means: dict[str, float]
    failed_predictions: int
    load_s: float
    predict_s: float
    judge_model: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.predict_s if self.predict_s > 0 else math.inf


def predict_rows(
    model_uri: str, plan: EvaluationPlan, *, one_by_one: bool = False
) -> tuple[list[Any], float, float]:
    """Each row's answer as scorers read it, load and predict wall seconds; one fresh process.

    Generation rows go in one predict call (`one_by_one`: one call per row, for the benchmark);
    embeddings rows are one request holding every text, split back per row.
    """
    from llmadapter.settings import get_settings

    timeout = plan.options.timeout_s or get_settings().validation_timeout_s
    rows = plan.dataset.rows
    with open_session(model_uri, fresh_process=plan.options.fresh_process, timeout_s=timeout) as session:
        if session.loaded.error is not None:
            raise QualityGateError(
                f"{model_uri} did not load for evaluation: {session.loaded.error.error}", param="model"
            )
        start = time.perf_counter()
        if plan.task in EMBEDDINGS_TASKS:
            outputs = _embedding_outputs(
                rows, session.predict({"input": [t for r in rows for t in r.request["input"]]})
            )
        elif one_by_one:
            outputs = [_text_outputs(session.predict(r.request)) for r in rows]
        else:
            outputs = [_text_outputs(o) for o in session.predict_batch([r.request for r in rows])]
        return outputs, session.loaded.load_s or 0.0, time.perf_counter() - start


def _text_outputs(outcome: Outcome) -> Any:
    if not outcome.ok:
        return {"error": outcome.error}
    try:
        choice = outcome.response["choices"][0]
    except (KeyError, IndexError, TypeError):
        return {"error": f"not an llm/v1 answer: {json.dumps(outcome.response)[:200]}"}
    if "text" in choice:
        return str(choice["text"] or "")
    message = choice.get("message") or {}
    if message.get("tool_calls"):
        return {"content": message.get("content") or "", "tool_calls": message["tool_calls"]}
    return str(message.get("content") or "")


def _embedding_outputs(rows: list[EvaluationRow], outcome: Outcome) -> list[Any]:
    import numpy as np

    if not outcome.ok:
        return [{"error": outcome.error}] * len(rows)
    vectors = np.array([d["embedding"] for d in outcome.response["data"]], dtype=float)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    out, at = [], 0
    for row in rows:
        n = len(row.request["input"])
        block = vectors[at : at + n]
        at += n
        out.append({"similarities": [round(float(s), 6) for s in block[1:] @ block[0]]})
    return out


def evaluation_frame(dataset: EvaluationSet, outputs: list[Any]) -> Any:
    """The rows as mlflow.genai.evaluate reads them, carrying the set's identity (name, source, digest)
    so the run's dataset input names this set rather than MLflow's default "dataset"."""
    import pandas as pd
    from mlflow.genai.datasets.evaluation_dataset import compute_records_sha256
    from mlflow.utils.mlflow_tags import MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY

    frame = pd.DataFrame(
        [
            {"inputs": row.request, "outputs": output, "expectations": row.expectations.given()}
            for row, output in zip(dataset.rows, outputs, strict=True)
        ]
    )
    frame.attrs[MLFLOW_GENAI_EVALUATE_DATASET_IDENTITY] = {
        "name": dataset.name,
        "digest": dataset.digest,
        "source_type": dataset.source_type,
        "source": json.dumps({"uri": dataset.source}),
        "schema": None,
        "profile": json.dumps({"num_rows": len(dataset.rows)}),
        "records_sha256": compute_records_sha256(frame),
    }
    return frame


@contextlib.contextmanager
def _scoring_threads() -> Iterator[None]:
    name = "MLFLOW_GENAI_EVAL_MAX_WORKERS"
    if name in os.environ:
        yield
        return
    os.environ[name] = _EVAL_WORKERS
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _model_link(model_uri: str) -> tuple[str | None, str | None]:
    """The LoggedModel id and the experiment of the run that logged it."""
    import mlflow
    import mlflow.models

    info = mlflow.models.get_model_info(model_uri)
    experiment = mlflow.get_run(info.run_id).info.experiment_id if info.run_id else None
    return getattr(info, "model_id", None), experiment


def evaluate_model(
    plan: EvaluationPlan,
    model_uri: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> ModelEvaluation:
    """Predict every row with `model_uri` (fresh process) and score the answers in a new MLflow run."""
    import mlflow
    import mlflow.genai

    outputs, load_s, predict_s = predict_rows(model_uri, plan)
    failed = sum(1 for o in outputs if isinstance(o, dict) and "error" in o)
    model_id, experiment_id = _model_link(model_uri)
    run_tags = {
        "llmadapter.evaluation_of": model_uri,
        "llmadapter.dataset": plan.dataset.label,
        **(tags or {}),
    }
    frame = evaluation_frame(plan.dataset, outputs)
    with (
        _scoring_threads(),
        mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=run_tags) as run,
    ):
        mlflow.log_params(
            {
                "model_uri": model_uri,
                "dataset": plan.dataset.label,
                "scorers": ", ".join(s.name for s in plan.scorers),
                "judge_model": plan.options.judge.model if plan.options.judge else "-",
            }
        )
        # evaluate() writes a banner in terminal colours to stdout; the callers report the run themselves.
        with contextlib.redirect_stdout(io.StringIO()):
            result = mlflow.genai.evaluate(
                data=frame, scorers=[s.scorer for s in plan.scorers], model_id=model_id
            )
        scores = read_scores(result.result_df, plan.scorers, model_uri)
        means = {name: sum(v) / len(v) for name, v in scores.items()}
        mlflow.log_metrics(
            {
                "rows_per_s": len(outputs) / predict_s if predict_s > 0 else 0.0,
                "failed_predictions": failed,
                **{f"quality.{n}": m for n, m in means.items()},
            }
        )
    return ModelEvaluation(
        model_uri=model_uri,
        model_id=model_id,
        run_id=run.info.run_id,
        dataset=plan.dataset.label,
        rows=len(outputs),
        scores=scores,
        means=means,
        failed_predictions=failed,
        load_s=load_s,
        predict_s=predict_s,
        judge_model=plan.options.judge.model if plan.options.judge else None,
    )


def read_scores(result_df: Any, scorers: list[PlannedScorer], model_uri: str) -> dict[str, list[float]]:
    """Each scorer's value per row from MLflow's result table; a scorer that failed on a row fails here,
    with its error (a judge that stopped answering names its URL)."""
    out: dict[str, list[float]] = {}
    for planned in scorers:
        column = f"{planned.name}/value"
        values = list(result_df[column]) if column in result_df.columns else [None] * len(result_df)
        numbers = [score_value(v) for v in values]
        if any(n is None for n in numbers):
            row = numbers.index(None)
            raise EvaluationError(
                f"scorer {planned.name} gave no score for row {row} of {model_uri}: "
                f"{_scorer_error(result_df, row, planned.name)}",
                param=f"quality.scorers.{planned.spec.name}",
            )
        out[planned.name] = [min(1.0, max(0.0, float(n))) for n in numbers if n is not None]
    return out


def _scorer_error(result_df: Any, row: int, name: str) -> str:
    """The error MLflow recorded for a scorer on a row (its assessments), else its raw value."""
    try:
        for assessment in result_df.iloc[row]["assessments"]:
            data = assessment if isinstance(assessment, dict) else assessment.to_dictionary()
            if data.get("assessment_name") == name:
                error = (data.get("feedback") or {}).get("error") or data.get("error")
                if error:
                    return str(error.get("error_message") if isinstance(error, dict) else error)[:500]
    except (KeyError, AttributeError, TypeError):
        pass
    column = f"{name}/value"
    return f"value {result_df.iloc[row].get(column)!r}"


def compare(
    plan: EvaluationPlan, challenger: ModelEvaluation, champion: ModelEvaluation | None
) -> GateResult:
    """The gate on the challenger's scores, against the champion's on the same rows when there is one."""
    names = [s.name for s in plan.scorers]
    outcomes = decide(
        [s.spec for s in plan.scorers],
        names,
        challenger.scores,
        champion.scores if champion is not None else None,
        confidence=plan.options.confidence,
        resamples=plan.options.resamples,
        seed=plan.options.seed,
    )
    passed = all(o.passed for o in outcomes)
    return GateResult(
        passed=passed,
        status="passed" if passed else "failed",
        dataset=plan.dataset.label,
        confidence=plan.options.confidence,
        rows=challenger.rows,
        outcomes=outcomes,
        challenger_uri=challenger.model_uri,
        champion_uri=champion.model_uri if champion is not None else None,
        challenger_run=challenger.run_id,
        champion_run=champion.run_id if champion is not None else None,
        judge_model=challenger.judge_model,
    )


def tag_version(name: str, version: int, tags: Mapping[str, str]) -> None:
    """Write the gate's tags on a registered version (quality.<scorer>, quality.gate, ...)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value[:5000])
