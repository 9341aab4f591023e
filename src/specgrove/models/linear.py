"""Linear layers of the fast runtime: dense (prepacked for oneDNN on CPU), weight-only int8, weight-only int4.

**Dense bf16 / fp32 on CPU.** oneDNN can reorder a weight once into its blocked layout ("prepacking",
what Inductor's CPU freezing pass does); matrix multiplies with few rows (decode and verification: 1-32
tokens) then read the weights at close to memory speed. On this CPU (AMD EPYC, AVX-512 BF16, 2 cores)
oneDNN's one- and two-row bf16 kernels are slower than its four-row one (1.5B target, whole forward,
measured: 106 ms for one token, 124 for two, 87 for four), so fewer than `PAD_ROWS` rows are padded with
zero rows: the padding rows cost nothing measurable and a one-token decode step becomes as fast as a
four-token one. In fp32 prepacking alone helps (151936x1536 weight, one row: 33 ms against 58 for
F.linear; four rows: 42 against 142). Elsewhere (CUDA, fp16, a torch build without the op) weights stay
plain tensors and F.linear is used.

**Weight-only int8** (`quantization="int8"`): each output row is stored as int8 with one scale,
w ~= scale * round(w / scale), scale = max|w_row| / 127, multiplied by PyTorch's `_weight_int8pack_mm`
(activations stay in the model dtype). Half the bytes of bf16, but on this CPU the kernel is compute
bound: 17920x1536 weight, 1.13 / 1.84 / 3.95 ms for 1 / 4 / 8 rows against 1.40 / 1.39 / 2.19 ms
prepacked bf16.

**Weight-only int4** (`quantization="int4"`): groups of `INT4_GROUP_SIZE` inputs of one output row share
a scale and an offset (asymmetric min-max, as the Q4 formats of llama.cpp): w ~= (q - 8) * scale + zero,
q in 0..15, kept in the packed layout of PyTorch's `_weight_int4pack_mm_for_cpu` (CPU) /
`_weight_int4pack_mm` (CUDA, bf16, tinygemm). A quarter of bf16's bytes plus 4 bytes of scale and offset
per group (4.5 bits per weight). On this CPU the kernel is compute bound too, but at one row it is twice
as fast as prepacked bf16 (17920x1536: 0.73 ms against 1.40; the 151936x1536 output layer 6.5 ms
against 13-17); its cost grows with the rows (1.31 ms at 4, 2.6 at 8).

Quantized weights change the model's outputs: use them for a draft (speculation stays exact with respect
to the target as loaded), or knowingly for a target (then the output is exactly the quantized target's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUANTIZATIONS = (None, "int8", "int4")
INT4_GROUP_SIZE = 32
PAD_ROWS = 4  # oneDNN prepacked bf16: fewer rows are padded up to this many (see above)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_available(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return (hasattr(torch.ops.aten, "_weight_int4pack_mm") and torch.cuda.is_available()
                and torch.cuda.get_device_capability(device)[0] >= 8)
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: (int8 weight [N, K], scales [N] in the weight's dtype)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric int4 of weight [N, K]: (q [N, K] int32 in 0..15, scale_zero [K / group, N, 2] fp32)
    with w ~= (q - 8) * scale + zero (`dequantize_int4`)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size {group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    return q.contiguous(), torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scale_zero: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    n, k = q.shape
    scale, zero = scale_zero[..., 0].t().float(), scale_zero[..., 1].t().float()  # [N, K / group]
    w = (q.reshape(n, k // group_size, group_size).float() - 8) * scale[..., None] + zero[..., None]
    return w.reshape(n, k)


class Linear:
    """y = x W^T + b with W [out, in]: prepacked for oneDNN when `packed`, int8 or int4 by `quantization`."""

    __slots__ = ("weight", "bias", "packed", "scales", "quantization", "out_features", "in_features", "nbytes",
                 "numel", "group_size", "pad_rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, quantization: str | None = None):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
        self.out_features, self.in_features = weight.shape
        self.numel = weight.numel() + (bias.numel() if bias is not None else 0)
        self.bias = bias
        self.scales = None
        self.quantization = quantization
        self.group_size = None
        self.packed = packed and quantization is None
        self.pad_rows = PAD_ROWS if self.packed and weight.dtype == torch.bfloat16 else 0
        if quantization == "int8":
            if not int8_available():
                raise ValueError("int8 weights need torch.ops.aten._weight_int8pack_mm, which this torch build lacks")
            self.weight, self.scales = quantize_int8(weight)
        elif quantization == "int4":
            self._init_int4(weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        self.nbytes = self.weight.numel() * self.weight.element_size()
        if self.scales is not None:
            self.nbytes += self.scales.numel() * self.scales.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()

    def _init_int4(self, weight: torch.Tensor) -> None:
        device = weight.device
        if not int4_available(device):
            raise ValueError(f"int4 weights need PyTorch's int4 kernel for {device.type} "
                             "(_weight_int4pack_mm_for_cpu on CPU; _weight_int4pack_mm on a CUDA GPU of compute "
                             "capability 8.0 or newer), which this machine or torch build lacks; use int8 or none")
        if device.type == "cuda" and weight.dtype != torch.bfloat16:
            raise ValueError("int4 weights on CUDA need dtype bfloat16 (PyTorch's tinygemm kernel)")
        self.group_size = INT4_GROUP_SIZE
        # The kernels want N a multiple of 16 (CPU) / 8 (CUDA): pad with zero rows, cut the output back.
        multiple = 8 if device.type == "cuda" else 16
        padded = -self.out_features % multiple
        if padded:
            weight = torch.cat([weight, weight.new_zeros(padded, self.in_features)])
        q, scale_zero = quantize_int4(weight, self.group_size)
        self.scales = scale_zero.to(device=device, dtype=weight.dtype)
        if device.type == "cuda":
            k = self.in_features
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            nibbles = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)  # even inputs in the high nibble
            self.weight = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), tiles)
        else:
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization is not None:
            x2 = x.reshape(-1, self.in_features)
            if self.quantization == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
            elif self.weight.device.type == "cuda":
                y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales)
            y = y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.packed:
            rows = x.numel() // self.in_features
            if rows < self.pad_rows:
                x2 = torch.cat([x.reshape(rows, self.in_features), x.new_zeros(self.pad_rows - rows, self.in_features)])
                y = torch.ops.mkldnn._linear_pointwise(x2, self.weight, self.bias, "none", [], "")
                return y[:rows].reshape(*x.shape[:-1], self.out_features)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
