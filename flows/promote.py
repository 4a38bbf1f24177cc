"""Flow `promote`: compare challenger and champion, wait for a person's approval, then move the alias."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import ConfigDict, Field, model_validator

from flows._params import ApprovalDecision, QualityOptions
from llmadapter.errors import NotFoundError, QualityGateError
from llmadapter.evaluation import GateResult
from llmadapter.registry import CHALLENGER, CHAMPION, RegisteredVersion, raise_unless_promotable
from llmadapter.settings import configure_mlflow
from llmadapter.validation import SampleAnswer, ValidationSample
from tasks.evaluate import evaluate_version, prepare_quality, publish_quality, quality_gate, record_override
from tasks.register import get_alias, get_version, promote_version
from tasks.serve import confirm_serving
from tasks.validate import answer_samples, artifact_key

# "approve": true needs a name. In the JSON schema too, because the Prefect server validates a resume
# against the schema (and refuses it, so the run stays paused); a pydantic validator alone would only
# fail the flow run after the server had accepted the input.
_APPROVER_REQUIRED: dict[str, Any] = {
    "if": {"properties": {"approve": {"const": True}}, "required": ["approve"]},
    "then": {"properties": {"approver": {"type": "string", "pattern": "\\S"}}, "required": ["approver"]},
}
AUTOMATIC_APPROVER = "automatic"


class ApprovalInput(RunInput):
    """The form a person fills in the Prefect UI (or sends with resume_flow_run) to decide."""

    model_config = ConfigDict(json_schema_extra=_APPROVER_REQUIRED)

    approve: bool = Field(default=False, description="Move the alias to this version.")
    alias: str = Field(default=CHAMPION, min_length=1, description="The alias to move.")
    approver: str = Field(
        default="", description="Who approves (recorded on the version); required to approve."
    )
    comment: str = Field(default="", description="Why (recorded on the version).")

    @model_validator(mode="after")
    def _approval_names_the_approver(self) -> ApprovalInput:
        if self.approve and not self.approver.strip():
            raise ValueError("approver is required when approve is true")
        return self


# When the quality gate failed, approving is an override: the form (and the server, through the schema)
# refuses approve=true without override_gate=true.
_OVERRIDE_REQUIRED: dict[str, Any] = {
    "if": {"properties": {"approve": {"const": True}}, "required": ["approve"]},
    "then": {"properties": {"override_gate": {"const": True}}, "required": ["override_gate"]},
}


class GateOverrideInput(ApprovalInput):
    """The approval form after a failed quality gate: approving overrides it, and says so."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_APPROVER_REQUIRED, _OVERRIDE_REQUIRED]})

    override_gate: bool = Field(
        default=False,
        description="The quality gate FAILED: promote anyway (who and why are recorded on the version).",
    )

    @model_validator(mode="after")
    def _approval_overrides_the_gate(self) -> GateOverrideInput:
        if self.approve and not self.override_gate:
            raise ValueError("the quality gate failed: approving needs override_gate=true")
        return self


_COMPARED_TAGS = (
    ("source", "source"),
    ("revision", "revision"),
    ("task", "task"),
    ("validation", "validation_status"),
    ("checks", "validation_checks"),
    ("p50 latency (s)", "validation_p50_latency_s"),
    ("weights", "weights"),
)


def _comparison_rows(candidate: RegisteredVersion, current: RegisteredVersion | None) -> list[dict[str, Any]]:
    rows = [
        {
            "": "version",
            "candidate": str(candidate.version),
            "current": str(current.version) if current else "-",
        }
    ]
    for label, tag in _COMPARED_TAGS:
        rows.append(
            {
                "": label,
                "candidate": candidate.tags.get(tag, ""),
                "current": current.tags.get(tag, "") if current else "-",
            }
        )
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def _markdown(
    name: str,
    alias: str,
    candidate: RegisteredVersion,
    current: RegisteredVersion | None,
    rows: list[dict[str, Any]],
    answers: list[tuple[SampleAnswer, SampleAnswer | None]],
) -> str:
    head = f"current @{alias} is version {current.version}" if current else f"no version holds @{alias} yet"
    lines = [
        f"## Promote {name} version {candidate.version} to @{alias}?",
        "",
        f"{head}. Approve in the Resume form below (approve, alias, approver, comment).",
        "",
        "| | candidate | current |",
        "|---|---|---|",
        *(f"| {r['']} | {r['candidate']} | {r['current']} |" for r in rows),
    ]
    if answers:
        lines += ["", "| sample | candidate | s | current | s |", "|---|---|---|---|---|"]
        for new, old in answers:
            old_cells = f"{_cell(old.answer)} | {old.latency_s:.2f}" if old else "- | -"
            lines.append(f"| {new.name} | {_cell(new.answer)} | {new.latency_s:.2f} | {old_cells} |")
    return "\n".join(lines) + "\n"


@flow(name="promote", log_prints=True)
def promote(
    model_name: str,
    version: int | None = None,
    alias: str = CHAMPION,
    from_alias: str = CHALLENGER,
    require_approval: bool = True,
    timeout_s: int = 3600,
    poll_interval_s: int = 10,
    eval_samples: list[ValidationSample] | None = None,
    serving_urls: list[str] | None = None,
    serving_timeout_s: int = 300,
    serving_api_key_env: str = "LLMADAPTER_API_KEY",
    quality: QualityOptions | None = None,
) -> ApprovalDecision:
    """Move `alias` (champion) to a version after a person approves it in the Prefect UI.

    Args:
        model_name: Registered model name.
        version: Version number to promote; default the one holding `from_alias`. An older version
            than the current `alias` holder is a rollback.
        alias: The alias to move.
        from_alias: Where the candidate comes from when no version number is given.
        require_approval: Pause for a person's decision (a typed form in the UI); False promotes at once.
        timeout_s: How long to wait for the decision; on timeout nothing changes and the run fails.
        poll_interval_s: How often the paused run checks for the decision.
        eval_samples: Requests answered by both versions and shown side by side before the decision.
        serving_urls: llmadapter servers following the alias (http://host:8080): after the move, wait
            until each answers with the new version; the run fails naming any that did not (the alias
            stays moved). Recorded on the version's tags and in a table artifact.
        serving_timeout_s: How long to wait for the servers to switch.
        serving_api_key_env: Name of an environment variable (on the worker) holding the servers' bearer
            key, when they have one.
        quality: Evaluate both versions on an evaluation set; a failed gate blocks the promotion unless
            a person overrides it in the form (override_gate, recorded on the version).
    """
    logger = get_run_logger()
    configure_mlflow()
    candidate = _candidate(model_name, version, from_alias)
    current = get_alias(model_name, alias)
    previous = current.version if current is not None else None
    if previous == candidate.version:
        logger.info("%s version %d already holds @%s: nothing to do.", model_name, candidate.version, alias)
        return ApprovalDecision(
            model_name=model_name,
            version=candidate.version,
            alias=alias,
            outcome="unchanged",
            previous=previous,
        )
    # Refused before anyone is asked; move_alias checks again at the move (the pause may last hours).
    raise_unless_promotable(candidate, alias)
    gate = _quality_gate(model_name, candidate, current, quality) if quality is not None else None
    markdown = _publish_comparison(model_name, alias, candidate, current, eval_samples or [])
    serving: list[str] = []
    blocked = gate is not None and not gate[0].passed
    if gate is not None:
        markdown += "\n" + gate[1]
        if blocked and not require_approval:
            raise _blocked(model_name, candidate, alias, gate)
    form = GateOverrideInput if blocked else ApprovalInput
    decision = _decision(model_name, markdown, alias, require_approval, timeout_s, poll_interval_s, form=form)
    if blocked and not decision.approve:
        raise _blocked(model_name, candidate, alias, gate)  # type: ignore[arg-type]
    if decision.approve:
        result = promote_version(
            model_name, candidate.version, decision.alias, decision.approver, decision.comment or None
        )
        previous = result.previous
        logger.info(
            "@%s of %s: version %s -> %d%s.",
            decision.alias,
            model_name,
            previous if previous is not None else "-",
            candidate.version,
            " (weights copied into the artifact store first)" if result.persisted_weights else "",
        )
        if blocked:
            record_override(model_name, candidate.version, decision.approver, decision.comment)
            logger.warning("Quality gate overridden by %s: %s", decision.approver, decision.comment or "-")
        if serving_urls:
            confirmed = confirm_serving(
                model_name, candidate.version, serving_urls, serving_timeout_s, serving_api_key_env
            )
            serving = [c.line(str(candidate.version)) for c in confirmed]
    else:
        logger.info("Rejected by %s: %s. Nothing changed.", decision.approver or "-", decision.comment or "-")
    return ApprovalDecision(
        model_name=model_name,
        version=candidate.version,
        alias=decision.alias,
        outcome="approved" if decision.approve else "rejected",
        previous=previous,
        approver=decision.approver or None,
        comment=decision.comment or None,
        serving=serving,
        quality=gate[0].summary() if gate is not None else None,
        quality_overridden=blocked and decision.approve,
    )


def _quality_gate(
    model_name: str, candidate: RegisteredVersion, current: RegisteredVersion | None, quality: QualityOptions
) -> tuple[GateResult, str]:
    """Challenger and champion evaluated on the same rows (each in a fresh process), the gate decided,
    published (artifacts, version tags); every setting is checked before either model loads."""
    uris = [candidate.uri] + ([current.uri] if current is not None else [])
    plan = prepare_quality(quality, uris)
    challenger = evaluate_version(plan, candidate.uri, model_name)
    champion = evaluate_version(plan, current.uri, model_name) if current is not None else None
    result = quality_gate(plan, challenger, champion)
    get_run_logger().info("%s v%d: %s", model_name, candidate.version, result.summary())
    return result, publish_quality(result, model_name, candidate.version)


def _blocked(
    model_name: str, candidate: RegisteredVersion, alias: str, gate: tuple[GateResult, str]
) -> QualityGateError:
    """The error that fails a blocked promotion: the gate's table, and what did not change."""
    return QualityGateError(
        f"{model_name} version {candidate.version} failed the quality gate; @{alias} is unchanged."
        f"\n\n{gate[1]}",
        param="quality",
        code="quality_gate_failed",
    )


def _candidate(model_name: str, version: int | None, from_alias: str) -> RegisteredVersion:
    """The version to promote: the one numbered `version`, else the one holding `from_alias`."""
    if version is not None:
        return get_version(model_name, version)
    found = get_alias(model_name, from_alias)
    if found is None:
        raise NotFoundError(f"No version of '{model_name}' holds @{from_alias}.", param="version")
    return found


def _publish_comparison(
    model_name: str,
    alias: str,
    candidate: RegisteredVersion,
    current: RegisteredVersion | None,
    samples: list[ValidationSample],
) -> str:
    """Candidate vs current (tags, and both answers to each sample) as run artifacts; returns the markdown."""
    rows = _comparison_rows(candidate, current)
    answers: list[tuple[SampleAnswer, SampleAnswer | None]] = []
    if samples:
        new = answer_samples(candidate.uri, samples)
        old = answer_samples(current.uri, samples) if current else [None] * len(new)
        answers = list(zip(new, old, strict=True))
    markdown = _markdown(model_name, alias, candidate, current, rows, answers)
    key = artifact_key("promotion", model_name)
    create_markdown_artifact(
        markdown=markdown, key=key, description=f"Promote {model_name} v{candidate.version}?"
    )
    create_table_artifact(table=rows, key=f"{key}-comparison", description="Candidate vs current")
    return markdown


def _decision(
    model_name: str,
    markdown: str,
    alias: str,
    require_approval: bool,
    timeout_s: int,
    poll_interval_s: int,
    form: type[ApprovalInput] = ApprovalInput,
) -> ApprovalInput:
    """A person's answer to the approval form (the run pauses for it), or the automatic approval."""
    if not require_approval:
        return ApprovalInput(
            approve=True, alias=alias, approver=AUTOMATIC_APPROVER, comment="require_approval=False"
        )
    try:
        answered = pause_flow_run(
            wait_for_input=form.with_initial_data(description=markdown, alias=alias),
            timeout=timeout_s,
            poll_interval=poll_interval_s,
        )
    except FlowPauseTimeout:
        # The run ends Failed (a paused run cannot complete without a decision); nothing was changed.
        get_run_logger().warning(
            "No decision within %d s: @%s of %s is unchanged.", timeout_s, alias, model_name
        )
        raise
    return answered if answered is not None else ApprovalInput()
