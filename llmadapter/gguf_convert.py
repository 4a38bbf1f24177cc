"""GGUF files as Transformers folders: load one with transformers, convert it to a float32 folder once."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmadapter.errors import ModelSourceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_MARKER = ".llmadapter-gguf.json"

_HASH_CHUNK = 8 * 1024 * 1024


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_gguf_out_dir(gguf_path: str | os.PathLike[str], sha256: str) -> Path:
    """Where a GGUF file is converted when no folder is given: <data dir>/gguf/<stem>-<sha256[:12]>."""
    from llmadapter.settings import get_settings

    return get_settings().data_dir / "gguf" / f"{Path(gguf_path).stem}-{sha256[:12]}"


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
    return convert_gguf(gguf, Path(out_dir).expanduser().absolute(), file_sha256(gguf))


def convert_gguf(gguf: Path, out_dir: Path, sha256: str) -> Path:
    """Convert `gguf` (whose sha256 the caller has) into `out_dir`, as `gguf_to_folder` does."""
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


# GGUF block types by the weight-only quantization that keeps as many bits (the "auto" quantization of a
# GGUF source): 4-bit blocks -> int4, 5- to 8-bit blocks -> int8, float tensors -> none.
_BLOCK_BITS = {"Q4": "int4", "IQ4": "int4", "Q5": "int8", "Q6": "int8", "Q8": "int8"}


def gguf_quantization(path: str | os.PathLike[str]) -> str | None:
    """The quantization matching most of a GGUF file's weights (by elements): int4, int8, or None."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        if len(tensor.shape) < 2:
            continue
        kind = tensor.tensor_type.name
        quant = next((q for prefix, q in _BLOCK_BITS.items() if kind.startswith(prefix)), "none")
        counts[quant] = counts.get(quant, 0) + int(tensor.n_elements)
    best = max(counts, key=lambda q: counts[q]) if counts else "none"
    return None if best == "none" else best
