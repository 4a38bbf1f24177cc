"""The MLflow Model Registry side: validated versions with provenance tags, aliases, promotion, rollback.

A version is identified for idempotency by (registered name, source revision sha, llm/v1 task,
model_config hash): registering the same triple again returns the existing version, also when several
callers register it at the same moment (the lowest of the twins wins; see register_version). `move_alias` is
the one way an alias is promoted (`challenger` -> `champion`) or rolled back: only through the gates,
validation passed and the weights in the artifact store (a version logged with save_pretrained=False
has them copied in first, so production never depends on a hub repository that may vanish).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from llmadapter.artifact_store import store_errors_named
from llmadapter.errors import ConfigError, LLMAdapterError, NotFoundError, ValidationFailedError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from llmadapter.validation import ValidationReport

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PromotionResult",
    "RegisteredVersion",
    "find_version",
    "get_alias",
    "get_version",
    "list_versions",
    "move_alias",
    "persist_weights",
    "promotion_problems",
    "raise_unless_promotable",
    "register_version",
    "set_alias",
    "weights_stored",
]

CHALLENGER = "challenger"
CHAMPION = "champion"

TAG_SOURCE = "source"
TAG_REVISION = "revision"
TAG_TASK = "task"
TAG_CONFIG_HASH = "model_config_hash"
TAG_VALIDATION = "validation_status"
TAG_WEIGHTS = "weights"  # "stored" | "hub-reference"
TAG_APPROVED_BY = "approved_by"
TAG_APPROVAL_COMMENT = "approval_comment"
TAG_PROMOTED_TO = "promoted_to"
TAG_PROMOTED_AT = "promoted_at"
TAG_REPLACED = "replaced_version"
TAG_ROLLBACK = "rollback_from_version"
TAG_SERVING_CONFIRMED = "serving_confirmed"  # servers that answered with the version after a promotion
TAG_SERVING_MISSED = "serving_not_switched"  # servers that did not within the promotion's wait

# MLflow's ModelVersionStatus names, as versions carry them.
_READY = "READY"
_FAILED = "FAILED_REGISTRATION"
# How long a twin registered by another caller may stay PENDING_REGISTRATION before we give up on it
# (MLflow's own wait for a version it registers), and how often it is looked at meanwhile.
_PENDING_WAIT_S = 300.0
_PENDING_POLL_S = 0.5


class RegisteredVersion(BaseModel):
    """One model version as the registry holds it (a snapshot; re-read after changes)."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: int
    source: str
    run_id: str | None = None
    tags: dict[str, str] = {}
    aliases: list[str] = []

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def validation_passed(self) -> bool:
        return self.tags.get(TAG_VALIDATION) == "passed"

    @property
    def revision(self) -> str | None:
        return self.tags.get(TAG_REVISION)

    @classmethod
    def from_mlflow(cls, mv: Any, aliases: Mapping[str, str] | None = None) -> RegisteredVersion:
        """From an MLflow ModelVersion; `aliases` (alias -> version) fills in what searches leave out."""
        names = set(mv.aliases or [])
        names.update(alias for alias, v in (aliases or {}).items() if str(v) == str(mv.version))
        return cls(
            name=mv.name,
            version=int(mv.version),
            source=mv.source,
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
            aliases=sorted(names),
        )


class PromotionResult(BaseModel):
    """What a promotion did: the version that now holds the alias and the one that held it before."""

    alias: str
    version: RegisteredVersion
    previous: int | None
    persisted_weights: bool = False


def _client() -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient()


def _quote(value: str) -> str:
    if "'" in value:
        # MLflow's filter grammar has no escape for quotes; refuse rather than search for something else.
        raise ConfigError(f"Registry values may not contain a quote: {value!r}.", param="model_name")
    return f"'{value}'"


def _model_aliases(client: MlflowClient, name: str) -> dict[str, str] | None:
    """alias -> version of a registered model, or None when the model does not exist.

    Version searches return no aliases, so they are read from the registered model once.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return {str(k): str(v) for k, v in (model.aliases or {}).items()}


def _model_exists(client: MlflowClient, name: str) -> bool:
    return _model_aliases(client, name) is not None


def list_versions(name: str) -> list[RegisteredVersion]:
    """All versions of a registered model, newest first (empty when the model does not exist)."""
    client = _client()
    aliases = _model_aliases(client, name)
    if aliases is None:
        return []
    found = client.search_model_versions(f"name={_quote(name)}")
    return sorted((RegisteredVersion.from_mlflow(mv, aliases) for mv in found), key=lambda v: -v.version)


def _twins_query(name: str, revision: str, task: str, config_hash: str) -> str:
    return (
        f"name={_quote(name)} and tags.{TAG_REVISION}={_quote(revision)} "
        f"and tags.{TAG_TASK}={_quote(task)} and tags.{TAG_CONFIG_HASH}={_quote(config_hash)}"
    )


def _agreed_version(client: MlflowClient, name: str, query: str, ours: int | None = None) -> Any | None:
    """The twin every caller agrees on: the lowest version matching `query` that is (or becomes) READY.

    `ours` is a version this caller just registered (READY: mlflow.register_model waited for it); it
    counts even if the search does not show it yet. A lower twin still PENDING_REGISTRATION is waited
    for, since it may still fail (then it no longer counts); failed registrations never count.
    """
    deadline = time.monotonic() + _PENDING_WAIT_S
    while True:
        twins = {int(mv.version): mv for mv in client.search_model_versions(query)}
        if ours is not None and ours not in twins:
            twins[ours] = client.get_model_version(name, str(ours))
        candidates = sorted(v for v, mv in twins.items() if mv.status != _FAILED)
        if not candidates:
            return None
        lowest = twins[candidates[0]]
        if lowest.status == _READY or candidates[0] == ours:
            return lowest
        if time.monotonic() > deadline:
            raise LLMAdapterError(
                f"{name} version {candidates[0]} (the same revision, task and model_config) is still "
                f"{lowest.status} after {_PENDING_WAIT_S:.0f} s; nothing was decided about it."
            )
        time.sleep(_PENDING_POLL_S)


def find_version(name: str, *, revision: str, task: str, config_hash: str) -> RegisteredVersion | None:
    """The version registered from this revision, task and model_config (`config_hash`: its digest(),
    see llmadapter.config.StoredConfig), if any: the lowest of its twins, as register_version decides."""
    client = _client()
    aliases = _model_aliases(client, name)
    if aliases is None:
        return None
    found = _agreed_version(client, name, _twins_query(name, revision, task, config_hash))
    return None if found is None else RegisteredVersion.from_mlflow(found, aliases)


def get_version(name: str, version: int) -> RegisteredVersion:
    from mlflow.exceptions import MlflowException

    client = _client()
    if not _model_exists(client, name):
        raise NotFoundError(f"No registered model named '{name}'.", param="model_name")
    try:
        return RegisteredVersion.from_mlflow(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFoundError(f"Model '{name}' has no version {version}.", param="version") from None
        raise


def get_alias(name: str, alias: str) -> RegisteredVersion | None:
    """The version holding an alias, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    client = _client()
    if not _model_exists(client, name):
        return None
    try:
        return RegisteredVersion.from_mlflow(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(name: str, alias: str, version: int) -> RegisteredVersion:
    """Point an alias at a version (moving it if another version held it)."""
    get_version(name, version)
    _client().set_registered_model_alias(name, alias, str(version))
    return get_version(name, version)


def tag_version(name: str, version: int, tags: Mapping[str, str]) -> None:
    """Set tags on a version (an empty value deletes the tag)."""
    client = _client()
    for key, value in tags.items():
        if value:
            client.set_model_version_tag(name, str(version), key, value)
        else:
            with contextlib.suppress(Exception):  # absent already
                client.delete_model_version_tag(name, str(version), key)


def weights_stored(model_uri: str) -> bool:
    """Whether the artifact holds the weights (False for save_pretrained=False hub references)."""
    import mlflow.models

    flavor = mlflow.models.get_model_info(model_uri).flavors.get("transformers", {})
    return "model_binary" in flavor


def register_version(
    model_uri: str,
    name: str,
    *,
    source: str,
    revision: str,
    task: str,
    config_hash: str,
    report: ValidationReport,
    extra_tags: Mapping[str, str] | None = None,
) -> tuple[RegisteredVersion, bool]:
    """Register a validated logged model; returns (version, created).

    Idempotent: if a version with the same revision, task and config hash (the model_config's
    digest()) exists, it is returned and nothing is registered. A report that did not pass is refused
    (nothing is registered).

    Also under concurrency, without any lock: callers that all found nothing register one version
    each, then look again. The lowest of the twins wins; a caller whose own version lost deletes it
    (before any alias is set: aliases are set after this returns) and every caller returns the winner,
    `created` True only for the one that registered it. A caller deletes only the version it created.
    This relies on the registry's search showing every committed version, which MLflow's SQL store and
    a tracking server over it do (version numbers are taken in order, so a caller holding version N
    sees every lower one); the caller's own version counts even before the search shows it.
    """
    import mlflow

    if not report.passed:
        raise ValidationFailedError(
            f"Refusing to register {model_uri}: validation {report.status} ({report.summary()}).",
            param="report",
        )
    existing = find_version(name, revision=revision, task=task, config_hash=config_hash)
    if existing is not None:
        return existing, False
    tags = {
        TAG_SOURCE: source,
        TAG_REVISION: revision,
        TAG_TASK: task,
        TAG_CONFIG_HASH: config_hash,
        TAG_WEIGHTS: "stored" if weights_stored(model_uri) else "hub-reference",
        **report.to_tags(),
        **dict(extra_tags or {}),
    }
    ours = int(mlflow.register_model(model_uri, name, tags=tags).version)
    client = _client()
    winner = _agreed_version(client, name, _twins_query(name, revision, task, config_hash), ours=ours)
    assert winner is not None  # ours is READY, so at least it counts
    if int(winner.version) != ours:
        _delete_duplicate(client, name, ours, int(winner.version))
    return get_version(name, int(winner.version)), int(winner.version) == ours


def _delete_duplicate(client: MlflowClient, name: str, ours: int, winner: int) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_model_version(name, str(ours))
    except MlflowException as exc:
        # Loud, not retried: a retry would find the winner and leave this duplicate behind unnamed.
        raise LLMAdapterError(
            f"{name} version {ours} duplicates version {winner} (registered at the same moment) and "
            f"could not be deleted: {exc.message}. Delete version {ours}; version {winner} is the one to use."
        ) from exc


def promotion_problems(version: RegisteredVersion) -> list[str]:
    """Why a version may not take an alias (empty when the gates pass)."""
    problems = []
    status = version.tags.get(TAG_VALIDATION)
    if status != "passed":
        problems.append(f"validation_status is {status!r}, promotion needs 'passed'")
    return problems


def raise_unless_promotable(version: RegisteredVersion, alias: str) -> None:
    """Refuse (ValidationFailedError naming the gates) a version that may not take `alias`."""
    problems = promotion_problems(version)
    if problems:
        raise ValidationFailedError(
            f"{version.name} version {version.version} cannot become @{alias}: {'; '.join(problems)}.",
            param="version",
        )


def _download_uri(version: RegisteredVersion) -> str:
    return str(_client().get_model_version_download_uri(version.name, str(version.version)))


def persist_weights(name: str, version: int) -> RegisteredVersion:
    """Copy the weights of a save_pretrained=False version into its artifact (no-op when stored).

    Uses `mlflow.transformers.persist_pretrained_model` on the version's artifact location: the
    pinned commit is loaded (from the local Hugging Face cache when offline) and saved into the
    artifact's `model/` folder, and the MLmodel then points at it.
    """
    import mlflow.transformers

    current = get_version(name, version)
    if weights_stored(current.uri):
        if current.tags.get(TAG_WEIGHTS) != "stored":
            _client().set_model_version_tag(name, str(version), TAG_WEIGHTS, "stored")
        return get_version(name, version)
    location = _download_uri(current)
    with store_errors_named(f"Copying the weights of '{name}' version {version} into {location} failed"):
        mlflow.transformers.persist_pretrained_model(location)
        _mark_engine_weights_stored(location)
    if not weights_stored(current.uri):
        raise ConfigError(
            f"Persisting the weights of '{name}' version {version} left no weights in {location}.",
            param="version",
        )
    _client().set_model_version_tag(name, str(version), TAG_WEIGHTS, "stored")
    return get_version(name, version)


def _mark_engine_weights_stored(location: str) -> None:
    """Keep llmadapter's own record (llmadapter/engine.json) in step with the MLmodel."""
    import tempfile
    from pathlib import Path

    from mlflow.artifacts import download_artifacts
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(download_artifacts(artifact_uri=f"{location}/llmadapter/engine.json", dst_path=tmp))
        except OSError:
            return
        data = json.loads(local.read_text())
        data["weights_stored"] = True
        local.write_text(json.dumps(data, indent=2))
        get_artifact_repository(location).log_artifact(str(local), "llmadapter")


def move_alias(
    name: str,
    version: int,
    alias: str = CHAMPION,
    *,
    approver: str | None = None,
    comment: str | None = None,
) -> PromotionResult:
    """Give `alias` to a version through the gates, recording who moved it and why as version tags.

    The gates hold at the moment of the move: validation passed (else ValidationFailedError, nothing
    moves), and the weights are in the artifact store (a hub reference has them copied in first). A
    version older than the alias's current holder is a rollback, tagged with the version it replaces.
    """
    target = get_version(name, version)
    raise_unless_promotable(target, alias)
    current = get_alias(name, alias)
    persist = target.tags.get(TAG_WEIGHTS) != "stored" and not weights_stored(target.uri)
    if persist:
        persist_weights(name, version)
    client = _client()
    client.set_registered_model_alias(name, alias, str(version))
    for key, value in _move_tags(alias, version, current, approver, comment).items():
        client.set_model_version_tag(name, str(version), key, value)
    return PromotionResult(
        alias=alias,
        version=get_version(name, version),
        previous=current.version if current is not None else None,
        persisted_weights=persist,
    )


def _move_tags(
    alias: str,
    version: int,
    current: RegisteredVersion | None,
    approver: str | None,
    comment: str | None,
) -> dict[str, str]:
    """The version tags that record a move of `alias` from `current` to `version`."""
    replaced = current.version if current is not None and current.version != version else None
    rollback = replaced is not None and version < replaced
    tags = {
        TAG_PROMOTED_TO: alias,
        TAG_PROMOTED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
        TAG_APPROVED_BY: approver or "",
        TAG_APPROVAL_COMMENT: comment or (f"rollback from version {replaced}" if rollback else ""),
    }
    if replaced is not None:
        tags[TAG_REPLACED] = str(replaced)
    if rollback:
        tags[TAG_ROLLBACK] = str(replaced)
    return tags
