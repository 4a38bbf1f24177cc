"""Quantized linears that call torch's CPU kernels directly, on the weights torchao quantized.

- int4: torchao's `Int4OpaqueTensor` (its CPU int4 weight-only format) answers every `F.linear` through
  Python tensor-subclass dispatch, about 20 us a call: with seven linears per layer that is a third of a
  batch-1 decode step of a small model. `PackedInt4Linear` keeps the same packed weight and scales and
  calls the same kernel (`aten._weight_int4pack_mm_for_cpu`) itself: identical numbers, no dispatch.
- int8: torchao's per-row `Int8Tensor` weight-only linear converts the whole int8 matrix to the
  activation dtype on every call (`qdata.t().to(dtype)`, then a float matmul, then the row scales),
  which for SmolLM2's output layer (49152 x 576) costs more than the rest of the step.
  `PackedInt8Linear` makes that conversion once, at load, and does the same matmul and scaling per
  call: the same operations on the same values, so the same logits to the bit, at twice the int8
  memory for the layer. torch's own int8 kernel (`aten._weight_int8pack_mm`) would keep int8 memory
  but sums in another order, and on SmolLM2 that flips the near-tie of "The capital of France is
  Paris." into a wrong answer: exactness won.

Nothing here quantizes or packs: torchao does that. Only CPU tensors are replaced (CUDA keeps torchao's
own kernels).
"""

from __future__ import annotations

from typing import Any

import torch


class _DirectLinear(torch.nn.Linear):
    """An nn.Linear that keeps torchao's weight (what code reading `.weight` sees: its shape, dtype and
    device) but computes through a torch kernel on that weight's own data."""

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None) -> None:
        torch.nn.Module.__init__(self)  # not Linear's: it would allocate a float weight
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.weight = weight
        self.bias = bias


class PackedInt4Linear(_DirectLinear):
    """y = x W^T + b with W in torchao's packed int4 CPU layout (groupwise scales and zero points)."""

    def __init__(self, weight: Any, bias: torch.nn.Parameter | None) -> None:
        super().__init__(weight, bias)
        self.group_size = int(weight.block_size[1])
        self.qdata, self.scale_and_zero = weight.qdata, weight.scale_and_zero  # the same tensors, no copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).contiguous(), self.qdata, self.group_size, self.scale_and_zero
        )
        y = y[:, : self.out_features].reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group_size}"


class PackedInt8Linear(_DirectLinear):
    """y = (x (W_int8)^T) * s + b as torchao's per-row Int8Tensor computes it, W converted once."""

    def __init__(self, weight: Any, bias: torch.nn.Parameter | None, dtype: torch.dtype) -> None:
        super().__init__(weight, bias)
        self.rows_t = weight.qdata.t().to(dtype)  # what torchao converts on every call
        self.scale = weight.scale.to(dtype).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.mm(x.reshape(-1, shape[-1]), self.rows_t) * self.scale
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per-row int8"


def _direct(child: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module | None:
    """The direct-kernel module for one Linear of torchao's, or None when its layout is another."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor

    weight = getattr(child, "weight", None)
    plain = isinstance(child, torch.nn.Linear) and not isinstance(child, _DirectLinear)
    if not plain or weight is None or weight.device.type != "cpu":
        return None
    if isinstance(weight, Int4OpaqueTensor):
        if weight.act_pre_scale is None and weight.act_mapping_type is None:
            return PackedInt4Linear(weight, child.bias)
    elif isinstance(weight, Int8Tensor):
        per_row = list(weight.block_size) == [1, weight.qdata.shape[-1]]
        if per_row and weight.act_quant_kwargs is None and weight.act_pre_scale is None:
            return PackedInt8Linear(weight, child.bias, dtype)
    return None


def direct_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace each Linear holding a torchao CPU int4 (A16W4) or per-row int8 weight-only tensor by the
    module that calls torch's kernel on the same data (`dtype`: the activations'); returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            direct = _direct(child, dtype)
            if direct is not None:
                setattr(module, name, direct)
                replaced += 1
    return replaced
