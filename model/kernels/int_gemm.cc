// Many rows of x times weights in a 32-value block format (Q8_0, Q4_0, Q4_1), as
// integers, on AVX-512 with VNNI or on AVX2 (see the AVX2 section below): every column,
// decode rows and prompt tokens alike.
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
// Q4_1's m (zero for the others) [K / 32]: what both GEMMs below read (on AVX2, a block's
// two vectors of 16 integers stored one after the other are its 16 pairs).
template <int64_t Kind>
__attribute__((target("avx2,fma,f16c"))) void expand_row(const uint8_t* row, int64_t K,
                                                         int32_t* pairs, float* d, float* m) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const IntBlock8 w = int_block8<Kind>(row + b * kIntBytes<Kind>);
    d[b] = w.d, m[b] = w.m;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + 16 * b), w.lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + 16 * b + 8), w.hi);
  }
}

// A panel of weight rows as expand_row gives them: pairs [R][K / 2], d and m [R][K / 32],
// in buffers of the thread's own; `rows` of the R are W's, the rest (past N) zeros,
// computed and not stored.
struct Panel {
  const int32_t* pairs;
  const float *d, *m;
  int rows;
};

template <int64_t Kind>
Panel expand_panel(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t n0, int R, int64_t K) {
  thread_local std::vector<int32_t> pairs;
  thread_local std::vector<float> dm;
  const int64_t half = K / 2, blocks = K / 32;
  pairs.resize(R * half);
  dm.resize(2 * R * blocks);
  float *d = dm.data(), *m = d + R * blocks;
  const int rows = static_cast<int>(std::min<int64_t>(R, N - n0));
  for (int j = 0; j < R; ++j) {
    if (j < rows) {
      expand_row<Kind>(w + (n0 + j) * row_bytes, K, pairs.data() + j * half, d + j * blocks,
                       m + j * blocks);
    } else {
      std::fill_n(pairs.data() + j * half, half, 0);
      std::fill_n(d + j * blocks, blocks, 0.0f);
      std::fill_n(m + j * blocks, blocks, 0.0f);
    }
  }
  return {pairs.data(), d, m, rows};
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
  const int64_t half = K / 2, blocks = K / 32, chunks = (U + kColumns - 1) / kColumns;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kRows;
    const Panel panel = expand_panel<Kind>(w, row_bytes, N, n0, kRows, K);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t columns = std::min<int64_t>(kColumns, U - c * kColumns);
      const int32_t* xc = xq + c * half * kColumns;
      const float *sc = scale + c * blocks * kColumns, *su = sum + c * blocks * kColumns;
      float* yc = y + n0 * T + c * kColumns;
      if (columns > 16) {
        panel_chunk<Kind, 2>(panel.pairs, panel.d, panel.m, K, xc, sc, su, yc, T, panel.rows,
                             columns);
      } else {
        panel_chunk<Kind, 1>(panel.pairs, panel.d, panel.m, K, xc, sc, su, yc, T, panel.rows,
                             columns);
      }
    }
  }
}


// ---- AVX2 (no VNNI) ---------------------------------------------------------------------
//
// The same arithmetic with vectors of 8: each k pair of 8 columns is one vpmaddwd (16
// multiply-adds into 8 int32 pair sums) and an add, where VNNI fuses the two. x is packed
// as above ([K / 2][32] words per chunk, the same scales and sums), a panel holds kRows2
// weight rows, and a chunk's 32 columns go by in two passes of 16, so that a pass's
// 4 x 2 integer sums, x's two vectors and the broadcast weight pair fit AVX2's 16
// registers. A block's sums are scaled into f32 accumulators exactly as the VNNI path
// scales them, so a column's product is the same to the bit on either CPU.
//
// On AVX2 this is no faster than qmatmul.cc's f32 panels: a 2-core AMD EPYC (Zen 3)
// issues one vpmaddwd a cycle (2.3 G/s against 5.5 G/s of FMAs), so 16 integer
// multiply-adds a cycle, as many as two FMAs of 8 (32 columns by a SmolLM2 FFN matrix:
// 0.93 against 0.85 ms; 512 columns: 14.5 against 13.9). Its point is that a column's
// product no longer depends on the step it is in: how a prompt was cut into chunks, or
// what shares a stream's step.

#define INT_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int kRows2 = 4;  // weight rows per panel

// 8 columns' values at p, of which the first `valid` are real (the rest read as zero).
INT_AVX2 INLINE __m256 load8(const float* p, int64_t valid, __m256i mask) {
  return valid == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
}

// Chunk c of x's first U columns, as quantize_chunk packs it.
INT_AVX2 void quantize_chunk8(const float* x, int64_t K, int64_t T, int64_t U, int64_t c,
                              int32_t* pairs, float* scale, float* sum) {
  const int64_t t0 = c * kColumns;
  const __m256 limit = _mm256_set1_ps(32767.0f), sign = _mm256_set1_ps(-0.0f);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < 4; ++v) {
    const int64_t valid = std::clamp<int64_t>(U - t0 - 8 * v, 0, 8);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lanes);
    const float* xv = x + t0 + 8 * v;
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* xb = xv + 32 * b * T;
      __m256 top = _mm256_setzero_ps(), total = _mm256_setzero_ps();
      for (int i = 0; i < 32; ++i) {
        const __m256 value = load8(xb + i * T, valid, mask);
        top = _mm256_max_ps(top, _mm256_andnot_ps(sign, value));
        total = _mm256_add_ps(total, value);
      }
      const __m256 nonzero = _mm256_cmp_ps(top, _mm256_setzero_ps(), _CMP_GT_OQ);
      const __m256 inv = _mm256_and_ps(nonzero, _mm256_div_ps(limit, top));
      _mm256_storeu_ps(scale + b * kColumns + 8 * v, _mm256_div_ps(top, limit));
      _mm256_storeu_ps(sum + b * kColumns + 8 * v, total);
      for (int i = 0; i < 16; ++i) {
        const __m256i even = _mm256_cvtps_epi32(_mm256_mul_ps(load8(xb + 2 * i * T, valid, mask), inv));
        const __m256i odd = _mm256_cvtps_epi32(_mm256_mul_ps(load8(xb + (2 * i + 1) * T, valid, mask), inv));
        const __m256i pair = _mm256_or_si256(
            _mm256_and_si256(even, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(odd, 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs + (16 * b + i) * kColumns + 8 * v),
                            pair);
      }
    }
  }
}

// A panel's kRows2 rows times 8 V columns of a chunk (xq and scale / sum at the pass's
// first column), stored to y's rows [0, rows) and first `columns` columns.
template <int64_t Kind, int V>
INT_AVX2 INLINE void panel_pass8(const int32_t* w, const float* d, const float* m, int64_t K,
                                 const int32_t* xq, const float* scale, const float* sum,
                                 float* y, int64_t T, int rows, int64_t columns) {
  const int64_t half = K / 2, blocks = K / 32;
  __m256 acc[kRows2][V];
  for (int j = 0; j < kRows2; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot[kRows2][V];
    for (int j = 0; j < kRows2; ++j)
      for (int v = 0; v < V; ++v) dot[j][v] = _mm256_setzero_si256();
    for (int p = 0; p < 16; ++p) {
      const int32_t* xp = xq + (16 * b + p) * kColumns;
      __m256i xv[V];
      for (int v = 0; v < V; ++v)
        xv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 8 * v));
      for (int j = 0; j < kRows2; ++j) {
        const __m256i wv = _mm256_set1_epi32(w[j * half + 16 * b + p]);
        for (int v = 0; v < V; ++v)
          dot[j][v] = _mm256_add_epi32(dot[j][v], _mm256_madd_epi16(xv[v], wv));
      }
    }
    for (int v = 0; v < V; ++v) {
      const __m256 s = _mm256_loadu_ps(scale + b * kColumns + 8 * v);
      const __m256 total = _mm256_loadu_ps(sum + b * kColumns + 8 * v);
      for (int j = 0; j < kRows2; ++j) {
        const __m256 scale_jv = _mm256_mul_ps(s, _mm256_set1_ps(d[j * blocks + b]));
        acc[j][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[j][v]), scale_jv, acc[j][v]);
        if constexpr (Kind == kQ4_1)
          acc[j][v] = _mm256_fmadd_ps(total, _mm256_set1_ps(m[j * blocks + b]), acc[j][v]);
      }
    }
  }
  alignas(32) float out[8];
  for (int j = 0; j < rows; ++j)
    for (int v = 0; v < V; ++v) {
      const int64_t n = std::min<int64_t>(8, columns - 8 * v);
      if (n == 8) {
        _mm256_storeu_ps(y + j * T + 8 * v, acc[j][v]);
      } else if (n > 0) {
        _mm256_store_ps(out, acc[j][v]);
        std::copy_n(out, n, y + j * T + 8 * v);
      }
    }
}

// Panels [p0, p1) of kRows2 rows of W against every chunk of x's first U columns.
template <int64_t Kind>
INT_AVX2 void panels8(const uint8_t* w, int64_t row_bytes, int64_t N, const int32_t* xq,
                      const float* scale, const float* sum, int64_t T, int64_t U, int64_t K,
                      float* y, int64_t p0, int64_t p1) {
  const int64_t half = K / 2, blocks = K / 32, chunks = (U + kColumns - 1) / kColumns;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kRows2;
    const Panel panel = expand_panel<Kind>(w, row_bytes, N, n0, kRows2, K);
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t* xc = xq + c * half * kColumns;
      const float *sc = scale + c * blocks * kColumns, *su = sum + c * blocks * kColumns;
      for (int64_t t0 = 0; t0 < std::min<int64_t>(kColumns, U - c * kColumns); t0 += 16) {
        const int64_t columns = std::min<int64_t>(16, U - c * kColumns - t0);
        float* yc = y + n0 * T + c * kColumns + t0;
        if (columns > 8) {
          panel_pass8<Kind, 2>(panel.pairs, panel.d, panel.m, K, xc + t0, sc + t0, su + t0, yc,
                               T, panel.rows, columns);
        } else {
          panel_pass8<Kind, 1>(panel.pairs, panel.d, panel.m, K, xc + t0, sc + t0, su + t0, yc,
                               T, panel.rows, columns);
        }
      }
    }
  }
}

bool vnni() {
  static const bool has =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("f16c");
  return has;
}

bool avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

}  // namespace

bool int_gemm_path(int64_t kind) {
  return avx2() && (kind == kQ8_0 || kind == kQ4_0 || kind == kQ4_1);  // (VNNI has AVX2)
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
  const bool wide = vnni();
  Workers::get().run(chunks, parts, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* pc = xq + c * (K / 2) * kColumns;
      float *sc = scale + c * blocks * kColumns, *su = sum + c * blocks * kColumns;
      if (wide) {
        quantize_chunk(x, K, T, U, c, pc, sc, su);
      } else {
        quantize_chunk8(x, K, T, U, c, pc, sc, su);
      }
    }
  });
  if (!wide) {
    Workers::get().run((N + kRows2 - 1) / kRows2, parts, [&](int64_t p0, int64_t p1) {
      switch (kind) {
        case kQ8_0: return panels8<kQ8_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
        case kQ4_0: return panels8<kQ4_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
        default: return panels8<kQ4_1>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
      }
    });
    return;
  }
  Workers::get().run((N + kRows - 1) / kRows, parts, [&](int64_t p0, int64_t p1) {
    switch (kind) {
      case kQ8_0: return panels<kQ8_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
      case kQ4_0: return panels<kQ4_0>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
      default: return panels<kQ4_1>(w, row_bytes, N, xq, scale, sum, T, U, K, y, p0, p1);
    }
  });
}

}  // namespace jaxchat
