"""Resolve a model source (hub id@revision, local folder, GGUF file) to a local folder and a pinned revision.

    resolve_source("org/name@v1.0")       -> kind="hub",   local_dir=<cache>/snapshots/<sha>, revision=<sha>
    resolve_source("/models/finetune")    -> kind="local", local_dir=that folder, revision=<fingerprint>
    resolve_source("/models/x.Q4_1.gguf") -> kind="gguf",  local_dir=<converted folder>, revision=<sha256>

`local_dir` is always a folder that transformers' `from_pretrained` loads without the network, and
`revision` is always set and immutable for the content it names, so callers may cache on it:

- hub: the commit sha of the snapshot. Moving names ("main", a tag) are resolved once, here: online by
  the hub, offline (HF_HUB_OFFLINE) from the cache's `refs/<name>`.
- local folder: a sha256 fingerprint of the relative path, size and mtime of every non-hidden file. It
  changes whenever a file is rewritten (even with the same bytes) and never stays the same across a
  normal re-save; it costs a `stat` per file, not a read of gigabytes of weights.
- GGUF: the sha256 of the file.

A local folder inside a hub cache (`models--org--name/snapshots/<sha>`) is reported as the hub source
it is. Every failure is a `ModelSourceError` naming the parameter at fault.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is first imported. This module reads the
cache from `huggingface_hub.constants` at each call (or takes `cache_dir`), and treats the hub as offline
when either that constant or the environment variable says so, so a process that sets HF_HUB_OFFLINE
after importing huggingface_hub still never touches the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmadapter.errors import ModelSourceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
GGUF_MARKER = ".llmadapter-gguf.json"

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HASH_CHUNK = 8 * 1024 * 1024


class ResolvedSource(BaseModel):
    """Where a model source lives on this machine, and the immutable revision of what is there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="The source as the user gave it.")
    kind: SourceKind
    local_dir: Path = Field(description="Folder that transformers' from_pretrained loads offline.")
    revision: str = Field(description="Commit sha (hub), sha256 of the file (gguf), fingerprint (local).")
    repo_id: str | None = Field(default=None, description="Hub repo id, for hub sources.")
    requested_revision: str | None = Field(
        default=None, description="The revision asked for (a branch, tag or sha), for hub sources."
    )
    gguf_file: Path | None = Field(default=None, description="The GGUF file, for gguf sources.")


@dataclass(frozen=True)
class _Parsed:
    kind: SourceKind
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None  # what the user asked for; None: the default branch / no pin
    param: str = "source"  # the parameter a revision problem is blamed on


# --- parsing -------------------------------------------------------------------------------------------


def _parse(source: str, revision: str | None) -> _Parsed:
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError("source must be a hub id, a local folder or a .gguf file", param="source")
    path = Path(source).expanduser()
    # An existing path wins over a hub id of the same spelling, as in transformers' from_pretrained.
    if path.is_dir():
        return _Parsed("local", path=path.absolute(), revision=revision, param="revision")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"source {source!r} is a file but not a .gguf file; give a model folder (with config.json), "
                "a .gguf file or a hub id",
                param="source",
            )
        return _Parsed("gguf", path=path.absolute(), revision=revision, param="revision")
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
    return _Parsed(
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


def _repo_storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _cached_ref(cache: Path, repo_id: str, revision: str) -> str | None:
    ref = _repo_storage(cache, repo_id) / "refs" / revision
    if not ref.is_file():
        return None
    sha = ref.read_text().strip()
    return sha or None


def _download_command(repo_id: str, revision: str) -> str:
    return f"`hf download {repo_id} --revision {revision}`"


def _resolve_hub(source: str, parsed: _Parsed, cache_dir: str | os.PathLike[str] | None) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert parsed.repo_id is not None
    repo_id, revision = parsed.repo_id, parsed.revision or DEFAULT_REVISION
    cache = hub_cache_dir(cache_dir)
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            local_files_only=offline,
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
        )
    except LocalEntryNotFoundError as exc:
        # Also IncompleteSnapshotError (huggingface_hub >= 2): a partial download with the hub unreachable.
        why = (
            "HF_HUB_OFFLINE is set"
            if offline
            else "the hub could not be reached and there is no complete cached copy"
        )
        raise ModelSourceError(
            f"source {source!r}: {repo_id} at revision {revision!r} is not in the Hugging Face cache "
            f"{cache} and {why}. Download it once with network access "
            f"({_download_command(repo_id, revision)}, with HF_HUB_CACHE pointing at that cache), "
            "or give a local folder.",
            param="source",
            code="not_in_cache" if offline else "hub_unreachable",
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"source {source!r}: the hub has no revision {revision!r} in {repo_id}",
            param=parsed.param,
            code="revision_not_found",
        ) from exc
    except GatedRepoError as exc:
        raise ModelSourceError(
            f"source {source!r}: {repo_id} is gated; accept its terms on the hub and log in (HF_TOKEN)",
            param="source",
            code="gated_repo",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"source {source!r}: no model repository {repo_id} on the hub (or it is private: set HF_TOKEN)",
            param="source",
            code="repo_not_found",
        ) from exc
    except (HfHubHTTPError, *_transport_errors()) as exc:
        raise ModelSourceError(
            f"source {source!r}: the hub failed while resolving {repo_id}@{revision}: {exc}",
            param="source",
            code="hub_unreachable",
        ) from exc
    local_dir = Path(folder)
    # snapshot_download returns <cache>/models--org--name/snapshots/<commit sha>: the folder name is the pin.
    sha = local_dir.name
    _require_config(source, local_dir)
    return ResolvedSource(
        source=source,
        kind="hub",
        local_dir=local_dir,
        revision=sha,
        repo_id=repo_id,
        requested_revision=revision,
    )


def cached_hub_commit(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, str] | None:
    """(repo id, commit sha) of a hub model from the local cache only; None when it is not a cached hub model.

    `name_or_path` is what a loaded model reports as `name_or_path`: a repo id (the sha is read from
    `refs/<revision>` in the cache, transformers 5 keeps no `_commit_hash` on the config) or a snapshot
    folder `.../models--org--name/snapshots/<sha>`. Never contacts the hub.
    """
    text = os.fspath(name_or_path)
    snapshot = _snapshot_reference(Path(text))
    if snapshot is not None:
        return snapshot
    if Path(text).exists():
        return None
    repo_id, _, pinned = text.partition("@")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    wanted = pinned or revision or DEFAULT_REVISION
    cache = hub_cache_dir(cache_dir)
    sha = wanted if _COMMIT_SHA.match(wanted) else _cached_ref(cache, repo_id, wanted)
    if sha is None or not (_repo_storage(cache, repo_id) / "snapshots" / sha).is_dir():
        return None
    return repo_id, sha


def _snapshot_reference(folder: Path) -> tuple[str, str] | None:
    """(repo id, sha) when `folder` is a snapshot folder of a hub cache."""
    folder = folder.expanduser().absolute()
    if not _COMMIT_SHA.match(folder.name) or folder.parent.name != "snapshots":
        return None
    match = _SNAPSHOT.match(folder.parent.parent.name)
    if match is None:
        return None
    return match["repo"].replace("--", "/", 1), folder.name


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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_pin(source: str, parsed: _Parsed, actual: str) -> None:
    if parsed.revision is not None and parsed.revision != actual:
        raise ModelSourceError(
            f"source {source!r} has revision {actual} now, not the pinned {parsed.revision}: "
            "its content changed since the pin was taken",
            param="revision",
            code="revision_mismatch",
        )


def _resolve_local(source: str, parsed: _Parsed) -> ResolvedSource:
    assert parsed.path is not None
    folder = parsed.path
    _require_config(source, folder)
    snapshot = _snapshot_reference(folder)
    if snapshot is not None:
        repo_id, sha = snapshot
        _check_pin(source, parsed, sha)
        return ResolvedSource(
            source=source, kind="hub", local_dir=folder, revision=sha, repo_id=repo_id, requested_revision=sha
        )
    fingerprint = local_fingerprint(folder)
    _check_pin(source, parsed, fingerprint)
    return ResolvedSource(source=source, kind="local", local_dir=folder, revision=fingerprint)


def default_gguf_out_dir(gguf_path: str | os.PathLike[str], sha256: str) -> Path:
    """Where a GGUF file is converted when no folder is given: <data dir>/gguf/<stem>-<sha256[:12]>."""
    from llmadapter.settings import get_settings

    return get_settings().data_dir / "gguf" / f"{Path(gguf_path).stem}-{sha256[:12]}"


def _resolve_gguf(
    source: str, parsed: _Parsed, gguf_out_dir: str | os.PathLike[str] | None
) -> ResolvedSource:
    assert parsed.path is not None
    sha = file_sha256(parsed.path)
    _check_pin(source, parsed, sha)
    out_dir = Path(gguf_out_dir) if gguf_out_dir is not None else default_gguf_out_dir(parsed.path, sha)
    folder = _gguf_to_folder(parsed.path, out_dir, sha)
    return ResolvedSource(source=source, kind="gguf", local_dir=folder, revision=sha, gguf_file=parsed.path)


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
    parsed = _parse(source, revision)
    if parsed.kind == "hub":
        return _resolve_hub(source, parsed, cache_dir)
    if parsed.kind == "gguf":
        return _resolve_gguf(source, parsed, gguf_out_dir)
    return _resolve_local(source, parsed)


def latest_revision(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str | None:
    """The revision `source` points at now, for a scheduled refresh to compare with the logged one.

    Hub: the commit sha of the requested branch or tag (default "main") on the hub; offline, the sha in
    the cache's refs, or None when the cache has no such ref (nothing can be known). A pinned commit sha
    is returned as is. Local folder: its fingerprint; GGUF file: its sha256. Downloads nothing.
    """
    parsed = _parse(source, revision)
    if parsed.kind == "local":
        assert parsed.path is not None
        snapshot = _snapshot_reference(parsed.path)
        return snapshot[1] if snapshot is not None else local_fingerprint(parsed.path)
    if parsed.kind == "gguf":
        assert parsed.path is not None
        return file_sha256(parsed.path)
    assert parsed.repo_id is not None
    wanted = parsed.revision or DEFAULT_REVISION
    if _COMMIT_SHA.match(wanted):
        return wanted
    if hub_offline():
        return _cached_ref(hub_cache_dir(cache_dir), parsed.repo_id, wanted)
    return _hub_head(source, parsed.repo_id, wanted, parsed.param)


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


def _hub_head(source: str, repo_id: str, revision: str, param: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        sha = HfApi().repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError as exc:
        raise ModelSourceError(
            f"source {source!r}: the hub has no revision {revision!r} in {repo_id}",
            param=param,
            code="revision_not_found",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelSourceError(
            f"source {source!r}: no model repository {repo_id} on the hub (or it is private: set HF_TOKEN)",
            param="source",
            code="repo_not_found",
        ) from exc
    except (HfHubHTTPError, *_transport_errors()) as exc:
        # The code lets a retrying caller (a Prefect task) tell a transient failure from a user error.
        raise ModelSourceError(
            f"source {source!r}: could not ask the hub for {repo_id}@{revision}: {exc}",
            param="source",
            code="hub_unreachable",
        ) from exc
    if not sha:
        raise ModelSourceError(f"source {source!r}: the hub returned no commit sha", code="hub_unreachable")
    return str(sha)


# --- GGUF ----------------------------------------------------------------------------------------------


def load_gguf(path: str | os.PathLike[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal-LM GGUF file with transformers: (model, tokenizer), weights dequantized to float32.

    The model is rebuilt from its config without the GGUF quantization marker, so unlike what
    `from_pretrained(..., gguf_file=...)` returns it can be `save_pretrained` (and logged). The tokenizer
    keeps the GGUF's chat template; its `model_max_length` is the model's context window when the GGUF
    gives none.
    """
    gguf = Path(path).expanduser().absolute()
    if not gguf.is_file():
        raise ModelSourceError(f"GGUF file {gguf} does not exist", param="source")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, ValueError, KeyError, RuntimeError) as exc:
        # transformers raises these for an architecture its GGUF loader does not know, a file that is not
        # GGUF, or a missing `gguf` package.
        raise ModelSourceError(
            f"could not load GGUF file {gguf} with transformers: {exc}", param="source"
        ) from exc
    plain = _without_quantization_marker(model)
    del model
    limit = getattr(plain.config, "max_position_embeddings", None)
    if isinstance(limit, int) and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**12):
        tokenizer.model_max_length = limit
    # from_pretrained's loading options land in init_kwargs and would be written to tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    return plain, tokenizer


def _without_quantization_marker(model: Any) -> Any:
    """The same weights in a model built from the config minus `quantization_config`.

    transformers marks a GGUF-loaded model as quantized (method "gguf") although its weights are plain
    float32, and `save_pretrained` refuses quantized models it cannot serialize.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    return plain


def _finished_build(out_dir: Path, sha256: str) -> bool:
    marker = out_dir / GGUF_MARKER
    if not marker.is_file() or not (out_dir / "config.json").is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("gguf_sha256") == sha256)
    except (OSError, ValueError):
        return False


def gguf_to_folder(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file to a Transformers folder (float32 safetensors + tokenizer); returns `out_dir`.

    A folder that already holds a finished conversion of a file with the same sha256 is reused. A
    conversion of another file is replaced; any other non-empty folder is refused, never deleted.
    """
    gguf = Path(gguf_path).expanduser().absolute()
    if not gguf.is_file():
        raise ModelSourceError(f"GGUF file {gguf} does not exist", param="gguf_path")
    return _gguf_to_folder(gguf, Path(out_dir).expanduser().absolute(), file_sha256(gguf))


def _gguf_to_folder(gguf: Path, out_dir: Path, sha256: str) -> Path:
    if _finished_build(out_dir, sha256):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / GGUF_MARKER).exists():
        raise ModelSourceError(
            f"gguf_out_dir {out_dir} is not empty and holds no GGUF conversion; refusing to overwrite it",
            param="gguf_out_dir",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written folder that looks finished
    # and two processes converting the same file do not write into each other's files.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        import transformers

        model, tokenizer = load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {"gguf_file": gguf.name, "gguf_sha256": sha256, "transformers": transformers.__version__}
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=1))
        if _finished_build(out_dir, sha256):  # another process finished first
            return out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a conversion of another file (marker checked above) or an empty dir
        tmp.rename(out_dir)
    except OSError:
        if _finished_build(out_dir, sha256):
            return out_dir
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
