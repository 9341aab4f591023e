"""Linear layers computed directly on llama.cpp's GGUF quantized weight blocks (CPU).

`ggml_matmul(x, weight, type, n, k)` returns `x @ W^T` for a weight stored as ggml blocks (Q8_0, Q5_0,
Q4_K, Q6_K; one row of `k` inputs is `k / block_size` blocks). Each token's activations are quantized to
int8 by themselves, per block (32 values for Q8_0/Q5_0, 256 for the K-quants, as ggml's Q8_0 and Q8_K
activation formats); every block's integer dot product is exact, and the float operations per block are
fixed, so:
- the scalar and AVX2 paths give bit-identical results;
- a token's output does not depend on the other tokens in the call (batch invariance).

The C++ code (`csrc/ggml_matmul.cpp`) is built on first use, see `specgrove.kernels.build`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import torch

from specgrove.kernels.build import GGML, ISA_AVX2, ISA_NAMES, ISA_SCALAR, best_isa, check_isa  # noqa: F401

_T = gguf.GGMLQuantizationType
F32, F16 = int(_T.F32), int(_T.F16)
Q5_0, Q8_0, Q4_K, Q6_K = int(_T.Q5_0), int(_T.Q8_0), int(_T.Q4_K), int(_T.Q6_K)
# Types ggml_matmul computes; ggml_dequantize also takes F32 and F16.
MATMUL_TYPES = (Q8_0, Q5_0, Q4_K, Q6_K)
DEQUANT_TYPES = (F32, F16, *MATMUL_TYPES)
TYPE_NAMES = {t: _T(t).name for t in DEQUANT_TYPES}
# (values per block, bytes per block), from gguf-py.
BLOCK_SIZE = {t: gguf.constants.GGML_QUANT_SIZES[_T(t)][0] for t in DEQUANT_TYPES}
TYPE_SIZE = {t: gguf.constants.GGML_QUANT_SIZES[_T(t)][1] for t in DEQUANT_TYPES}
# Block of the activations' int8 quantization for each weight type.
ACT_BLOCK = {Q8_0: 32, Q5_0: 32, Q4_K: 256, Q6_K: 256}
# Not a ggml type: Q4_K rows interleaved by 8 (`repack_q4k_x8`), which the AVX2 path of the extension's
# `linear` multiplies with one register holding 4 values of 8 rows: the Q4_K sums and float operations, so
# the same bits, with fewer instructions (no horizontal sums; one scale multiply per 8 rows' sub-block).
Q4_K_X8 = 1012
X8_RECORD_BYTES = 1184  # one block of 8 rows


def repack_q4k_x8(weight: torch.Tensor | np.ndarray, n: int, k: int) -> torch.Tensor:
    """`n` Q4_K rows (n a multiple of 8) as the Q4_K x8 layout: uint8 [n / 8, k / 256 * X8_RECORD_BYTES]."""
    if n % 8:
        raise ValueError(f"Q4_K x8 needs a multiple of 8 rows, got {n}")
    return load_extension().repack_q4k_x8(_weight_tensor(weight, Q4_K, n, k).contiguous(), k)


def _type_name(type_: int) -> str:
    return TYPE_NAMES.get(type_, str(type_))


def row_bytes(type_: int, k: int) -> int:
    """Bytes of one weight row of `k` inputs in ggml type `type_`; ValueError if `k` is not whole blocks."""
    if type_ not in DEQUANT_TYPES:
        raise ValueError(
            f"ggml type {_type_name(type_)} is not supported; use one of "
            f"{', '.join(TYPE_NAMES[t] for t in DEQUANT_TYPES)}"
        )
    block = BLOCK_SIZE[type_]
    if k <= 0 or k % block:
        raise ValueError(f"K={k} is not a positive multiple of {_type_name(type_)}'s block size {block}")
    return k // block * TYPE_SIZE[type_]


# --- build and CPU level (specgrove.kernels.build) -------------------------------------------------


def load_extension() -> ModuleType:
    """The compiled extension (built on first use; RuntimeError naming a missing compiler or ninja)."""
    return GGML.load()


def build() -> Path:
    """Build (or find already built) the extension; returns its directory."""
    GGML.load()
    return GGML.build_directory()


def cpu_isa_level(max_level: int | None = None) -> int:
    """The best kernel path here (`specgrove.kernels.build.best_isa`: the CPU's flags after the ISA caps in the
    environment, read on every call), capped by `max_level`."""
    return best_isa(max_level)


# --- operations ---------------------------------------------------------------------------------


def _weight_tensor(weight: torch.Tensor | np.ndarray, type_: int, n: int, k: int) -> torch.Tensor:
    """`weight` as a CPU uint8 [n, row_bytes] tensor (any shape with that many bytes)."""
    nbytes = row_bytes(type_, k)
    w = torch.from_numpy(np.ascontiguousarray(weight)) if isinstance(weight, np.ndarray) else weight
    if w.dtype != torch.uint8:
        raise ValueError(f"weight must hold raw ggml bytes (uint8), got {w.dtype}")
    if w.shape != (n, nbytes):
        if w.numel() != n * nbytes:
            raise ValueError(
                f"weight has {w.numel()} bytes; {n} rows of {_type_name(type_)} with K={k} need {n * nbytes}"
            )
        w = w.reshape(n, nbytes)
    return w


def ggml_dequantize(weight: torch.Tensor | np.ndarray, type_: int, n: int, k: int) -> torch.Tensor:
    """The float32 [n, k] values of `n` rows of ggml type `type_` (F32, F16, Q8_0, Q5_0, Q4_K, Q6_K)."""
    return load_extension().dequantize(_weight_tensor(weight, type_, n, k), type_, k)


def quantize_activations(
    x: torch.Tensor, block: int, isa: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] quantized by itself per `block` (32 or 256) values, as the matmul does:
    d = amax/127, q = nearbyint(x * 127/amax) in [-127, 127] (d = 0, q = 0 for an all-zero block).
    Returns (int8 q [M, K], float32 d [M, K/block], int16 bsums [M, K/16]: sums of 16 consecutive q).
    Every `isa` gives the same result."""
    if block not in (32, 256):
        raise ValueError(f"activation block must be 32 or 256, got {block}")
    if x.dim() != 2 or x.shape[1] % block:
        raise ValueError(f"x must be [M, K] with K a multiple of {block}, got {tuple(x.shape)}")
    return load_extension().quantize_activations(x.detach(), block, check_isa(isa))


def ggml_matmul(
    x: torch.Tensor, weight: torch.Tensor | np.ndarray, type_: int, n: int, k: int, isa: int | None = None
) -> torch.Tensor:
    """x [..., k] (any float dtype) times the transpose of `n` ggml rows of `type_`: float32 [..., n].

    `isa` picks the path (ISA_SCALAR, ISA_AVX2; default `cpu_isa_level()`); all paths give the same bits.
    ValueError for an unsupported type, a `k` that is not whole blocks (256 for Q4_K / Q6_K) or wrong shapes."""
    if type_ not in ACT_BLOCK:
        raise ValueError(
            f"ggml_matmul supports {', '.join(TYPE_NAMES[t] for t in MATMUL_TYPES)}, not {_type_name(type_)}"
        )
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} inputs per token, the weight has K={k}")
    w = _weight_tensor(weight, type_, n, k)
    ext = load_extension()
    if x.dim() == 2:
        return ext.matmul(x.detach(), w, type_, n, k, check_isa(isa))  # the extension converts to contiguous fp32
    return ext.matmul(x.detach().reshape(-1, k), w, type_, n, k, check_isa(isa)).reshape(*x.shape[:-1], n)
