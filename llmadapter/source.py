"""Model sources (hub id@revision, local folder, GGUF file): parsed, resolved to a local folder and a pin.

    parse_source("org/name@v1.0")         -> kind="hub",   repo_id="org/name", revision="v1.0" (nothing read)
    resolve_source("org/name@v1.0")       -> kind="hub",   local_dir=<cache>/snapshots/<sha>, revision=<sha>
    resolve_source("/models/finetune")    -> kind="local", local_dir=that folder, revision=<fingerprint>
    resolve_source("/models/x.Q4_1.gguf") -> kind="gguf",  local_dir=<converted folder>, revision=<sha256>

`local_dir` is always a folder that transformers' `from_pretrained` loads without the network, and
`revision` is always set and immutable for the content it names, so callers may cache on it:

- hub: the commit sha of the snapshot. Moving names ("main", a tag) are resolved once, here: online by
  the hub, offline (HF_HUB_OFFLINE) from the cache's refs, through huggingface_hub's offline lookups.
- local folder: a sha256 fingerprint of the relative path, size and mtime of every non-hidden file. It
  changes whenever a file is rewritten (even with the same bytes) and never stays the same across a
  normal re-save; it costs a `stat` per file, not a read of gigabytes of weights.
- GGUF: the sha256 of the file (converted by `llmadapter.gguf_convert`).

A local folder inside a hub cache (`models--org--name/snapshots/<sha>`) is reported as the hub source
it is. Every failure is a `ModelSourceError` naming the parameter at fault.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is first imported. This module reads the
cache from `huggingface_hub.constants` at each call (or takes `cache_dir`), and treats the hub as offline
when either that constant or the environment variable says so, so a process that sets HF_HUB_OFFLINE
after importing huggingface_hub still never touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmadapter.catalog import get_task
from llmadapter.errors import ModelSourceError

# GGUF_MARKER and gguf_to_folder moved to llmadapter.gguf_convert; importable from here as before.
from llmadapter.gguf_convert import GGUF_MARKER as GGUF_MARKER
from llmadapter.gguf_convert import convert_gguf, default_gguf_out_dir, file_sha256
from llmadapter.gguf_convert import gguf_to_folder as gguf_to_folder

SourceKind = Literal["hub", "local", "gguf"]

DEFAULT_REVISION = "main"
# Files of other frameworks that a transformers/PyTorch load never reads: not worth downloading.
HUB_IGNORE_PATTERNS = (
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.mlmodel",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "original/*",
)

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_NAME_SLUG = re.compile(r"[^a-z0-9]+")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ParsedSource:
    """A source as spelled, before anything is downloaded or hashed: its kind and the revision it asks for."""

    source: str
    kind: SourceKind
    path: Path | None = None  # local and gguf: the absolute path
    repo_id: str | None = None  # hub
    revision: str | None = None  # what was asked for; None: the default branch (hub), no pin (local, gguf)
    param: str = "source"  # the parameter a revision problem is blamed on

    @property
    def hub_revision(self) -> str:
        """The hub revision to resolve: the one asked for, else the default branch."""
        return self.revision or DEFAULT_REVISION

    @property
    def follows_branch(self) -> bool:
        """A hub id at a branch or tag (the default branch included), not at a commit sha: it can move."""
        return self.kind == "hub" and not _COMMIT_SHA.match(self.hub_revision)

    def default_model_name(self, task: str) -> str:
        """A registry name: 'org/SmolLM2-135M-Instruct' for llm/v1/chat -> 'smollm2-135m-instruct-chat'."""
        if self.repo_id is not None:
            stem = self.repo_id.rsplit("/", 1)[-1]
        else:
            assert self.path is not None
            stem = self.path.stem if self.kind == "gguf" else self.path.name
        slug = _NAME_SLUG.sub("-", stem.lower()).strip("-") or "model"
        return f"{slug}-{get_task(task).name_suffix}"


class ResolvedSource(BaseModel):
    """Where a model source lives on this machine, and the immutable revision of what is there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="The source as the user gave it.")
    kind: SourceKind
    local_dir: Path = Field(description="Folder that transformers' from_pretrained loads offline.")
    revision: str = Field(description="Commit sha (hub), sha256 of the file (gguf), fingerprint (local).")
    repo_id: str | None = Field(default=None, description="Hub repo id, for hub sources.")
    requested_revision: str | None = Field(
        default=None,
        description="The revision asked for with a hub id (a branch, tag or sha); None for a folder or file.",
    )
    gguf_file: Path | None = Field(default=None, description="The GGUF file, for gguf sources.")

    def pinned(self) -> str:
        """The source spelled so that it cannot move: a hub id at its sha, the GGUF file, else the folder.

        A hub id is re-resolved from the default cache at its sha; a snapshot folder given as a path
        (possibly in another cache) stays a path.
        """
        if self.kind == "hub" and self.requested_revision is not None:  # asked for by hub id
            return f"{self.repo_id}@{self.revision}"
        return str(self.gguf_file or self.local_dir)


# --- parsing -------------------------------------------------------------------------------------------


def parse_source(source: str, revision: str | None = None) -> ParsedSource:
    """What `source` is, from its spelling and what exists on disk; nothing is downloaded or hashed.

    An existing path wins over a hub id of the same spelling, as in transformers' from_pretrained.
    `revision` is the hub revision when the source pins none, or the expected fingerprint / sha256 of a
    folder or GGUF file. A source that cannot be one of the three is a `ModelSourceError`.
    """
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError("source must be a hub id, a local folder or a .gguf file", param="source")
    path = Path(source).expanduser()
    if path.is_dir():
        return ParsedSource(source, "local", path=path.absolute(), revision=revision, param="revision")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"source {source!r} is a file but not a .gguf file; give a model folder (with config.json), "
                "a .gguf file or a hub id",
                param="source",
            )
        return ParsedSource(source, "gguf", path=path.absolute(), revision=revision, param="revision")
    if source.startswith(("/", "./", "../", "~", "\\")) or source.lower().endswith(".gguf"):
        raise ModelSourceError(f"source {source!r}: no such file or folder", param="source")

    repo_id, at, pinned = source.partition("@")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelSourceError(
            f"source {source!r} is neither an existing folder or .gguf file nor a hub id "
            f"('org/name' or 'org/name@revision'): {exc}",
            param="source",
        ) from exc
    if at and not pinned:
        raise ModelSourceError(f"source {source!r} ends with '@' but names no revision", param="source")
    if pinned and revision and pinned != revision:
        raise ModelSourceError(
            f"source {source!r} pins revision {pinned!r} but revision={revision!r} was also given",
            param="revision",
        )
    return ParsedSource(
        source,
        "hub",
        repo_id=repo_id,
        revision=pinned or revision,
        param="source" if pinned else "revision" if revision else "source",
    )


# --- hub -----------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether the hub must not be contacted: HF_HUB_OFFLINE as huggingface_hub read it, or as set now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The hub cache in use: `cache_dir` when given, else the one huggingface_hub itself uses."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub version uses."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hub_error(exc: BaseException, parsed: ParsedSource, cache: Path) -> ModelSourceError:
    """The ModelSourceError for a failed huggingface_hub call about `parsed`; its code lets a retrying
    caller (a Prefect task) tell a transient failure ("hub_unreachable") from a user error."""
    from huggingface_hub import errors

    repo_id, revision, offline = parsed.repo_id, parsed.hub_revision, hub_offline()
    why = (
        "HF_HUB_OFFLINE is set"
        if offline
        else "the hub could not be reached and there is no complete cached copy"
    )
    # First match wins: GatedRepoError is a RepositoryNotFoundError, and every hub error is an OSError.
    table: tuple[tuple[type[BaseException], str, str, str], ...] = (
        (
            # Also IncompleteSnapshotError (huggingface_hub >= 2): a partial download, the hub unreachable.
            errors.LocalEntryNotFoundError,
            "not_in_cache" if offline else "hub_unreachable",
            "source",
            f"{repo_id} at revision {revision!r} is not in the Hugging Face cache {cache} and {why}. "
            f"Download it once with network access (`hf download {repo_id} --revision {revision}`, with "
            "HF_HUB_CACHE pointing at that cache), or give a local folder.",
        ),
        (
            errors.RevisionNotFoundError,
            "revision_not_found",
            parsed.param,
            f"the hub has no revision {revision!r} in {repo_id}",
        ),
        (
            errors.GatedRepoError,
            "gated_repo",
            "source",
            f"{repo_id} is gated; accept its terms on the hub and log in (HF_TOKEN)",
        ),
        (
            errors.RepositoryNotFoundError,
            "repo_not_found",
            "source",
            f"no model repository {repo_id} on the hub (or it is private: set HF_TOKEN)",
        ),
        (BaseException, "hub_unreachable", "source", f"the hub failed on {repo_id}@{revision}: {exc}"),
    )
    code, param, message = next((c, p, m) for kind, c, p, m in table if isinstance(exc, kind))
    return ModelSourceError(f"source {parsed.source!r}: {message}", param=param, code=code)


@contextlib.contextmanager
def _hub_errors(parsed: ParsedSource, cache: Path) -> Iterator[None]:
    """Raise huggingface_hub's failures (HTTP, connection, not cached) as `_hub_error` maps them."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except (LocalEntryNotFoundError, HfHubHTTPError, *_transport_errors()) as exc:
        raise _hub_error(exc, parsed, cache) from exc


def _resolve_hub(parsed: ParsedSource, cache_dir: str | os.PathLike[str] | None) -> ResolvedSource:
    from huggingface_hub import snapshot_download

    assert parsed.repo_id is not None
    cache = hub_cache_dir(cache_dir)
    with _hub_errors(parsed, cache):
        folder = snapshot_download(
            parsed.repo_id,
            revision=parsed.hub_revision,
            cache_dir=str(cache),
            local_files_only=hub_offline(),
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )
    local_dir = Path(folder)
    _require_config(parsed.source, local_dir)
    return ResolvedSource(
        source=parsed.source,
        kind="hub",
        local_dir=local_dir,
        # snapshot_download returns <cache>/models--org--name/snapshots/<commit sha>: the name is the pin.
        revision=local_dir.name,
        repo_id=parsed.repo_id,
        requested_revision=parsed.hub_revision,
    )


def _hub_head(parsed: ParsedSource, cache: Path) -> str:
    """The commit sha the hub has for `parsed`'s revision now."""
    from huggingface_hub import HfApi

    with _hub_errors(parsed, cache):
        sha = HfApi().repo_info(parsed.repo_id, revision=parsed.hub_revision).sha
    if not sha:
        raise ModelSourceError(
            f"source {parsed.source!r}: the hub returned no commit sha", code="hub_unreachable"
        )
    return str(sha)


def _cached_commit(parsed: ParsedSource, cache: Path) -> str | None:
    """The commit the cache holds for `parsed`'s revision (a branch or tag read from its refs), or None."""
    from huggingface_hub import try_to_load_from_cache

    assert parsed.repo_id is not None
    config = try_to_load_from_cache(
        parsed.repo_id, "config.json", cache_dir=cache, revision=parsed.hub_revision
    )
    # A cached file lies in <cache>/models--org--name/snapshots/<commit sha>/.
    return Path(config).parent.name if isinstance(config, str) else None


def _snapshot_commit(folder: Path) -> tuple[str, str] | None:
    """(repo id, sha) when `folder` is a snapshot folder of a hub cache, as huggingface_hub's scan sees it."""
    folder = folder.expanduser().absolute()
    # Only a folder named like <cache>/models--org--name/snapshots/<sha> is worth scanning its cache for.
    if folder.parent.name != "snapshots" or len(folder.parents) < 3 or not folder.is_dir():
        return None
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        cache = scan_cache_dir(folder.parents[2])
    except (CacheNotFound, ValueError, OSError):
        return None
    return next(
        (
            (repo.repo_id, revision.commit_hash)
            for repo in cache.repos
            if repo.repo_type == "model"
            for revision in repo.revisions
            if revision.snapshot_path.samefile(folder)
        ),
        None,
    )


def cached_hub_commit(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, str] | None:
    """(repo id, commit sha) of a hub model from the local cache only; None when it is not a cached hub model.

    `name_or_path` is what a loaded model reports as `name_or_path`: a repo id (its revision, default
    "main", is looked up in the cache: transformers 5 keeps no `_commit_hash` on the config) or a
    snapshot folder `.../models--org--name/snapshots/<sha>`. Never contacts the hub.
    """
    try:
        parsed = parse_source(os.fspath(name_or_path), revision)
    except ModelSourceError:
        return None
    if parsed.kind == "local":
        assert parsed.path is not None
        return _snapshot_commit(parsed.path)
    if parsed.kind != "hub":
        return None
    assert parsed.repo_id is not None
    sha = _cached_commit(parsed, hub_cache_dir(cache_dir))
    return (parsed.repo_id, sha) if sha is not None else None


# --- local folders and files ---------------------------------------------------------------------------


def _require_config(source: str, folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f" It holds GGUF files ({', '.join(ggufs[:3])}): give the path of one of them." if ggufs else ""
    raise ModelSourceError(
        f"source {source!r}: folder {folder} has no config.json, so it is not a Transformers model "
        f"folder.{hint}",
        param="source",
    )


def local_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 over (relative path, size, mtime) of every non-hidden file under `folder` (links followed)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{rel.as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check_pin(parsed: ParsedSource, actual: str) -> None:
    if parsed.revision is not None and parsed.revision != actual:
        raise ModelSourceError(
            f"source {parsed.source!r} has revision {actual} now, not the pinned {parsed.revision}: "
            "its content changed since the pin was taken",
            param="revision",
            code="revision_mismatch",
        )


def _resolve_local(parsed: ParsedSource) -> ResolvedSource:
    assert parsed.path is not None
    folder = parsed.path
    _require_config(parsed.source, folder)
    snapshot = _snapshot_commit(folder)
    if snapshot is not None:
        repo_id, sha = snapshot
        _check_pin(parsed, sha)
        return ResolvedSource(
            source=parsed.source, kind="hub", local_dir=folder, revision=sha, repo_id=repo_id
        )
    fingerprint = local_fingerprint(folder)
    _check_pin(parsed, fingerprint)
    return ResolvedSource(source=parsed.source, kind="local", local_dir=folder, revision=fingerprint)


def _resolve_gguf(parsed: ParsedSource, gguf_out_dir: str | os.PathLike[str] | None) -> ResolvedSource:
    assert parsed.path is not None
    sha = file_sha256(parsed.path)
    _check_pin(parsed, sha)
    out_dir = Path(gguf_out_dir) if gguf_out_dir is not None else default_gguf_out_dir(parsed.path, sha)
    folder = convert_gguf(parsed.path, out_dir, sha)
    return ResolvedSource(
        source=parsed.source, kind="gguf", local_dir=folder, revision=sha, gguf_file=parsed.path
    )


# --- public entry points -------------------------------------------------------------------------------


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    gguf_out_dir: str | os.PathLike[str] | None = None,
) -> ResolvedSource:
    """Resolve `source` to a local folder and an immutable revision (see the module docstring).

    source: "org/name", "org/name@revision", a local model folder or a local .gguf file.
    revision: the hub revision (branch, tag or commit sha) when `source` does not pin one; for a local
        folder or a GGUF file, the expected fingerprint / sha256, checked.
    cache_dir: the Hugging Face hub cache (default: huggingface_hub's, from HF_HUB_CACHE / HF_HOME).
    gguf_out_dir: where a GGUF file is converted to a Transformers folder (default: under the data dir);
        a finished conversion of the same file is reused.
    """
    parsed = parse_source(source, revision)
    if parsed.kind == "hub":
        return _resolve_hub(parsed, cache_dir)
    if parsed.kind == "gguf":
        return _resolve_gguf(parsed, gguf_out_dir)
    return _resolve_local(parsed)


def latest_revision(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str | None:
    """The revision `source` points at now, for a scheduled refresh to compare with the logged one.

    Hub: the commit sha of the requested branch or tag (default "main") on the hub; offline, the commit
    the cache holds for it, or None when it holds none (nothing can be known). A pinned commit sha is
    returned as is. Local folder: its fingerprint; GGUF file: its sha256. Downloads nothing.
    """
    parsed = parse_source(source, revision)
    if parsed.kind == "local":
        assert parsed.path is not None
        snapshot = _snapshot_commit(parsed.path)
        return snapshot[1] if snapshot is not None else local_fingerprint(parsed.path)
    if parsed.kind == "gguf":
        assert parsed.path is not None
        return file_sha256(parsed.path)
    if not parsed.follows_branch:
        return parsed.hub_revision
    cache = hub_cache_dir(cache_dir)
    if hub_offline():
        return _cached_commit(parsed, cache)
    return _hub_head(parsed, cache)
