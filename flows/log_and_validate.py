"""Flow `log-and-validate`: download -> log -> validate -> register (only if valid) -> alias challenger.

Runs for one registered name may overlap (two schedules, a schedule and a person): registration takes
the name's lock (tasks._lock.registration_lock), and each run first ends the MLflow runs that
killed earlier runs left RUNNING (tasks.log.end_runs_left_running).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._params import LogAndValidateResult, default_model_name
from llmadapter.catalog import LLMTask, get_task
from llmadapter.config import TaskConfig
from llmadapter.registry import CHALLENGER, CHAMPION
from llmadapter.settings import configure_mlflow
from llmadapter.validation import raise_for_report
from tasks.download import download_model
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
    """
    logger = get_run_logger()
    configure_mlflow()
    # Validated once, for the task; the typed config travels on to llmadapter.log_model.
    model_config = get_task(task).parse_config(config)
    chash = model_config.digest()

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
    else:
        logged = log_model_once(resolved, task, model_config, save_pretrained, model_name=name)
        report = validate_logged_model(logged.model_uri, validation)
        publish_report(report, logged.run_id, name)
        logger.info("Validation of %s: %s", logged.model_uri, report.summary())
        raise_for_report(report)
        version, created = register_model(logged, name, report)
        summary = report.summary()

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
