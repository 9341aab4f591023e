// Helpers shared by the batch-invariant kernels (attention.cpp, layer_ops.cpp): an exp for x <= 0 and an
// 8-lane horizontal sum, each with a scalar and an AVX2 version that give the same bits, and the AVX2 check.
// Include inside the including file's anonymous namespace, after SG_X86 / SG_AVX2 are defined.
#pragma once

// --- exp ----------------------------------------------------------------------------------------
// exp(x) for x <= 0 (Cephes expf): n = round(x / ln2), r = x - n ln2 in two steps, a degree-7
// polynomial in r, times 2^n built from the exponent bits. Below EXP_MIN the result would be under
// FLT_MIN: return exactly 0 (also for NaN). The input is clamped first so that the float -> int
// conversion of n is always defined.
constexpr float EXP_MIN = -87.33654f;  // ~ ln(FLT_MIN): n >= -126 above it
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f;  // few mantissa bits: n * LN2_HI is exact
constexpr float LN2_LO = -2.12194440e-4f;
constexpr float P0 = 1.9875691500e-4f, P1 = 1.3981999507e-3f, P2 = 8.3334519073e-3f, P3 = 4.1665795894e-2f,
                P4 = 1.6666665459e-1f, P5 = 5.0000001201e-1f;

inline float exp_scalar(float x) {
  float xc = x > EXP_MIN ? x : EXP_MIN;  // as _mm256_max_ps(x, EXP_MIN), NaN -> EXP_MIN
  xc = xc < 0.0f ? xc : 0.0f;            // as _mm256_min_ps(xc, 0)
  const float n = std::nearbyint(xc * LOG2E);  // current rounding mode, as _mm256_round_ps below
  float r = std::fma(n, -LN2_HI, xc);
  r = std::fma(n, -LN2_LO, r);
  float p = P0;
  p = std::fma(p, r, P1);
  p = std::fma(p, r, P2);
  p = std::fma(p, r, P3);
  p = std::fma(p, r, P4);
  p = std::fma(p, r, P5);
  const float z = r * r;
  float y = std::fma(p, z, r) + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  y = y * two_n;
  return x >= EXP_MIN ? y : 0.0f;
}

inline float hsum_lanes(const float* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

#if SG_X86
SG_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l0+l4, l1+l5, l2+l6, l3+l7
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                        // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

SG_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)), _mm256_setzero_ps());
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)), _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
  __m256 p = _mm256_set1_ps(P0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, z, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_GE_OQ));
}

#endif  // SG_X86

// Whether this CPU runs the AVX2 path of these kernels (AVX2 and FMA).
inline bool cpu_has_avx2() {
#if SG_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
