// Linear layers straight on llama.cpp's GGUF weight blocks (ggml's Q8_0, Q5_0, Q4_K, Q6_K).
//
// y = x @ W^T where each token's activations are first quantized to int8 per block (ggml's Q8_0 /
// Q8_K activation formats, with the 16-value sums Q8_K calls `bsums`). Every block's integer dot
// product is exact (int32), and the float operations are the same ones in the same order in the
// scalar and the AVX2 path, so the two give bit-identical results, and a token's output does not
// depend on which other tokens share the call (batch invariance).
//
// The file is compiled for baseline x86-64; the AVX2 functions carry a GCC target attribute and are
// chosen at run time. Build with -ffp-contract=off: GCC's float intrinsics are plain vector
// arithmetic that it would otherwise fuse into FMAs, which the scalar path does not do.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SG_X86 1
#define SG_AVX2 __attribute__((target("avx2,fma,f16c")))
// The small helpers take arrays of vectors: only inlined do those stay in registers.
#define SG_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma,f16c")))
#else
#define SG_X86 0
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Formats (ggml type ids as in gguf.GGMLQuantizationType)

enum : int64_t { T_F32 = 0, T_F16 = 1, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };
// Not a ggml type: Q4_K rows repacked eight at a time for the AVX2 kernel (repack_q4k_x8 below).
enum : int64_t { T_Q4_K_X8 = 1012 };
enum : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1 };

struct Format {
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};

Format format_of(int64_t type) {
  switch (type) {
    case T_F32: return {1, 4};
    case T_F16: return {1, 2};
    case T_Q5_0: return {32, 22};   // fp16 d; u8 qh[4]; u8 qs[16]
    case T_Q8_0: return {32, 34};   // fp16 d; i8 qs[32]
    case T_Q4_K: return {256, 144}; // fp16 d; fp16 dmin; u8 scales[12]; u8 qs[128]
    case T_Q6_K: return {256, 210}; // u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d
  }
  TORCH_CHECK_VALUE(false, "ggml type ", type, " is not supported (F32=0, F16=1, Q5_0=6, Q8_0=8, Q4_K=12, Q6_K=14)");
  return {0, 0};
}

// Block fields are read through memcpy: a row of Q5_0 / Q8_0 blocks has no alignment guarantee.
inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// IEEE half -> float, exact (every half is a float). F16C's vcvtph2ps gives the same bits.
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);            // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);   // normal: rebias 15 -> 127
  } else {
    const float f = float(mant) * 5.9604644775390625e-08f;  // subnormal: mant * 2^-24, exact
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Q4_K's 6-bit sub-block scales and mins, 4 bytes to a uint32 (ggml's get_scale_min_k4, SWAR):
// scales[0..3] / mins[0..3] are the low 6 bits of bytes 0..3 / 4..7; scales[4..7] / mins[4..7] take
// their low 4 bits from the low / high nibbles of bytes 8..11 and their top 2 bits from the top bits
// of bytes 0..3 / 4..7. Byte j of `sc` / `m` is sub-block j's (kept in integers: the AVX2 path moves
// them into a vector register whole).
struct Q4KScales {
  uint64_t sc, m;
  int scale(int j) const { return int((sc >> (8 * j)) & 0xff); }
  int min(int j) const { return int((m >> (8 * j)) & 0xff); }
};
inline Q4KScales q4k_scales(const uint8_t* s12) {
  const uint32_t b0 = load_u32(s12), b1 = load_u32(s12 + 4), b2 = load_u32(s12 + 8);
  const uint64_t sc_lo = b0 & 0x3f3f3f3fu, sc_hi = (b2 & 0x0f0f0f0fu) | ((b0 >> 2) & 0x30303030u);
  const uint64_t m_lo = b1 & 0x3f3f3f3fu, m_hi = ((b2 >> 4) & 0x0f0f0f0fu) | ((b1 >> 2) & 0x30303030u);
  return {sc_lo | (sc_hi << 32), m_lo | (m_hi << 32)};
}

// ---------------------------------------------------------------------------------------------
// Dequantization (one row of K values), with the float operations of gguf-py's numpy reference.

void dequantize_row(int64_t type, const uint8_t* row, int64_t K, float* y) {
  switch (type) {
    case T_F32:
      std::memcpy(y, row, size_t(K) * 4);
      return;
    case T_F16:
      for (int64_t i = 0; i < K; ++i) y[i] = fp16_to_fp32(load_u16(row + 2 * i));
      return;
    case T_Q8_0:
      for (int64_t b = 0; b < K / 32; ++b, row += 34, y += 32) {
        const float d = fp16_to_fp32(load_u16(row));
        for (int i = 0; i < 32; ++i) y[i] = d * float(int8_t(row[2 + i]));
      }
      return;
    case T_Q5_0:
      for (int64_t b = 0; b < K / 32; ++b, row += 22, y += 32) {
        const float d = fp16_to_fp32(load_u16(row));
        const uint32_t qh = load_u32(row + 2);
        const uint8_t* qs = row + 6;
        for (int j = 0; j < 16; ++j) {
          const int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
          const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
          y[j] = d * float(lo - 16);
          y[j + 16] = d * float(hi - 16);
        }
      }
      return;
    case T_Q4_K:
      for (int64_t b = 0; b < K / 256; ++b, row += 144, y += 256) {
        const float d = fp16_to_fp32(load_u16(row)), dmin = fp16_to_fp32(load_u16(row + 2));
        const Q4KScales s = q4k_scales(row + 4);
        const uint8_t* qs = row + 16;
        for (int j = 0; j < 8; ++j) {
          const float scale = d * float(s.scale(j)), min = dmin * float(s.min(j));
          const uint8_t* chunk = qs + 32 * (j / 2);  // sub-block 2c: low nibbles, 2c+1: high nibbles
          const int shift = 4 * (j % 2);
          for (int i = 0; i < 32; ++i) y[32 * j + i] = scale * float((chunk[i] >> shift) & 0xF) - min;
        }
      }
      return;
    case T_Q6_K:
      for (int64_t b = 0; b < K / 256; ++b, row += 210, y += 256) {
        const float d = fp16_to_fp32(load_u16(row + 208));
        const int8_t* sc = reinterpret_cast<const int8_t*>(row + 192);
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = row + 64 * h;
          const uint8_t* qh = row + 128 + 32 * h;
          const int8_t* s = sc + 8 * h;
          float* yh = y + 128 * h;
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            yh[l] = (d * float(s[is + 0])) * float(q1);
            yh[l + 32] = (d * float(s[is + 2])) * float(q2);
            yh[l + 64] = (d * float(s[is + 4])) * float(q3);
            yh[l + 96] = (d * float(s[is + 6])) * float(q4);
          }
        }
      }
      return;
  }
}


// ---------------------------------------------------------------------------------------------
// Q4_K x8: eight Q4_K rows interleaved, so that one AVX2 register holds 4 values of each of 8 rows and
// the lanes of every product are rows (no horizontal sums), and one madd applies a sub-block's 8 row
// scales to the 8 summed maddubs of the sub-block. Per group of rows 8g..8g+7 and block b, a record of
// kX8Record bytes:
//   [0, 16)     d of rows 0..7 (fp16)             [16, 32)   dmin of rows 0..7 (fp16)
//   [32, 96)    scale of sub-block j, row r at 32 + 8j + r (decoded 6-bit values)
//   [96, 160)   min of sub-block 2k + e, row r at 96 + 16k + 2r + e
//   [160, 1184) the 4-bit values: sub-block j, chunk c (0..3) is 32 bytes at 160 + 32 (4j + c); byte 4r + i
//               holds q[r][32j + 4c + i] (low nibble) and q[r][32j + 16 + 4c + i] (high nibble)
// The integer sums per (row, token) are those of the Q4_K contract, so the float accumulation is the same.
constexpr int64_t kX8Record = 1184;

// ---------------------------------------------------------------------------------------------
// Activation quantization: each token by itself, per block of `block` values (32: ggml's Q8_0,
// 256: ggml's Q8_K). d = amax/127, q = nearbyint(x * (127/amax)) in [-127, 127]; amax == 0 gives
// d = 0 and q = 0; a NaN or infinity in the block gives d = NaN (so the outputs it touches are NaN,
// as with a float matmul); an amax so small that 127/amax overflows gives q = +-127 where x != 0. bsums: sums of 16 consecutive q. Plain scalar code (the compiler
// vectorizes it), one formula for every path.

struct Acts {
  int64_t M = 0, K = 0, block = 0;
  const int8_t* q = nullptr;       // [M, K]
  const float* d = nullptr;        // [M, K / block]
  const int16_t* bsums = nullptr;  // [M, K / 16]
};

// Written once, compiled twice (baseline and, below, AVX2): the operations are exact IEEE float and
// integer operations, so both give the same bits; AVX2 just vectorizes them twice as wide.
inline __attribute__((always_inline)) void quantize_row_body(const float* x, int64_t K, int64_t block, int8_t* q,
                                                             float* d, int16_t* bsums) {
  for (int64_t b = 0; b < K / block; ++b) {
    const float* xb = x + b * block;
    int8_t* qb = q + b * block;
    // max |x| on the bit patterns: for non-negative IEEE floats the integer order is the float order
    // (an integer max vectorizes where a float one, NaN-aware, does not); NaN / inf sort last.
    uint32_t amax_bits = 0;
    for (int64_t i = 0; i < block; ++i) {
      uint32_t bits;
      std::memcpy(&bits, xb + i, 4);
      amax_bits = std::max(amax_bits, bits & 0x7fffffffu);
    }
    float amax;
    std::memcpy(&amax, &amax_bits, 4);
    if (amax == 0.0f || amax_bits >= 0x7f800000u) {
      std::memset(qb, 0, size_t(block));
      d[b] = amax == 0.0f ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float iscale = 127.0f / amax;
    if (iscale > std::numeric_limits<float>::max()) {  // amax < 127 / FLT_MAX: x * inf is +-127 (and 0 stays 0)
      for (int64_t i = 0; i < block; ++i) qb[i] = int8_t(xb[i] > 0.0f ? 127 : xb[i] < 0.0f ? -127 : 0);
      d[b] = amax / 127.0f;
      continue;
    }
    for (int64_t i = 0; i < block; ++i) {
      // (v + 1.5*2^23) - 1.5*2^23 rounds to the nearest integer, ties to even: nearbyint for
      // |v| < 2^22 in the default rounding mode, without a libm call (|v| <= 127 here).
      const float v = xb[i] * iscale;
      float r = (v + 12582912.0f) - 12582912.0f;
      r = r > 127.0f ? 127.0f : r;
      r = r < -127.0f ? -127.0f : r;
      qb[i] = int8_t(int32_t(r));
    }
    d[b] = amax / 127.0f;
  }
  for (int64_t g = 0; g < K / 16; ++g) {
    int s = 0;
    for (int i = 0; i < 16; ++i) s += q[16 * g + i];
    bsums[g] = int16_t(s);
  }
}

void quantize_row(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int16_t* bsums) {
  quantize_row_body(x, K, block, q, d, bsums);
}

#if SG_X86
SG_AVX2 void quantize_row_avx2(const float* x, int64_t K, int64_t block, int8_t* q, float* d, int16_t* bsums) {
  quantize_row_body(x, K, block, q, d, bsums);
}
#endif

// ---------------------------------------------------------------------------------------------
// Scalar reference: the plain formulas, one (token, row) at a time. The float operations per block
// are the contract every other path reproduces exactly:
//   32-blocks (Q8_0, Q5_0): acc += (d_w * d_a) * (float)sumi
//   Q6_K:                   acc += (d_w * d_a) * (float)sumi
//   Q4_K:                   acc += (d_w * d_a) * (float)sumi;  acc -= (dmin_w * d_a) * (float)summ

float dot_row_scalar(int64_t type, const uint8_t* row, int64_t K, const int8_t* a, const float* da) {
  float acc = 0.0f;
  switch (type) {
    case T_Q8_0:
      for (int64_t b = 0; b < K / 32; ++b, row += 34, a += 32) {
        int32_t sumi = 0;
        for (int i = 0; i < 32; ++i) sumi += int32_t(int8_t(row[2 + i])) * a[i];
        acc += (fp16_to_fp32(load_u16(row)) * da[b]) * float(sumi);
      }
      break;
    case T_Q5_0:
      for (int64_t b = 0; b < K / 32; ++b, row += 22, a += 32) {
        const uint32_t qh = load_u32(row + 2);
        const uint8_t* qs = row + 6;
        int32_t sumi = 0;
        for (int j = 0; j < 16; ++j) {
          sumi += (((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16) * a[j];
          sumi += (((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16) * a[j + 16];
        }
        acc += (fp16_to_fp32(load_u16(row)) * da[b]) * float(sumi);
      }
      break;
    case T_Q4_K:
      for (int64_t b = 0; b < K / 256; ++b, row += 144, a += 256) {
        const Q4KScales s = q4k_scales(row + 4);
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; ++j) {
          const uint8_t* chunk = row + 16 + 32 * (j / 2);
          const int shift = 4 * (j % 2);
          int32_t dot = 0, asum = 0;
          for (int i = 0; i < 32; ++i) {
            dot += ((chunk[i] >> shift) & 0xF) * a[32 * j + i];
            asum += a[32 * j + i];
          }
          sumi += s.scale(j) * dot;
          summ += s.min(j) * asum;
        }
        acc += (fp16_to_fp32(load_u16(row)) * da[b]) * float(sumi);
        acc -= (fp16_to_fp32(load_u16(row + 2)) * da[b]) * float(summ);
      }
      break;
    case T_Q6_K:
      for (int64_t b = 0; b < K / 256; ++b, row += 210, a += 256) {
        const int8_t* sc = reinterpret_cast<const int8_t*>(row + 192);
        int32_t sumi = 0;
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = row + 64 * h;
          const uint8_t* qh = row + 128 + 32 * h;
          const int8_t* ah = a + 128 * h;
          int32_t dots[8] = {0};  // the half's 8 sub-blocks of 16
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            dots[is + 0] += (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * ah[l];
            dots[is + 2] += (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * ah[l + 32];
            dots[is + 4] += (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * ah[l + 64];
            dots[is + 6] += (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * ah[l + 96];
          }
          for (int j = 0; j < 8; ++j) sumi += sc[8 * h + j] * dots[j];
        }
        acc += (fp16_to_fp32(load_u16(row + 208)) * da[b]) * float(sumi);
      }
      break;
  }
  return acc;
}

void matmul_rows_scalar(int64_t type, const uint8_t* W, int64_t row_bytes, int64_t K, const Acts& acts,
                        int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t nb = K / acts.block;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < acts.M; ++m)
      out[m * N + n] = dot_row_scalar(type, W + n * row_bytes, K, acts.q + m * K, acts.d + m * nb);
}

// ---------------------------------------------------------------------------------------------
// AVX2. A pass takes R consecutive weight rows and a tile of NT (<= 8) tokens, R * NT <= 8: lane
// p = r * NT + t of an 8-lane float vector is the scalar accumulator of (row r, token t). Per block,
// the integer sums of all (row, token) pairs are reduced together (one transpose-and-add), and the
// float update is one lane-wise multiply and add: the same operations, in the same block order, as
// the scalar path, whatever R and NT are. Several rows per pass share the reduction and the float
// work, which is what a single token (M = 1) is limited by.

#if SG_X86

constexpr int kTile = 8;  // tokens per tile = float lanes of a reduction

// A tile of `nt` consecutive tokens, with its activation scales laid out per block: da[b * kTile + t].
struct Tile {
  int64_t m0 = 0;
  int nt = 0;
  const int8_t* a[kTile] = {};
  const int16_t* bsums[kTile] = {};
  const float* da = nullptr;      // [blocks * kTile]
  const int32_t* asum = nullptr;  // [blocks * kTile]: the 32-value activation sums (Q5_0), same slots
};

void slot_layout(const Acts& acts, int64_t m0, int nt, std::vector<float>& da, std::vector<int32_t>& asum) {
  const int64_t nb = acts.K / acts.block;
  da.assign(size_t(nb) * kTile, 0.0f);
  asum.assign(size_t(nb) * kTile, 0);
  for (int64_t b = 0; b < nb; ++b)
    for (int t = 0; t < nt; ++t) {
      const int64_t m = m0 + t;
      da[b * kTile + t] = acts.d[m * nb + b];
      const int16_t* bs = acts.bsums + m * (acts.K / 16) + b * (acts.block / 16);
      asum[b * kTile + t] = acts.block == 32 ? int32_t(bs[0]) + bs[1] : 0;
    }
}

// Rows per pass for a tile of NT tokens (measured on Zen 3; more rows share more of the reduction
// and float work, but each is another interleaved stream for the prefetchers).
constexpr int rows_per_pass(int64_t type, int nt) {
  if (type == T_Q4_K) return nt == 1 ? 4 : nt == 2 ? 2 : 1;  // sumi and summ of <= 4 pairs share one reduction
  if (type == T_Q6_K) return nt <= 2 ? 4 : nt <= 4 ? 2 : 1;
  return nt == 1 ? 8 : nt == 2 ? 4 : nt <= 4 ? 2 : 1;        // 32-value blocks
}

// Lane p: token p % NT / row p / NT (clamped to R - 1 for unused lanes).
template <int NT>
SG_AVX2_INLINE __m256i token_lanes() {
  return _mm256_setr_epi32(0 % NT, 1 % NT, 2 % NT, 3 % NT, 4 % NT, 5 % NT, 6 % NT, 7 % NT);
}
template <int NT, int R>
SG_AVX2_INLINE __m256i row_lanes() {
  constexpr auto f = [](int p) { return p / NT < R ? p / NT : R - 1; };
  return _mm256_setr_epi32(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7));
}

// The integer sums of up to 8 slots, folded pairwise as the slots are produced, so that few slot
// vectors are live. Lane s of total(): the sum of slot s's 8 int32 lanes; zero for slots not put.
// Within each half [0, 4) and [4, 8) slots are put in increasing order (the two halves may interleave);
// `last` marks a half's final slot when its count is odd.
struct Sums8 {
  __m256i pair[4], pend[2];
  SG_AVX2_INLINE Sums8() {
    for (int k = 0; k < 4; ++k) pair[k] = _mm256_setzero_si256();
    pend[0] = pend[1] = _mm256_setzero_si256();
  }
  SG_AVX2_INLINE void put(int s, __m256i v, bool last) {
    if (s % 2 == 1) {
      pair[s / 2] = _mm256_hadd_epi32(pend[s / 4], v);
    } else if (last) {
      pair[s / 2] = _mm256_hadd_epi32(v, _mm256_setzero_si256());
    } else {
      pend[s / 4] = v;
    }
  }
  SG_AVX2_INLINE __m256i total() const {
    const __m256i g0 = _mm256_hadd_epi32(pair[0], pair[1]), g1 = _mm256_hadd_epi32(pair[2], pair[3]);
    return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
  }
};

// R fp16 values at p, p + stride, ... as floats in lanes 0..R-1 (built in registers).
template <int R>
SG_AVX2_INLINE __m256 gather_f16(const uint8_t* p, int64_t stride) {
  if constexpr (R == 1) {
    return _mm256_set1_ps(_cvtsh_ss(load_u16(p)));
  } else {
    short h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int r = 0; r < R; ++r) h[r] = short(load_u16(p + r * stride));
    return _mm256_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
  }
}

// Lane p = r * NT + t of the weight-side scale: lane r of `w` (R rows' values).
template <int NT, int R>
SG_AVX2_INLINE __m256 spread_rows(__m256 w) {
  if constexpr (R == 1 || NT == 1) return w;  // R == 1: gather_f16 broadcasts
  else return _mm256_permutevar8x32_ps(w, row_lanes<NT, R>());
}
// Lane p of the activation scales of block b: token p % NT's (lanes past R * NT: unspecified).
template <int NT, int R = 2>
SG_AVX2_INLINE __m256 spread_tokens(const float* da) {
  if constexpr (NT == 1 && R > 1) return _mm256_broadcast_ss(da);
  else if constexpr (NT == 8 || R == 1) return _mm256_loadu_ps(da);
  else return _mm256_permutevar8x32_ps(_mm256_loadu_ps(da), token_lanes<NT>());
}

// Q8_0: w * a as |w| * (a * sign(w)); maddubs pairs stay within 2 * 128 * 127 < 32767.
struct Q8_0_avx2 {
  static constexpr int64_t kBytes = 34;
  static constexpr bool kOffset16 = false;
  struct Unpacked {
    __m256i w, wabs;
  };
  static SG_AVX2_INLINE Unpacked unpack(const uint8_t* p) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    return {w, _mm256_sign_epi8(w, w)};  // |w| as unsigned (|-128| = 128 fits)
  }
  static SG_AVX2_INLINE __m256i dot(const Unpacked& u, const int8_t* a) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u.wabs, _mm256_sign_epi8(av, u.w)), _mm256_set1_epi16(1));
  }
};

// The 32 high bits of a Q5_0 block as bytes of 0x10 (bit j -> byte j).
SG_AVX2_INLINE __m256i q5_high_bits(uint32_t qh) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int(qh)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// Q5_0: the unsigned q in 0..31 (maddubs pairs <= 2 * 31 * 127); the -16 comes off through the
// activation sums: sum (q - 16) a = sum q a - 16 sum a.
struct Q5_0_avx2 {
  static constexpr int64_t kBytes = 22;
  static constexpr bool kOffset16 = true;
  using Unpacked = __m256i;
  static SG_AVX2_INLINE Unpacked unpack(const uint8_t* p) {
    // values 0..15 from the low nibbles, 16..31 from the high nibbles; plus the 5th bit.
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 6));
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
    return _mm256_or_si256(nib, q5_high_bits(load_u32(p + 2)));
  }
  static SG_AVX2_INLINE __m256i dot(const Unpacked& q, const int8_t* a) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), _mm256_set1_epi16(1));
  }
};

// vpshufb masks that broadcast one int16 of each 128-bit lane over the lane: int16 `lo` of the low
// lane and `hi` of the high lane (Q4_K: a sub-block's scale over 32 values; Q6_K: two sub-blocks').
struct BroadcastMasks {
  alignas(32) uint8_t q4k[8][32];  // lo = hi = j
  alignas(32) uint8_t q6k[4][32];  // lo = 2g, hi = 2g + 1
  BroadcastMasks() {
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 32; ++i) q4k[j][i] = uint8_t(2 * j + i % 2);
    for (int g = 0; g < 4; ++g)
      for (int i = 0; i < 32; ++i) q6k[g][i] = uint8_t(2 * (2 * g + i / 16) + i % 2);
  }
};
const BroadcastMasks kMasks;

SG_AVX2_INLINE __m256i load_mask(const uint8_t* m) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(m)); }


// Software prefetch of the next pass's rows (the R rows after this pass's, contiguous in memory), in
// step with the block loop: block b fetches the b-th 1/nb of that range. The hardware prefetchers
// follow one sequential stream well, R interleaved ones less so.
#ifndef SG_PREFETCH
#define SG_PREFETCH 1
#endif
template <int64_t kBytesPerBlock>
SG_AVX2_INLINE void prefetch_step(const uint8_t* next, int64_t b) {
#if SG_PREFETCH
  constexpr int kLines = int((kBytesPerBlock + 63) / 64);
  const char* p = reinterpret_cast<const char*>(next + b * kBytesPerBlock);
#pragma GCC unroll 32
  for (int i = 0; i < kLines; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
#else
  (void)next, (void)b;
#endif
}

// The activation pointer, opaque to the optimizer: each row then reloads its activation vectors
// (from L1) instead of the compiler keeping all of a block's in registers, which spills.
SG_AVX2_INLINE const int8_t* opaque(const int8_t* p) {
  asm volatile("" : "+r"(p));
  return p;
}
// Tokens per group of accumulators (<= 4): with more, the block's unpacked weights and the
// accumulators do not fit in the 16 registers, and unpacking twice costs less than spilling.
template <int NT>
constexpr int kGroup = NT <= 4 ? NT : 4;
// Q6_K with one row per pass (5-8 tokens): all the tile's tokens in one group, so each block is unpacked once.
// Its accumulators are int32 sums that madd updates, without the int16 partial sums Q4_K also keeps, so 8
// of them fit beside the unpacked values (less time than groups of 4 for 5 and 6 tokens, about the same for 8:
// docs/benchmarks.md, "2026-11-30 (last)").
template <int NT, int R>
constexpr int kGroupQ6 = R == 1 ? NT : kGroup<NT>;

// An accumulator pinned to a register at this point: GCC would otherwise reassociate a chain of
// integer adds into a tree over all the block's products, which needs more registers than there are.
SG_AVX2_INLINE void pin(__m256i& v) { asm("" : "+x"(v)); }

// 32-value blocks, R rows x NT tokens, one block at a time.
template <class Q, int NT, int R>
__attribute__((noinline)) SG_AVX2 __m256 pass_32(const uint8_t* row, int64_t row_bytes, int64_t nb, const Tile& tile) {
  constexpr int P = NT * R;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * Q::kBytes;
    if constexpr (R > 1) prefetch_step<R * Q::kBytes>(row + R * row_bytes, b);  // one row: the hardware prefetcher does
    Sums8 sums;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename Q::Unpacked w = Q::unpack(blk + r * row_bytes);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const int p = r * NT + t;
        sums.put(p, Q::dot(w, tile.a[t] + b * 32), p == P - 1 && P % 2 == 1);
      }
    }
    __m256i sumi = sums.total();
    if constexpr (Q::kOffset16) {
      const __m256i as = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.asum + kTile * b));
      const __m256i asp = R == 1 || NT == 8 ? as
                        : NT == 1 ? _mm256_broadcastd_epi32(_mm256_castsi256_si128(as))
                                  : _mm256_permutevar8x32_epi32(as, token_lanes<NT>());
      sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(asp, 4));
    }
    const __m256 dw = spread_rows<NT, R>(gather_f16<R>(blk, row_bytes));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(dw, spread_tokens<NT, R>(tile.da + kTile * b)), _mm256_cvtepi32_ps(sumi)));
  }
  return acc;
}

// Q4_K: sumi = sum_j sc_j * dot(q_j, a_j) with q in 0..15 (maddubs pairs <= 2*15*127), the scales
// folded in by madd; summ = sum_j m_j * (bsum_2j + bsum_2j+1) by one madd of the 16 bsums. With
// P = R * NT <= 4 pairs, sumi goes to slots [0, P) and summ to [4, 4 + P) of one reduction.
template <int NT, int R>
__attribute__((noinline)) SG_AVX2 __m256 pass_q4k(const uint8_t* row, int64_t row_bytes, int64_t nb, const Tile& tile) {
  constexpr int P = NT * R;
  constexpr bool kOne = P <= 4;
  static_assert(kOne || R == 1, "Q4_K: more than 4 pairs only with one row");
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    if constexpr (R > 1) prefetch_step<R * 144>(row + R * row_bytes, b);  // one row: the hardware prefetcher does
    Sums8 si, sm;  // sm: only when the pairs do not fit one reduction
    uint32_t ddm[4] = {0, 0, 0, 0};
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* br = blk + r * row_bytes;
      const int8_t* ap[kTile];
      for (int t = 0; t < NT; ++t) ap[t] = opaque(tile.a[t]);
      ddm[r] = load_u32(br);
      const Q4KScales s = q4k_scales(br + 4);
      const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(int64_t(s.sc))));
      const __m128i m16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(int64_t(s.m)));
      const __m256i mins = _mm256_set_m128i(_mm_unpackhi_epi16(m16, m16), _mm_unpacklo_epi16(m16, m16));
      // tokens in groups of <= 4, so that the accumulators stay in registers
#pragma GCC unroll 2
      for (int t0 = 0; t0 < NT; t0 += kGroup<NT>) {
        constexpr int G = kGroup<NT>;
        __m256i s4[G];
#pragma GCC unroll 4
        for (int i = 0; i < G; ++i) s4[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(br + 16 + 32 * c));
          const __m256i lo = _mm256_and_si256(q, m4);                        // sub-block 2c
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);  // sub-block 2c+1
          const __m256i sc_lo = _mm256_shuffle_epi8(sc, load_mask(kMasks.q4k[2 * c]));
          const __m256i sc_hi = _mm256_shuffle_epi8(sc, load_mask(kMasks.q4k[2 * c + 1]));
#pragma GCC unroll 4
          for (int i = 0; i < G; ++i) {
            if (t0 + i >= NT) break;
            const int8_t* a = ap[t0 + i] + b * 256 + 64 * c;
            const __m256i p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
            const __m256i p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32)));
            s4[i] = _mm256_add_epi32(s4[i], _mm256_add_epi32(_mm256_madd_epi16(p_lo, sc_lo), _mm256_madd_epi16(p_hi, sc_hi)));
            pin(s4[i]);
          }
        }
#pragma GCC unroll 4
        for (int i = 0; i < G; ++i) {
          const int t = t0 + i;
          if (t >= NT) break;
          const int p = r * NT + t;
          const bool last = p == P - 1 && P % 2 == 1;
          const __m256i mm = _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.bsums[t] + 16 * b)), mins);
          si.put(p, s4[i], last);
          if constexpr (kOne) si.put(4 + p, mm, last);
          else sm.put(p, mm, last);
        }
      }
    }
    const __m256 da = spread_tokens<NT>(tile.da + kTile * b);
    if constexpr (kOne) {
      // lanes 2r / 2r+1: row r's d / dmin; spread to lanes p (d) and 4 + p (dmin)
      const __m256 dm = _mm256_cvtph_ps(_mm_setr_epi32(int(ddm[0]), int(ddm[1]), int(ddm[2]), int(ddm[3])));
      constexpr auto f = [](int p) { const int q = p & 3; return 2 * (q / NT < R ? q / NT : R - 1) + (p >> 2); };
      const __m256 dd = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7)));
      const __m256 da2 = NT == 1 || NT == 2 || NT == 4 ? da : _mm256_permutevar8x32_ps(da, _mm256_setr_epi32(0 % NT, 1 % NT, 2 % NT, 3 % NT, 0 % NT, 1 % NT, 2 % NT, 3 % NT));
      const __m256 pr = _mm256_mul_ps(_mm256_mul_ps(dd, da2), _mm256_cvtepi32_ps(si.total()));
      __m128 a4 = _mm256_castps256_ps128(acc);
      a4 = _mm_add_ps(a4, _mm256_castps256_ps128(pr));
      a4 = _mm_sub_ps(a4, _mm256_extractf128_ps(pr, 1));
      acc = _mm256_castps128_ps256(a4);
    } else {
      const __m256 dm = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(int(ddm[0]))));
      const __m256 d = _mm256_permutevar8x32_ps(dm, _mm256_set1_epi32(0));
      const __m256 dmin = _mm256_permutevar8x32_ps(dm, _mm256_set1_epi32(1));
      acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(si.total())));
      acc = _mm256_sub_ps(acc, _mm256_mul_ps(_mm256_mul_ps(dmin, da), _mm256_cvtepi32_ps(sm.total())));
    }
  }
  return acc;
}

// Q6_K: sumi = sum_j sc_j * (dot(u_j, a_j) - 32 * bsum_j) with u = q + 32 in 0..63 (maddubs pairs
// <= 2*63*127), over the 16 sub-blocks of 16; the offset term is one madd of the bsums with 32*sc.
template <int NT, int R>
__attribute__((noinline)) SG_AVX2 __m256 pass_q6k(const uint8_t* row, int64_t row_bytes, int64_t nb, const Tile& tile) {
  constexpr int P = NT * R;
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 210;
    if constexpr (R > 1) prefetch_step<R * 210>(row + R * row_bytes, b);  // one row: the hardware prefetcher does
    Sums8 sums;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* br = blk + r * row_bytes;
      const int8_t* ap[kTile];
      for (int t = 0; t < NT; ++t) ap[t] = opaque(tile.a[t]);
      const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(br + 192));
      const __m256i sc32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc8), 5);  // |32 sc| <= 4096
#pragma GCC unroll 2
      for (int t0 = 0; t0 < NT; t0 += kGroupQ6<NT, R>) {
        constexpr int G = kGroupQ6<NT, R>;
        __m256i isum[G];
#pragma GCC unroll 8
        for (int i = 0; i < G; ++i)
          if (t0 + i < NT)
            isum[i] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                       _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.bsums[t0 + i] + 16 * b)), sc32));
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(h == 0 ? sc8 : _mm_srli_si128(sc8, 8)));
          const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(br + 64 * h));
          const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(br + 64 * h + 32));
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(br + 128 + 32 * h));
#pragma GCC unroll 4
          for (int g = 0; g < 4; ++g) {
            // Group g: values y[32g + l] of the half (l < 32), sub-blocks 2g (low 16 bytes) and 2g+1.
            // The 16-bit shifts move bits across bytes, but the masks keep only each byte's own.
            const __m256i low = g == 0 ? _mm256_and_si256(ql0, m4)
                              : g == 1 ? _mm256_and_si256(ql1, m4)
                              : g == 2 ? _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4)
                                       : _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4);
            const __m256i high = g == 0 ? _mm256_slli_epi16(qh, 4)
                               : g == 1 ? _mm256_slli_epi16(qh, 2)
                               : g == 2 ? qh
                                        : _mm256_srli_epi16(qh, 2);
            const __m256i u = _mm256_or_si256(low, _mm256_and_si256(high, m30));
            const __m256i scv = _mm256_shuffle_epi8(sc, load_mask(kMasks.q6k[g]));
#pragma GCC unroll 8
            for (int i = 0; i < G; ++i) {
              if (t0 + i >= NT) break;
              const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap[t0 + i] + b * 256 + 128 * h + 32 * g));
              isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), scv));
              pin(isum[i]);
            }
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < G; ++i) {
          const int p = r * NT + t0 + i;
          if (t0 + i < NT) sums.put(p, isum[i], p == P - 1 && P % 2 == 1);
        }
      }
    }
    const __m256 dw = spread_rows<NT, R>(gather_f16<R>(blk + 208, row_bytes));
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(dw, spread_tokens<NT, R>(tile.da + kTile * b)), _mm256_cvtepi32_ps(sums.total())));
  }
  return acc;
}

template <int NT, int R>
SG_AVX2 __m256 pass(int64_t type, const uint8_t* row, int64_t row_bytes, int64_t nb, const Tile& tile) {
  switch (type) {
    case T_Q8_0: return pass_32<Q8_0_avx2, NT, R>(row, row_bytes, nb, tile);
    case T_Q5_0: return pass_32<Q5_0_avx2, NT, R>(row, row_bytes, nb, tile);
    case T_Q4_K:
      if constexpr (NT * R <= 4 || R == 1) return pass_q4k<NT, R>(row, row_bytes, nb, tile);
      else return _mm256_setzero_ps();  // not used
    default: return pass_q6k<NT, R>(row, row_bytes, nb, tile);
  }
}

// Rows [n0, n1) for one tile: passes of R rows, then single rows.
template <int NT, int R>
SG_AVX2 void tile_rows_r(int64_t type, const uint8_t* W, int64_t row_bytes, int64_t nb, const Tile& tile,
                         int64_t n0, int64_t n1, float* out, int64_t N) {
  alignas(32) float lanes[kTile];
  float* o = out + tile.m0 * N;
  int64_t n = n0;
  if constexpr (R > 1) {
    for (; n + R <= n1; n += R) {
      const __m256 acc = pass<NT, R>(type, W + n * row_bytes, row_bytes, nb, tile);
      if constexpr (NT == 1 && R == 8) {
        _mm256_storeu_ps(o + n, acc);
      } else if constexpr (NT == 1 && R == 4) {
        _mm_storeu_ps(o + n, _mm256_castps256_ps128(acc));
      } else {
        _mm256_store_ps(lanes, acc);
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < NT; ++t) o[t * N + n + r] = lanes[r * NT + t];
      }
    }
  }
  for (; n < n1; ++n) {
    const __m256 acc = pass<NT, 1>(type, W + n * row_bytes, row_bytes, nb, tile);
    _mm256_store_ps(lanes, acc);
    for (int t = 0; t < NT; ++t) o[t * N + n] = lanes[t];
  }
}

template <int NT>
SG_AVX2 void tile_rows(int64_t type, const uint8_t* W, int64_t row_bytes, int64_t nb, const Tile& tile,
                       int64_t n0, int64_t n1, float* out, int64_t N) {
  switch (type) {
    case T_Q4_K: tile_rows_r<NT, rows_per_pass(T_Q4_K, NT)>(type, W, row_bytes, nb, tile, n0, n1, out, N); break;
    case T_Q6_K: tile_rows_r<NT, rows_per_pass(T_Q6_K, NT)>(type, W, row_bytes, nb, tile, n0, n1, out, N); break;
    default: tile_rows_r<NT, rows_per_pass(T_Q8_0, NT)>(type, W, row_bytes, nb, tile, n0, n1, out, N); break;
  }
}

SG_AVX2 void matmul_rows_avx2(int64_t type, const uint8_t* W, int64_t row_bytes, int64_t nb,
                              const std::vector<Tile>& tiles, int64_t n0, int64_t n1, float* out, int64_t N) {
  // With several tiles (M > 8), rows go in chunks of ~32 KiB so that a chunk stays in cache while
  // every tile passes over it.
  const int64_t chunk = tiles.size() > 1 ? std::max<int64_t>(8, (1 << 15) / row_bytes) : n1 - n0;
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (const Tile& tile : tiles) {
      switch (tile.nt) {
        case 1: tile_rows<1>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 2: tile_rows<2>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 3: tile_rows<3>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 4: tile_rows<4>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 5: tile_rows<5>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 6: tile_rows<6>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        case 7: tile_rows<7>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
        default: tile_rows<8>(type, W, row_bytes, nb, tile, c0, c1, out, N); break;
      }
    }
  }
}


// Q4_K x8 against up to 8 tokens (G), one record: adds each token's block terms to acc[t] (lanes = the group's 8
// rows), in the contract's order.
template <int G>
SG_AVX2_INLINE void x8_block(const uint8_t* rec, const int8_t* const* a, const int16_t* const* asum,
                             const float* da, __m256* acc) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  // Up to 4 tokens the sums stay in registers; with more, in memory (behind an opaque pointer and a barrier per
  // sub-block), so that the registers hold the G int16 sums and the unpacked weights.
  alignas(32) __m256i sumi_store[G];
  __m256i* sumi = sumi_store;
  if constexpr (G > 4) asm volatile("" : "+r"(sumi));
#pragma GCC unroll 8
  for (int t = 0; t < G; ++t) sumi[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
  for (int j = 0; j < 8; ++j) {
    // the 8 rows' scales of sub-block j, each in both int16 of its pair
    const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rec + 32 + 8 * j));
    const __m256i sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(s8, s8));
    __m256i p[G];
#pragma GCC unroll 8
    for (int t = 0; t < G; ++t) p[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 160 + 32 * (4 * j + c)));
      const __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
#pragma GCC unroll 8
      for (int t = 0; t < G; ++t) {
        int32_t alo, ahi;
        std::memcpy(&alo, a[t] + 32 * j + 4 * c, 4);
        std::memcpy(&ahi, a[t] + 32 * j + 16 + 4 * c, 4);
        // |maddubs| <= 2 * 15 * 127 = 3810 per int16; 8 of them sum to <= 30480: no int16 overflow. Each
        // product goes into its token's sum at once (pinned): GCC would otherwise compute all of a sub-block's
        // 32 products first and spill them.
        p[t] = _mm256_add_epi16(p[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(alo)));
        pin(p[t]);
        p[t] = _mm256_add_epi16(p[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ahi)));
        pin(p[t]);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < G; ++t) sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p[t], sc));
    if constexpr (G > 4) asm volatile("" ::: "memory");
  }
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
  const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16)));
  __m256i mins[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
    mins[k] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 96 + 16 * k)));
#pragma GCC unroll 8
  for (int t = 0; t < G; ++t) {
    __m256i summ = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      int32_t pair;
      std::memcpy(&pair, asum[t] + 2 * k, 4);  // the 32-value sums of sub-blocks 2k and 2k + 1
      summ = _mm256_add_epi32(summ, _mm256_madd_epi16(mins[k], _mm256_set1_epi32(pair)));
    }
    const __m256 dat = _mm256_set1_ps(da[t]);
    acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_mul_ps(d, dat), _mm256_cvtepi32_ps(sumi[t])));
    acc[t] = _mm256_sub_ps(acc[t], _mm256_mul_ps(_mm256_mul_ps(dmin, dat), _mm256_cvtepi32_ps(summ)));
  }
}

// One group of 8 rows (its nb records at `rows`) against tokens m0 .. m0 + G - 1 (G <= 8), into out.
template <int G>
SG_AVX2_INLINE void x8_group(const uint8_t* rows, int64_t nb, const Acts& acts, const int16_t* asum32, int64_t m0,
                             float* out, int64_t stride, bool prefetch) {
  const int64_t K = acts.K;
  __m256 acc[G];
  for (int t = 0; t < G; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = rows + b * kX8Record;
    // One sequential stream: software prefetch 2 KiB ahead of the record read (no slower than the hardware
    // prefetcher alone for one token where measured; a prefetch of the next group's record was slower).
    if (prefetch) prefetch_step<kX8Record>(rec + 2048, 0);
    const int8_t* a[G];
    const int16_t* as[G];
    float da[G];
    for (int t = 0; t < G; ++t) {
      a[t] = acts.q + (m0 + t) * K + b * 256;
      as[t] = asum32 + ((m0 + t) * nb + b) * 8;
      da[t] = acts.d[(m0 + t) * nb + b];
    }
    x8_block<G>(rec, a, as, da, acc);
  }
  for (int t = 0; t < G; ++t) _mm256_storeu_ps(out + (m0 + t) * stride, acc[t]);
}

// Groups [g0, g1) of a Q4_K x8 matrix for every token: out[m * stride + 8g + r], tokens 8 at a time (one unpacking
// of the weights serves them all; against groups of 4: docs/benchmarks.md, "2026-11-30 (later)", tokens 8 at a time).
// With more than 8 tokens the groups of rows go in chunks of ~256 KiB of records, which stay in L2 while every 8
// tokens pass over them.
SG_AVX2 void matmul_x8_avx2(const uint8_t* W, int64_t nb, const Acts& acts, const int16_t* asum32, int64_t g0,
                            int64_t g1, float* out, int64_t stride) {
  const int64_t M = acts.M;
  const int64_t chunk = M > 8 ? std::max<int64_t>(1, (1 << 18) / (nb * kX8Record)) : g1 - g0;
  for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
    const int64_t c1 = std::min(g1, c0 + chunk);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int G = int(std::min<int64_t>(8, M - m0));
      for (int64_t g = c0; g < c1; ++g) {
        const uint8_t* rows = W + g * nb * kX8Record;
        float* o = out + 8 * g;
        const bool prefetch = m0 == 0;
        switch (G) {
          case 1: x8_group<1>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 2: x8_group<2>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 3: x8_group<3>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 4: x8_group<4>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 5: x8_group<5>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 6: x8_group<6>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          case 7: x8_group<7>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
          default: x8_group<8>(rows, nb, acts, asum32, m0, o, stride, prefetch); break;
        }
      }
    }
  }
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#else
bool cpu_has_avx2() { return false; }
#endif  // SG_X86

// ---------------------------------------------------------------------------------------------
// Splitting rows over threads

// Blocks of about this many weight bytes are what a thread claims at a time (parallel_rows).
constexpr int64_t kClaimBytes = int64_t(1) << 16;

// fn(r0, r1) over rows [0, n), every row exactly once, on the torch threads. Each thread owns one contiguous
// range (a multiple of `align` rows) and works through it from the front, `block` rows at a time, so that it
// reads one continuous stream; a thread done with its own takes blocks from the back of the others' ranges.
// On a shared machine one core is often slower for a while; with fixed halves the call waits for it (handing
// out interleaved blocks instead breaks each thread's stream and is slower still: docs/benchmarks.md).
// Which thread computes a row does not change its result.
template <class F>
void parallel_rows(int64_t n, int64_t align, int64_t block, const F& fn) {
  if (n <= 0) return;
  TORCH_CHECK(n < (int64_t(1) << 32), "parallel_rows: ", n, " rows do not fit its 32-bit claims");
  block = std::max<int64_t>(1, block);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + block - 1) / block);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(int64_t(0), n);
    return;
  }
  // A range's front (low 32 bits) and back (high 32 bits), claimed from either end by compare-and-swap.
  struct alignas(64) Range {
    std::atomic<uint64_t> front_back;
  };
  std::vector<Range> ranges(static_cast<size_t>(threads));
  const int64_t per = std::max<int64_t>(align, n / threads / align * align);
  for (int64_t t = 0; t < threads; ++t) {
    const uint64_t front = uint64_t(std::min(n, t * per)), back = uint64_t(t == threads - 1 ? n : std::min(n, (t + 1) * per));
    ranges[t].front_back.store(front | (back << 32), std::memory_order_relaxed);
  }
  // Claims up to `block` rows of range r, from its front or its back; false when the range is used up.
  auto claim = [&](Range& r, bool from_front, int64_t& r0, int64_t& r1) {
    uint64_t v = r.front_back.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = int64_t(v & 0xffffffffu), back = int64_t(v >> 32);
      if (front >= back) return false;
      r0 = from_front ? front : std::max(front, back - block);
      r1 = from_front ? std::min(back, front + block) : back;
      const uint64_t next = from_front ? uint64_t(r1) | (uint64_t(back) << 32) : uint64_t(front) | (uint64_t(r0) << 32);
      if (r.front_back.compare_exchange_weak(v, next, std::memory_order_relaxed)) return true;
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t me = t0; me < t1; ++me) {
      int64_t r0, r1;
      while (claim(ranges[me], true, r0, r1)) fn(r0, r1);
      for (int64_t k = 1; k < threads; ++k)
        while (claim(ranges[(me + k) % threads], false, r0, r1)) fn(r0, r1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Torch entry points

void check_weight(const torch::Tensor& weight, int64_t type, int64_t K, Format& f, int64_t& row_bytes) {
  f = format_of(type);
  TORCH_CHECK_VALUE(K > 0 && K % f.block == 0, "K=", K, " is not a positive multiple of the block size ", f.block,
                    " of ggml type ", type);
  row_bytes = K / f.block * f.bytes;
  TORCH_CHECK_VALUE(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.device().is_cpu(),
                    "weight must be a CPU uint8 tensor [N, row_bytes]");
  TORCH_CHECK_VALUE(weight.size(1) == row_bytes, "weight rows have ", weight.size(1), " bytes; type ", type, " with K=",
                    K, " needs ", row_bytes);
}

// The Q4_K x8 layout (see kX8Record) of Q4_K rows.
torch::Tensor repack_q4k_x8(torch::Tensor weight, int64_t K) {
  Format f;
  int64_t row_bytes;
  check_weight(weight, T_Q4_K, K, f, row_bytes);
  const int64_t N = weight.size(0), nb = K / 256;
  TORCH_CHECK_VALUE(N % 8 == 0, "Q4_K x8 repacking needs a multiple of 8 rows, got ", N);
  weight = weight.contiguous();
  auto out = torch::empty({N / 8, nb * kX8Record}, torch::kUInt8);
  const uint8_t* W = weight.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / 8, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        uint8_t* rec = O + (g * nb + b) * kX8Record;
        for (int r = 0; r < 8; ++r) {
          const uint8_t* blk = W + (8 * g + r) * row_bytes + b * 144;
          std::memcpy(rec + 2 * r, blk, 2);
          std::memcpy(rec + 16 + 2 * r, blk + 2, 2);
          const Q4KScales sm = q4k_scales(blk + 4);
          for (int j = 0; j < 8; ++j) {
            rec[32 + 8 * j + r] = uint8_t(sm.scale(j));
            rec[96 + 16 * (j / 2) + 2 * r + j % 2] = uint8_t(sm.min(j));
          }
          for (int j = 0; j < 8; ++j) {
            const uint8_t* chunk = blk + 16 + 32 * (j / 2);  // sub-block j: low (even j) / high (odd j) nibbles
            const int shift = 4 * (j % 2);
            for (int c = 0; c < 4; ++c)
              for (int i = 0; i < 4; ++i) {
                const uint8_t lo = (chunk[4 * c + i] >> shift) & 0xF, hi = (chunk[16 + 4 * c + i] >> shift) & 0xF;
                rec[160 + 32 * (4 * j + c) + 4 * r + i] = uint8_t(lo | (hi << 4));
              }
          }
        }
      }
  });
  return out;
}

torch::Tensor dequantize(torch::Tensor weight, int64_t type, int64_t K) {
  Format f;
  int64_t row_bytes;
  check_weight(weight, type, K, f, row_bytes);
  weight = weight.contiguous();
  const int64_t N = weight.size(0);
  auto out = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* W = weight.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / (K * 4)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequantize_row(type, W + n * row_bytes, K, y + n * K);
  });
  return out;
}

// The quantized activations of one call, in plain vectors (no tensor allocations on the matmul path).
struct QuantizedActs {
  int64_t M = 0, K = 0, block = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> bsums;
  Acts view() const { return Acts{M, K, block, q.data(), d.data(), bsums.data()}; }
};

QuantizedActs quantize_acts(const torch::Tensor& x_in, int64_t block, int64_t isa) {
  TORCH_CHECK_VALUE(block == 32 || block == 256, "activation block must be 32 or 256, got ", block);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.device().is_cpu(), "x must be a CPU tensor [M, K]");
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous();
  QuantizedActs r;
  r.M = x.size(0), r.K = x.size(1), r.block = block;
  const int64_t M = r.M, K = r.K;
  TORCH_CHECK_VALUE(K % block == 0, "K=", K, " is not a multiple of the activation block ", block);
  r.q.resize(size_t(M * K));
  r.d.resize(size_t(M * (K / block)));
  r.bsums.resize(size_t(M * (K / 16)));
  const float* xp = x.data_ptr<float>();
  int8_t* q = r.q.data();
  float* d = r.d.data();
  int16_t* bs = r.bsums.data();
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if SG_X86
      if (isa == ISA_AVX2) {
        quantize_row_avx2(xp + m * K, K, block, q + m * K, d + m * (K / block), bs + m * (K / 16));
        continue;
      }
#endif
      quantize_row(xp + m * K, K, block, q + m * K, d + m * (K / block), bs + m * (K / 16));
    }
  });
  return r;
}

void check_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa == ISA_SCALAR || isa == ISA_AVX2, "isa must be 0 (scalar) or 1 (avx2), got ", isa);
  TORCH_CHECK(isa != ISA_AVX2 || cpu_has_avx2(), "isa=1 (avx2) asked for, but this CPU lacks AVX2/FMA/F16C");
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_activations(torch::Tensor x, int64_t block, int64_t isa) {
  check_isa(isa);
  const QuantizedActs r = quantize_acts(x, block, isa);
  const int64_t M = r.M, K = r.K;
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, K / block}, torch::kFloat32);
  auto bsums = torch::empty({M, K / 16}, torch::kInt16);
  std::copy(r.q.begin(), r.q.end(), q.data_ptr<int8_t>());
  std::copy(r.d.begin(), r.d.end(), d.data_ptr<float>());
  std::copy(r.bsums.begin(), r.bsums.end(), bsums.data_ptr<int16_t>());
  return {q, d, bsums};
}

// out[m * stride + n] = row m of the activations times weight row n, for the N rows of W.
void matmul_into(const Acts& acts, const uint8_t* W, int64_t type, int64_t N, int64_t row_bytes, int64_t isa,
                 float* y, int64_t stride) {
  const int64_t M = acts.M, K = acts.K;
  if (M == 0 || N == 0) return;
  // Blocks of ~64 KiB of weights, whole passes of the AVX2 kernel (8 rows), per claim.
  const int64_t block = std::max<int64_t>(8, kClaimBytes / row_bytes / 8 * 8);
  if (isa == ISA_SCALAR) {
    parallel_rows(N, 8, block, [&](int64_t n0, int64_t n1) { matmul_rows_scalar(type, W, row_bytes, K, acts, n0, n1, y, stride); });
    return;
  }
#if SG_X86
  std::vector<Tile> tiles;
  std::vector<std::vector<float>> da_slots;
  std::vector<std::vector<int32_t>> asum_slots;
  for (int64_t m0 = 0; m0 < M; m0 += kTile) {
    Tile t;
    t.m0 = m0;
    t.nt = int(std::min<int64_t>(kTile, M - m0));
    for (int i = 0; i < t.nt; ++i) {
      t.a[i] = acts.q + (m0 + i) * K;
      t.bsums[i] = acts.bsums + (m0 + i) * (K / 16);
    }
    da_slots.emplace_back();
    asum_slots.emplace_back();
    slot_layout(acts, m0, t.nt, da_slots.back(), asum_slots.back());
    tiles.push_back(t);
  }
  for (size_t i = 0; i < tiles.size(); ++i) {
    tiles[i].da = da_slots[i].data();
    tiles[i].asum = asum_slots[i].data();
  }
  const int64_t nb = K / acts.block;
  // The lambda itself is not compiled for AVX2; it only calls the AVX2 function.
  parallel_rows(N, 8, block, [&](int64_t n0, int64_t n1) { matmul_rows_avx2(type, W, row_bytes, nb, tiles, n0, n1, y, stride); });
#endif
}

void check_matmul_type(int64_t type) {
  TORCH_CHECK_VALUE(type == T_Q8_0 || type == T_Q5_0 || type == T_Q4_K || type == T_Q6_K,
                    "matmul supports Q8_0, Q5_0, Q4_K and Q6_K, not ggml type ", type);
}

torch::Tensor matmul(torch::Tensor x, torch::Tensor weight, int64_t type, int64_t N, int64_t K, int64_t isa) {
  Format f;
  int64_t row_bytes;
  check_weight(weight, type, K, f, row_bytes);
  check_matmul_type(type);
  TORCH_CHECK_VALUE(weight.size(0) == N, "weight has ", weight.size(0), " rows, expected N=", N);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == K, "x must be [M, K=", K, "]");
  check_isa(isa);
  weight = weight.contiguous();
  const QuantizedActs qa = quantize_acts(x, f.block, isa);  // once per call, shared by every row
  auto out = torch::empty({qa.M, N}, torch::kFloat32);
  matmul_into(qa.view(), weight.data_ptr<uint8_t>(), type, N, row_bytes, isa, out.data_ptr<float>(), N);
  return out;
}

// A whole linear layer in one call: y = x W^T (+ bias) (+ residual), W the row-wise concatenation of
// `weights` (each [n_i, row_bytes_i] of ggml type types[i]). The activations are quantized once per
// block size and shared by the matrices that use it. The bias and then the residual are added to each
// output as one float addition each (the same operations as adding them after the product).
torch::Tensor linear(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types,
                     c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == types.size(), "linear needs one type per weight matrix");
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> row_bytes(weights.size());
  int64_t N = 0;
  std::vector<int64_t> rows(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK_VALUE(weights[i].is_contiguous(), "weight matrices must be contiguous");
    if (types[i] == T_Q4_K_X8) {
      TORCH_CHECK_VALUE(K % 256 == 0 && weights[i].scalar_type() == torch::kUInt8 && weights[i].dim() == 2 &&
                            weights[i].size(1) == K / 256 * kX8Record,
                        "a Q4_K x8 matrix must be uint8 [N / 8, K / 256 * ", kX8Record, "] (repack_q4k_x8)");
      TORCH_CHECK(isa == ISA_AVX2, "Q4_K x8 (repacked) weights run on the AVX2 path only; load with isa=1 or keep "
                  "the plain Q4_K rows");
      row_bytes[i] = 0;
      rows[i] = weights[i].size(0) * 8;
    } else {
      Format f;
      check_weight(weights[i], types[i], K, f, row_bytes[i]);
      check_matmul_type(types[i]);
      rows[i] = weights[i].size(0);
    }
    N += rows[i];
  }
  torch::Tensor b, r;
  if (bias.has_value()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "bias must be [", N, "], got ", b.sizes());
  }
  if (residual.has_value()) {
    r = residual->to(torch::kFloat32).contiguous();
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == M && r.size(1) == N, "residual must be [", M, ", ", N, "], got ",
                      r.sizes());
  }
  auto out = torch::empty({M, N}, torch::kFloat32);
  float* y = out.data_ptr<float>();
  QuantizedActs by_block[2];  // activation blocks of 32 and of 256
  int64_t col = 0;
  std::vector<int16_t> asum32;  // Q4_K x8: each token's 32-value activation sums, [M, K / 256, 8]
  for (size_t i = 0; i < weights.size(); ++i) {
    const bool x8 = types[i] == T_Q4_K_X8;
    const int64_t block = x8 ? 256 : format_of(types[i]).block;
    QuantizedActs& qa = by_block[block == 32 ? 0 : 1];
    if (qa.block == 0) qa = quantize_acts(x, block, isa);
    if (!x8) {
      matmul_into(qa.view(), weights[i].data_ptr<uint8_t>(), types[i], rows[i], row_bytes[i], isa, y + col, N);
    } else if (M > 0) {
#if SG_X86
      const int64_t nb = K / 256;
      if (asum32.empty()) {
        asum32.resize(size_t(M * nb * 8));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t u = 0; u < nb * 8; ++u)
            asum32[m * nb * 8 + u] = int16_t(qa.bsums[m * (K / 16) + 2 * u] + qa.bsums[m * (K / 16) + 2 * u + 1]);
      }
      const Acts acts = qa.view();
      const uint8_t* W = weights[i].data_ptr<uint8_t>();
      // more than 8 tokens: claims as large as the kernel's L2 chunks (matmul_x8_avx2)
      const int64_t claim = (M > 8 ? 4 : 1) * kClaimBytes / (nb * kX8Record);
      parallel_rows(rows[i] / 8, 1, claim, [&](int64_t g0, int64_t g1) {
        matmul_x8_avx2(W, nb, acts, asum32.data(), g0, g1, y + col, N);
      });
#endif
    }
    col += rows[i];
  }
  if (b.defined() || r.defined()) {
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    const float* rp = r.defined() ? r.data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < M; ++m) {
      float* row = y + m * N;
      if (bp) for (int64_t n = 0; n < N; ++n) row[n] = row[n] + bp[n];
      if (rp) for (int64_t n = 0; n < N; ++n) row[n] = rp[m * N + n] + row[n];
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Linear layers on llama.cpp GGUF quantized blocks (Q8_0, Q5_0, Q4_K, Q6_K), scalar and AVX2";
  m.def("dequantize", &dequantize, "weight uint8 [N, row_bytes], ggml type, K -> float32 [N, K]");
  m.def("quantize_activations", &quantize_activations,
        "x float32 [M, K], block 32|256, isa -> (int8 q [M, K], float32 d [M, K/block], int16 bsums [M, K/16])");
  m.def("linear", &linear,
        "x float32 [M, K], weights [uint8 [n_i, row_bytes_i]], types, bias [N] or None, residual [M, N] or None, isa "
        "-> x W^T + bias + residual, float32 [M, N]");
  m.def("repack_q4k_x8", &repack_q4k_x8,
        "Q4_K weight uint8 [N, row_bytes] (N a multiple of 8), K -> the rows interleaved by 8 for the AVX2 kernel "
        "(ggml type 1012 in linear)");
  m.def("matmul", &matmul, "x float32 [M, K], weight uint8 [N, row_bytes], type, N, K, isa (0 scalar, 1 avx2) -> [M, N]");
  m.def("cpu_has_avx2", &cpu_has_avx2, "whether this CPU runs the AVX2 path (AVX2, FMA and F16C)");
}
