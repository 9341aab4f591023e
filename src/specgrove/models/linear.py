"""Linear layers of the fast runtime.

On CPU, oneDNN can reorder a weight once into its blocked layout ("prepacking", what Inductor's CPU
freezing pass does); matrix multiplies with few rows (decode and verification: 1-32 tokens) then read the
weights at close to memory speed: measured here for a 17920x1536 bf16 weight, 1.1 ms instead of 3.9 ms
for one row and 1.5 ms instead of 3.7 ms for four. Elsewhere (CUDA, other dtypes, a torch build without
the op) weights stay plain tensors and F.linear is used.

Weight-only int8 (`quantization="int8"`): each output row is stored as int8 with one scale,
w ~= scale * round(w / scale), scale = max|w_row| / 127, and multiplied by PyTorch's
`_weight_int8pack_mm` kernel (activations stay in the model dtype). Half the bytes of bf16 per
decode step, but on this CPU (AMD EPYC, AVX-512 BF16, no AMX; torch 2.13) the kernel is not faster:
17920x1536 weight, measured 1.36 / 4.04 / 16.5 ms for 1 / 8 / 32 rows against 1.00 / 1.66 / 4.54 ms
for the prepacked bf16 weight. It is here for memory and for machines where the kernel wins. It changes the model's outputs slightly: use it for a draft (speculation stays exact with
respect to the target as loaded), or knowingly for a target (then the output is exactly the quantized
target's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZATIONS = (None, "int8")


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: (int8 weight [N, K], scales [N] in the weight's dtype)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


class Linear:
    """y = x W^T + b with W [out, in]: prepacked for oneDNN when `packed`, int8 when `quantization="int8"`."""

    __slots__ = ("weight", "bias", "packed", "scales", "out_features", "in_features", "nbytes", "numel")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, quantization: str | None = None):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
        self.out_features, self.in_features = weight.shape
        self.numel = weight.numel() + (bias.numel() if bias is not None else 0)
        self.bias = bias
        self.scales = None
        if quantization == "int8":
            if not int8_available():
                raise ValueError("int8 weights need torch.ops.aten._weight_int8pack_mm, which this torch build lacks")
            self.weight, self.scales = quantize_int8(weight)
            self.packed = False
            self.nbytes = self.weight.numel() + self.scales.numel() * self.scales.element_size()
        else:
            self.packed = packed
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if packed else weight
            self.nbytes = weight.numel() * weight.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is not None:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
