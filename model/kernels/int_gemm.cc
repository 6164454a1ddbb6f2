// Many rows of x times weights in a 32-value block format (Q8_0, Q4_0, Q4_1), as
// integers, on AVX-512 with VNNI.
//
// qmatmul.cc multiplies many rows (prefill, batched decode) as an f32 GEMM, bound by the
// FMA units: 16 multiply-adds an instruction. Here x is rounded to 16-bit integers per
// block of 32 values of each column (scale: the block's largest |x| / 32767, exactly as
// qmatmul.cc's few-row path rounds it), the weights are their blocks' integers, and one
// vpdpwssd does 32 multiply-adds into 16 int32 sums. A block's integer sums are then
// scaled once, by the weight block's d times x's block scale, into f32 accumulators;
// Q4_1's offset m meets the block's exact f32 sum of x, as in the few-row path.
//
// x [K, T] (feature-major, as the model holds activations) is packed per chunk of 32
// columns as [K / 2][32] int32 words, each the 16-bit integers of k = 2p and 2p + 1 of one
// column, so that a k pair of 16 columns is one load; the weights of a panel of kRows rows
// are expanded once to the same pairs. A panel times a chunk keeps kRows x 2 int32 sums
// and as many f32 accumulators in registers.

#include "int_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "int_blocks.h"
#include "workers.h"

namespace jaxchat {
namespace {

constexpr int kRows = 6;       // weight rows per panel
constexpr int kColumns = 32;   // columns of x per chunk: two vectors of 16

#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))
// GCC 12's AVX-512 headers pass undefined vectors as the unused merge operand of unmasked
// instructions, which -Wall reports as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The first `columns` of 16 lanes.
VNNI INLINE __mmask16 first(int64_t columns) {
  return columns >= 16 ? 0xffff : static_cast<__mmask16>((1u << std::max<int64_t>(columns, 0)) - 1);
}

// Chunk c of x's first U columns: the 16-bit integers of each block of 32 values of a
// column as k pairs [K / 2][32], the blocks' scales and exact sums [K / 32][32]; columns
// from U on are zero.
VNNI void quantize_chunk(const float* x, int64_t K, int64_t T, int64_t U, int64_t c,
                         int32_t* pairs, float* scale, float* sum) {
  const int64_t t0 = c * kColumns;
  const __m512 limit = _mm512_set1_ps(32767.0f);
  for (int v = 0; v < 2; ++v) {
    const __mmask16 valid = first(U - t0 - 16 * v);
    const float* xv = x + t0 + 16 * v;
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* xb = xv + 32 * b * T;
      __m512 top = _mm512_setzero_ps(), total = _mm512_setzero_ps();
      for (int i = 0; i < 32; ++i) {
        const __m512 value = _mm512_maskz_loadu_ps(valid, xb + i * T);
        top = _mm512_max_ps(top, _mm512_abs_ps(value));
        total = _mm512_add_ps(total, value);
      }
      const __mmask16 nonzero = _mm512_cmp_ps_mask(top, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __m512 inv = _mm512_maskz_div_ps(nonzero, limit, top);
      _mm512_storeu_ps(scale + b * kColumns + 16 * v, _mm512_div_ps(top, limit));
      _mm512_storeu_ps(sum + b * kColumns + 16 * v, total);
      for (int i = 0; i < 16; ++i) {
        const __m512 x0 = _mm512_maskz_loadu_ps(valid, xb + 2 * i * T);
        const __m512 x1 = _mm512_maskz_loadu_ps(valid, xb + (2 * i + 1) * T);
        const __m512i even = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
        const __m512i odd = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
        const __m512i pair = _mm512_or_si512(_mm512_and_si512(even, _mm512_set1_epi32(0xffff)),
                                             _mm512_slli_epi32(odd, 16));
        _mm512_storeu_si512(pairs + (16 * b + i) * kColumns + 16 * v, pair);
      }
    }
  }
}

// One weight row's blocks as k pairs of 16-bit integers [K / 2], with each block's d and
// Q4_1's m (zero for the others) [K / 32].
template <int64_t Kind>
VNNI void expand_row(const uint8_t* row, int64_t K, int32_t* pairs, float* d, float* m) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512i w = int_block512<Kind>(row + b * kIntBytes<Kind>, d + b, m + b);
    _mm512_storeu_si512(pairs + 16 * b, w);
  }
}

// A panel's kRows weight rows (pairs [kRows][K / 2], d and m [kRows][K / 32]) times one
// chunk of x (16 V columns), stored to y's rows [0, rows) and first `columns` columns.
template <int64_t Kind, int V>
VNNI INLINE void panel_chunk(const int32_t* w, const float* d, const float* m, int64_t K,
                             const int32_t* xq, const float* scale, const float* sum, float* y,
                             int64_t T, int rows, int64_t columns) {
  const int64_t half = K / 2, blocks = K / 32;
  __m512 acc[kRows][V];
  for (int j = 0; j < kRows; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dot[kRows][V];
    for (int j = 0; j < kRows; ++j)
      for (int v = 0; v < V; ++v) dot[j][v] = _mm512_setzero_si512();
    for (int p = 0; p < 16; ++p) {
      const int32_t* xp = xq + (16 * b + p) * kColumns;
      __m512i xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_si512(xp + 16 * v);
      for (int j = 0; j < kRows; ++j) {
        const __m512i wv = _mm512_set1_epi32(w[j * half + 16 * b + p]);
        for (int v = 0; v < V; ++v) dot[j][v] = _mm512_dpwssd_epi32(dot[j][v], xv[v], wv);
      }
    }
    __m512 s[V], total[V];
    for (int v = 0; v < V; ++v) {
      s[v] = _mm512_loadu_ps(scale + b * kColumns + 16 * v);
      if constexpr (Kind == kQ4_1) total[v] = _mm512_loadu_ps(sum + b * kColumns + 16 * v);
    }
    for (int j = 0; j < kRows; ++j) {
      const __m512 dj = _mm512_set1_ps(d[j * blocks + b]);
      for (int v = 0; v < V; ++v) {
        const __m512 scale_jv = _mm512_mul_ps(s[v], dj);
        acc[j][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j][v]), scale_jv, acc[j][v]);
        if constexpr (Kind == kQ4_1)
          acc[j][v] = _mm512_fmadd_ps(total[v], _mm512_set1_ps(m[j * blocks + b]), acc[j][v]);
      }
    }
  }
  for (int j = 0; j < rows; ++j)
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(y + j * T + 16 * v, first(columns - 16 * v), acc[j][v]);
}

// Panels [p0, p1) of W against every chunk of x's first U columns (as quantize_chunk
// packs them).
template <int64_t Kind>
VNNI void panels(const uint8_t* w, int64_t row_bytes, int64_t N, const int32_t* xq,
                 const float* scale, const float* sum, int64_t T, int64_t U, int64_t K, float* y,
                 int64_t p0, int64_t p1) {
  thread_local std::vector<int32_t> pairs;
  thread_local std::vector<float> dm;
  const int64_t half = K / 2, blocks = K / 32, chunks = (U + kColumns - 1) / kColumns;
  pairs.resize(kRows * half);
  dm.resize(2 * kRows * blocks);
  float *d = dm.data(), *m = d + kRows * blocks;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, N - n0));
    for (int j = 0; j < kRows; ++j) {
      if (j < rows) {
        expand_row<Kind>(w + (n0 + j) * row_bytes, K, pairs.data() + j * half, d + j * blocks,
                         m + j * blocks);
      } else {  // past N: zero weights, computed and not stored
        std::fill_n(pairs.data() + j * half, half, 0);
        std::fill_n(d + j * blocks, blocks, 0.0f);
        std::fill_n(m + j * blocks, blocks, 0.0f);
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t columns = std::min<int64_t>(kColumns, U - c * kColumns);
      const int32_t* xc = xq + c * half * kColumns;
      const float *sc = scale + c * blocks * kColumns, *su = sum + c * blocks * kColumns;
      float* yc = y + n0 * T + c * kColumns;
      if (columns > 16) {
        panel_chunk<Kind, 2>(pairs.data(), d, m, K, xc, sc, su, yc, T, rows, columns);
      } else {
        panel_chunk<Kind, 1>(pairs.data(), d, m, K, xc, sc, su, yc, T, rows, columns);
      }
    }
  }
}

}  // namespace

bool int_gemm_path(int64_t kind) {
  static const bool vnni =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("f16c");
  return vnni && (kind == kQ8_0 || kind == kQ4_0 || kind == kQ4_1);
}

void int_gemm(int64_t kind, const uint8_t* w, int64_t row_bytes, int64_t N, const float* x,
              int64_t T, int64_t U, int64_t K, float* y, int parts) {
  const int64_t chunks = (U + kColumns - 1) / kColumns, blocks = K / 32;
  thread_local std::vector<int32_t> packed;
  thread_local std::vector<float> scales;
  packed.resize(chunks * (K / 2) * kColumns);
  scales.resize(2 * chunks * blocks * kColumns);
  // (thread_locals: the workers see these through pointers, not by name)
  int32_t* xq = packed.data();
  float *scale = scales.data(), *sum = scale + chunks * blocks * kColumns;
  Workers::get().run(chunks, parts, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      quantize_chunk(x, K, T, U, c, xq + c * (K / 2) * kColumns, scale + c * blocks * kColumns,
                     sum + c * blocks * kColumns);
  });
  Workers::get().run((N + kRows - 1) / kRows, parts, [&](int64_t p0, int64_t p1) {
    switch (kind) {
      case kQ8_0: return panels<kQ8_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
      case kQ4_0: return panels<kQ4_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
      default: return panels<kQ4_1>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
    }
  });
}

}  // namespace jaxchat
