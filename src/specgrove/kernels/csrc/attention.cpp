// Batch-invariant attention for small forwards on CPU: decode of one token, verification of a token
// tree or chain of up to a few dozen tokens.
//
// For each query (b, t, h) the visible keys are the slots s with mask[b, t, s], taken in increasing
// slot order and renumbered j = 0..n-1. The result depends only on q and that ordered list of
// (k_j, v_j): not on the slot numbers, the span, the other queries or how the work is split. So a
// token of a tree gives the same bits as the same token decoded alone after its path was committed
// contiguously. Exactly:
//   s_j = hsum8(lanes) * scale   lane l = fma-chain of q[d] * k_j[d] over d = l (mod 8), increasing d;
//                                hsum8 = ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))
//   m   = max_j s_j
//   p_j = exp_approx(s_j - m)    Cephes-style, same operations in the scalar and the 8-wide version
//   l   = hsum8 of 8 lanes, lane l summing p_j for j = l (mod 8) in increasing j
//   out[d] = fma-chain over increasing j of p_j * v_j[d], times (1 / l)
// n == 0 gives zeros. The scalar and AVX2 paths perform these operations in this order and agree
// bitwise; compile with -ffp-contract=off so that GCC fuses no other multiply-add (it does so for
// vector intrinsics as well as scalar code).
//
// The file is compiled for baseline x86-64; the AVX2 functions carry a GCC target attribute and are
// chosen at run time by the `isa` argument.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SG_X86 1
#define SG_AVX2 __attribute__((target("avx2,fma")))
// Loops over a template-sized array of vectors must be unrolled early, or GCC keeps the array in
// memory and stores every accumulator to the stack after each step.
#define SG_UNROLL _Pragma("GCC unroll 16")
#else
#define SG_X86 0
#endif

namespace {

#include "vec_math.h"

enum : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1 };

// Query heads per block of the AVX2 kernel: 6 heads x 2 keys (or 2 vectors of D) = 12 accumulators,
// which with the loaded operands still fit the 16 ymm registers.
constexpr int MAX_BLOCK = 6;

// --- one task's data -----------------------------------------------------------------------------
// A task is a query (b, t), a kv head and a range of its query heads. `kp` / `vp` are the visible
// keys' and values' rows in rank order; `s` holds HB rows of scores (then probabilities) of n8 floats,
// n8 = n rounded up to 8, padded with -inf so that the padding's probability is exactly 0.
struct Task {
  const float* const* qh;  // the query heads' rows [D]
  float* const* oh;        // their output rows [D]
  int hb;                  // number of heads
  const float* const* kp;
  const float* const* vp;
  int64_t n, n8, D;
  float scale;
  float* s;    // [hb, n8]
  float* inv;  // [hb] 1 / l
};

// m = max_j s_j: a plain loop, the same in both paths (max is exact, the order does not matter).
inline float row_max(const float* s, int64_t n) {
  float m = s[0];
  for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

void attend_scalar(const Task& w) {
  const int64_t D = w.D;
  for (int64_t j = 0; j < w.n; ++j) {
    const float* k = w.kp[j];
    for (int h = 0; h < w.hb; ++h) {
      const float* q = w.qh[h];
      float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t c = 0; c < D; c += 8)
        for (int l = 0; l < 8; ++l) lane[l] = std::fma(q[c + l], k[c + l], lane[l]);
      w.s[h * w.n8 + j] = hsum_lanes(lane) * w.scale;
    }
  }
  for (int h = 0; h < w.hb; ++h) {
    float* s = w.s + h * w.n8;
    const float m = row_max(s, w.n);
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < w.n8; ++j) {
      s[j] = exp_scalar(s[j] - m);
      lane[j % 8] = lane[j % 8] + s[j];
    }
    w.inv[h] = 1.0f / hsum_lanes(lane);
  }
  // Accumulate straight into the output rows (j outer: each row of V is read once, in order).
  for (int h = 0; h < w.hb; ++h) std::fill(w.oh[h], w.oh[h] + D, 0.0f);
  for (int64_t j = 0; j < w.n; ++j) {
    const float* v = w.vp[j];
    for (int h = 0; h < w.hb; ++h) {
      const float p = w.s[h * w.n8 + j];
      float* o = w.oh[h];
      for (int64_t d = 0; d < D; ++d) o[d] = std::fma(p, v[d], o[d]);
    }
  }
  for (int h = 0; h < w.hb; ++h)
    for (int64_t d = 0; d < D; ++d) w.oh[h][d] = w.oh[h][d] * w.inv[h];
}

#if SG_X86
// Scores of HB heads, two keys at a time: each loaded key chunk serves every head (GQA reuse), and
// the 2 * HB independent fma chains hide the fma latency.
template <int HB>
SG_AVX2 void scores_avx2(const Task& w) {
  // Locals rather than w's fields: the stores through s cannot then alias them.
  const int64_t D = w.D, n = w.n, n8 = w.n8;
  const float* const* kp = w.kp;
  const float* q[HB];
  SG_UNROLL
  for (int h = 0; h < HB; ++h) q[h] = w.qh[h];
  const float scale = w.scale;
  float* s = w.s;
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const float* k0 = kp[j];
    const float* k1 = kp[j + 1];
    __m256 a0[HB], a1[HB];
    SG_UNROLL
    for (int h = 0; h < HB; ++h) a0[h] = a1[h] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 x0 = _mm256_loadu_ps(k0 + c), x1 = _mm256_loadu_ps(k1 + c);
      SG_UNROLL
      for (int h = 0; h < HB; ++h) {
        const __m256 qv = _mm256_loadu_ps(q[h] + c);
        a0[h] = _mm256_fmadd_ps(qv, x0, a0[h]);
        a1[h] = _mm256_fmadd_ps(qv, x1, a1[h]);
      }
    }
    SG_UNROLL
    for (int h = 0; h < HB; ++h) {
      s[h * n8 + j] = hsum8(a0[h]) * scale;
      s[h * n8 + j + 1] = hsum8(a1[h]) * scale;
    }
  }
  for (; j < n; ++j) {
    const float* k0 = kp[j];
    __m256 a0[HB];
    SG_UNROLL
    for (int h = 0; h < HB; ++h) a0[h] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 x0 = _mm256_loadu_ps(k0 + c);
      SG_UNROLL
      for (int h = 0; h < HB; ++h) a0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + c), x0, a0[h]);
    }
    SG_UNROLL
    for (int h = 0; h < HB; ++h) s[h * n8 + j] = hsum8(a0[h]) * scale;
  }
}

SG_AVX2 void softmax_avx2(const Task& w) {
  for (int h = 0; h < w.hb; ++h) {
    float* s = w.s + h * w.n8;
    const __m256 m = _mm256_set1_ps(row_max(s, w.n));
    __m256 lanes = _mm256_setzero_ps();
    for (int64_t j = 0; j < w.n8; j += 8) {
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
      _mm256_storeu_ps(s + j, p);
      lanes = _mm256_add_ps(lanes, p);
    }
    w.inv[h] = 1.0f / hsum8(lanes);
  }
}

// out[:, c : c + 8W] of HB heads: the accumulators stay in registers over all j, and each loaded
// value chunk serves every head.
template <int HB, int W>
SG_AVX2 void values_avx2(const Task& w, int64_t c) {
  const int64_t n = w.n, n8 = w.n8;
  const float* const* vp = w.vp;
  const float* s = w.s;
  __m256 acc[HB * W];
  SG_UNROLL
  for (int i = 0; i < HB * W; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* v = vp[j] + c;
    __m256 x[W];
    SG_UNROLL
    for (int i = 0; i < W; ++i) x[i] = _mm256_loadu_ps(v + 8 * i);
    SG_UNROLL
    for (int h = 0; h < HB; ++h) {
      const __m256 p = _mm256_broadcast_ss(s + h * n8 + j);
      SG_UNROLL
      for (int i = 0; i < W; ++i) acc[h * W + i] = _mm256_fmadd_ps(p, x[i], acc[h * W + i]);
    }
  }
  SG_UNROLL
  for (int h = 0; h < HB; ++h)
    SG_UNROLL
    for (int i = 0; i < W; ++i)
      _mm256_storeu_ps(w.oh[h] + c + 8 * i, _mm256_mul_ps(acc[h * W + i], _mm256_set1_ps(w.inv[h])));
}

template <int HB>
SG_AVX2 void attend_avx2_block(const Task& w) {
  scores_avx2<HB>(w);
  softmax_avx2(w);
  int64_t c = 0;
  for (; c + 16 <= w.D; c += 16) values_avx2<HB, 2>(w, c);
  if (c < w.D) values_avx2<HB, 1>(w, c);  // D is a multiple of 8
}

// exp8 over an array, for the tests.
SG_AVX2 void exp_avx2_array(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    float in[8] = {0, 0, 0, 0, 0, 0, 0, 0}, out[8];
    std::memcpy(in, x + i, (n - i) * 4);
    _mm256_storeu_ps(out, exp8(_mm256_loadu_ps(in)));
    std::memcpy(y + i, out, (n - i) * 4);
  }
}

void attend_avx2(const Task& w) {
  switch (w.hb) {
    case 1: attend_avx2_block<1>(w); break;
    case 2: attend_avx2_block<2>(w); break;
    case 3: attend_avx2_block<3>(w); break;
    case 4: attend_avx2_block<4>(w); break;
    case 5: attend_avx2_block<5>(w); break;
    case 6: attend_avx2_block<6>(w); break;
    default: TORCH_CHECK(false, "internal: head block of ", w.hb);
  }
}
#endif

// The softmax's exp (meant for x <= 0) on every element of x, by the path `isa`: for the tests.
torch::Tensor exp_approx(torch::Tensor x, int64_t isa) {
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x must be a CPU float32 tensor");
  TORCH_CHECK_VALUE(isa == ISA_SCALAR || isa == ISA_AVX2, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK_VALUE(isa != ISA_AVX2 || cpu_has_avx2(), "isa=1 (avx2) asked for, but this CPU lacks AVX2/FMA");
  x = x.contiguous();
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if SG_X86
  if (isa == ISA_AVX2) {
    exp_avx2_array(xp, yp, x.numel());
    return y;
  }
#endif
  for (int64_t i = 0; i < x.numel(); ++i) yp[i] = exp_scalar(xp[i]);
  return y;
}

// q [B, T, Hq, D] contiguous; k_cache, v_cache [R, Hkv, S_max, D] with unit stride in D; row_index
// int64 [B]; mask bool [B, T, span] contiguous. -> out [B, T, Hq, D].
torch::Tensor attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor row_index,
                        torch::Tensor mask, double scale, int64_t isa) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && q.device().is_cpu() && q.is_contiguous(),
                    "q must be a contiguous CPU float32 tensor [B, T, Hq, D]");
  for (const auto* t : {&k_cache, &v_cache})
    TORCH_CHECK_VALUE(t->dim() == 4 && t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->stride(3) == 1,
                      "k_cache and v_cache must be CPU float32 tensors [R, Hkv, S_max, D] with unit stride in D");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
                    " differ in shape");
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t R = k_cache.size(0), Hkv = k_cache.size(1), S_max = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "q has head size ", D, ", the cache ", k_cache.size(3));
  TORCH_CHECK_VALUE(D > 0 && D % 8 == 0, "head size must be a positive multiple of 8, got ", D);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "query heads ", Hq, " are not a multiple of kv heads ", Hkv);
  TORCH_CHECK_VALUE(row_index.dim() == 1 && row_index.size(0) == B && row_index.scalar_type() == torch::kInt64 &&
                        row_index.is_contiguous() && row_index.device().is_cpu(),
                    "row_index must be a contiguous CPU int64 tensor [B=", B, "]");
  TORCH_CHECK_VALUE(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == T && mask.scalar_type() == torch::kBool &&
                        mask.is_contiguous() && mask.device().is_cpu(),
                    "mask must be a contiguous CPU bool tensor [B=", B, ", T=", T, ", span]");
  const int64_t span = mask.size(2);
  TORCH_CHECK_VALUE(span <= S_max, "mask spans ", span, " slots, the cache holds ", S_max);
  TORCH_CHECK_VALUE(isa == ISA_SCALAR || isa == ISA_AVX2, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK_VALUE(isa != ISA_AVX2 || cpu_has_avx2(), "isa=1 (avx2) asked for, but this CPU lacks AVX2/FMA");
  const int64_t* rows = row_index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(rows[b] >= 0 && rows[b] < R, "row_index[", b, "]=", rows[b], " is outside the cache's ", R,
                      " rows");

  auto out = torch::empty({B, T, Hq, D}, torch::kFloat32);
  const int64_t G = Hq / Hkv;
  // Tasks: (b, kv head, t, part of its query heads). Splitting the heads changes nothing in any
  // head's arithmetic; it only gives idle threads work when there are few (b, t, kv head).
  const int64_t base = B * T * Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t parts = base >= threads ? 1 : std::min<int64_t>(G, (threads + base - 1) / base);
  const int64_t tasks = base * parts;
  if (tasks == 0) return out;

  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  const float fscale = float(scale);

  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const float*> kp, vp, qh;
    std::vector<float*> oh;
    std::vector<float> s, inv;
    for (int64_t task = t0; task < t1; ++task) {
      // Order (b, kv head, t, part): a thread's consecutive tasks read the same keys and values, which
      // then are still in its cache.
      const int64_t part = task % parts, t = task / parts % T;
      const int64_t kvh = task / parts / T % Hkv, b = task / parts / T / Hkv;
      const int64_t bt = b * T + t;
      const int64_t g0 = G * part / parts, g1 = G * (part + 1) / parts;
      // Compaction: the visible slots in increasing order become ranks 0..n-1.
      const bool* mrow = mp + bt * span;
      const float* kbase = kc + rows[b] * k_cache.stride(0) + kvh * k_cache.stride(1);
      const float* vbase = vc + rows[b] * v_cache.stride(0) + kvh * v_cache.stride(1);
      kp.clear();
      vp.clear();
      for (int64_t slot = 0; slot < span; ++slot) {
        if (mrow[slot]) {
          kp.push_back(kbase + slot * k_cache.stride(2));
          vp.push_back(vbase + slot * v_cache.stride(2));
        }
      }
      const int64_t n = int64_t(kp.size()), n8 = (n + 7) / 8 * 8;
      if (n == 0) {  // cannot happen in the engine (a token sees itself)
        std::fill(op + (bt * Hq + kvh * G + g0) * D, op + (bt * Hq + kvh * G + g1) * D, 0.0f);
        continue;
      }
      // Blocks of at most MAX_BLOCK heads, as even as possible (8 heads: 4 + 4, not 6 + 2).
      const int64_t nh = g1 - g0, blocks = (nh + MAX_BLOCK - 1) / MAX_BLOCK;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t h0 = g0 + nh * blk / blocks, h1 = g0 + nh * (blk + 1) / blocks;
        qh.clear();
        oh.clear();
        for (int64_t g = h0; g < h1; ++g) {
          qh.push_back(qp + (bt * Hq + kvh * G + g) * D);
          oh.push_back(op + (bt * Hq + kvh * G + g) * D);
        }
        const int hb = int(h1 - h0);
        s.assign(hb * n8, -std::numeric_limits<float>::infinity());
        inv.assign(hb, 0.0f);
        const Task w{qh.data(), oh.data(), hb, kp.data(), vp.data(), n, n8, D, fscale, s.data(), inv.data()};
#if SG_X86
        if (isa == ISA_AVX2) {
          attend_avx2(w);
          continue;
        }
#endif
        attend_scalar(w);
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batch-invariant attention over a KV cache for small forwards (scalar and AVX2, bit-identical)";
  m.def("attention", &attention, py::call_guard<py::gil_scoped_release>(),
        "q float32 [B, T, Hq, D], k_cache, v_cache float32 [R, Hkv, S_max, D], row_index int64 [B], "
        "mask bool [B, T, span], scale, isa (0 scalar, 1 avx2) -> float32 [B, T, Hq, D]");
  m.def("exp_approx", &exp_approx, "x float32, isa -> the softmax's exp of each element (for the tests)");
  m.def("cpu_has_avx2", &cpu_has_avx2, "whether this CPU runs the AVX2 path (AVX2 and FMA)");
}
