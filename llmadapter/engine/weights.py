"""Weight formats of a loaded model: dtype, torchao weight-only int8/int4, device, and the check that a
format still answers like the checkpoint (apply_weight_format: every generation load goes through it).

Precedence per field: an explicit server setting > the model_config > auto. `auto` is: device cuda when
CUDA is available, else cpu; dtype bfloat16 on CUDA, float32 on CPU (exact); quantization the GGUF
source's own blocks (Q4_x -> int4, Q8_0 -> int8), else none. int8/int4 run bfloat16 activations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmadapter.config import WeightFormat
from llmadapter.engine.packed import direct_linears
from llmadapter.errors import ConfigError

log = logging.getLogger("llmadapter.weights")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# torchao's int4 kernels take these group sizes; the first that fits the most layers wins. 32 first: on
# SmolLM2 (bench/formats.py) group 64 loses a third of the greedy answers (KL 0.41 to float32) and is no
# faster, while 32 is the block size of GGUF's Q4 formats, whose dequantized weights it represents again.
INT4_GROUP_SIZES = (32, 64, 128)
_INT4_ROW_TILE = 16
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# Teacher-forced agreement of next-token choices with the checkpoint below this refuses the format.
MIN_AGREEMENT = 0.6
_PROBE_TOKENS = 12


@dataclass(frozen=True)
class ServedFormat:
    """The format a model is served with, as /v1/models, /ready and the load log show it."""

    dtype: str
    quantization: str
    device: str
    group_size: int | None = None
    quantized_layers: int = 0
    skipped_layers: tuple[str, ...] = ()
    head: str | None = None  # the output layer's own quantization when it differs (int4: int8)
    agreement: float | None = None  # teacher-forced next-token agreement with the checkpoint
    kl: float | None = None  # mean KL(checkpoint || served) over the same positions
    notes: tuple[str, ...] = field(default=(), compare=False)

    def card(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "quantization": self.quantization, "device": self.device}

    def describe(self) -> str:
        parts = [f"{self.quantization if self.quantization != 'none' else self.dtype} on {self.device}"]
        if self.quantization != "none":
            parts.append(f"{self.dtype} activations, {self.quantized_layers} layers quantized")
            if self.group_size:
                parts.append(f"group size {self.group_size}")
            if self.head:
                parts.append(f"lm_head {self.head}")
            if self.skipped_layers:
                parts.append(f"{len(self.skipped_layers)} left in {self.dtype}")
        if self.agreement is not None:
            parts.append(
                f"agrees with the checkpoint on {self.agreement:.0%} of next tokens, KL {self.kl:.4f}"
            )
        return ", ".join(parts)


def model_device(model: Any) -> torch.device:
    """The device a model's weights are on (cpu for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return first.device if first is not None else torch.device("cpu")


def check_device_name(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"'{value}' is not a device: use auto, cpu, cuda or cuda:N")
    return value


def resolve_device(asked: str = "auto") -> str:
    """auto -> cuda:0 when CUDA is available, else cpu; cuda without CUDA, or a missing index, is an error."""
    check_device_name(asked)
    available = torch.cuda.is_available()
    if asked == "auto":
        return "cuda:0" if available else "cpu"
    if asked == "cpu":
        return "cpu"
    if not available:
        raise ConfigError(
            f"device '{asked}' was asked for but this machine has no CUDA device (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device 'cpu' or 'auto'.",
            param="device",
        )
    index = int(asked.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device '{asked}' does not exist: this machine has {count} CUDA device(s).", param="device"
        )
    return f"cuda:{index}"


def resolve_format(asked: WeightFormat, *, source_quantization: str | None = None) -> ServedFormat:
    """The format a model will be served with (before its layers are known): auto values filled in and the
    combinations no kernel runs refused or adjusted (each adjustment a note, logged once at load)."""
    device = resolve_device(asked.device)
    on_cuda = device.startswith("cuda")
    notes: list[str] = []
    quantization = asked.quantization
    if quantization == "auto":
        quantization = source_quantization or "none"
        if source_quantization:
            notes.append(
                f"quantization {source_quantization}: the GGUF source's own blocks (set 'none' for float)"
            )
    dtype = asked.dtype
    if dtype == "auto":
        dtype = "bfloat16" if on_cuda or quantization != "none" else "float32"
    elif quantization != "none" and dtype != "bfloat16":
        notes.append(f"dtype {dtype} -> bfloat16: {quantization} kernels take bfloat16 activations")
        dtype = "bfloat16"
    if dtype == "float16" and not on_cuda:
        raise ConfigError(
            "dtype 'float16' on cpu is refused: CPUs have no fast float16 matrix kernels, so it runs "
            "slower than float32 (bench/formats.py); use 'bfloat16' (half the memory, fast) or 'float32'.",
            param="dtype",
        )
    return ServedFormat(dtype=dtype, quantization=quantization, device=device, notes=tuple(notes))


# ---------------------------------------------------------------------------------------------
# Applying a format
# ---------------------------------------------------------------------------------------------


def _conv1d_as_linear(model: torch.nn.Module) -> int:
    """GPT-2's Conv1D layers (weight [in, out]) as nn.Linear (weight [out, in]), the same function, so
    that torchao quantizes them; returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                weight = child.weight
                linear = torch.nn.Linear(
                    weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype
                )
                with torch.no_grad():
                    linear.weight.copy_(weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def pick_group_size(in_features: Sequence[int]) -> int | None:
    """The int4 group size dividing the most layers' in_features (ties: the earlier in INT4_GROUP_SIZES)."""
    best: tuple[int, int] | None = None
    for size in INT4_GROUP_SIZES:
        covered = sum(1 for n in in_features if n % size == 0)
        if covered and (best is None or covered > best[0]):
            best = (covered, size)
    return best[1] if best else None


def _import_torchao() -> None:
    """Import torchao without its import-time warnings: on a CPU build it warns that its CUDA-only
    extensions do not load, and torch that its enums need no registration; noise in every server log."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torchao_config(quantization: str, device: str, group_size: int | None) -> Any:
    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    assert group_size is not None
    if device.startswith("cuda"):
        from torchao.quantization import Int4WeightOnlyConfig

        # tinygemm's layout: aten kernels, no extra package (the default layout needs fbgemm-gpu-genai).
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    # Int4OpaqueTensor: aten's _weight_int4pack_mm_for_cpu, the fastest CPU path measured.
    return PrototypeInt4WeightOnlyConfig(group_size=group_size)


def quantize_model(model: torch.nn.Module, fmt: ServedFormat) -> ServedFormat:
    """Weight-only quantize every linear layer torchao can take, in place.

    int4 quantizes the transformer blocks to int4 and the output layer (lm_head) to int8, as llama.cpp's
    Q4 GGUF files keep their output matrix at Q8_0: on SmolLM2 an int4 lm_head alone takes the KL to
    float32 from 0.004 to 0.061 and changes the greedy answers (bench/formats.py).
    """
    _import_torchao()
    from torchao.quantization import quantize_

    _conv1d_as_linear(model)
    layers = _linears(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((name for name, mod in layers if mod is head), None)
    group_size = None
    eligible = [name for name, _ in layers]
    if fmt.quantization == "int4":
        # The int4 kernels pack output rows in tiles of 16 (aten's _convert_weight_to_int4pack_*).
        packable = [(n, m) for n, m in layers if m.out_features % _INT4_ROW_TILE == 0 and n != head_name]
        group_size = pick_group_size([mod.in_features for _, mod in packable])
        eligible = [name for name, mod in packable if group_size and mod.in_features % group_size == 0]
    if not eligible:
        kinds = sorted({type(m).__name__ for m in model.modules() if len(list(m.children())) == 0})
        raise ConfigError(
            f"quantization '{fmt.quantization}' cannot quantize any layer of this model (its layers: "
            f"{', '.join(kinds[:8])}; int4 needs linear layers whose input size is a multiple of "
            f"{' or '.join(map(str, INT4_GROUP_SIZES))} and output size of {_INT4_ROW_TILE}); use "
            "quantization 'none' or 'int8'.",
            param="quantization",
        )
    int8_head = fmt.quantization == "int4" and head_name is not None
    skipped = tuple(
        name for name, _ in layers if name not in eligible and not (int8_head and name == head_name)
    )
    if skipped:
        log.info(
            "quantization %s: %d linear layer(s) stay %s (input size not a multiple of %s or output size "
            "not of %d): %s",
            fmt.quantization, len(skipped), fmt.dtype, group_size, _INT4_ROW_TILE, ", ".join(skipped[:5]),
        )  # fmt: skip
    wanted = set(eligible)
    # lm_head shares its weight with the embedding in tied models: quantize_ gives lm_head a new
    # parameter and leaves the embedding's float one for the lookup.
    quantize_(
        model,
        _torchao_config(fmt.quantization, fmt.device, group_size),
        filter_fn=lambda mod, name: name in wanted,
        device=fmt.device,
    )
    if int8_head:
        quantize_(
            model,
            _torchao_config("int8", fmt.device, None),
            filter_fn=lambda mod, name: name == head_name,
            device=fmt.device,
        )
    # On CPU, torch's int4 / int8 kernels called directly on what torchao quantized: no tensor-subclass
    # dispatch per call, and no int8 -> bfloat16 copy of the whole matrix per call (llmadapter.engine.packed).
    direct_linears(model, DTYPES[fmt.dtype])
    return replace(
        fmt,
        group_size=group_size,
        quantized_layers=len(eligible) + int8_head,
        skipped_layers=skipped,
        head="int8" if int8_head else None,
    )


def _convert(model: torch.nn.Module, fmt: ServedFormat) -> ServedFormat:
    """Move the model to the format's device and dtype, then quantize it; returns what was done."""
    model.to(device=fmt.device, dtype=DTYPES[fmt.dtype])
    if fmt.quantization != "none":
        fmt = quantize_model(model, fmt)
    return fmt


# ---------------------------------------------------------------------------------------------
# The check: a format that breaks the answers is refused
# ---------------------------------------------------------------------------------------------


def _pad_left(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


@dataclass
class Probe:
    """The checkpoint's greedy continuations of the probe prompts and its next-token distributions."""

    ids: torch.Tensor
    mask: torch.Tensor
    start: int  # first position whose prediction is a generated token
    logprobs: torch.Tensor  # [rows, positions, vocab] of the checkpoint, float32, on cpu

    @classmethod
    def record(
        cls, model: Any, prompts: list[list[int]], pad_id: int, new_tokens: int = _PROBE_TOKENS
    ) -> Probe:
        ids, mask = _pad_left(prompts, pad_id)
        device = model_device(model)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            full = out.cpu()
            full_mask = torch.cat(
                [mask, torch.ones((len(prompts), full.shape[1] - ids.shape[1]), dtype=torch.long)], 1
            )
            logprobs = _logprobs(model, full, full_mask, ids.shape[1] - 1)
        return cls(full, full_mask, ids.shape[1] - 1, logprobs)

    def compare(self, model: Any) -> tuple[float, float]:
        """(agreement of greedy choices, mean KL(checkpoint || model)) at the generated positions."""
        with torch.inference_mode():
            other = _logprobs(model, self.ids, self.mask, self.start)
        agree = (other.argmax(-1) == self.logprobs.argmax(-1)).float().mean().item()
        kl = (self.logprobs.exp() * (self.logprobs - other)).sum(-1).mean().item()
        return agree, kl


def _logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
    device = model_device(model)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
    return torch.log_softmax(out.logits[:, start:-1, :].float(), dim=-1).cpu()


def probe_prompts(tokenizer: Any, task: str) -> list[list[int]]:
    """The prompts of the task's built-in validation samples, as token ids (what validation will ask)."""
    from llmadapter.catalog import CHAT
    from llmadapter.validation.samples import BUILTIN_SAMPLES

    prompts = []
    for sample in BUILTIN_SAMPLES.get(task, ()):
        request = sample.request
        if task == CHAT and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                request["messages"], add_generation_prompt=True, tokenize=False
            )
            prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        elif isinstance(request.get("prompt"), str):
            prompts.append(list(tokenizer(request["prompt"])["input_ids"]))
    return [p for p in prompts if p]


def apply_generation_format(
    model: Any,
    tokenizer: Any,
    asked: WeightFormat,
    *,
    task: str,
    source_quantization: str | None = None,
    name: str = "model",
) -> ServedFormat:
    """apply_weight_format with the task's validation prompts as the probe and the tokenizer's padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return apply_weight_format(
        model,
        asked,
        probe_prompts=probe_prompts(tokenizer, task),
        pad_id=int(pad or 0),
        source_quantization=source_quantization,
        name=name,
    )


def apply_embedding_format(model: Any, asked: WeightFormat, *, name: str = "model") -> ServedFormat:
    """Embedding models: device and an explicit dtype apply (auto stays float32: the pooled vectors must
    match sentence-transformers'); quantization does not (logged when asked for)."""
    device = resolve_device(asked.device)
    dtype = asked.dtype if asked.dtype != "auto" else "float32"
    if dtype == "float16" and device == "cpu":
        resolve_format(WeightFormat(dtype="float16", quantization="none", device="cpu"))  # raises
    if asked.quantization not in ("auto", "none"):
        log.info(
            "%s: quantization %s does not apply to embedding models; serving %s",
            name,
            asked.quantization,
            dtype,
        )
    model.to(device=device, dtype=DTYPES[dtype])
    served = ServedFormat(dtype=dtype, quantization="none", device=device)
    log.info("%s: weights %s", name, served.describe())
    return served


def apply_weight_format(
    model: Any,
    asked: WeightFormat,
    *,
    probe_prompts: list[list[int]] | None = None,
    pad_id: int = 0,
    source_quantization: str | None = None,
    name: str = "model",
) -> ServedFormat:
    """Put a loaded generation model into the format it is served with (the one load path: pyfunc,
    server, validation, evaluation, swaps, Ray all come here through build_engine).

    When the format is not the checkpoint's own (quantized, or another dtype), the checkpoint's greedy
    continuations of `probe_prompts` (the task's validation samples) are recorded first, and the
    converted model is refused, naming the setting, when fewer than MIN_AGREEMENT of its teacher-forced
    next-token choices match: a format that breaks the validation answers never serves.
    """
    fmt = resolve_format(asked, source_quantization=source_quantization)
    for note in fmt.notes:
        log.info("%s: %s", name, note)
    stored = next(model.parameters()).dtype
    exact = fmt.quantization == "none" and DTYPES[fmt.dtype] == stored
    probe = None
    if not exact and probe_prompts:
        probe = Probe.record(model, probe_prompts, pad_id)
    fmt = _convert(model, fmt)
    if probe is not None:
        agreement, kl = probe.compare(model)
        fmt = replace(fmt, agreement=agreement, kl=kl)
        if agreement < MIN_AGREEMENT:
            param = "quantization" if fmt.quantization != "none" else "dtype"
            value = fmt.quantization if param == "quantization" else fmt.dtype
            raise ConfigError(
                f"{param} '{value}' breaks this model: on its validation prompts only {agreement:.0%} of "
                f"the next tokens match the checkpoint's greedy answers (at least {MIN_AGREEMENT:.0%} "
                f"needed; KL {kl:.3f}); serve it with {param} "
                f"'{'none' if param == 'quantization' else 'float32'}' or another format.",
                param=param,
            )
    log.info("%s: weights %s", name, fmt.describe())
    return fmt
