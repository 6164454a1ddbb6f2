// Quantized matrix products for XLA:CPU, called from jitted code through jax.ffi.
//
//   y[N, T] = W[layer][N, K] @ x[K, T]
//
// computed for x's first `used` columns only (a step's real tokens; the rest of a step's
// fixed shape is padding), y's other columns zero. `used` may also say how many of those
// come first as decode rows (the rest are prompt tokens): [used, decode].
// W is read as shipped: each row is a run of blocks in one of GGUF's formats (Q8_0, Q4_0,
// Q4_1, Q4_K, Q6_K) or jaxchat's int8 rows (an f32 scale, then K int8 values). W holds the
// same matrix of every layer, [L, N, bytes], each layer in its own format (`kinds`; rows
// padded to the longest format's), and the product reads layer `layer` in place, so a
// step that scans the layers never copies a layer's weights out of the stack.
//
// For a few rows of x (decode), the weights are read block by block and multiplied with up
// to 8 rows at once, so they cross the memory bus once per 8 rows as 4-8 bits, not 32.
// For more rows (batched decode, prefill), a panel of weight rows is expanded once and
// multiplied as a small GEMM. Where the CPU has AVX2 (or AVX-512), every column of a
// 32-value format (Q8_0, Q4_0, Q4_1), decode row or prompt token, takes 16-bit integers: x
// rounded to 16 bits per block of 32, each block's exact integer product scaled once
// (int_gemm.cc past 8 columns, `canonical_rows` up to 8), each column's product the same
// to the bit on either path and in any step. The other formats, and every format without
// AVX2, take f32: expanded in registers for a few rows (`rows`), in panels for more
// (`panels`).
//
// The f32 arithmetic is written with GCC's vector extensions, its loops compiled for the
// CPU's level, or in a portable build for AVX-512, AVX2 and plain x86-64, one picked when
// the library loads (JAXCHAT_TARGETS, workers.h). The integer path uses AVX2 or AVX-512
// intrinsics where the CPU has them. Output rows are split among a small pool of threads
// (one per core).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "int_blocks.h"
#include "int_gemm.h"
#include "vec16.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// GGML's type ids, and ours for int8 rows.
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kInt8Row = 1024;
constexpr int kTile = 8;  // rows of x multiplied with one expanded block

typedef uint8_t u8x16 __attribute__((vector_size(16)));
#define AVX2 __attribute__((target("avx2,fma,f16c")))

INLINE float half_to_float(const uint8_t* p) {
  _Float16 h;  // one instruction where the target has F16C (the AVX2 and AVX-512 clones)
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// The f32 arithmetic runs on vectors Vec of 16 floats (AVX-512's registers) or, where the
// CPU lacks AVX-512, of 8 (AVX2's: GCC keeps a vector of 16 in memory there). The
// weights' bytes become floats through the helpers below, overloaded on the vector (an
// unused value of it). On vectors of 8 they take AVX2's intrinsics: GCC widens 8 bytes
// (or the high half of 16) to 8 int32 one lane at a time through general registers, so
// the vectors of 8 are only ever used in functions compiled for AVX2.
template <typename Vec>
constexpr int kLanes = sizeof(Vec) / sizeof(float);
template <typename Vec>
constexpr int kSplit = 16 / kLanes<Vec>;  // vectors per 16 values

template <typename Vec>
INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename Vec>
INLINE float sum_of(Vec v) {
  float s = 0;
  for (int i = 0; i < kLanes<Vec>; ++i) s += v[i];
  return s;
}

INLINE f32x16 widen(u8x16 q) { return __builtin_convertvector(__builtin_convertvector(q, i32x16), f32x16); }

INLINE u8x16 bytes16(const uint8_t* p) {
  u8x16 q;
  std::memcpy(&q, p, 16);
  return q;
}

// 16 signed bytes at p as floats (through the unsigned widening, which GCC vectorises:
// q + 128 is q ^ 0x80).
INLINE f32x16 signed_at(const uint8_t* p, f32x16) { return widen(bytes16(p) ^ 0x80) - 128.0f; }

// The low and high nibbles of 16 bytes at p as floats.
INLINE void nibbles_at(const uint8_t* p, f32x16, f32x16* low, f32x16* high) {
  const u8x16 q = bytes16(p);
  *low = widen(q & 15);
  *high = widen(q >> 4);
}

// Q6_K's values (0-63) from 16 bytes each of low bits `lo`, `hi` and high bits `high`:
// lo's low nibbles, hi's, lo's high nibbles, hi's, each with its 2 bits of `high`.
INLINE void six_bits_at(const uint8_t* lo, const uint8_t* hi, const uint8_t* high, f32x16,
                        f32x16* q) {
  const u8x16 l = bytes16(lo), h = bytes16(hi), top = bytes16(high);
  q[0] = widen((l & 15) | ((top & 3) << 4));
  q[1] = widen((h & 15) | (((top >> 2) & 3) << 4));
  q[2] = widen((l >> 4) | (((top >> 4) & 3) << 4));
  q[3] = widen((h >> 4) | (((top >> 6) & 3) << 4));
}

AVX2 INLINE i32x8 ints8(const uint8_t* p) {
  return reinterpret_cast<i32x8>(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

AVX2 INLINE f32x8 signed_at(const uint8_t* p, f32x8) {
  const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return __builtin_convertvector(reinterpret_cast<i32x8>(v), f32x8);
}

AVX2 INLINE void nibbles_at(const uint8_t* p, f32x8, f32x8* low, f32x8* high) {
  const i32x8 v = ints8(p);
  *low = __builtin_convertvector(v & 15, f32x8);
  *high = __builtin_convertvector(v >> 4, f32x8);
}

AVX2 INLINE void six_bits_at(const uint8_t* lo, const uint8_t* hi, const uint8_t* high, f32x8,
                             f32x8* q) {
  const i32x8 l = ints8(lo), h = ints8(hi), top = ints8(high);
  q[0] = __builtin_convertvector((l & 15) | ((top & 3) << 4), f32x8);
  q[1] = __builtin_convertvector((h & 15) | (((top >> 2) & 3) << 4), f32x8);
  q[2] = __builtin_convertvector((l >> 4) | (((top >> 4) & 3) << 4), f32x8);
  q[3] = __builtin_convertvector((h >> 4) | (((top >> 6) & 3) << 4), f32x8);
}

namespace by16 {  // for the target clones: vectors of 16
#include "formats.h"
}  // namespace by16

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace by8 {  // for AVX2: vectors of 8
#include "formats.h"
}  // namespace by8
#pragma GCC pop_options

// Weight rows [n0, n1) against columns [from, U) of x (`rows_of`).
AVX2 void rows8(int64_t kind, const uint8_t* w, int64_t row_bytes, const float* x, int64_t T,
                int64_t from, int64_t U, int64_t K, float* y, int64_t n0, int64_t n1) {
  by8::rows_of<f32x8>(kind, w, row_bytes, x, T, from, U, K, y, n0, n1);
}

// Whether the CPU has AVX2, FMA and F16C (the functions marked AVX2).
bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

JAXCHAT_TARGETS
void rows(int64_t kind, const uint8_t* w, int64_t row_bytes, const float* x, int64_t T,
          int64_t from, int64_t U, int64_t K, float* y, int64_t n0, int64_t n1) {
  if (!wide_vectors() && has_avx2()) return rows8(kind, w, row_bytes, x, T, from, U, K, y, n0, n1);
  by16::rows_of<f32x16>(kind, w, row_bytes, x, T, from, U, K, y, n0, n1);
}

// ---- Few rows, 32-value formats: integer products (AVX2) -------------------------------
//
// Expanding every weight to f32 leaves the few-row product bound by arithmetic (about 17 G
// weights/s on two cores, half of what the memory bus delivers). For the formats with
// blocks of 32 values (Q8_0, Q4_0, Q4_1), x is instead rounded to 16-bit integers per
// block of 32 (scale: the block's largest |x| / 32767, so each value moves by at most
// 1.5e-5 of that), and a block's product is one integer dot product (vpmaddwd) of the
// weights' integers with x's, scaled once. Q4_1's offset m adds m times the block's sum
// of x, taken in f32.

// x's rows [U, K] (K a multiple of 32) as 16-bit integers [U, K], with each block's scale
// and sum [U, K / 32]: the values int_gemm.cc's quantize_chunk gives a column of x.
AVX2 void quantize_x(const float* x, int64_t U, int64_t K, int16_t* q, float* scale,
                     float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < U * K / 32; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    float amax = 0, s = 0;
    for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
    for (int i = 0; i < 32; ++i) s += xb[i];  // in order, as int_gemm.cc sums a column's
    const __m256 inv = _mm256_set1_ps(amax > 0 ? 32767.0f / amax : 0.0f);
    for (int h = 0; h < 2; ++h) {  // 16 values: rounded to int32, packed with saturation
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h], inv));
      __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h + 1], inv));
      __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b + 16 * h), packed);
    }
    scale[b] = amax / 32767.0f;
    sum[b] = s;
  }
}

using jaxchat::kIntBytes;

// acc + a block's exact integer sums for 8 weight rows with one row of x (`dots`), times
// x's block scale times the rows' d, then Q4_1's m times x's block sum: per block, the
// arithmetic of int_gemm.cc, whose order every path that claims its results keeps.
template <int64_t Kind>
AVX2 INLINE __m256 add_block8(__m256 acc, __m256i dots, float scale, float sum, __m256 d,
                              __m256 m) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(_mm256_set1_ps(scale), d), acc);
  if constexpr (Kind == kQ4_1) acc = _mm256_fmadd_ps(_mm256_set1_ps(sum), m, acc);
  return acc;
}

// Where each of 8 lanes' weight row starts (byte offsets; past `rows`, the last row
// again: computed, not stored).
AVX2 INLINE __m256i lane_rows(int rows, int64_t row_bytes) {
  int32_t at[8];
  for (int j = 0; j < 8; ++j) at[j] = static_cast<int32_t>(std::min(j, rows - 1) * row_bytes);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
}

// The d (and Q4_1's m) of a block of 8 weight rows, `base` its first row's block: the 8
// rows' halves by one gather, converted at once.
AVX2 INLINE void rows_dm8(const uint8_t* base, __m256i rows, __m256* d, __m256* m) {
  // Each 128-bit lane's d halves (bytes 0-1 of each word) to its low 8 bytes, m's (2-3)
  // to its high 8.
  const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const __m256i halves = _mm256_permute4x64_epi64(
      _mm256_shuffle_epi8(_mm256_i32gather_epi32(reinterpret_cast<const int*>(base), rows, 1),
                          split),
      0xd8);
  *d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  *m = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

// 8 weight rows' integer sums with a row of x, one vector of 8 lanes each, added across
// into one vector (lane j: row j's): pairs of rows (each 128-bit lane: two sums of each),
// then fours (one sum of each of 4 rows per lane), then the two lanes added. Integers:
// exact in any order.
AVX2 INLINE __m256i across8(const __m256i* dot) {
  const __m256i h01 = _mm256_hadd_epi32(dot[0], dot[1]), h23 = _mm256_hadd_epi32(dot[2], dot[3]);
  const __m256i h45 = _mm256_hadd_epi32(dot[4], dot[5]), h67 = _mm256_hadd_epi32(dot[6], dot[7]);
  const __m256i g0 = _mm256_hadd_epi32(h01, h23), g1 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),
                          _mm256_permute2x128_si256(g0, g1, 0x31));
}

// Weight rows [0, rows) (up to 8, copied out in order) against TT rows of x
// (quantize_x's), into out [TT][8]: each product as int_gemm.cc computes it (see
// canonical_rows8 below, the AVX-512 version), on AVX2, for 5 to 8 rows of x. Each block
// of the 8 weight rows is expanded once (16 vectors), then each row of x's two vpmaddwd
// sums with each weight row are added across (across8).
template <int64_t Kind, int TT>
AVX2 INLINE void copied_rows8_avx2(const uint8_t* w, int64_t row_bytes, int rows,
                                   const int16_t* q, const float* scale, const float* sum,
                                   int64_t K, float* out) {
  const int64_t blocks = K / 32;
  __m256 acc[TT];
  for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i at = lane_rows(rows, row_bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* base = w + b * kIntBytes<Kind>;
    __m256 d, m;
    rows_dm8(base, at, &d, &m);
    __m256i expanded[16];  // (more than the registers hold beside the sums)
    for (int j = 0; j < 8; ++j) {
      const jaxchat::IntBlock8 block =
          jaxchat::int_block8<Kind>(base + std::min(j, rows - 1) * row_bytes);
      expanded[2 * j] = block.lo, expanded[2 * j + 1] = block.hi;
    }
    for (int t = 0; t < TT; ++t) {
      const __m256i* xq = reinterpret_cast<const __m256i*>(q + t * K + 32 * b);
      const __m256i lo = _mm256_loadu_si256(xq), hi = _mm256_loadu_si256(xq + 1);
      __m256i dot[8];
      for (int j = 0; j < 8; ++j)
        dot[j] = _mm256_add_epi32(_mm256_madd_epi16(expanded[2 * j], lo),
                                  _mm256_madd_epi16(expanded[2 * j + 1], hi));
      acc[t] = add_block8<Kind>(acc[t], across8(dot), scale[t * blocks + b], sum[t * blocks + b],
                                d, m);
    }
  }
  for (int t = 0; t < TT; ++t) _mm256_storeu_ps(out + t * 8, acc[t]);
}

// The same for up to 4 rows of x (decode rows, most often one), the weights read in place
// a row at a time: each row's blocks are expanded once and their integer sums with each
// row of x (a vector each) kept, a chunk of blocks at a time (8 KB); then each block's 8
// rows' sums are added across by the same tree and taken in order (exact integers: the
// same sums). Meanwhile the next 8 rows (`next`, `next_bytes`) are prefetched: the adds
// read no weights, and without it the loads of the next rows wait for them.
// Through a SmolLM2 step's products (30 layers) on a 2-core AVX2 EPYC, alternating in one
// process: one row of x in 0.85-0.96 of the copied path's time (in place without the
// prefetch, slower than the decode rows' former lanes in each of 3 rounds); 5 to 8 rows
// as fast or faster copied.
template <int64_t Kind, int TT>
AVX2 INLINE void canonical_rows8_avx2(const uint8_t* w, int64_t row_bytes, int rows,
                                      const int16_t* q, const float* scale, const float* sum,
                                      int64_t K, float* out, const uint8_t* next,
                                      int64_t next_bytes) {
  constexpr int64_t kChunk = 32 / TT;  // blocks per pass
  const int64_t blocks = K / 32;
  const int64_t lines = (next_bytes + 63) / 64, per = (lines + blocks - 1) / blocks;
  alignas(32) __m256i dots[kChunk][TT][8];
  __m256 acc[TT];
  for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i at = lane_rows(rows, row_bytes);
  for (int64_t c0 = 0; c0 < blocks; c0 += kChunk) {
    const int64_t c1 = std::min(blocks, c0 + kChunk);
    for (int j = 0; j < 8; ++j) {
      for (int64_t b = c0; b < c1; ++b) {
        if (j >= rows) {
          for (int t = 0; t < TT; ++t) dots[b - c0][t][j] = _mm256_setzero_si256();
          continue;
        }
        const jaxchat::IntBlock8 block =
            jaxchat::int_block8<Kind>(w + j * row_bytes + b * kIntBytes<Kind>);
        for (int t = 0; t < TT; ++t) {
          const __m256i* xq = reinterpret_cast<const __m256i*>(q + t * K + 32 * b);
          const __m256i lo = _mm256_loadu_si256(xq), hi = _mm256_loadu_si256(xq + 1);
          dots[b - c0][t][j] = _mm256_add_epi32(_mm256_madd_epi16(block.lo, lo),
                                                _mm256_madd_epi16(block.hi, hi));
        }
      }
    }
    for (int64_t b = c0; b < c1; ++b) {
      for (int64_t i = b * per; i < std::min(lines, (b + 1) * per); ++i)
        _mm_prefetch(reinterpret_cast<const char*>(next + 64 * i), _MM_HINT_T0);
      __m256 d, m;
      rows_dm8(w + b * kIntBytes<Kind>, at, &d, &m);
      for (int t = 0; t < TT; ++t)
        acc[t] = add_block8<Kind>(acc[t], across8(dots[b - c0][t]), scale[t * blocks + b],
                                  sum[t * blocks + b], d, m);
    }
  }
  for (int t = 0; t < TT; ++t) _mm256_storeu_ps(out + t * 8, acc[t]);
}

// ---- Many rows: a small GEMM ------------------------------------------------------------
//
// Past a few rows of x, expanding every block once per 8 rows costs more than the
// products. There a panel of kPanel weight rows is expanded to f32 once (kPanel x K floats,
// in L2), then multiplied with x 32 columns at a time: for each k, kPanel broadcast
// weights times two vectors of 16 columns, into 2 kPanel accumulators that stay in
// registers. x comes feature-major ([K, T], as the model holds activations) and is first
// packed in chunks of 32 columns, so the product reads it in order and aligned.

constexpr int kPanel = 12;   // weight rows expanded together
constexpr int kColumns = 32;  // columns of x per pass over a panel: two vectors

AVX2 void expand_row8(int64_t kind, const uint8_t* row, int64_t K, float* out) {
  by8::expand_row<f32x8>(kind, row, K, out);
}

// y[j, c] = sum_k panel[j, k] x[k, c] for R rows j of a panel (row stride K) and V vectors
// of columns c of x (row stride ldx); results to y (row stride ldy), the first `columns`
// of each row. The R x V accumulators stay in registers: with AVX-512, 12 x 2 vectors of
// 16 in 24 of its 32; elsewhere 6 x 2 vectors of 8 in 12 of AVX2's 16. (GCC keeps a
// vector wider than the target's registers in memory, moving it through general
// registers at every operation: 12 x 2 of 16 on AVX2 ran at 3 GFLOP/s.)
template <typename Vec, int R, int V>
INLINE void panel_product(const float* panel, int64_t K, const float* x, int64_t ldx, float* y,
                          int64_t ldy, int64_t columns) {
  constexpr int L = kLanes<Vec>;
  Vec acc[R][V] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec xv[V];
    for (int v = 0; v < V; ++v) std::memcpy(&xv[v], x + k * ldx + L * v, sizeof(Vec));
    for (int j = 0; j < R; ++j) {
      float w = panel[j * K + k];
      for (int v = 0; v < V; ++v) acc[j][v] += w * xv[v];
    }
  }
  for (int j = 0; j < R; ++j)
    std::memcpy(y + j * ldy, acc[j], sizeof(float) * std::min<int64_t>(columns, L * V));
}

// The panel's kPanel rows times `columns` (up to kColumns) columns of x: with AVX-512 in
// one pass of 12 rows by 32 columns, elsewhere in passes of 6 rows by 16.
INLINE void panel_products(const float* panel, int64_t K, const float* x, float* y,
                           int64_t ldy, int64_t columns) {
  if (wide_vectors()) {
    if (columns > 16)
      return panel_product<f32x16, kPanel, 2>(panel, K, x, kColumns, y, ldy, columns);
    return panel_product<f32x16, kPanel, 1>(panel, K, x, kColumns, y, ldy, columns);
  }
  constexpr int R = kPanel / 2;
  for (int64_t c = 0; c < columns; c += 16)
    for (int j = 0; j < kPanel; j += R)
      panel_product<f32x8, R, 2>(panel + j * K, K, x + c, kColumns, y + j * ldy + c, ldy,
                                 std::min<int64_t>(16, columns - c));
}

// Panels [p0, p1) of W against columns [D, U) of x, packed as [(U - D) / 32 chunks][K][32]
// (the last chunk padded with zeros), into y [N, T], its columns from U on zero. Rows past
// N (the last panel) are computed from zeros and not stored.
JAXCHAT_TARGETS
void panels(int64_t kind, const uint8_t* w, int64_t row_bytes, int64_t N, const float* packed,
            int64_t T, int64_t D, int64_t U, int64_t K, float* y, int64_t p0, int64_t p1) {
  thread_local std::vector<float> panel, out;
  panel.resize(kPanel * K);
  out.resize(kPanel * kColumns);
  for (int64_t p = p0; p < p1; ++p) {
    int64_t n0 = p * kPanel, rows_here = std::min<int64_t>(kPanel, N - n0);
    for (int64_t j = 0; j < kPanel; ++j) {
      if (j < rows_here && !wide_vectors() && has_avx2()) {
        expand_row8(kind, w + (n0 + j) * row_bytes, K, panel.data() + j * K);
      } else if (j < rows_here) {
        by16::expand_row<f32x16>(kind, w + (n0 + j) * row_bytes, K, panel.data() + j * K);
      } else {
        std::fill_n(panel.data() + j * K, K, 0.0f);
      }
    }
    for (int64_t j = 0; j < rows_here; ++j)
      std::fill(y + (n0 + j) * T + U, y + (n0 + j + 1) * T, 0.0f);
    // Whole panels store straight into y; the last one through `out`.
    bool whole = rows_here == kPanel;
    for (int64_t t0 = D; t0 < U; t0 += kColumns) {
      const float* xs = packed + (t0 - D) * K;
      int64_t columns = std::min<int64_t>(kColumns, U - t0);
      float* ys = whole ? y + n0 * T + t0 : out.data();
      int64_t ldy = whole ? T : kColumns;
      panel_products(panel.data(), K, xs, ys, ldy, columns);
      if (!whole)
        for (int64_t j = 0; j < rows_here; ++j)
          std::memcpy(y + (n0 + j) * T + t0, out.data() + j * kColumns, sizeof(float) * columns);
    }
  }
}

// Chunks [c0, c1) of x [K, T]'s columns [D, U) packed as `panels` reads them: 32 columns
// of every k in a row of 128 bytes, so the product streams them in order, whatever T's
// alignment.
void pack(const float* x, int64_t K, int64_t T, int64_t D, int64_t U, float* packed,
          int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    int64_t t0 = D + c * kColumns, columns = std::min<int64_t>(kColumns, U - t0);
    float* to = packed + c * kColumns * K;
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(to + k * kColumns, x + k * T + t0, sizeof(float) * columns);
      std::fill(to + k * kColumns + columns, to + (k + 1) * kColumns, 0.0f);
    }
  }
}

// ---- Few rows, 32-value formats, AVX-512 ------------------------------------------------

#define AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
// GCC 12's AVX-512 headers pass undefined vectors as the unused merge operand of unmasked
// instructions, which -Wall reports as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Whether few-row products of this format take the AVX-512 integer path.
bool wide_integer_path(int64_t kind) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  return avx512 && jaxchat::int_gemm_path(kind);
}

constexpr int kInt512Rows = 8;  // weight rows per pass: the lanes of an accumulator

// Weight rows [n, n + rows) (up to 8) against TT rows of x (quantize_x's: q [TT, K], scale
// and sum [TT, K / 32]), into out [TT][8]: each product as int_gemm.cc computes it, per
// block the exact integer dot product times d times x's block scale, then Q4_1's m times
// x's block sum, added in block order, so a row of x's product is the same to the bit
// whichever rows share its step, and whether this path or int_gemm.cc takes it. The 8
// weight rows are the lanes: their block's dot products with a row of x are summed across
// into one vector (integers: in any order, exactly).
template <int64_t Kind, int TT>
AVX512 INLINE void canonical_rows8(const uint8_t* w, int64_t row_bytes, int rows, const int16_t* q,
                           const float* scale, const float* sum, int64_t K, float* out) {
  const int64_t blocks = K / 32;
  __m256 acc[TT];
  for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
  int32_t at[kInt512Rows];  // each lane's row (past `rows`, the last again: not stored)
  for (int j = 0; j < kInt512Rows; ++j)
    at[j] = static_cast<int32_t>(std::min(j, rows - 1) * row_bytes);
  const __m256i offsets = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* base = w + b * kIntBytes<Kind>;
    __m512i values[kInt512Rows];
    float unused;  // (each row's d and m: the lanes' come below, at once)
    for (int j = 0; j < kInt512Rows; ++j)
      values[j] = jaxchat::int_block512<Kind>(base + at[j], &unused, &unused);
    // The 8 rows' d (and Q4_1's m: the next half), as halves, converted at once.
    const __m256i halves = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), offsets, 1);
    const __m256 d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(halves));
    const __m256 m = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(halves, 16)));
    for (int t = 0; t < TT; ++t) {
      const __m512i x = _mm512_loadu_si512(q + t * K + 32 * b);
      __m512i dot[kInt512Rows];
      for (int j = 0; j < kInt512Rows; ++j) dot[j] = _mm512_madd_epi16(values[j], x);
      // Pairs of rows interleaved (each 128-bit lane: two sums of each row), then fours
      // (each lane: one sum of each of 4 rows), then the lanes added up across.
      __m512i pairs[kInt512Rows / 2], fours[2];
      for (int j = 0; j < kInt512Rows / 2; ++j)
        pairs[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[2 * j], dot[2 * j + 1]),
                                    _mm512_unpackhi_epi32(dot[2 * j], dot[2 * j + 1]));
      for (int j = 0; j < 2; ++j)
        fours[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * j], pairs[2 * j + 1]),
                                    _mm512_unpackhi_epi64(pairs[2 * j], pairs[2 * j + 1]));
      const __m512i halves8 = _mm512_add_epi32(_mm512_shuffle_i32x4(fours[0], fours[1], 0x88),
                                               _mm512_shuffle_i32x4(fours[0], fours[1], 0xdd));
      const __m256i low = _mm512_castsi512_si256(halves8);
      const __m256i high = _mm512_extracti64x4_epi64(halves8, 1);
      const __m256i dots = _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20),
                                            _mm256_permute2x128_si256(low, high, 0x31));
      acc[t] = add_block8<Kind>(acc[t], dots, scale[t * blocks + b], sum[t * blocks + b], d, m);
    }
  }
  for (int t = 0; t < TT; ++t) _mm256_storeu_ps(out + t * kInt512Rows, acc[t]);
}

// U (up to 8) rows of x against 8 weight rows: canonical_rows8 on AVX-512, for each
// number of rows.
template <int64_t Kind>
AVX512 void canonical8_wide(int64_t U, const uint8_t* w, int64_t row_bytes, int rows,
                            const int16_t* q, const float* scale, const float* sum, int64_t K,
                            float* out) {
  switch (U) {
#define JAXCHAT_ROWS(TT) canonical_rows8<Kind, TT>(w, row_bytes, rows, q, scale, sum, K, out)
    case 1: return JAXCHAT_ROWS(1);
    case 2: return JAXCHAT_ROWS(2);
    case 3: return JAXCHAT_ROWS(3);
    case 4: return JAXCHAT_ROWS(4);
    case 5: return JAXCHAT_ROWS(5);
    case 6: return JAXCHAT_ROWS(6);
    case 7: return JAXCHAT_ROWS(7);
    default: return JAXCHAT_ROWS(8);
#undef JAXCHAT_ROWS
  }
}

// The same on AVX2: up to kInPlace rows of x read the weights in place (the next 8 weight
// rows prefetched), more from a copy.
constexpr int kInPlace = 4;
template <int64_t Kind, int TT = 1>
AVX2 void canonical8_avx2(int64_t U, const uint8_t* w, int64_t row_bytes, int rows,
                          const int16_t* q, const float* scale, const float* sum, int64_t K,
                          float* out, const uint8_t* next, int64_t next_bytes) {
  if constexpr (TT < 8) {
    if (U > TT)
      return canonical8_avx2<Kind, TT + 1>(U, w, row_bytes, rows, q, scale, sum, K, out, next,
                                           next_bytes);
  }
  if constexpr (TT <= kInPlace) {
    canonical_rows8_avx2<Kind, TT>(w, row_bytes, rows, q, scale, sum, K, out, next, next_bytes);
  } else {
    copied_rows8_avx2<Kind, TT>(w, row_bytes, rows, q, scale, sum, K, out);
  }
}

// Weight rows [n0, n1) against U rows of x (up to 8; quantize_x's), into y's columns
// [from, from + U) (y [N, T]); columns from from + U on zero.
template <int64_t Kind>
void canonical_rows_of(const uint8_t* w, int64_t row_bytes, const int16_t* q, const float* scale,
                       const float* sum, int64_t T, int64_t from, int64_t U, int64_t K, float* y,
                       int64_t n0, int64_t n1, bool wide) {
  alignas(32) float out[8 * kInt512Rows];
  // The 8 rows are copied out first, in order (on AVX2 for more than kInPlace rows of x):
  // read in place, 8 rows' blocks side by side, they streamed from memory at half the
  // speed (a 30 MB head times one row of x: 1.8 ms in place, 1.1 copied; reading a row at
  // a time, 0.8).
  thread_local std::vector<uint8_t> copy;
  copy.resize(kInt512Rows * row_bytes);
  for (int64_t n = n0; n < n1; n += kInt512Rows) {
    const int rows = static_cast<int>(std::min<int64_t>(kInt512Rows, n1 - n));
    if (wide) {
      std::memcpy(copy.data(), w + n * row_bytes, rows * row_bytes);
      canonical8_wide<Kind>(U, copy.data(), row_bytes, rows, q, scale, sum, K, out);
    } else {
      const uint8_t* wn = w + n * row_bytes;
      if (U > kInPlace) {
        std::memcpy(copy.data(), wn, rows * row_bytes);
        wn = copy.data();
      }
      const int64_t ahead = std::clamp<int64_t>(n1 - n - kInt512Rows, 0, kInt512Rows);
      const uint8_t* next = ahead > 0 ? w + (n + kInt512Rows) * row_bytes : nullptr;
      canonical8_avx2<Kind>(U, wn, row_bytes, rows, q, scale, sum, K, out, next,
                            ahead * row_bytes);
    }
    for (int j = 0; j < rows; ++j) {
      float* yn = y + (n + j) * T;
      for (int64_t t = 0; t < U; ++t) yn[from + t] = out[t * kInt512Rows + j];
      std::fill(yn + from + U, yn + T, 0.0f);
    }
  }
}

// Weight rows [n0, n1) against U rows of x as int_gemm.cc computes each column, on AVX-512
// (`wide`) or AVX2.
void canonical_rows(int64_t kind, const uint8_t* w, int64_t row_bytes, const int16_t* q,
                    const float* scale, const float* sum, int64_t T, int64_t from, int64_t U,
                    int64_t K, float* y, int64_t n0, int64_t n1, bool wide) {
  switch (kind) {
#define JAXCHAT_ROWS(KIND) \
  canonical_rows_of<KIND>(w, row_bytes, q, scale, sum, T, from, U, K, y, n0, n1, wide)
    case kQ8_0: return JAXCHAT_ROWS(kQ8_0);
    case kQ4_0: return JAXCHAT_ROWS(kQ4_0);
    default: return JAXCHAT_ROWS(kQ4_1);
#undef JAXCHAT_ROWS
  }
}

// Bytes of one weight row of K values, or -1 if the format cannot hold K values.
int64_t row_bytes_of(int64_t kind, int64_t K) {
  auto blocks = [K](int values, int bytes) -> int64_t { return K % values ? -1 : K / values * bytes; };
  switch (kind) {
    case kQ8_0: return blocks(by16::Q8_0::kValues, by16::Q8_0::kBytes);
    case kQ4_0: return blocks(by16::Q4_0::kValues, by16::Q4_0::kBytes);
    case kQ4_1: return blocks(by16::Q4_1::kValues, by16::Q4_1::kBytes);
    case kQ4_K: return blocks(by16::Q4_K::kValues, by16::Q4_K::kBytes);
    case kQ6_K: return blocks(by16::Q6_K::kValues, by16::Q6_K::kBytes);
    case kInt8Row: return 4 + K;
    default: return -1;
  }
}

// Up to this many rows of x, each block is expanded in registers once per 8 rows
// (`rows`); past it, once per product (`panels`).
constexpr int64_t kFewRows = 8;

// The few-row products of columns [from, U) of x (x [K, T], feature-major; up to 8), each
// weight row expanded once for all of them: where the CPU has the integer path for `kind`,
// each column as int_gemm.cc computes it (canonical_rows), else in f32 (`rows`); y's
// columns from U on zero.
void few_rows(int64_t kind, const uint8_t* wp, int64_t row_bytes, int64_t N, const float* xp,
              int64_t T, int64_t from, int64_t U, int64_t K, float* yp, int parts) {
  thread_local std::vector<float> staged;  // those columns of x as rows [U - from, K]
  if (T > 1) {  // the few-row path reads each row of x whole
    staged.resize((U - from) * K);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = from; t < U; ++t) staged[(t - from) * K + k] = xp[k * T + t];
    xp = staged.data();
  }
  if (!jaxchat::int_gemm_path(kind)) {
    jaxchat::Workers::get().run(N, parts, [&](int64_t n0, int64_t n1) {
      rows(kind, wp, row_bytes, xp, T, from, U, K, yp, n0, n1);
    });
    return;
  }
  const bool wide = wide_integer_path(kind);
  const int64_t R = U - from, blocks = K / 32;  // rows of x here (up to 8)
  thread_local std::vector<int16_t> q;
  thread_local std::vector<float> scales;
  q.resize(R * K);
  scales.resize(2 * R * blocks);
  // (thread_locals: the workers see these through pointers, not by name)
  int16_t* qp = q.data();
  float *scale = scales.data(), *sum = scale + R * blocks;
  quantize_x(xp, R, K, qp, scale, sum);
  jaxchat::Workers::get().run(N, parts, [&](int64_t n0, int64_t n1) {
    canonical_rows(kind, wp, row_bytes, qp, scale, sum, T, from, R, K, yp, n0, n1, wide);
  });
}

// silu(g) * u for n values (silu(g) = g sigmoid(g); sigmoid(g) is 1 / (1 + e) for g >= 0,
// e / (1 + e) below, with e = e^-|g|, at most 1), a vector Vec of them at a time (each
// lane's arithmetic the same whatever the vectors). Vectors of 16 where the CPU has
// AVX-512, else of 8: GCC keeps a vector of 16 in memory there (a 1,536 x 32 product took
// 0.58 ms on a 2-core AVX2 EPYC).
template <typename Vec, typename Int>
INLINE void swiglu_lanes(const float* gate, const float* up, float* out, int64_t n) {
  constexpr int L = kLanes<Vec>;
  for (int64_t t = 0; t < n; t += L) {
    const bool whole = n - t >= L;  // else the last values, fewer than L
    const size_t bytes = sizeof(float) * (whole ? L : n - t);
    Vec g{}, u{};
    if (whole) {
      g = load<Vec>(gate + t), u = load<Vec>(up + t);
    } else {
      std::memcpy(&g, gate + t, bytes);
      std::memcpy(&u, up + t, bytes);
    }
    const Vec e = exp_of<Vec, Int>(g < 0 ? g : -g);
    const Vec h = g * ((g < 0 ? e : Vec{} + 1.0f) / (1.0f + e)) * u;
    if (whole) {
      std::memcpy(out + t, &h, sizeof h);
    } else {
      std::memcpy(out + t, &h, bytes);
    }
  }
}

INLINE void swiglu_run(const float* gate, const float* up, float* out, int64_t n) {
  if (wide_vectors()) return swiglu_lanes<f32x16, i32x16>(gate, up, out, n);
  swiglu_lanes<f32x8, i32x8>(gate, up, out, n);
}

// SwiGLU's product silu(gate) * up for rows [k0, k1) of the gate and columns [0, V) of
// x = [gate; up] ([2K, T], feature-major), into out [K, T]: where V is T, the rows' values
// are one run (a decode step's few columns take whole vectors too); else V is a multiple
// of 16 (`swiglu`).
JAXCHAT_TARGETS
void swiglu_rows(const float* x, int64_t K, int64_t T, int64_t V, float* out, int64_t k0,
                 int64_t k1) {
  if (V == T) return swiglu_run(x + k0 * T, x + (K + k0) * T, out + k0 * T, (k1 - k0) * T);
  for (int64_t k = k0; k < k1; ++k) swiglu_run(x + k * T, x + (K + k) * T, out + k * T, V);
}

// Floats of a buffer a thread keeps for its next call (a step's: a few MB); a larger one
// (a long forward pass's) is the caller's, freed when the call returns.
constexpr int64_t kKeep = int64_t{1} << 22;

// x = [gate; up] [2K, T] as SwiGLU's product [K, T], its first U columns (in a buffer the
// thread keeps, or in `once` past kKeep floats): the down projection's input made here,
// for the real tokens only, rather than by XLA for every column of the step. Columns are
// taken in whole vectors of 16 (past U they are padding, which no product reads).
const float* swiglu(const float* x, int64_t K, int64_t T, int64_t U, int parts,
                    std::vector<float>& once) {
  thread_local std::vector<float> kept;
  std::vector<float>& product = K * T <= kKeep ? kept : once;
  product.resize(K * T);
  float* out = product.data();
  const int64_t V = std::min(T, (U + 15) / 16 * 16);
  if (K * V < 16384) parts = 1;
  jaxchat::Workers::get().run(K, parts, [&](int64_t k0, int64_t k1) {
    swiglu_rows(x, K, T, V, out, k0, k1);
  });
  return out;
}

// y's columns [D, U) = W x's in f32 panels, its columns from U on zero.
void f32_panels(int64_t kind, const uint8_t* wp, int64_t row_bytes, int64_t N, const float* xp,
                int64_t T, int64_t D, int64_t U, int64_t K, float* yp, int parts) {
  thread_local std::vector<float> staged;  // x's columns packed for the panels
  int64_t chunks = (U - D + kColumns - 1) / kColumns;
  staged.resize(chunks * kColumns * K);
  float* packed = staged.data();  // (a thread_local: each worker has its own `staged`)
  jaxchat::Workers::get().run(chunks, parts, [&](int64_t c0, int64_t c1) {
    pack(xp, K, T, D, U, packed, c0, c1);
  });
  jaxchat::Workers::get().run((N + kPanel - 1) / kPanel, parts, [&](int64_t p0, int64_t p1) {
    panels(kind, wp, row_bytes, N, packed, T, D, U, K, yp, p0, p1);
  });
}

// y [N, T] = W x for x's first U columns (the first `decode` of them decode rows), zero
// past them.
void product(int64_t kind, const uint8_t* wp, int64_t row_bytes, int64_t N, const float* xp,
             int64_t T, int64_t U, int64_t decode, int64_t K, float* yp, int parts) {
  // Where the CPU has the integer paths (AVX2, or AVX-512 VNNI) every column of a 32-value
  // format takes them alike, decode rows and prompt tokens in one pass over the weights: a
  // column's product is then the same to the bit in any step (a prompt's keys and values
  // do not depend on how it was cut into chunks, nor a stream's tokens on what shares its
  // step), and a step that carries both reads and expands each weight block once. The
  // few-row path takes up to 8 columns, the GEMM more. On a 2-core AVX2 EPYC, through a
  // SmolLM2 step's products (30 layers), medians of 4 rounds alternating with the earlier
  // AVX2 paths (the decode rows in lanes of their own, the prompt tokens in a second pass):
  // one decode row 8.1-10.6 ms against 9.0-13.7, 8 decode rows and 4 prompt tokens
  // 32.2-46.9 against 41.8-52.5.
  if (jaxchat::int_gemm_path(kind)) {
    if (U > kFewRows) {
      jaxchat::int_gemm(kind, wp, row_bytes, N, xp, T, U, K, yp, parts);
    } else if (U > 0) {
      few_rows(kind, wp, row_bytes, N, xp, T, 0, U, K, yp, parts);  // (zeroes the rest)
      return;
    }
    for (int64_t n = 0; n < N; ++n) std::fill(yp + n * T + U, yp + (n + 1) * T, 0.0f);
    return;
  }
  // Elsewhere (no AVX2, or a format without blocks of 32: Q4_K, Q6_K, int8 rows) in f32.
  if (T <= kFewRows) {
    few_rows(kind, wp, row_bytes, N, xp, T, 0, U, K, yp, parts);
    return;
  }
  // The decode rows first. Up to 8 take the few-row path, as a decode-only step's rows do,
  // so that a decode row's product is the same whether or not prompt tokens share its step.
  int64_t D = 0;
  if (decode > 0 && decode <= kFewRows) {
    few_rows(kind, wp, row_bytes, N, xp, T, 0, decode, K, yp, parts);
    D = decode;
  }
  if (D == U) {
    for (int64_t n = 0; n < N; ++n) std::fill(yp + n * T + U, yp + (n + 1) * T, 0.0f);
    return;
  }
  if (U - D <= kFewRows) {
    // A few prompt tokens (a paced chunk beside decode rows) on the few-row path, where a
    // panel would spend a vector of 16 products on each weight for them. 8 decode rows and
    // 4 prompt tokens through a SmolLM2 layer's four products: 0.9 instead of 1.4 ms.
    few_rows(kind, wp, row_bytes, N, xp, T, D, U, K, yp, parts);
    return;
  }
  f32_panels(kind, wp, row_bytes, N, xp, T, D, U, K, yp, parts);
}

// y [T, N] = the first U columns of src [N, T] as rows, the rest zero: the head's logits
// as sampling reads them (a row of the vocabulary per token), where XLA's transpose read
// the product's [N, T] with a stride, twice (9 of a 32-row step's 67 ms).
void rows_of(const float* src, int64_t N, int64_t T, int64_t U, float* y, int parts) {
  constexpr int64_t kBlock = 64;  // outputs per pass: their T columns stay in L1
  jaxchat::Workers::get().run((N + kBlock - 1) / kBlock, parts, [&](int64_t b0, int64_t b1) {
    for (int64_t n0 = b0 * kBlock; n0 < std::min(N, b1 * kBlock); n0 += kBlock) {
      const int64_t n1 = std::min(N, n0 + kBlock);
      for (int64_t t = 0; t < U; ++t)
        for (int64_t n = n0; n < n1; ++n) y[t * N + n] = src[n * T + t];
    }
  });
  std::fill(y + U * N, y + T * N, 0.0f);
}

ffi::Error QMatmulImpl(ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::S32> kinds,
                       ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> used,
                       ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t threads,
                       int64_t glu, int64_t rows) {
  auto wd = w.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (wd.size() != 3 || kinds.element_count() != static_cast<size_t>(wd[0]) ||
      layer.element_count() != 1 || used.element_count() < 1 || used.element_count() > 2 ||
      xd.size() != 2 ||
      yd.size() != 2)
    return ffi::Error::InvalidArgument(
        "qmatmul: W [L, N, bytes], kinds [L], layer [], used [] or [2], x [K, T] and y [N, T]");
  int64_t L = wd[0], N = wd[1], stride = wd[2], K = xd[0], T = xd[1];
  if (glu) {  // x is [gate; up], [2K, T]
    if (K % 2) return ffi::Error::InvalidArgument("qmatmul: glu's x is not [2K, T]");
    K /= 2;
  }
  for (int64_t i = 0; i < L; ++i) {
    int64_t kind = kinds.typed_data()[i], bytes = row_bytes_of(kind, K);
    if (bytes < 0 || bytes > stride)
      return ffi::Error::InvalidArgument("qmatmul: format " + std::to_string(kind) +
                                         " cannot hold " + std::to_string(K) +
                                         " values in rows of " + std::to_string(stride) + " bytes");
  }
  if (rows ? yd[0] != T || yd[1] != N : yd[0] != N || yd[1] != T)
    return ffi::Error::InvalidArgument(rows ? "qmatmul: y is not [T, N] (rows)"
                                            : "qmatmul: y is not [N, T]");
  int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("qmatmul: layer out of range");
  int64_t kind = kinds.typed_data()[l], row_bytes = stride;  // rows may be padded
  const uint8_t* wp = w.typed_data() + l * N * stride;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // Only the first U columns of x are real (the rest padding): their products alone.
  int64_t U = std::clamp<int64_t>(used.typed_data()[0], 0, T);
  // x's first `decode` columns are decode rows (the rest prompt tokens).
  int64_t decode = 0;
  if (used.element_count() > 1) decode = std::clamp<int64_t>(used.typed_data()[1], 0, U);
  int parts = threads > 0 ? static_cast<int>(threads) : jaxchat::Workers::get().size();
  std::vector<float> once, large;  // buffers too large to keep: freed on return
  if (glu) xp = swiglu(xp, K, T, U, parts, once);
  // Below about 64k weights a product is faster than waking another thread.
  const int inner = N * K < 65536 ? 1 : parts;
  if (!rows) {
    product(kind, wp, row_bytes, N, xp, T, U, decode, K, yp, inner);
    return ffi::Error::Success();
  }
  thread_local std::vector<float> kept;  // y as [T, N]: the product goes here first
  std::vector<float>& buffer = N * T <= kKeep ? kept : large;
  buffer.resize(N * T);
  product(kind, wp, row_bytes, N, xp, T, U, decode, K, buffer.data(), inner);
  rows_of(buffer.data(), N, T, U, yp, parts);
  return ffi::Error::Success();
}
}  // namespace

// Whether the f32 loops take vectors of 16 (else of 8), and the same set from now on.
extern "C" int JaxchatWideVectors() { return wide_vectors(); }
extern "C" void JaxchatSetWideVectors(int wide) { wide_vectors_now = wide != 0; }

// Whether every column of a product, decode row or prompt token, takes int_gemm.cc's
// integer arithmetic (few rows or many), each the same to the bit in any step.
extern "C" int JaxchatIntGemm(int64_t kind) { return jaxchat::int_gemm_path(kind); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("glu")
                                  .Attr<int64_t>("rows"));
