"""The GGUF block kernels (specgrove.kernels.ggml): layouts against gguf-py's numpy reference, exact integer
dot products against a float64 reference, scalar == AVX2 bit for bit, and batch invariance."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from specgrove.kernels import ggml

ggml.load_extension()  # the default CPU path: a machine that cannot build it fails here, it is not skipped

TYPES = [ggml.Q8_0, ggml.Q5_0, ggml.Q4_K, ggml.Q6_K]
NAMES = [ggml.TYPE_NAMES[t] for t in TYPES]
HAS_AVX2 = ggml.cpu_isa_level() >= ggml.ISA_AVX2  # honours SPECGROVE_MAX_ISA
ISAS = [ggml.ISA_SCALAR, pytest.param(ggml.ISA_AVX2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 here"))]
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 here (or SPECGROVE_MAX_ISA caps it)")


def _fp16_bytes(rng, shape, lo, hi):
    """Random fp16 values in [lo, hi) as bytes: block scales that are finite and normal."""
    return rng.uniform(lo, hi, size=shape).astype(np.float16).view(np.uint8).reshape(*shape[:-1], -1)


def random_blocks(type_, n, k, seed=0, fill=None):
    """n rows of random ggml blocks (random bytes, or every byte `fill`) with sane fp16 scales."""
    rng = np.random.default_rng(seed)
    nb, size = k // ggml.BLOCK_SIZE[type_], ggml.TYPE_SIZE[type_]
    shape = (n, nb, size)
    b = rng.integers(0, 256, size=shape, dtype=np.uint8) if fill is None else np.full(shape, fill, np.uint8)
    if type_ == ggml.Q4_K:
        b[..., 0:4] = _fp16_bytes(rng, (n, nb, 2), 1e-4, 1e-2)  # d, dmin
    elif type_ == ggml.Q6_K:
        b[..., 208:210] = _fp16_bytes(rng, (n, nb, 1), 1e-4, 1e-2)
    else:
        b[..., 0:2] = _fp16_bytes(rng, (n, nb, 1), -1e-2, 1e-2)
    return b.reshape(n, nb * size)


def gguf_dequantize(w, type_):
    return quants.dequantize(w, GGMLQuantizationType(type_))


def dequantized_activations(x, type_):
    """The int8 activations the kernel uses, as float64 values q * d."""
    block = ggml.ACT_BLOCK[type_]
    q, d, _ = ggml.quantize_activations(x, block)
    return (q.double().reshape(x.shape[0], -1, block) * d.double()[..., None]).reshape(x.shape)


def assert_exact_up_to_rounding(y, x_deq, w_deq, rtol=1e-5):
    """y against the float64 product of the dequantized activations and weights. The bound is relative to
    the sum of |terms| (the kernel's float32 rounding scales with it), so one wrong product in a row fails."""
    ref = x_deq @ torch.from_numpy(w_deq).double().T
    scale = x_deq.abs() @ torch.from_numpy(np.abs(w_deq)).double().T
    err = (y.double() - ref).abs()
    worst = float((err / (scale + 1e-30)).max())
    assert worst <= rtol, f"error {worst:.3g} x sum|terms| (allowed {rtol})"


# --- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
def test_dequantize_matches_gguf_bitwise(type_):
    w = random_blocks(type_, 7, 512, seed=type_)
    np.testing.assert_array_equal(ggml.ggml_dequantize(w, type_, 7, 512).numpy(), gguf_dequantize(w, type_))


@pytest.mark.parametrize("type_", [ggml.Q8_0, ggml.Q5_0], ids=["Q8_0", "Q5_0"])
def test_dequantize_of_gguf_quantized_floats(type_):
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    w = quants.quantize(x, GGMLQuantizationType(type_))
    np.testing.assert_array_equal(ggml.ggml_dequantize(w, type_, 5, 256).numpy(), gguf_dequantize(w, type_))


def test_dequantize_f32_f16():
    x = np.random.default_rng(2).standard_normal((3, 40)).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 6e-8, 65504.0]  # zero, a half subnormal, the largest half
    for type_, raw in ((ggml.F32, x), (ggml.F16, x.astype(np.float16))):
        got = ggml.ggml_dequantize(raw.view(np.uint8), type_, 3, 40).numpy()
        np.testing.assert_array_equal(got, raw.astype(np.float32))


def q6_k_reference(w, offset=32):
    """Q6_K decoded from llama.cpp's layout as written in block_q6_K's description; `offset` is the -32."""
    b = w.reshape(-1, 210)
    ql, qh, sc = b[:, :128].astype(np.int32), b[:, 128:192].astype(np.int32), b[:, 192:208].view(np.int8)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    y = np.zeros((b.shape[0], 256), np.float32)
    for h in range(2):
        lo, hi, hh = ql[:, 64 * h : 64 * h + 32], ql[:, 64 * h + 32 : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
        parts = [
            (lo & 15) | ((hh & 3) << 4),
            (hi & 15) | (((hh >> 2) & 3) << 4),
            (lo >> 4) | (((hh >> 4) & 3) << 4),
            (hi >> 4) | (((hh >> 6) & 3) << 4),
        ]
        for g, q in enumerate(parts):
            for half16 in range(2):
                scale = d * sc[:, 8 * h + 2 * g + half16].astype(np.float32)
                cols = slice(128 * h + 32 * g + 16 * half16, 128 * h + 32 * g + 16 * half16 + 16)
                y[:, cols] = scale[:, None] * (q[:, 16 * half16 : 16 * half16 + 16] - offset).astype(np.float32)
    return y.reshape(w.shape[0], -1)


def test_checks_can_fail_on_a_wrong_layout():
    """The Q6_K layout read as documented matches gguf-py; read without its -32 offset it does not, and the
    kernel check above rejects the matmul that the wrong weights would give."""
    w = random_blocks(ggml.Q6_K, 4, 512, seed=3)
    np.testing.assert_allclose(q6_k_reference(w), gguf_dequantize(w, ggml.Q6_K), rtol=1e-6, atol=0)
    wrong = q6_k_reference(w, offset=0)
    assert np.abs(wrong - gguf_dequantize(w, ggml.Q6_K)).max() > 1e-2
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    y = ggml.ggml_matmul(x, w, ggml.Q6_K, 4, 512, ggml.ISA_SCALAR)
    x_deq = dequantized_activations(x, ggml.Q6_K)
    assert_exact_up_to_rounding(y, x_deq, gguf_dequantize(w, ggml.Q6_K))
    with pytest.raises(AssertionError):
        assert_exact_up_to_rounding(y, x_deq, wrong)


# --- activations --------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("block", [32, 256])
def test_quantize_activations_formula(block, isa):
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 2, 512)
    x[1, :block] = 0.0  # an all-zero block: d = 0, q = 0
    x[2, :32] = torch.arange(32) - 15.5  # with amax = 127 (so x * 127/amax = x), ties go to even (as np.rint)
    x[2, 0] = 127.0
    q, d, bsums = ggml.quantize_activations(x, block, isa)
    xb = x.numpy().reshape(3, -1, block)
    amax = np.abs(xb).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_ref = np.where(amax[..., None] > 0, np.rint(xb * (np.float32(127) / amax)[..., None]), 0).clip(-127, 127)
    np.testing.assert_array_equal(q.numpy(), q_ref.reshape(3, -1).astype(np.int8))
    np.testing.assert_array_equal(d.numpy(), amax / np.float32(127))
    np.testing.assert_array_equal(bsums.numpy(), q_ref.reshape(3, -1, 16).sum(-1).astype(np.int16))
    assert d[1, 0] == 0 and not q[1, :block].any()


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
def test_quantize_activations_edge_blocks(isa):
    """A block of subnormals (127/amax overflows: q = +-127 where x != 0), and NaN / inf (d = NaN)."""
    x = torch.zeros(3, 64)
    x[0, :32:2] = 1e-39
    x[0, 1] = -3e-40
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    q, d, _ = ggml.quantize_activations(x, 32, isa)
    expected = torch.zeros(32, dtype=torch.int8)
    expected[::2], expected[1] = 127, -127
    assert torch.equal(q[0, :32], expected) and d[0, 0] == torch.tensor(1e-39) / 127
    assert torch.isnan(d[1, 0]) and torch.isnan(d[2, 1]) and d[1, 1] == 0 and d[2, 0] == 0
    assert not q[1:].any()


# --- matmul -------------------------------------------------------------------------------------


def _x(m, k, seed=0):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
def test_matmul_exact_against_float64_reference(type_, isa):
    n, k = 40, 768
    w = random_blocks(type_, n, k, seed=10 + type_)
    x = _x(6, k, seed=1)
    y = ggml.ggml_matmul(x, w, type_, n, k, isa)
    assert y.dtype == torch.float32 and y.shape == (6, n)
    w_deq = gguf_dequantize(w, type_)
    assert_exact_up_to_rounding(y, dequantized_activations(x, type_), w_deq)
    # and near the plain float product (what int8 activations cost)
    full = x @ torch.from_numpy(w_deq).T
    assert float((y - full).norm() / full.norm()) < 3e-2


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
@pytest.mark.parametrize("fill", [0x00, 0x80, 0xFF])
def test_matmul_extreme_blocks_do_not_saturate(type_, isa, fill):
    """Every weight byte at 0x00 / 0x80 / 0xFF (Q8_0's -128, Q6_K's scale -128 and q = +31, Q4_K's 63 scales
    and 15s, Q5_0's 31s) against activations at +-127: the 16-bit pair sums' worst cases."""
    n, k = 8, 512
    w = random_blocks(type_, n, k, seed=5, fill=fill)
    x = torch.ones(4, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x[3] = torch.linspace(-1, 1, k)
    y = ggml.ggml_matmul(x, w, type_, n, k, isa)
    assert_exact_up_to_rounding(y, dequantized_activations(x, type_), gguf_dequantize(w, type_))


@needs_avx2
@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
@pytest.mark.parametrize("k_blocks", [1, 3, 7])  # 32-blocks: groups of 4 / 2 blocks with a tail
def test_scalar_equals_avx2_bitwise(type_, k_blocks):
    k = k_blocks * ggml.BLOCK_SIZE[type_]
    n = 33
    w = random_blocks(type_, n, k, seed=20 + k_blocks)
    x = _x(9, k, seed=k_blocks) * torch.logspace(-2, 2, k)
    x[4] = 0.0
    for m in range(1, 10):
        y0 = ggml.ggml_matmul(x[:m], w, type_, n, k, ggml.ISA_SCALAR)
        y1 = ggml.ggml_matmul(x[:m], w, type_, n, k, ggml.ISA_AVX2)
        assert torch.equal(y0, y1), f"M={m}: max diff {float((y0 - y1).abs().max())}"


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
def test_batch_invariance(type_, isa):
    n, k = 24, 512
    w = random_blocks(type_, n, k, seed=30)
    x = _x(9, k, seed=2)
    alone = torch.cat([ggml.ggml_matmul(x[i : i + 1], w, type_, n, k, isa) for i in range(9)])
    for m in range(1, 10):
        assert torch.equal(ggml.ggml_matmul(x[:m], w, type_, n, k, isa), alone[:m]), f"M={m}"
    # a token's output also ignores which tokens come before it
    assert torch.equal(ggml.ggml_matmul(x.flip(0), w, type_, n, k, isa), alone.flip(0))


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("type_", TYPES, ids=NAMES)
def test_batch_invariance_over_tiles_and_row_chunks(type_, isa):
    """19 tokens (tiles of 8 + 8 + 3) over 300 rows (the AVX2 path then walks the rows in chunks)."""
    n, k = 300, 512
    w = random_blocks(type_, n, k, seed=31)
    x = _x(19, k, seed=3)
    together = ggml.ggml_matmul(x, w, type_, n, k, isa)
    for i in (0, 7, 8, 16, 18):
        assert torch.equal(together[i], ggml.ggml_matmul(x[i : i + 1], w, type_, n, k, isa)[0]), f"token {i}"


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
@pytest.mark.parametrize("type_", [ggml.Q4_K, ggml.Q6_K, ggml.Q4_K_X8], ids=["Q4_K", "Q6_K", "Q4_K_x8"])
def test_any_thread_count_gives_every_row_once_and_the_same_bits(type_, isa):
    """Rows are split over the threads in claimed blocks (each thread its own range, then the others' from the
    back): with 1 to 5 threads, over 2,000 rows (many claims per thread, a range that is not whole blocks), one
    token and five, every output equals the one-thread scalar result bit for bit (a row lost or done twice
    leaves garbage or a wrong sum)."""
    if type_ == ggml.Q4_K_X8 and isa != ggml.ISA_AVX2:
        pytest.skip("Q4_K x8 runs on the AVX2 path only")
    n, k, ext = 2008, 256, ggml.load_extension()
    plain = ggml.Q4_K if type_ == ggml.Q4_K_X8 else type_
    w = torch.from_numpy(random_blocks(plain, n, k, seed=60))
    weight = ggml.repack_q4k_x8(w, n, k) if type_ == ggml.Q4_K_X8 else w
    x, bias = _x(5, k, seed=5), torch.randn(n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = {m: ext.linear(x[:m], [w], [plain], bias, None, ggml.ISA_SCALAR) for m in (1, 5)}
        for t in (1, 2, 3, 4, 5):
            torch.set_num_threads(t)
            for m in (1, 5):
                assert torch.equal(ext.linear(x[:m], [weight], [type_], bias, None, isa), ref[m]), f"{t} threads, M={m}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
def test_nan_stays_in_its_token(isa):
    w = random_blocks(ggml.Q4_K, 8, 256, seed=6)
    x = _x(3, 256)
    x[1, 7] = float("nan")
    y = ggml.ggml_matmul(x, w, ggml.Q4_K, 8, 256, isa)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


def test_any_float_dtype_and_leading_dims():
    n, k = 16, 256
    w = torch.from_numpy(random_blocks(ggml.Q8_0, n, k, seed=7)).reshape(-1)  # flat bytes are fine too
    x = _x(6, k).to(torch.bfloat16).reshape(2, 3, k)
    y = ggml.ggml_matmul(x, w, ggml.Q8_0, n, k)
    assert y.shape == (2, 3, n) and y.dtype == torch.float32
    assert ggml.ggml_matmul(torch.zeros(0, k), w, ggml.Q8_0, n, k).shape == (0, n)
    assert torch.equal(y.reshape(6, n), ggml.ggml_matmul(x.float().reshape(6, k), w, ggml.Q8_0, n, k))


@pytest.mark.parametrize("type_, k", [(ggml.Q4_K, 384), (ggml.Q6_K, 128), (ggml.Q8_0, 48), (ggml.Q5_0, 0)])
def test_k_not_whole_blocks_is_refused(type_, k):
    with pytest.raises(ValueError, match="multiple of"):
        ggml.ggml_matmul(torch.zeros(1, k), np.zeros(64, np.uint8), type_, 1, k)


def test_bad_arguments_are_refused():
    w = random_blocks(ggml.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="bytes"):
        ggml.ggml_matmul(torch.zeros(1, 64), w[:3], ggml.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="inputs per token"):
        ggml.ggml_matmul(torch.zeros(1, 32), w, ggml.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="supports"):
        ggml.ggml_matmul(torch.zeros(1, 64), w, ggml.F16, 4, 64)


# --- CPU level ----------------------------------------------------------------------------------


def test_isa_cap_from_environment(monkeypatch):
    monkeypatch.delenv("SPECGROVE_MAX_ISA", raising=False)
    best = ggml.cpu_isa_level()
    assert best in (ggml.ISA_SCALAR, ggml.ISA_AVX2)
    assert ggml.cpu_isa_level(max_level=ggml.ISA_SCALAR) == ggml.ISA_SCALAR
    monkeypatch.setenv("SPECGROVE_MAX_ISA", "scalar")
    assert ggml.cpu_isa_level() == ggml.ISA_SCALAR
    with pytest.raises(ValueError, match="not available"):  # the capped path is not taken even when asked for
        ggml.ggml_matmul(torch.zeros(1, 32), random_blocks(ggml.Q8_0, 1, 32), ggml.Q8_0, 1, 32, ggml.ISA_AVX2)
    monkeypatch.setenv("SPECGROVE_MAX_ISA", "avx512")
    assert ggml.cpu_isa_level() == best
    monkeypatch.setenv("SPECGROVE_MAX_ISA", "sse9")
    with pytest.raises(ValueError, match="SPECGROVE_MAX_ISA"):
        ggml.cpu_isa_level()


def test_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(ggml.GGML, "_module", None)  # as in a fresh process, with nothing built yet
    monkeypatch.setenv("SPECGROVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler"):
        ggml.load_extension()


# --- the fused linear layer (GGUFLinear's one call) --------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, ids=["scalar", "avx2"])
def test_linear_is_the_matmuls_plus_bias_plus_residual_bitwise(isa):
    """One call over matrices of several types (a Q4_K_M q/k/v: Q4_K and Q6_K rows; with a 32-block type too) with
    a bias and a residual gives, bit for bit, the separate matmuls concatenated, then + bias, then residual + it."""
    k, ext = 512, ggml.load_extension()
    parts = [(ggml.Q4_K, 24), (ggml.Q6_K, 8), (ggml.Q8_0, 5), (ggml.Q4_K, 3)]
    weights = [torch.from_numpy(random_blocks(t, n, k, seed=i)) for i, (t, n) in enumerate(parts)]
    types = [t for t, _ in parts]
    x = _x(5, k, seed=3)
    n = sum(p[1] for p in parts)
    bias, residual = torch.randn(n), torch.randn(5, n)
    separate = torch.cat([ggml.ggml_matmul(x, w, t, w.shape[0], k, isa) for w, t in zip(weights, types)], dim=1)
    assert torch.equal(ext.linear(x, weights, types, None, None, isa), separate)
    assert torch.equal(ext.linear(x, weights, types, bias, None, isa), separate + bias)
    assert torch.equal(ext.linear(x, weights, types, bias, residual, isa), residual + (separate + bias))
    assert torch.equal(ext.linear(x, weights, types, None, residual, isa), residual + separate)
    # and a wrong combination is caught by the same comparison
    assert not torch.equal(ext.linear(x, weights, types, bias, residual, isa), separate + bias)


def test_linear_refuses_bad_shapes():
    k, ext = 256, ggml.load_extension()
    w = torch.from_numpy(random_blocks(ggml.Q4_K, 4, k))
    x = _x(2, k)
    with pytest.raises(ValueError, match="bias must be"):
        ext.linear(x, [w], [ggml.Q4_K], torch.zeros(5), None, 0)
    with pytest.raises(ValueError, match="residual must be"):
        ext.linear(x, [w], [ggml.Q4_K], None, torch.zeros(3, 4), 0)
    with pytest.raises(ValueError, match="one type per weight"):
        ext.linear(x, [w], [ggml.Q4_K, ggml.Q6_K], None, None, 0)
    with pytest.raises(ValueError, match="not a positive multiple"):
        ext.linear(_x(2, 200), [w], [ggml.Q4_K], None, None, 0)


# --- Q4_K x8: eight rows interleaved for the AVX2 path ----------------------------------------------


@needs_avx2
@pytest.mark.parametrize("k_blocks", [1, 3, 6])
def test_q4k_x8_equals_the_scalar_q4k_bitwise(k_blocks):
    """The repacked rows on the AVX2 path give the plain Q4_K rows' scalar results bit for bit, for 1 to 9 tokens
    (groups of 4 tokens and a remainder), with extreme activations, and with a bias and a residual."""
    k, n, ext = 256 * k_blocks, 48, ggml.load_extension()
    w = torch.from_numpy(random_blocks(ggml.Q4_K, n, k, seed=40 + k_blocks))
    wx = ggml.repack_q4k_x8(w, n, k)
    assert wx.shape == (n // 8, k_blocks * ggml.X8_RECORD_BYTES)
    x = _x(9, k, seed=k_blocks) * torch.logspace(-2, 2, k)
    x[4] = 0.0
    bias, residual = torch.randn(n), torch.randn(9, n)
    for m in range(1, 10):
        plain = ext.linear(x[:m], [w], [ggml.Q4_K], bias, residual[:m], ggml.ISA_SCALAR)
        assert torch.equal(ext.linear(x[:m], [wx], [ggml.Q4_K_X8], bias, residual[:m], ggml.ISA_AVX2), plain), f"M={m}"


@needs_avx2
def test_q4k_x8_many_tokens_and_chunks_equal_the_scalar_q4k_bitwise():
    """More than 8 tokens (groups of 8 and a remainder) over a matrix larger than one L2 chunk of records per thread
    (256 groups of 8 rows with K=512: chunks of 110), as in a prompt's prefill: the scalar results bit for bit."""
    n, k, ext = 2048, 512, ggml.load_extension()
    w = torch.from_numpy(random_blocks(ggml.Q4_K, n, k, seed=47))
    x = _x(19, k, seed=9)
    plain = ext.linear(x, [w], [ggml.Q4_K], None, None, ggml.ISA_SCALAR)
    assert torch.equal(ext.linear(x, [ggml.repack_q4k_x8(w, n, k)], [ggml.Q4_K_X8], None, None, ggml.ISA_AVX2), plain)


@needs_avx2
@pytest.mark.parametrize("fill", [0x00, 0x80, 0xFF])
def test_q4k_x8_extreme_blocks_do_not_overflow(fill):
    """Every 4-bit value 15 and every scale 63 against activations of +-127: the int16 sums of 8 maddubs per
    sub-block at their largest (8 * 3810)."""
    n, k, ext = 16, 512, ggml.load_extension()
    w = random_blocks(ggml.Q4_K, n, k, seed=5, fill=fill)
    x = torch.ones(4, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    x[3] = torch.linspace(-1, 1, k)
    y = ext.linear(x, [ggml.repack_q4k_x8(w, n, k)], [ggml.Q4_K_X8], None, None, ggml.ISA_AVX2)
    assert_exact_up_to_rounding(y, dequantized_activations(x, ggml.Q4_K), gguf_dequantize(w, ggml.Q4_K))


@needs_avx2
def test_q4k_x8_batch_invariance_and_mixed_matrices():
    n, k, ext = 64, 512, ggml.load_extension()
    w = torch.from_numpy(random_blocks(ggml.Q4_K, n, k, seed=50))
    w6 = torch.from_numpy(random_blocks(ggml.Q6_K, 8, k, seed=51))
    weights, types = [ggml.repack_q4k_x8(w, n, k), w6], [ggml.Q4_K_X8, ggml.Q6_K]
    x = _x(11, k, seed=4)
    together = ext.linear(x, weights, types, None, None, ggml.ISA_AVX2)
    for i in range(11):
        assert torch.equal(together[i], ext.linear(x[i : i + 1], weights, types, None, None, ggml.ISA_AVX2)[0])
    # and a wrongly repacked matrix (the rows of two groups swapped) is caught by the same kind of comparison
    swapped = torch.cat([w[8:16], w[:8], w[16:]])
    assert not torch.equal(
        ext.linear(x, [ggml.repack_q4k_x8(swapped, n, k)], [ggml.Q4_K_X8], None, None, ggml.ISA_AVX2), together[:, :n]
    )


def test_q4k_x8_is_refused_where_it_cannot_run():
    ext = ggml.load_extension()
    w = torch.from_numpy(random_blocks(ggml.Q4_K, 8, 256))
    with pytest.raises(ValueError, match="multiple of 8"):
        ggml.repack_q4k_x8(torch.from_numpy(random_blocks(ggml.Q4_K, 12, 256)), 12, 256)
    with pytest.raises(RuntimeError, match="AVX2 path only"):
        ext.linear(_x(1, 256), [ggml.repack_q4k_x8(w, 8, 256)], [ggml.Q4_K_X8], None, None, ggml.ISA_SCALAR)
    with pytest.raises(ValueError, match="x8 matrix must be"):
        ext.linear(_x(1, 256), [w], [ggml.Q4_K_X8], None, None, ggml.ISA_SCALAR)


def test_gguf_linear_q4k_layouts_agree_bitwise(monkeypatch):
    """GGUFLinear's Q4_K layouts on the AVX2 path (SPECGROVE_Q4K_LAYOUT): "auto" (default) multiplies one token
    by the file's rows and several by Q4_K x8, "rows" and "x8" use one layout for all. Every layout gives the same
    outputs bit for bit, for one token and for several; an unknown layout is refused."""
    from specgrove.models.gguf_weights import GGUFMatrix
    from specgrove.models.linear import GGUFLinear

    n, k = 32, 512
    parts = [
        GGUFMatrix(torch.from_numpy(random_blocks(ggml.Q4_K, n, k, seed=60)), ggml.Q4_K, n, k),
        GGUFMatrix(torch.from_numpy(random_blocks(ggml.Q6_K, 8, k, seed=61)), ggml.Q6_K, 8, k),
    ]
    x, bias = _x(3, k, seed=6), torch.randn(n + 8)
    x8_type = ggml.Q4_K_X8 if HAS_AVX2 else ggml.Q4_K
    layers = {}
    for layout, one, many in (("rows", ggml.Q4_K, ggml.Q4_K), ("x8", x8_type, x8_type), ("auto", ggml.Q4_K, x8_type)):
        monkeypatch.setenv("SPECGROVE_Q4K_LAYOUT", layout)
        layer = layers[layout] = GGUFLinear(parts, bias)
        assert (layer._types[0], layer._types_many[0]) == (one, many) and layer._types[1] == ggml.Q6_K
        assert layer.nbytes <= layer.resident_bytes
    monkeypatch.delenv("SPECGROVE_Q4K_LAYOUT")
    assert GGUFLinear(parts, bias)._types_many[0] == x8_type  # "auto" is the default
    rows_bytes = layers["rows"].resident_bytes
    assert layers["auto"].nbytes == rows_bytes  # a one-token forward reads the rows
    assert layers["auto"].resident_bytes > rows_bytes if HAS_AVX2 else layers["auto"].resident_bytes == rows_bytes
    for tokens in (x[:1], x):
        assert torch.equal(layers["x8"](tokens), layers["rows"](tokens))
        assert torch.equal(layers["auto"](tokens), layers["rows"](tokens))
    monkeypatch.setenv("SPECGROVE_Q4K_LAYOUT", "x16")
    with pytest.raises(ValueError, match="SPECGROVE_Q4K_LAYOUT"):
        GGUFLinear(parts, bias)
