"""The batch-invariant attention kernel (specgrove.kernels.attention): close to torch's SDPA, bit-identical
between its scalar and AVX2 paths, and a query's bits depend only on the keys it sees, in order — not on
the other queries of the call, the tree layout, the slots or the threads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from specgrove.cpu import cpu_features
from specgrove.kernels import attention as attn

attn.load_extension()  # the default CPU path: a machine that cannot build it fails here, it is not skipped

ISAS = [attn.ISA_SCALAR] + ([attn.ISA_AVX2] if attn.best_isa() == attn.ISA_AVX2 else [])


@pytest.fixture(scope="module", autouse=True)
def _built():
    attn.build()


def random_case(gen: torch.Generator, B: int, T: int, Hkv: int, G: int, D: int, span: int, extra_rows: int = 1):
    """A cache of B + extra_rows rows and span + 5 slots; batch row b reads a random cache row, has
    `committed` keys and its T new tokens in slots committed .. committed + T - 1. Query t sees a random
    prefix of the committed keys, a random subset of the later slots and always itself."""
    R, S_max = B + extra_rows, span + 5
    q = torch.randn(B, T, Hkv * G, D, generator=gen)
    k = torch.randn(R, Hkv, S_max, D, generator=gen)
    v = torch.randn(R, Hkv, S_max, D, generator=gen)
    rows = torch.randperm(R, generator=gen)[:B]
    mask = torch.zeros(B, T, span, dtype=torch.bool)
    for b in range(B):
        committed = int(torch.randint(0, span - T + 1, (1,), generator=gen))
        for t in range(T):
            prefix = int(torch.randint(0, committed + 1, (1,), generator=gen))
            mask[b, t, :prefix] = True
            mask[b, t, committed:] = torch.rand(span - committed, generator=gen) < 0.5
            mask[b, t, committed + t] = True
    return q, k, v, rows, mask


def sdpa_reference(q, k, v, rows, mask, scale):
    G = q.shape[2] // k.shape[1]
    span = mask.shape[-1]
    keys = k[rows, :, :span].repeat_interleave(G, dim=1)
    values = v[rows, :, :span].repeat_interleave(G, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


SIZES = [
    (1, 1, 1, 1, 64, 17),
    (2, 5, 2, 3, 128, 300),
    (3, 9, 1, 6, 64, 120),
    (1, 8, 2, 6, 128, 257),
    (2, 3, 2, 1, 128, 40),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("size", SIZES)
def test_close_to_sdpa(size, isa):
    B, T, Hkv, G, D, span = size
    gen = torch.Generator().manual_seed(hash(size) % 2**31)
    q, k, v, rows, mask = random_case(gen, B, T, Hkv, G, D, span)
    scale = 1 / math.sqrt(D)
    out = attn.invariant_attention(q, k, v, rows, mask, scale, isa=isa)
    torch.testing.assert_close(out, sdpa_reference(q, k, v, rows, mask, scale), rtol=1e-5, atol=1e-5)


def test_random_sizes_close_to_sdpa():
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        B, T, Hkv = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((1, 3), (1, 9), (1, 2)))
        G = (1, 3, 6)[int(torch.randint(0, 3, (1,), generator=gen))]
        D = (64, 128)[int(torch.randint(0, 2, (1,), generator=gen))]
        span = int(torch.randint(T, 301, (1,), generator=gen))
        q, k, v, rows, mask = random_case(gen, B, T, Hkv, G, D, span)
        out = attn.invariant_attention(q, k, v, rows, mask, D**-0.5)
        torch.testing.assert_close(out, sdpa_reference(q, k, v, rows, mask, D**-0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(attn.ISA_AVX2 not in ISAS, reason="this CPU lacks AVX2/FMA")
@pytest.mark.parametrize("size", [*SIZES, (2, 4, 1, 8, 24, 50), (1, 3, 3, 5, 40, 90), (1, 2, 1, 7, 8, 9)])
@pytest.mark.parametrize("scale", [0.125, 4.0])
def test_scalar_equals_avx2(size, scale):
    """Odd head groups (blocks of 4 + 4, 3 + 2 ...), head sizes that leave a tail of 8, and a large scale
    whose probabilities underflow to 0 and to subnormals."""
    B, T, Hkv, G, D, span = size
    gen = torch.Generator().manual_seed(7 + hash(size) % 2**31)
    q, k, v, rows, mask = random_case(gen, B, T, Hkv, G, D, span)
    a = attn.invariant_attention(q, k, v, rows, mask, scale, isa=attn.ISA_SCALAR)
    b = attn.invariant_attention(q, k, v, rows, mask, scale, isa=attn.ISA_AVX2)
    assert torch.equal(a, b)


def test_exp_accuracy_and_paths_agree():
    lo = torch.linspace(-104.0, 0.0, 200_003)
    x = torch.cat([lo, torch.tensor([0.0, -0.0, -1e-30, -87.3, -87.34, -88.0, -1e30, -math.inf, math.nan])])
    ext = attn.load_extension()
    ys = [ext.exp_approx(x, isa) for isa in ISAS]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    y = ys[0]
    exact = torch.exp(x.double())
    normal = (x >= -87.33) & (exact >= torch.finfo(torch.float32).tiny)
    rel = ((y.double() - exact).abs() / exact)[normal]
    assert rel.max() < 2 * 2**-24  # about an ulp
    assert (y[x < -87.4] == 0).all() and y[-1] == 0 and y[-2] == 0  # -inf, nan -> 0
    assert (y[: len(lo)] >= 0).all() and y[len(lo)] == 1.0


@pytest.mark.parametrize("isa", ISAS)
def test_batch_invariance(isa):
    """Each query computed alone (B=1, T=1, its own span, one thread or several) equals its row of the full call."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, rows, mask = random_case(gen, 3, 7, 2, 6, 128, 200)
    full = attn.invariant_attention(q, k, v, rows, mask, 0.09, isa=isa)
    threads = torch.get_num_threads()
    try:
        for b in range(3):
            for t in range(7):
                torch.set_num_threads(1 + (b + t) % 3)  # also changes how heads are split into tasks
                last = int(mask[b, t].nonzero().max()) + 1
                span = last + (b + t) % 4  # trailing invisible slots change nothing
                one = attn.invariant_attention(
                    q[b : b + 1, t : t + 1], k, v, rows[b : b + 1], mask[b : b + 1, t : t + 1, :span], 0.09, isa=isa
                )
                assert torch.equal(one[0, 0], full[b, t]), (b, t)
    finally:
        torch.set_num_threads(threads)


def tree_and_chain(L: int, D: int = 64, Hkv: int = 2, G: int = 3):
    """A tree of 8 new tokens after L committed keys, in cache row 1 (of 2), and the same query's path
    committed as a chain in a separate cache: keys [0..L) + tree slots {L+2, L+5, L+6} at [0..L+3).
    Returns (tree call args, chain call args, index of the query in the tree call)."""
    gen = torch.Generator().manual_seed(L)
    T, S_max = 8, L + 8 + 4
    k = torch.randn(2, Hkv, S_max, D, generator=gen)
    v = torch.randn(2, Hkv, S_max, D, generator=gen)
    q = torch.randn(1, T, Hkv * G, D, generator=gen)
    # Tree token i sits in slot L + i, below the last committed token (-1) or its parent. Token 6's path
    # is 2, 5, 6: it sees [0..L) + {L+2, L+5, L+6}.
    parent = [-1, 0, -1, 1, 2, 2, 5, 3]
    mask = torch.zeros(1, T, L + T, dtype=torch.bool)
    for i in range(T):
        mask[0, i, :L] = True
        node = i
        while node >= 0:
            mask[0, i, L + node] = True
            node = parent[node]
    path = [L + 2, L + 5, L + 6]
    ck = torch.randn(1, Hkv, L + 9, D, generator=gen)  # a fresh cache, other data past the chain
    cv = torch.randn(1, Hkv, L + 9, D, generator=gen)
    ck[0, :, :L], cv[0, :, :L] = k[1, :, :L], v[1, :, :L]
    ck[0, :, L : L + 3], cv[0, :, L : L + 3] = k[1, :, path], v[1, :, path]
    chain_mask = torch.zeros(1, 1, L + 6, dtype=torch.bool)  # trailing slots it does not see
    chain_mask[0, 0, : L + 3] = True
    tree = (q, k, v, torch.tensor([1]), mask)
    chain = (q[:, 6:7], ck, cv, torch.tensor([0]), chain_mask)
    return tree, chain, 6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L", [1, 13, 100, 333])
def test_tree_equals_chain(L, isa):
    """The property the engine needs: a token verified in a tree gives the bits of the same token decoded
    after its path was committed contiguously."""
    tree, chain, i = tree_and_chain(L)
    in_tree = attn.invariant_attention(*tree, 0.125, isa=isa)[0, i]
    alone = attn.invariant_attention(*chain, 0.125, isa=isa)[0, 0]
    assert torch.equal(in_tree, alone)


def test_strided_cache_view():
    """A layer view of a [layers, rows, kv heads, slots, D] cache, and a cache stored slot-major
    ([rows, slots, kv heads, D] permuted), give the bits of a contiguous copy."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, rows, mask = random_case(gen, 2, 4, 2, 3, 64, 60)
    ref = attn.invariant_attention(q, k, v, rows, mask, 0.1)
    big_k = torch.randn(3, *k.shape)
    big_v = torch.randn(3, *v.shape)
    big_k[1], big_v[1] = k, v
    assert torch.equal(attn.invariant_attention(q, big_k[1], big_v[1], rows, mask, 0.1), ref)
    sk = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    sv = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert sk.stride(-1) == 1 and not sk.is_contiguous()
    assert torch.equal(attn.invariant_attention(q, sk, sv, rows, mask, 0.1), ref)


def test_bitwise_checks_have_teeth():
    """torch's SDPA, the obvious implementation, fails the batch-invariance and tree-vs-chain checks on
    this machine (its reduction order depends on the shapes). Should some build of torch pass them, a
    perturbed visible key must still change the kernel's output, so the comparisons are not vacuous."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, rows, mask = random_case(gen, 1, 6, 2, 3, 64, 300)
    full = sdpa_reference(q, k, v, rows, mask, 0.125)
    alone = [sdpa_reference(q[:, t : t + 1], k, v, rows, mask[:, t : t + 1], 0.125)[0, 0] for t in range(6)]
    tree, chain, i = tree_and_chain(100)
    sdpa_varies = any(not torch.equal(a, full[0, t]) for t, a in enumerate(alone)) or not torch.equal(
        sdpa_reference(*tree, 0.125)[0, i], sdpa_reference(*chain, 0.125)[0, 0]
    )
    if sdpa_varies:
        return
    q, k, v, rows, mask = tree
    base = attn.invariant_attention(q, k, v, rows, mask, 0.125)
    k2 = k.clone()
    k2[1, 0, 100 + 5, 0] += 1e-3  # a key the query sees
    assert not torch.equal(attn.invariant_attention(q, k2, v, rows, mask, 0.125)[0, i], base[0, i])


def test_invisible_slots_are_never_read_into_the_result():
    """NaN in a slot the query does not see (an unwritten or rejected tree slot) changes nothing."""
    tree, _, i = tree_and_chain(40)
    q, k, v, rows, mask = tree
    base = attn.invariant_attention(q, k, v, rows, mask, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 40 + 7] = math.nan  # tree token 7 is not on token 6's path
    v2[1, :, 40 + 4] = math.nan
    for isa in ISAS:
        assert torch.equal(attn.invariant_attention(q, k2, v2, rows, mask, 0.125, isa=isa)[0, i], base[0, i])


def test_no_visible_key_gives_zeros():
    gen = torch.Generator().manual_seed(2)
    q, k, v, rows, mask = random_case(gen, 1, 3, 1, 2, 64, 20)
    mask[0, 1] = False
    for isa in ISAS:
        out = attn.invariant_attention(q, k, v, rows, mask, 0.125, isa=isa)
        assert (out[0, 1] == 0).all() and out[0, 0].abs().sum() > 0


def test_isa_choice(monkeypatch):
    monkeypatch.setenv("SPECGROVE_MAX_ISA", "scalar")
    assert attn.best_isa() == attn.ISA_SCALAR
    monkeypatch.setenv("SPECGROVE_MAX_ISA", "avx2")
    assert attn.best_isa() == (attn.ISA_AVX2 if cpu_features().has("avx2") else attn.ISA_SCALAR)
    with pytest.raises(ValueError, match="isa"):
        attn.invariant_attention(
            torch.zeros(1, 1, 1, 8),
            torch.zeros(1, 1, 1, 8),
            torch.zeros(1, 1, 1, 8),
            torch.zeros(1, dtype=torch.int64),
            torch.ones(1, 1, 1, dtype=torch.bool),
            1.0,
            isa=5,
        )


def test_bad_arguments():
    q = torch.zeros(1, 1, 4, 64)
    k = torch.zeros(2, 2, 10, 64)
    rows = torch.tensor([0])
    mask = torch.ones(1, 1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside"):
        attn.invariant_attention(q, k, k, torch.tensor([2]), mask, 1.0)
    with pytest.raises(ValueError, match="spans"):
        attn.invariant_attention(q, k, k, rows, torch.ones(1, 1, 11, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="multiple"):
        attn.invariant_attention(torch.zeros(1, 1, 3, 64), k, k, rows, mask, 1.0)
    with pytest.raises(ValueError, match="float32"):
        attn.invariant_attention(q.double(), k, k, rows, mask, 1.0)
    with pytest.raises(ValueError, match="head size"):
        attn.invariant_attention(
            torch.zeros(1, 1, 4, 12), torch.zeros(2, 2, 10, 12), torch.zeros(2, 2, 10, 12), rows, mask, 1.0
        )
