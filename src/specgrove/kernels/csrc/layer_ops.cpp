// The small operations of a transformer layer on CPU, one call each instead of several torch ops:
// RMSNorm, SiLU(gate) * up, and RoPE on the query / key heads with the keys' and values' store into
// the KV cache. In a decode step a torch op's dispatch and allocation cost as much as the arithmetic of a
// whole layer's glue (docs/benchmarks.md, "2026-11-30: fused layer ops"); here a layer's glue is three calls.
//
// Every result depends only on its own row (token), never on how many rows share the call, and the
// scalar and AVX2 paths give the same bits:
//   rms_norm:  lane l = sum over i = l (mod 8), increasing i, of x_i * x_i (product rounded, then added);
//              r = 1 / sqrt(hsum8(lanes) / K + eps); y_i = (x_i * r) * w_i
//   silu_mul:  e = exp(-|g|) (vec_math.h); y = ((g >= 0 ? g : g * e) / (1 + e)) * u
//   rope:      y_d = x_d * cos_d + x_(d +- D/2) * sin_d  (sin sign-folded: rotate_half's negation is in it)
// Build with -ffp-contract=off (no fused multiply-adds beyond the explicit ones in vec_math.h).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SG_X86 1
#define SG_AVX2 __attribute__((target("avx2,fma")))
#else
#define SG_X86 0
#endif

namespace {

#include "vec_math.h"

enum : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1 };

void check_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa == ISA_SCALAR || isa == ISA_AVX2, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK(isa != ISA_AVX2 || cpu_has_avx2(), "isa=1 (avx2) asked for, but this CPU lacks AVX2/FMA");
}

torch::Tensor as_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && x.dim() >= 1, name,
                    " must be a CPU float32 tensor");
  return x.contiguous();
}

// --- RMSNorm ------------------------------------------------------------------------------------

inline float rms_factor(const float* lane, int64_t K, float eps) {
  return 1.0f / std::sqrt(hsum_lanes(lane) / float(K) + eps);
}

void rms_norm_row_scalar(const float* x, const float* w, int64_t K, float eps, float* y) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < K; ++i) lane[i % 8] = lane[i % 8] + x[i] * x[i];
  const float r = rms_factor(lane, K, eps);
  for (int64_t i = 0; i < K; ++i) y[i] = (x[i] * r) * w[i];
}

#if SG_X86
SG_AVX2 void rms_norm_row_avx2(const float* x, const float* w, int64_t K, float eps, float* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= K; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  alignas(32) float lane[8];
  _mm256_store_ps(lane, acc);
  for (int64_t j = i; j < K; ++j) lane[j % 8] = lane[j % 8] + x[j] * x[j];
  const float r = rms_factor(lane, K, eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= K; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  for (; i < K; ++i) y[i] = (x[i] * r) * w[i];
}
#endif

// x [..., K], weight [K] -> [..., K]
torch::Tensor rms_norm(torch::Tensor x_in, torch::Tensor w_in, double eps, int64_t isa) {
  check_isa(isa);
  const torch::Tensor x = as_rows(x_in, "x"), w = as_rows(w_in, "weight");
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, "weight must be [", K, "], got ", w.sizes());
  auto y = torch::empty_like(x);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = float(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if SG_X86
      if (isa == ISA_AVX2) {
        rms_norm_row_avx2(xp + m * K, wp, K, e, yp + m * K);
        continue;
      }
#endif
      rms_norm_row_scalar(xp + m * K, wp, K, e, yp + m * K);
    }
  });
  return y;
}

// --- SiLU(gate) * up ----------------------------------------------------------------------------

inline float silu_mul_scalar(float g, float u) {
  const float e = exp_scalar(-std::fabs(g));  // exp(-|g|) in (0, 1]: never overflows
  const float num = g >= 0.0f ? g : g * e;    // silu(g) = g / (1 + exp(-g)) = g e^g / (1 + e^g)
  return (num / (1.0f + e)) * u;
}

#if SG_X86
SG_AVX2 void silu_mul_avx2(const float* g, const float* u, int64_t n, float* y) {
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_or_ps(gv, sign));  // -|g|: the sign bit set, as the scalar negation of fabs
    const __m256 num = _mm256_blendv_ps(_mm256_mul_ps(gv, e), gv, _mm256_cmp_ps(gv, zero, _CMP_GE_OQ));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) y[i] = silu_mul_scalar(g[i], u[i]);
}
#endif

// gate_up [..., 2I] (gate in the first half, up in the second) -> [..., I]
torch::Tensor silu_mul(torch::Tensor gu_in, int64_t isa) {
  check_isa(isa);
  const torch::Tensor gu = as_rows(gu_in, "gate_up");
  const int64_t W = gu.size(-1);
  TORCH_CHECK_VALUE(W % 2 == 0, "gate_up's last dimension must be even (gate, then up), got ", W);
  const int64_t I = W / 2, M = W == 0 ? 0 : gu.numel() / W;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  auto y = torch::empty(shape, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(I, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = gp + m * W;
      float* out = yp + m * I;
#if SG_X86
      if (isa == ISA_AVX2) {
        silu_mul_avx2(g, g + I, I, out);
        continue;
      }
#endif
      for (int64_t i = 0; i < I; ++i) out[i] = silu_mul_scalar(g[i], g[I + i]);
    }
  });
  return y;
}

// --- RoPE and the KV store ----------------------------------------------------------------------

// x * cos + swap_halves(x) * sin over one head of D values (plain float code: the same bits whatever
// the compiler vectorizes).
inline void rope_head(const float* x, const float* c, const float* s, int64_t D, float* y) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) y[d] = x[d] * c[d] + x[d + half] * s[d];
  for (int64_t d = half; d < D; ++d) y[d] = x[d] * c[d] + x[d - half] * s[d];
}

// qkv [B, T, (Hq + 2 Hkv) D] (q heads, k heads, v heads); cos, sin [B, T, D]; k_layer, v_layer [R, Hkv,
// S_max, D] (unit stride in D); rows int64 [B]; slots int64 [B, T]. Writes token (b, t)'s rotated keys
// and its values into cache row rows[b], slot slots[b, t]; returns the rotated queries [B, T, Hq, D].
torch::Tensor rope_store(torch::Tensor qkv_in, torch::Tensor cos_in, torch::Tensor sin_in, torch::Tensor k_layer,
                         torch::Tensor v_layer, torch::Tensor rows_in, torch::Tensor slots_in, int64_t Hq, int64_t Hkv) {
  const torch::Tensor qkv = as_rows(qkv_in, "qkv"), cs = as_rows(cos_in, "cos"), sn = as_rows(sin_in, "sin");
  TORCH_CHECK_VALUE(qkv.dim() == 3, "qkv must be [B, T, (Hq + 2 Hkv) * D], got ", qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1);
  TORCH_CHECK_VALUE(Hq > 0 && Hkv > 0 && qkv.size(2) % (Hq + 2 * Hkv) == 0, "qkv's last dimension ", qkv.size(2),
                    " is not (Hq + 2 Hkv) * D for Hq=", Hq, ", Hkv=", Hkv);
  const int64_t D = qkv.size(2) / (Hq + 2 * Hkv);
  TORCH_CHECK_VALUE(D % 2 == 0, "head_dim must be even, got ", D);
  TORCH_CHECK_VALUE(cs.dim() == 3 && cs.size(0) == B && cs.size(1) == T && cs.size(2) == D && cs.sizes() == sn.sizes(),
                    "cos and sin must be [B, T, D] = [", B, ", ", T, ", ", D, "], got ", cs.sizes(), " and ", sn.sizes());
  for (const torch::Tensor* t : {&k_layer, &v_layer})
    TORCH_CHECK_VALUE(t->scalar_type() == torch::kFloat32 && t->device().is_cpu() && t->dim() == 4 &&
                          t->size(1) == Hkv && t->size(3) == D && t->stride(3) == 1,
                      "k_layer / v_layer must be CPU float32 [R, Hkv=", Hkv, ", S_max, D=", D,
                      "] with unit stride in D, got ", t->sizes());
  const torch::Tensor rows = rows_in.to(torch::kInt64).contiguous(), slots = slots_in.to(torch::kInt64).contiguous();
  TORCH_CHECK_VALUE(rows.numel() == B && slots.numel() == B * T, "rows must be [B] and slots [B, T]");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(rp[b] >= 0 && rp[b] < k_layer.size(0) && rp[b] < v_layer.size(0), "cache row ", rp[b],
                      " out of range");
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK_VALUE(sp[b * T + t] >= 0 && sp[b * T + t] < k_layer.size(2) && sp[b * T + t] < v_layer.size(2),
                        "cache slot ", sp[b * T + t], " out of range");
  }
  auto q = torch::empty({B, T, Hq, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* snp = sn.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kc = k_layer.data_ptr<float>();
  float* vc = v_layer.data_ptr<float>();
  const int64_t W = qkv.size(2);
  at::parallel_for(0, B * T, std::max<int64_t>(1, 4096 / W), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T;
      const float* x = xp + i * W;
      const float* c = cp + i * D;
      const float* s = snp + i * D;
      for (int64_t h = 0; h < Hq; ++h) rope_head(x + h * D, c, s, D, qp + (i * Hq + h) * D);
      for (int64_t h = 0; h < Hkv; ++h) {
        float* k = kc + rp[b] * k_layer.stride(0) + h * k_layer.stride(1) + sp[i] * k_layer.stride(2);
        float* v = vc + rp[b] * v_layer.stride(0) + h * v_layer.stride(1) + sp[i] * v_layer.stride(2);
        rope_head(x + (Hq + h) * D, c, s, D, k);
        std::memcpy(v, x + (Hq + Hkv + h) * D, size_t(D) * 4);
      }
    }
  });
  return q;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "A transformer layer's small operations on CPU (RMSNorm, SiLU * up, RoPE + KV store), batch-invariant";
  m.def("rms_norm", &rms_norm, "x float32 [..., K], weight [K], eps, isa -> (x * rsqrt(mean(x^2) + eps)) * weight");
  m.def("silu_mul", &silu_mul, "gate_up float32 [..., 2I], isa -> silu(gate) * up [..., I]");
  m.def("rope_store", &rope_store,
        "qkv [B, T, (Hq + 2 Hkv) D], cos, sin [B, T, D], k_layer, v_layer [R, Hkv, S_max, D], rows [B], slots [B, T], "
        "Hq, Hkv -> rotated queries [B, T, Hq, D]; writes the rotated keys and the values into the cache");
  m.def("cpu_has_avx2", &cpu_has_avx2, "whether this CPU runs the AVX2 path (AVX2 and FMA)");
}
