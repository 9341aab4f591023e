"""A transformer layer's small operations on CPU, each one C++ call (`csrc/layer_ops.cpp`): RMSNorm, SiLU(gate)
* up, and RoPE with the keys' and values' store into the KV cache. They replace several torch ops each (whose
dispatch costs as much as their arithmetic in a decode step) in the batch-invariant forward, and like the
other kernels give a row's result independently of the other rows of the call, with the same bits in the
scalar and AVX2 paths. The exact arithmetic is in the C++ file's header comment.
"""

from __future__ import annotations

from types import ModuleType

import torch

from specgrove.kernels.build import (  # noqa: F401
    ISA_AVX2,
    ISA_NAMES,
    ISA_SCALAR,
    LAYER_OPS,
    best_isa,
    check_isa,
)


def load_extension() -> ModuleType:
    """The compiled extension (built on first use; RuntimeError naming a missing compiler or ninja)."""
    return LAYER_OPS.load()


def _float32(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    return t.detach()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: int | None = None) -> torch.Tensor:
    """(x * rsqrt(mean(x^2, -1) + eps)) * weight over the last dimension of float32 x [..., K]; weight [K]."""
    return load_extension().rms_norm(_float32("x", x), _float32("weight", weight), float(eps), check_isa(isa))


def silu_mul(gate_up: torch.Tensor, isa: int | None = None) -> torch.Tensor:
    """silu(gate) * up of float32 gate_up [..., 2I] (gate in the first half): [..., I]."""
    return load_extension().silu_mul(_float32("gate_up", gate_up), check_isa(isa))


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_layer: torch.Tensor,
    v_layer: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate the query and key heads of qkv [B, T, (Hq + 2 Hkv) * D] (x * cos + swap_halves(x) * sin, cos and
    the sign-folded sin [B, T, D]); write token (b, t)'s keys and values into k_layer / v_layer [R, Hkv, S_max, D]
    at row rows[b], slot slots[b, t]; return the rotated queries [B, T, Hq, D]."""
    return load_extension().rope_store(
        _float32("qkv", qkv),
        _float32("cos", cos),
        _float32("sin", sin),
        k_layer,
        v_layer,
        rows,
        slots,
        int(num_heads),
        int(num_kv_heads),
    )
