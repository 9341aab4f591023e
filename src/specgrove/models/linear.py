"""Linear layers of the fast runtime: dense (prepacked for oneDNN on CPU), weight-only int8, weight-only int4,
w8a8, and the GGUF file's own blocks (`GGUFLinear`).

Figures for every format below (per-matrix and per-forward timings, which differ from CPU to CPU) are in
docs/benchmarks.md, "2026-11-26 (midday): the runtime's formats and llama.cpp (AVX-512 CPU)"; the GGUF path's
are in its 2026-11-29 and 2026-11-30 sections. docs/runtime.md describes the formats together.

**Dense bf16 / fp32 on CPU.** oneDNN can reorder a weight once into its blocked layout ("prepacking",
what Inductor's CPU freezing pass does); matrix multiplies with few rows (decode and verification: 1-32
tokens) then read the weights at close to memory speed. oneDNN's one- and two-row bf16 kernels can be slower
than its four-row one on some CPUs, so fewer than `PAD_ROWS` rows are padded with zero rows: the padding rows
cost nothing measurable and a one-token decode step runs the four-row kernel. fp32 weights gain from
prepacking alone. Elsewhere (CUDA, fp16, a torch build without the op) weights stay plain tensors and
F.linear is used.

**Weight-only int8** (`quantization="int8"`): each output row is stored as int8 with one scale,
w ~= scale * round(w / scale), scale = max|w_row| / 127, multiplied by PyTorch's `_weight_int8pack_mm`
(activations stay in the model dtype). Half the bytes of bf16, but the CPU kernel is compute bound, so it is
not faster than prepacked bf16 and slows down as the rows grow.

**Weight-only int4** (`quantization="int4"`): groups of `INT4_GROUP_SIZE` inputs of one output row share
a scale and an offset (asymmetric min-max, as the Q4 formats of llama.cpp): w ~= (q - 8) * scale + zero,
q in 0..15, kept in the packed layout of PyTorch's `_weight_int4pack_mm_for_cpu` (CPU) /
`_weight_int4pack_mm` (CUDA, bf16, tinygemm). A quarter of bf16's bytes plus 4 bytes of scale and offset
per group (4.5 bits per weight). The CPU kernel is compute bound too: at one row it beats prepacked bf16 on an
AVX-512 CPU, and its cost grows with the rows (it has no fast path without AVX-512: a warning says so).

**Weights and activations int8** (`quantization="w8a8"`, CPU): weights int8 per output row (symmetric),
activations int8 per token, the product in int32 by fbgemm's VNNI kernel (`quantized::linear_dynamic`
of PyTorch's x86 backend), what llama.cpp's Q8 activations do. That kernel quantizes its input with one
range for the whole tensor, which would make a token's output depend on the other tokens of the forward
(the verification batch). So each token's activations are first scaled to max |x| = 1 and two
constant rows (all +1, all -1) are appended: the range is then always exactly [-1, 1], every token is
quantized by itself, and the integer products make the outputs bit-identical whatever else is in the
forward (tested). The product is scaled back per token. The rest of a bf16 forward (attention over a
different number of new tokens) still rounds differently in a verification forward than in a one-token
one, and int8 activations turn more of those roundings into different greedy tokens, so in bf16 a w8a8
target's speculative output matches its plain decoding on fewer prompts than a bf16 target's does. In fp32
they match (tested). Without AVX-512 VNNI fbgemm's kernel saturates, so w8a8 is refused there
(`UnsupportedOnCpuError`). PyTorch marks its quantized tensor types as deprecated for a future release;
torch 2.13, pinned here, has them.

Quantized weights change the model's outputs: use them for a draft (speculation stays exact with respect
to the target as loaded), or knowingly for a target (then the output is exactly the quantized target's).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from specgrove.cpu import UnsupportedOnCpuError, cpu_features

QUANTIZATIONS = (None, "int8", "int4", "w8a8", "gguf")
INT4_GROUP_SIZE = 32
PAD_ROWS = 4  # oneDNN prepacked bf16: fewer rows are padded up to this many (see above)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking: fp32 on any x86 CPU, bf16 only where oneDNN can reorder bf16 weights
    (`CpuFeatures.bf16_prepack`; elsewhere bf16 weights stay plain tensors for F.linear)."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and (dtype != torch.bfloat16 or cpu_features().bf16_prepack)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_available(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return (
            hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 8
        )
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def w8a8_available(device: torch.device | str = "cpu") -> bool:
    """fbgemm's int8 kernel is present and sums its products exactly here (AVX-512 VNNI; see `check_w8a8`)."""
    return (
        torch.device(device).type == "cpu"
        and hasattr(torch.ops.quantized, "linear_dynamic")
        and any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))
        and cpu_features().int8_exact
    )


def check_w8a8(device: torch.device | str = "cpu") -> None:
    """Refuse w8a8 where fbgemm would compute it wrongly: without AVX-512 VNNI its u8 x s8 products are
    summed in saturating 16-bit pairs (a token with a large range came out 17% wrong, silently)."""
    if (
        torch.device(device).type != "cpu"
        or not hasattr(torch.ops.quantized, "linear_dynamic")
        or not any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))
    ):
        raise ValueError(
            "w8a8 needs PyTorch's x86/fbgemm quantized CPU backend (quantized::linear_dynamic); "
            "on CUDA or elsewhere use int4, int8 or none"
        )
    features = cpu_features()
    if not features.int8_exact:
        raise UnsupportedOnCpuError(
            f"w8a8 needs AVX-512 VNNI, which this CPU ({features.describe()}) lacks: fbgemm's int8 kernel would sum "
            "its products in saturating 16-bit pairs and give wrong outputs. Use the model's own GGUF weights "
            "(quantization='gguf'), or int8 / int4 weight-only, or none."
        )


def _w8a8_engine() -> None:
    """fbgemm-based engines run `linear_dynamic` with VNNI; qnnpack (the ARM default) packs differently."""
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def int8_row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-row symmetric int8 scales [N] (fp32): max |w_row| / 127."""
    return weight.float().abs().amax(dim=1).clamp_min(1e-12) / 127.0


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: (int8 weight [N, K], scales [N] in the weight's dtype)."""
    w = weight.float()
    scales = int8_row_scales(w)
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


Q4K_LAYOUTS = ("auto", "rows", "x8")


def q4k_layout() -> str:
    """How GGUFLinear keeps Q4_K matrices on the AVX2 path: `SPECGROVE_Q4K_LAYOUT`.
    - "auto" (default): both the file's rows, for forwards of one token, and `ggml.repack_q4k_x8` (eight rows
      interleaved), for forwards of two or more tokens (verification, prefill). A one-token step streams the rows
      faster; several tokens share the x8 layout's cheaper products. It costs a second copy of the Q4_K matrices
      in memory (about 0.76 GB for the default 1.5B target).
    - "rows": the file's rows only. "x8": the x8 layout only.
    All give the same bits; measurements in docs/benchmarks.md."""
    layout = os.environ.get("SPECGROVE_Q4K_LAYOUT", "auto")
    if layout not in Q4K_LAYOUTS:
        raise ValueError(f"SPECGROVE_Q4K_LAYOUT must be one of {Q4K_LAYOUTS}, got {layout!r}")
    return layout


class GGUFLinear:
    """y = x W^T + b where W is llama.cpp's quantized blocks (`quantization="gguf"`), multiplied as they are by
    `specgrove.kernels.ggml`: each token's activations quantized to int8 by itself, exact integer dot products,
    one fp32 accumulation order, so a token's output is bit-identical whatever else shares the forward.

    `parts` are the GGUF matrices stacked along the output (a fused q/k/v or gate/up); parts of one type are
    concatenated into one matrix, and the whole layer (bias and an optional residual included) is one kernel call
    that quantizes the activations once per block size. Output is fp32 cast to the input's dtype."""

    __slots__ = (
        "_types",
        "_types_many",
        "_weights",
        "_weights_many",
        "bias",
        "in_features",
        "isa",
        "linear",
        "nbytes",
        "numel",
        "out_features",
        "parts",
        "quantization",
        "resident_bytes",
    )

    def __init__(self, parts: list, bias: torch.Tensor | None):
        from specgrove.kernels import ggml

        if not parts or any(p.k != parts[0].k for p in parts):
            raise ValueError("a GGUF linear needs one or more matrices of the same input size")
        self.in_features = parts[0].k
        self.out_features = sum(p.n for p in parts)
        self.quantization = "gguf"
        self.bias = None if bias is None else bias.float()
        self.isa = ggml.best_isa()
        self.linear = ggml.load_extension().linear
        layout = q4k_layout()
        # The matrices (raw blocks) and their types for a forward of one token, and for one of several tokens.
        self._weights: list[torch.Tensor] = []
        self._types: list[int] = []
        self._weights_many: list[torch.Tensor] = []
        self._types_many: list[int] = []
        i = 0
        while i < len(parts):  # consecutive parts of one type become one matrix
            j = i
            while j + 1 < len(parts) and parts[j + 1].type == parts[i].type:
                j += 1
            run = parts[i : j + 1]
            if run[0].type not in ggml.MATMUL_TYPES:
                raise UnsupportedOnCpuError(
                    f"GGML type {ggml.TYPE_NAMES.get(run[0].type, run[0].type)} has no kernel here (supported: "
                    f"{', '.join(ggml.TYPE_NAMES[t] for t in ggml.MATMUL_TYPES)}); load the model with "
                    "quantization='none' (dequantized) instead"
                )
            data = (run[0].data if len(run) == 1 else torch.cat([p.data for p in run])).contiguous()
            rows, type_ = sum(p.n for p in run), run[0].type
            one, many = (data, type_), (data, type_)
            if type_ == ggml.Q4_K and self.isa >= ggml.ISA_AVX2 and rows % 8 == 0 and layout != "rows":
                # rows interleaved by 8 for the AVX2 kernel (ggml.Q4_K_X8): the same bits, fewer instructions
                many = (ggml.repack_q4k_x8(data, rows, self.in_features), ggml.Q4_K_X8)
                one = many if layout == "x8" else one
            for (d, t), weights, types in (
                (one, self._weights, self._types),
                (many, self._weights_many, self._types_many),
            ):
                weights.append(d)
                types.append(t)
            i = j + 1
        extra = 0 if bias is None else bias.numel() * 4
        # the matrices as they came (GGUFMatrix), where they are what the one-token forward reads (no copy kept)
        held = {id(d) for d in self._weights}
        self.parts = list(parts) if all(id(p.data) in held for p in parts) else None
        self.nbytes = sum(d.numel() for d in self._weights) + extra  # read by a one-token forward
        distinct = {id(d): d.numel() for d in self._weights + self._weights_many}
        self.resident_bytes = sum(distinct.values()) + extra  # held in memory (both layouts under "auto")
        self.numel = self.out_features * self.in_features + (0 if bias is None else bias.numel())

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` (shaped as the output) when given: `residual + (x W^T + b)` in one call."""
        x2 = x.reshape(-1, self.in_features)
        r2 = None if residual is None else residual.reshape(-1, self.out_features)
        weights, types = (self._weights, self._types) if x2.shape[0] == 1 else (self._weights_many, self._types_many)
        y = self.linear(x2, weights, types, self.bias, r2, self.isa)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Linear:
    """y = x W^T + b with W [out, in]: prepacked for oneDNN when `packed`, int8 / int4 / w8a8 by `quantization`."""

    __slots__ = (
        "bias",
        "bounds",
        "group_size",
        "in_features",
        "nbytes",
        "numel",
        "out_features",
        "packed",
        "pad_rows",
        "quantization",
        "scales",
        "weight",
    )

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, quantization: str | None = None):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
        if quantization == "gguf":
            raise ValueError("gguf weights are read from a GGUF file as they are stored: use GGUFLinear")
        self.out_features, self.in_features = weight.shape
        self.numel = weight.numel() + (bias.numel() if bias is not None else 0)
        self.bias = bias
        self.scales = None
        self.bounds = None
        self.quantization = quantization
        self.group_size = None
        self.packed = packed and quantization is None
        if self.packed and not packing_available(weight.device, weight.dtype):
            raise UnsupportedOnCpuError(
                f"oneDNN cannot prepack {weight.dtype} weights on this CPU ({cpu_features().describe()}): bf16 "
                "prepacking needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; load with pack_weights=None (chosen per CPU) "
                "or dtype float32"
            )
        self.pad_rows = PAD_ROWS if self.packed and weight.dtype == torch.bfloat16 else 0
        if quantization == "int8":
            if not int8_available():
                raise ValueError("int8 weights need torch.ops.aten._weight_int8pack_mm, which this torch build lacks")
            self.weight, self.scales = quantize_int8(weight)
        elif quantization == "int4":
            self._init_int4(weight)
        elif quantization == "w8a8":
            self._init_w8a8(weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        if quantization == "w8a8":  # the packed weight is opaque: int8 values + one fp32 scale per row
            self.nbytes = self.out_features * (self.in_features + 4)
        else:
            self.nbytes = self.weight.numel() * self.weight.element_size()
        if self.scales is not None:
            self.nbytes += self.scales.numel() * self.scales.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()

    def _init_int4(self, weight: torch.Tensor) -> None:
        device = weight.device
        if device.type == "cpu" and not cpu_features().has("avx512"):
            warnings.warn(
                f"int4 on this CPU ({cpu_features().describe()}): PyTorch's int4 CPU kernel has no fast path "
                "without AVX-512 (correct, but slower than fp32); the GGUF format (quantization='gguf') is "
                "the fast quantized path here",
                RuntimeWarning,
                stacklevel=4,
            )
        if not int4_available(device):
            raise ValueError(
                f"int4 weights need PyTorch's int4 kernel for {device.type} "
                "(_weight_int4pack_mm_for_cpu on CPU; _weight_int4pack_mm on a CUDA GPU of compute "
                "capability 8.0 or newer), which this machine or torch build lacks; use int8 or none"
            )
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

    def _init_w8a8(self, weight: torch.Tensor) -> None:
        check_w8a8(weight.device)
        _w8a8_engine()
        w = weight.float()
        scales = int8_row_scales(w)
        with warnings.catch_warnings():  # deprecated for a future torch; torch 2.13 (pinned) has it
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(
                w, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8
            )
        self.weight = torch.ops.quantized.linear_prepack(qweight, None)
        # The two constant rows that pin the kernel's input range to [-1, 1] (see the module docstring).
        self.bounds = torch.cat([torch.ones(1, self.in_features), -torch.ones(1, self.in_features)])

    def _w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        xf = x2.float()
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        y = torch.ops.quantized.linear_dynamic(torch.cat([xf / scale, self.bounds]), self.weight, False)
        return (y[:rows] * scale).to(x2.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization is not None:
            x2 = x.reshape(-1, self.in_features)
            if self.quantization == "w8a8":
                y = self._w8a8(x2)
            elif self.quantization == "int8":
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
