"""Batch-invariant attention over a KV cache for small forwards on CPU (decode, tree / chain verification).

`invariant_attention(q, k_layer, v_layer, row_index, mask, scale)` gives, for each query, a result that
depends only on the query and the ordered list of keys/values it sees (mask true, in increasing slot
order): not on the slots they sit in, the span, the tree layout or the other queries in the call. A token
verified inside a token tree therefore gets the same bits as the same token decoded alone after its path
was committed contiguously, which torch's SDPA (blocked GEMMs whose reduction order depends on the
shapes) does not promise. The exact arithmetic is defined in `csrc/attention.cpp`; its scalar and AVX2
paths give bit-identical results.

The C++ code (`csrc/attention.cpp`) is built on first use, see `specgrove.kernels.build`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from specgrove.kernels.build import ATTENTION, ISA_AVX2, ISA_NAMES, ISA_SCALAR, best_isa, check_isa  # noqa: F401


def load_extension() -> ModuleType:
    """The compiled extension (built on first use; RuntimeError naming a missing compiler or ninja)."""
    return ATTENTION.load()


def build() -> Path:
    """Build (or find already built) the extension; returns its directory."""
    ATTENTION.load()
    return ATTENTION.build_directory()


# --- operation ----------------------------------------------------------------------------------


def invariant_attention(
    q: torch.Tensor,
    k_layer: torch.Tensor,
    v_layer: torch.Tensor,
    row_index: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    isa: int | None = None,
) -> torch.Tensor:
    """Attention of q [B, T, Hq, D] over one layer of a KV cache, k_layer / v_layer [R, Hkv, S_max, D]
    (float32; views with any strides but unit stride in D are read in place). Batch row b reads cache row
    row_index[b]; query (b, t) sees key slot s < span where mask [B, T, span] (bool) is true. Query head h
    uses kv head h // (Hq / Hkv). Returns float32 [B, T, Hq, D]; a query that sees no key gets zeros.

    `isa` picks the path (ISA_SCALAR, ISA_AVX2; default `best_isa()`); both give the same bits."""
    level = check_isa(isa)
    if q.dim() != 4 or k_layer.dim() != 4 or mask.dim() != 3:
        raise ValueError(
            f"expected q [B, T, Hq, D], k/v [R, Hkv, S_max, D], mask [B, T, span]; got q "
            f"{tuple(q.shape)}, k {tuple(k_layer.shape)}, mask {tuple(mask.shape)}"
        )
    for name, t in (("q", q), ("k_layer", k_layer), ("v_layer", v_layer)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    k = k_layer if k_layer.stride(-1) == 1 else k_layer.contiguous()
    v = v_layer if v_layer.stride(-1) == 1 else v_layer.contiguous()
    return load_extension().attention(
        q.detach().contiguous(),
        k.detach(),
        v.detach(),
        row_index.to(torch.int64).contiguous(),
        mask.to(torch.bool).contiguous(),
        float(scale),
        level,
    )
