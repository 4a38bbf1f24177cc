"""Flow `log-and-validate`: download -> log -> validate -> register (only if valid) -> alias challenger.

Runs for one registered name may overlap (two schedules, a schedule and a person): registration takes
the name's lock (tasks._lock.registration_lock), and each run first ends the MLflow runs that
killed earlier runs left RUNNING (tasks.log.end_runs_left_running).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._params import LogAndValidateResult, QualityOptions, default_model_name
from llmadapter.catalog import LLMTask, get_task
from llmadapter.config import TaskConfig
from llmadapter.errors import QualityGateError
from llmadapter.evaluation import EvaluationPlan, GateResult
from llmadapter.registry import CHALLENGER, CHAMPION
from llmadapter.settings import configure_mlflow
from llmadapter.validation import raise_for_report
from tasks.download import download_model
from tasks.evaluate import evaluate_version, prepare_quality, publish_quality, quality_gate
from tasks.log import end_runs_left_running, log_model_once
from tasks.register import find_registered_version, get_version, promote_version, register_model, set_alias
from tasks.validate import ValidationOptions, artifact_key, publish_report, validate_logged_model


@flow(name="log-and-validate", log_prints=True)
def log_and_validate(
    source: str,
    task: LLMTask = "llm/v1/chat",
    model_name: str | None = None,
    revision: str | None = None,
    config: TaskConfig | None = None,
    save_pretrained: bool = True,
    validation: ValidationOptions = ValidationOptions(),
    promote: bool = False,
    quality: QualityOptions | None = None,
) -> LogAndValidateResult:
    """Log a Hugging Face model as an llm/v1 MLflow model, validate it, and register it if it passes.

    Args:
        source: Hub id (org/name or org/name@revision), local model folder, or .gguf file.
        task: The llm/v1 task the model answers.
        model_name: Registered model name; default derived from the source and task.
        revision: Hub branch, tag or commit sha when the source pins none.
        config: model_config, the request defaults stored with the model (temperature, max_tokens, ...).
        save_pretrained: False stores a hub reference instead of the weights (copied in before champion).
        validation: Extra samples and limits for the validation step.
        promote: Also move `champion` to the new version when the promotion gates pass.
        quality: Minimum scores on an evaluation set, required before registering (below them nothing
            is registered); the scores are tagged on the version.
    """
    logger = get_run_logger()
    configure_mlflow()
    # Validated once, for the task; the typed config travels on to llmadapter.log_model.
    model_config = get_task(task).parse_config(config)
    chash = model_config.digest()
    # Every quality setting (set, scorers, judge) is checked before anything is downloaded or loaded.
    plan = prepare_quality(quality, model_task=task) if quality is not None else None

    resolved = download_model(source, revision)
    name = model_name or default_model_name(source, task)
    end_runs_left_running(name)
    version = find_registered_version(name, resolved.revision, task, chash)
    if version is not None:
        logger.info(
            "%s version %d already holds %s at %s with this model_config: nothing logged or registered.",
            name,
            version.version,
            source,
            resolved.revision,
        )
        created = False
        summary = f"reused; validation {version.tags.get('validation_status', 'unknown')}"
        gate_summary = _reused_quality(version.tags) if plan is not None else None
    else:
        logged = log_model_once(resolved, task, model_config, save_pretrained, model_name=name)
        report = validate_logged_model(logged.model_uri, validation)
        publish_report(report, logged.run_id, name)
        logger.info("Validation of %s: %s", logged.model_uri, report.summary())
        raise_for_report(report)
        gate = _quality_minimums(plan, logged.model_uri, name) if plan is not None else None
        version, created = register_model(logged, name, report)
        summary = report.summary()
        gate_summary = gate.summary() if gate is not None else None
        if gate is not None:
            publish_quality(gate, name, version.version)

    set_alias(name, CHALLENGER, version.version)
    if promote:
        promote_version(name, version.version, CHAMPION, approver="log-and-validate", comment="promote=True")
    final = get_version(name, version.version)
    result = LogAndValidateResult(
        model_name=name,
        version=final.version,
        model_uri=final.uri,
        created=created,
        revision=resolved.revision,
        task=task,
        config_hash=chash,
        aliases=sorted(final.aliases),
        validation=summary,
        quality=gate_summary,
    )
    what = "Registered" if created else "Reused (already registered)"
    aliases = ", ".join("@" + a for a in result.aliases) or "none"
    create_markdown_artifact(
        markdown=(
            f"## {name} version {result.version}\n\n{what} from `{source}` at `{resolved.revision}` as "
            f"`{task}`.\n\nAliases: {aliases}. Validation: {summary}.\n"
        ),
        key=artifact_key("registered", name),
        description=f"{name} v{result.version}",
    )
    return result


def _quality_minimums(plan: EvaluationPlan, model_uri: str, model_name: str) -> GateResult:
    """The logged model's scores against the minimums; below them the run fails, nothing registered."""
    result = quality_gate(plan, evaluate_version(plan, model_uri, model_name), None)
    get_run_logger().info("Quality of %s: %s", model_uri, result.summary())
    if not result.passed:
        markdown = publish_quality(result, model_name)
        raise QualityGateError(
            f"{model_uri} is below the quality minimums; nothing was registered.\n\n{markdown}",
            param="quality",
            code="quality_gate_failed",
        )
    return result


def _reused_quality(tags: dict[str, str]) -> str:
    """What the reused version's tags say of its quality (it is not evaluated again)."""
    scores = ", ".join(
        f"{k.removeprefix('quality.')} {v.split()[0]}" for k, v in sorted(tags.items()) if _is_score(k)
    )
    gate = tags.get("quality.gate")
    return f"reused; quality gate {gate}: {scores}" if gate else "reused; never evaluated for quality"


def _is_score(tag: str) -> bool:
    return tag.startswith("quality.") and tag.count(".") == 1 and tag.split(".")[1] not in _GATE_TAGS


_GATE_TAGS = frozenset(
    {"gate", "dataset", "run_id", "compared_with", "judge_model", "override_by", "override_comment"}
)
