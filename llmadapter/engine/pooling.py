"""How an embedding model turns token states into one vector: PoolingSpec, read from the model's files.

A sentence-transformers folder says how its model pools (`modules.json`, `1_Pooling/config.json`, a
`Normalize` module, `sentence_bert_config.json`). MLflow's Transformers artifact drops those files, so the
spec is saved next to the artifact as `pooling.json` and read back from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmadapter.errors import ConfigError, first_error

if TYPE_CHECKING:
    import torch

PoolingMode = Literal["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
POOLING_FILE = "pooling.json"

# sentence-transformers' legacy boolean keys, in the order it concatenates the pooled vectors.
_LEGACY_MODE_KEYS: dict[str, PoolingMode] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class PoolingSpec(BaseModel):
    """The model's own recipe from token states to a sentence vector; saved as `pooling.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: tuple[PoolingMode, ...] = Field(
        default=("mean",), min_length=1, description="Pooling modes; several are concatenated in this order."
    )
    normalize: bool = Field(default=False, description="L2-normalise the pooled vector (a Normalize module).")
    max_seq_length: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens fed to the model; None: the tokenizer's / model's own limit.",
    )
    lowercase: bool = Field(default=False, description="Lowercase texts before tokenizing (do_lower_case).")
    prompt: str = Field(default="", description="Text prepended to every text input (default prompt).")
    embedding_dimension: int | None = Field(
        default=None, ge=1, description="Token-state size the pooling expects (checked against the model)."
    )
    source: Literal["sentence-transformers", "default"] = Field(
        default="default", description="Where the recipe came from: the model's files or the mean default."
    )


def save_pooling(spec: PoolingSpec, dest_dir: str | os.PathLike[str]) -> Path:
    """Write `dest_dir/pooling.json` and return its path."""
    path = Path(dest_dir) / POOLING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_pooling(dest_dir: str | os.PathLike[str]) -> PoolingSpec:
    """Read `dest_dir/pooling.json`; a folder without it gets what its own files say (mean when none)."""
    path = Path(dest_dir) / POOLING_FILE
    if not path.is_file():
        return read_pooling(dest_dir)
    try:
        return PoolingSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise ConfigError(
            f"{path} is not a valid pooling spec: {first_error(exc).message}.", param="model"
        ) from None


def _read_json(path: Path, kind: type, what: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}.", param="model") from None
    if not isinstance(data, kind):
        raise ConfigError(f"{path} must hold {what}.", param="model")
    return data


def _read_object(path: Path) -> dict[str, Any]:
    return _read_json(path, dict, "a JSON object")


def _modes_from_config(config: dict[str, Any], path: Path) -> tuple[PoolingMode, ...]:
    mode = config.get("pooling_mode")
    if mode is None:  # legacy format: one boolean per mode
        modes = tuple(m for key, m in _LEGACY_MODE_KEYS.items() if config.get(key))
        return modes or ("mean",)
    raw = (mode,) if isinstance(mode, str) else tuple(mode)
    valid = PoolingMode.__args__  # type: ignore[attr-defined]
    bad = [m for m in raw if m not in valid]
    if bad or not raw:
        raise ConfigError(f"{path}: unsupported pooling mode {bad or raw}; known: {valid}.", param="model")
    return raw


def _module_kind(module: dict[str, Any]) -> str:
    # Module types are dotted class paths that moved between versions
    # (sentence_transformers.models.Pooling, ...sentence_transformer.modules.pooling.Pooling).
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def sentence_transformers_modules(folder: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The entries of `folder/modules.json`, or None when the folder is not a sentence-transformers model."""
    path = Path(folder) / "modules.json"
    if not path.is_file():
        return None
    return _read_json(path, list, "a JSON list of modules")


def transformer_dir(folder: str | os.PathLike[str]) -> Path:
    """The folder of the Transformers model: the sentence-transformers Transformer module's, or `folder`."""
    modules = sentence_transformers_modules(folder) or []
    for module in modules:
        if _module_kind(module) == "Transformer":
            return Path(folder) / str(module.get("path", ""))
    return Path(folder)


def read_pooling(folder: str | os.PathLike[str]) -> PoolingSpec:
    """The pooling a model folder declares (sentence-transformers files), or mean pooling when it has none.

    Modules other than Transformer, Pooling and Normalize (Dense, LayerNorm, ...) change the vector in
    ways this engine does not reproduce, so they are refused rather than silently skipped.
    """
    root = Path(folder)
    modules = sentence_transformers_modules(root)
    if modules is None:
        # A Transformer module kept in a subfolder points back to its parent's modules.json.
        parent_modules = sentence_transformers_modules(root.parent)
        if parent_modules and any(
            _module_kind(m) == "Transformer" and str(m.get("path", "")) == root.name for m in parent_modules
        ):
            return read_pooling(root.parent)
        return PoolingSpec()

    fields: dict[str, Any] = {"source": "sentence-transformers"}
    include_prompt = True
    for module in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = _module_kind(module)
        module_dir = root / str(module.get("path", ""))
        if kind == "Transformer":
            for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
                if (module_dir / name).is_file():
                    config = _read_object(module_dir / name)
                    if config.get("max_seq_length") is not None:
                        fields["max_seq_length"] = int(config["max_seq_length"])
                    fields["lowercase"] = bool(config.get("do_lower_case", False))
                    break
        elif kind == "Pooling":
            config = _read_object(module_dir / "config.json")
            fields["modes"] = _modes_from_config(config, module_dir / "config.json")
            dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
            if dim is not None:
                fields["embedding_dimension"] = int(dim)
            include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Normalize":
            fields["normalize"] = True
        else:
            raise ConfigError(
                f"The sentence-transformers module '{module.get('type')}' in {root / 'modules.json'} is not "
                "supported (only Transformer, Pooling and Normalize): its vectors would differ from the "
                "model's.",
                param="model",
            )

    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        config = _read_object(st_config)
        prompt_name = config.get("default_prompt_name")
        prompt = str((config.get("prompts") or {}).get(prompt_name) or "") if prompt_name else ""
        if prompt and not include_prompt:
            raise ConfigError(
                f"{root}: pooling that excludes the prompt tokens (include_prompt=false) is not supported.",
                param="model",
            )
        fields["prompt"] = prompt
    return PoolingSpec.model_validate(fields)


# ---------------------------------------------------------------------------------------------
# Pooling in torch (the same arithmetic as sentence-transformers' Pooling module)
# ---------------------------------------------------------------------------------------------


def _cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    first = mask.to(torch.int).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def _max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values


def _masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _masked_sum(hidden, mask)
    return total / count


def _mean_sqrt_len(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _masked_sum(hidden, mask)
    return total / count.sqrt()


def _weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    # Weights count from the first real token (1, 2, ...), so left padding would not shift them.
    first = mask.to(torch.int).argmax(dim=1, keepdim=True)
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device).unsqueeze(0) - first
    weights = (mask * positions).unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    import torch

    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    last = (positions * mask.to(torch.long)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


_POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls,
    "max": _max,
    "mean": _mean,
    "mean_sqrt_len_tokens": _mean_sqrt_len,
    "weightedmean": _weighted_mean,
    "lasttoken": _last_token,
}


def pool(hidden: torch.Tensor, mask: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """(batch, seq, hidden) token states + (batch, seq) attention mask -> (batch, dim) float32 vectors."""
    import torch

    # Half-precision sums over hundreds of tokens lose digits; pool in float32 as sentence-transformers does.
    hidden = hidden.float()
    vectors = torch.cat([_POOLERS[mode](hidden, mask) for mode in spec.modes], dim=-1)
    if spec.normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors
