"""int4 linears that call torch's CPU kernel directly, on the weights torchao packed.

torchao's `Int4OpaqueTensor` (its CPU int4 weight-only format) answers every `F.linear` through Python
tensor-subclass dispatch, about 20 us a call: with seven linears per layer that is a third of a batch-1
decode step of a small model. `PackedInt4Linear` keeps the same packed weight and scales and calls the
same kernel (`aten._weight_int4pack_mm_for_cpu`) itself, so the numbers are identical and the dispatch
is gone. Nothing here quantizes or packs: torchao does that.
"""

from __future__ import annotations

from typing import Any

import torch


class PackedInt4Linear(torch.nn.Module):
    """y = x W^T + b with W in torchao's packed int4 CPU layout (groupwise scales and zero points)."""

    def __init__(self, weight: Any, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.group_size = int(weight.block_size[1])
        self.register_buffer("qdata", weight.qdata, persistent=False)
        self.register_buffer("scale_and_zero", weight.scale_and_zero, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).contiguous(), self.qdata, self.group_size, self.scale_and_zero
        )
        y = y[:, : self.out_features].reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group_size}"


def direct_int4_linears(model: torch.nn.Module) -> int:
    """Replace each Linear whose weight is torchao's plain A16W4 Int4OpaqueTensor by a PackedInt4Linear
    over the same data; returns how many were replaced (other layouts are left to torchao)."""
    try:
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    except ImportError:  # an older torchao without the CPU int4 format: nothing to replace
        return 0
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            weight = getattr(child, "weight", None)
            if (
                isinstance(child, torch.nn.Linear)
                and isinstance(weight, Int4OpaqueTensor)
                and weight.act_pre_scale is None
                and weight.act_mapping_type is None
                and weight.device.type == "cpu"
            ):
                setattr(module, name, PackedInt4Linear(weight, child.bias))
                replaced += 1
    return replaced
