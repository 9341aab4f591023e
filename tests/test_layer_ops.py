"""The layer's fused small operations (specgrove.kernels.layer_ops): close to torch's ops, RoPE bit-identical to
the model's torch formula, scalar == AVX2 bit for bit, and a row's result independent of the other rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specgrove.kernels import layer_ops as ops

ops.load_extension()  # the default CPU path: a machine that cannot build it fails here, it is not skipped

HAS_AVX2 = ops.best_isa() >= ops.ISA_AVX2  # honours SPECGROVE_MAX_ISA
ISAS = [ops.ISA_SCALAR, pytest.param(ops.ISA_AVX2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 here"))]
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 here (or SPECGROVE_MAX_ISA caps it)")


def _rows(m, k, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * scale


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors of finite values."""
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


# --- RMSNorm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("k", [1536, 896, 13])  # 13: a tail past the 8-lane body
def test_rms_norm_is_torchs_up_to_rounding(isa, k):
    x, w = _rows(6, k, 0, scale=3.0), _rows(1, k, 1)[0]
    y = ops.rms_norm(x, w, 1e-6, isa)
    ref = F.rms_norm(x.double(), (k,), w.double(), eps=1e-6)
    assert float(((y.double() - ref).abs() / (ref.abs() + 1e-28)).max()) < 3e-6
    # a wrong eps or a missing weight is far outside that bound
    assert float((ops.rms_norm(x, torch.ones(k), 1e-6, isa) - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
def test_rms_norm_row_does_not_depend_on_the_batch(isa):
    x, w = _rows(9, 1536, 2), _rows(1, 1536, 3)[0]
    whole = ops.rms_norm(x.view(3, 3, 1536), w, 1e-6, isa)
    for i in range(9):
        assert torch.equal(ops.rms_norm(x[i : i + 1], w, 1e-6, isa)[0], whole.view(9, -1)[i])


@needs_avx2
@pytest.mark.parametrize("k", [1536, 13, 7])
def test_rms_norm_scalar_equals_avx2_bitwise(k):
    x, w = _rows(5, k, 4, scale=50.0), _rows(1, k, 5)[0]
    assert torch.equal(ops.rms_norm(x, w, 1e-6, ops.ISA_SCALAR), ops.rms_norm(x, w, 1e-6, ops.ISA_AVX2))


# --- SiLU(gate) * up ----------------------------------------------------------------------------


def _gate_up(m, i, seed):
    gu = _rows(m, 2 * i, seed, scale=4.0)
    # the extremes of the exp: saturation, underflow, zeros of both signs
    gu[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0])
    gu[0, 8:16] = torch.tensor([1e-30, -1e-30, 1e30, -1e30, 87.0, -87.0, 0.5, -0.5])
    return gu


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("i", [8960, 27])
def test_silu_mul_is_torchs_up_to_rounding(isa, i):
    gu = _gate_up(4, i, 6)
    y = ops.silu_mul(gu, isa)
    ref = F.silu(gu[:, :i].double()) * gu[:, i:].double()
    # relative, with a floor: below exp's normal range (g < -87.3) silu(g) ~ g e^g < 1e-34 comes out as 0
    err = (y.double() - ref).abs() / (ref.abs() + 1e-28)
    assert float(err.max()) < 1e-6, f"relative error {float(err.max()):.3g}"
    assert y.shape == (4, i)
    # gate and up swapped is caught by the same bound
    swapped = ops.silu_mul(torch.cat([gu[:, i:], gu[:, :i]], dim=1), isa)
    assert float(((swapped.double() - ref).abs() / (ref.abs() + 1e-28)).max()) > 1e-2


@needs_avx2
def test_silu_mul_scalar_equals_avx2_bitwise():
    gu = _gate_up(3, 8960 + 5, 7)
    a, b = ops.silu_mul(gu, ops.ISA_SCALAR), ops.silu_mul(gu, ops.ISA_AVX2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
def test_silu_mul_row_does_not_depend_on_the_batch(isa):
    gu = _gate_up(6, 4864, 8)
    whole = ops.silu_mul(gu, isa)
    for r in range(6):
        assert torch.equal(ops.silu_mul(gu[r : r + 1], isa)[0], whole[r])


def test_silu_mul_nan_stays_in_its_element():
    gu = _gate_up(2, 16, 9)
    gu[0, 3] = float("nan")
    y = ops.silu_mul(gu, ops.best_isa())
    assert torch.isnan(y[0, 3]) and int(torch.isnan(y).sum()) == 1


def test_silu_mul_refuses_odd_width_and_other_dtypes():
    with pytest.raises(ValueError, match="even"):
        ops.silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="float32"):
        ops.silu_mul(torch.zeros(2, 8, dtype=torch.bfloat16))


# --- RoPE and the KV store ----------------------------------------------------------------------


def _rope_case(B=2, T=3, Hq=4, Hkv=2, D=16, R=3, S=10, seed=10):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g)
    angles = torch.rand(B, T, D // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([-angles.sin(), angles.sin()], -1)
    k_layer, v_layer = torch.randn(R, Hkv, S, D, generator=g), torch.randn(R, Hkv, S, D, generator=g)
    rows = torch.tensor([2, 0])[:B]
    slots = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    return qkv, cos, sin, k_layer, v_layer, rows, slots, Hq, Hkv, D


def _torch_rope(x, cos, sin):
    """The model's torch formula (LlamaModel._apply_rope): x * cos + swap_halves(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def test_rope_store_is_the_torch_formula_bitwise_and_writes_only_its_slots():
    qkv, cos, sin, k_layer, v_layer, rows, slots, Hq, Hkv, D = _rope_case()
    k0, v0 = k_layer.clone(), v_layer.clone()
    q = ops.rope_store(qkv, cos, sin, k_layer, v_layer, rows, slots, Hq, Hkv)
    B, T = qkv.shape[:2]
    heads = qkv.view(B, T, Hq + 2 * Hkv, D)
    rotated = _torch_rope(heads[:, :, : Hq + Hkv], cos[:, :, None], sin[:, :, None])
    assert torch.equal(q, rotated[:, :, :Hq])
    expect_k, expect_v = k0.clone(), v0.clone()
    for b in range(B):
        for t in range(T):
            expect_k[rows[b], :, slots[b, t]] = rotated[b, t, Hq:]
            expect_v[rows[b], :, slots[b, t]] = heads[b, t, Hq + Hkv :]
    assert torch.equal(k_layer, expect_k) and torch.equal(v_layer, expect_v)
    # the unrotated keys (a wrong store) differ from what the same check expects
    assert not torch.equal(heads[:, :, Hq : Hq + Hkv], rotated[:, :, Hq:])


def test_rope_store_writes_into_a_strided_cache_view():
    """The model passes one layer of a [L, R, Hkv, S, D] cache: a view whose storage holds the other layers."""
    qkv, cos, sin, _, _, rows, slots, Hq, Hkv, D = _rope_case()
    cache = torch.zeros(3, 3, Hkv, 10, D)
    ops.rope_store(qkv, cos, sin, cache[1], cache[2], rows, slots, Hq, Hkv)
    assert cache[0].abs().sum() == 0
    assert cache[1, rows[0], :, slots[0, 0]].abs().sum() > 0 and cache[2, rows[1], :, slots[1, 2]].abs().sum() > 0


def test_rope_store_refuses_out_of_range_slots_and_bad_shapes():
    qkv, cos, sin, k_layer, v_layer, rows, slots, Hq, Hkv, _ = _rope_case()
    with pytest.raises(ValueError, match="slot"):
        ops.rope_store(qkv, cos, sin, k_layer, v_layer, rows, slots + 10, Hq, Hkv)
    with pytest.raises(ValueError, match="row"):
        ops.rope_store(qkv, cos, sin, k_layer, v_layer, rows + 5, slots, Hq, Hkv)
    with pytest.raises(ValueError, match="Hq"):
        ops.rope_store(qkv, cos, sin, k_layer, v_layer, rows, slots, Hq + 1, Hkv)
    with pytest.raises(ValueError, match="cos and sin"):
        ops.rope_store(qkv, cos[:, :, :4], sin, k_layer, v_layer, rows, slots, Hq, Hkv)
