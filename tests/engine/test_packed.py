"""Direct kernels on torchao's quantized weights: the same answers as torchao's own linears, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from llmadapter.engine.packed import PackedInt4Linear, PackedInt8Linear, direct_linears

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])


def _quantized(folder: Path, config: Any) -> torch.nn.Module:
    from torchao.quantization import quantize_

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    # torch's int4 packing needs out_features divisible by 16: the tiny vocabulary (600) stays bf16.
    quantize_(
        model, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0
    )
    return model


def _linears(model: torch.nn.Module) -> list[type]:
    return [
        type(m)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | PackedInt4Linear | PackedInt8Linear)
    ]


def test_int4_direct_linears_give_torchaos_logits_exactly(tiny_llama: Path) -> None:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    config = PrototypeInt4WeightOnlyConfig(group_size=32)
    reference, direct = _quantized(tiny_llama, config), _quantized(tiny_llama, config)
    linears = len(_linears(direct))
    assert direct_linears(direct, torch.bfloat16) == linears - 1 > 0  # all but the lm_head
    assert _linears(direct).count(torch.nn.Linear) == 1
    assert direct_linears(direct, torch.bfloat16) == 0  # already direct: nothing more to replace
    with torch.inference_mode():
        assert torch.equal(direct(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_int8_direct_linears_give_torchaos_logits_exactly(tiny_llama: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig

    reference, direct = (
        _quantized(tiny_llama, Int8WeightOnlyConfig()),
        _quantized(tiny_llama, Int8WeightOnlyConfig()),
    )
    assert direct_linears(direct, torch.bfloat16) == len(_linears(direct)) - 1 > 0
    assert PackedInt8Linear in _linears(direct)
    with torch.inference_mode():
        ours, theirs = direct(input_ids=IDS).logits.float(), reference(input_ids=IDS).logits.float()
    assert torch.equal(ours, theirs)  # the same operations: near-ties fall the same way


def test_plain_linears_are_left_alone(tiny_llama: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert direct_linears(model, torch.float32) == 0
