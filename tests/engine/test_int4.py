"""PackedInt4Linear: torchao's packed int4 weights through torch's kernel, without subclass dispatch."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from llmadapter.engine.int4 import PackedInt4Linear, direct_int4_linears


def _quantized(folder: Path) -> torch.nn.Module:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    # torch's int4 packing needs out_features divisible by 16: the tiny vocabulary (600) stays bf16.
    quantize_(
        model,
        PrototypeInt4WeightOnlyConfig(group_size=32),
        filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0,
    )
    return model


def test_direct_linears_give_the_same_logits_as_torchao(tiny_llama: Path) -> None:
    reference, direct = _quantized(tiny_llama), _quantized(tiny_llama)
    linears = sum(isinstance(m, torch.nn.Linear) for m in direct.modules())
    assert direct_int4_linears(direct) == linears - 1 > 0  # all but the lm_head
    assert [type(m) for m in direct.modules() if isinstance(m, torch.nn.Linear)] == [torch.nn.Linear]
    assert any(isinstance(m, PackedInt4Linear) for m in direct.modules())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(direct(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_plain_linears_are_left_alone(tiny_llama: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert direct_int4_linears(model) == 0
