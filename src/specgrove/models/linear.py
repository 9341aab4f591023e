"""Linear layers of the fast runtime.

On CPU, oneDNN can reorder a weight once into its blocked layout ("prepacking", what Inductor's CPU
freezing pass does); matrix multiplies with few rows (decode and verification: 1-32 tokens) then read the
weights at close to memory speed: measured here for a 17920x1536 bf16 weight, 1.1 ms instead of 3.9 ms
for one row and 1.5 ms instead of 3.7 ms for four. Elsewhere (CUDA, other dtypes, a torch build without
the op) weights stay plain tensors and F.linear is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """y = x W^T + b with W [out, in], prepacked for oneDNN when `packed`."""

    __slots__ = ("weight", "bias", "packed", "out_features", "in_features", "nbytes", "numel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool):
        self.out_features, self.in_features = weight.shape
        self.numel = weight.numel() + (bias.numel() if bias is not None else 0)
        self.nbytes = weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if packed else weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
