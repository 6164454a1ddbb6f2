// Decode attention over the paged KV pool, for XLA:CPU through jax.ffi.
//
//   out[r, k, g] = softmax(q[r, k, g] · keys / sqrt(H)) @ values
//
// over positions 0..context[r] of row r, read block by block through its block table
// (model/nn/attention.py lays out the pool: k [L·NB, K, H, BS], v [L·NB, K, BS, H]).
// XLA gathers each chunk's blocks into a new array before its two products; for the
// one to eight rows of a decode step that copy and the loop around it cost more than
// the arithmetic. Here each (row, kv head, query head) reads its blocks in place, in
// chunks of about kChunk positions: the scores 16 positions at a time, four runs of them
// together (positions are minor in a key block), then the chunk's softmax, then the values
// (features minor); the chunks' states are merged in order. Rows with context -1 are
// idle: output 0.
//
// Prompt attention (PromptAttentionImpl) is the prefill region's: each segment's queries
// over the positions its sequence already has in the pool (a later chunk of a long prompt,
// a cached prefix: its prior group's, read through the group's block table) and then the
// segment's own keys up to their position, in tiles of up to 8 queries of one kv head (a
// run of the segment's positions, each with its query heads), each key and value vector
// loaded once per tile, no work for other segments' keys or past the diagonal's tile.
// Where a kv head's tiles are few, each span's pool blocks are first read in address order.
//
// A query's softmax runs online over spans of kSpan positions counted from position 0,
// whichever of the pool and the region holds them, in one pass: so a token's output is
// the same to the bit however its prompt was cut into chunks, or however much of it came
// from the prefix cache (the scores' lanes are positions modulo 16, its sums in position
// order).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <optional>
#include <type_traits>
#include <string>
#include <vector>

#include "vec16.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define MEMBER inline __attribute__((always_inline))

// The largest of `start` and row[0 … n), a vector at a time (a scalar max is a chain of
// dependent instructions, as long as the scores' products): the same whatever the vectors.
template <typename Vec>
INLINE float max_over(const float* row, int64_t n, float start) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  Vec most = Vec{} + start;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    Vec v;
    std::memcpy(&v, row + i, sizeof v);
    most = most > v ? most : v;
  }
  float top = start;
  for (int l = 0; l < L; ++l) top = std::max(top, most[l]);
  for (; i < n; ++i) top = std::max(top, row[i]);
  return top;
}

INLINE float max_of(const float* row, int64_t n, float start) {
  return wide_vectors() ? max_over<f32x16>(row, n, start) : max_over<f32x8>(row, n, start);
}

// e with its lanes for positions i … i + 15 at or past `n` zeroed.
INLINE f32x16 before(f32x16 e, int64_t i, int64_t n) {
  const i32x16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i32x16 keep = lanes < static_cast<int32_t>(std::clamp<int64_t>(n - i, 0, 16));
  return keep ? e : f32x16{};
}

// row[0 … n) = e^(row - top) for the first `seen`, 0 past them (in runs of 16); returns
// their sum, lane by lane of 16 and then across, whatever the vectors.
INLINE float exp_run(float* row, int64_t n, int64_t seen, float top) {
  float lanes[16];
  if (wide_vectors()) {
    f32x16 sum = {};
    for (int64_t i = 0; i < n; i += 16) {
      const f32x16 e = before(exp16(load16(row + i) - top), i, seen);
      store16(row + i, e);
      sum += e;
    }
    std::memcpy(lanes, &sum, sizeof lanes);
  } else {
    const i32x8 index = {0, 1, 2, 3, 4, 5, 6, 7};
    f32x8 sum[2] = {};
    for (int64_t i = 0; i < n; i += 16)
      for (int half = 0; half < 2; ++half) {
        f32x8 x;
        std::memcpy(&x, row + i + 8 * half, sizeof x);
        const int64_t left = std::clamp<int64_t>(seen - i - 8 * half, 0, 8);
        const f32x8 e = index < static_cast<int32_t>(left) ? exp_of<f32x8, i32x8>(x - top) : f32x8{};
        std::memcpy(row + i + 8 * half, &e, sizeof e);
        sum[half] += e;
      }
    std::memcpy(lanes, sum, sizeof lanes);
  }
  float add = 0;
  for (int l = 0; l < 16; ++l) add += lanes[l];
  return add;
}

constexpr int kMaxHead = 512;  // head dims up to this (multiples of 16)

// A pool of float16 keys and values (half the bytes of float32: attention over a long
// context reads the pool, and its blocks lie scattered, so it runs at the memory's speed)
// is read as floats: each piece the loops read is widened into a buffer first, with the
// widest conversion the CPU has (one instruction per 16 values with AVX-512 or F16C).
// `widen` converts `rows` runs of 16 halves, run r at p + r * stride, into out[16 r …].
__attribute__((target("avx512f"))) void widen512(const uint16_t* p, int64_t stride,
                                                 int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    _mm512_storeu_ps(out + 16 * r, _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(
                                       reinterpret_cast<const __m256i*>(p + r * stride))));
}

__attribute__((target("avx,f16c"))) void widen256(const uint16_t* p, int64_t stride,
                                                  int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int half = 0; half < 2; ++half)
      _mm256_storeu_ps(out + 16 * r + 8 * half,
                       _mm256_cvtph_ps(_mm_loadu_si128(
                           reinterpret_cast<const __m128i*>(p + r * stride + 8 * half))));
}

// IEEE binary16 to float, exactly (subnormals through an integer conversion, so that no
// denormal float is read whatever the thread's flush-to-zero mode).
float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exponent = (h >> 10) & 0x1f,
                 mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
  } else {
    const uint32_t bits = exponent == 31 ? 0x7f800000u | (mantissa << 13)
                                         : ((exponent + 112) << 23) | (mantissa << 13);
    std::memcpy(&magnitude, &bits, sizeof magnitude);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  bits |= sign;
  std::memcpy(&magnitude, &bits, sizeof magnitude);
  return magnitude;
}

void widen_scalar(const uint16_t* p, int64_t stride, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int l = 0; l < 16; ++l) out[16 * r + l] = half_to_float(p[r * stride + l]);
}

using Widen = void (*)(const uint16_t*, int64_t, int64_t, float*);

Widen pick_widen() {
  if (__builtin_cpu_supports("avx512f")) return widen512;
  if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) return widen256;
  return widen_scalar;
}

const Widen widen = pick_widen();

// A piece of the pool, rows runs of 16 values at `stride`, as floats at stride 16 (for
// float16, widened into `buffer`); a float pool's piece is read in place (`stride` kept).
struct Piece {
  const float* p;
  int64_t stride;
};
INLINE Piece floats(const float* p, int64_t stride, int64_t, float*) { return {p, stride}; }
INLINE Piece floats(const uint16_t* p, int64_t stride, int64_t rows, float* buffer) {
  widen(p, stride, rows, buffer);
  return {buffer, 16};
}

struct Shapes {
  int64_t K, G, H, BS, MB, blocks;  // kv heads, group, head dim, block size, table width, pool
};

constexpr int64_t kGroupTile = 4;  // query heads of one kv head that share each load

// The hot loops below run on vectors of 16 floats with AVX-512 and of 8 elsewhere
// (`wide_vectors`; on AVX2, 8 decode rows over 20-120 positions took 0.58 ms a layer with
// vectors of 16). A lane's sums are the same either way.
// NV feature slices (of 16) of TG queries' weighted values over n positions (position
// i's values at row(i), query g's weight weight(g, i)), added to the 16 floats at at(g, v)
// in position order: each slice and query a sum of its own (TG·NV independent chains of
// multiply-adds in flight), in vectors Vec. Decode and prompt attention address them
// their own ways.
template <typename Vec, int TG, int NV, typename Row, typename Weight, typename At>
INLINE void weighted_values(int64_t n, Row row, Weight weight, At at) {
  constexpr int L = sizeof(Vec) / sizeof(float), P = 16 / L;
  Vec part[TG][NV][P];
  for (int g = 0; g < TG; ++g)
    for (int v = 0; v < NV; ++v)
      for (int p = 0; p < P; ++p) std::memcpy(&part[g][v][p], at(g, v) + L * p, sizeof(Vec));
  for (int64_t i = 0; i < n; ++i)
    for (int v = 0; v < NV; ++v)
      for (int p = 0; p < P; ++p) {
        Vec value;
        std::memcpy(&value, row(i) + 16 * v + L * p, sizeof value);
        for (int g = 0; g < TG; ++g) part[g][v][p] += weight(g, i) * value;
      }
  for (int g = 0; g < TG; ++g)
    for (int v = 0; v < NV; ++v)
      for (int p = 0; p < P; ++p) std::memcpy(at(g, v) + L * p, &part[g][v][p], sizeof(Vec));
}

// Decode attention's: value p at values + p * H, query g's weights[g], its slice v at
// acc[g * stride + v].
template <typename Vec, int TG, int NV>
INLINE void value_slices_of(const float* values, int64_t H, int64_t used,
                            const float* const* weights, f32x16* acc, int64_t stride) {
  weighted_values<Vec, TG, NV>(
      used, [&](int64_t i) { return values + i * H; },
      [&](int g, int64_t i) { return weights[g][i]; },
      [&](int g, int v) { return reinterpret_cast<float*>(acc + g * stride + v); });
}

template <int TG, int NV>
INLINE void value_slices(const float* values, int64_t H, int64_t used, const float* const* weights,
                         f32x16* acc, int64_t stride) {
  if (wide_vectors()) return value_slices_of<f32x16, TG, NV>(values, H, used, weights, acc, stride);
  for (int v = 0; v < NV; ++v)  // TG x 2 accumulators of AVX2's 16 registers
    value_slices_of<f32x8, TG, 1>(values + 16 * v, H, used, weights, acc + v, stride);
}

// TG queries' scores (times `scale`) over NR runs of 16 keys (run r's feature h at
// pieces[r].p + h * pieces[r].stride), into out[g][16 r …]: NR·TG independent sums, in
// vectors Vec.
template <typename Vec, int TG, int NR>
INLINE void key_runs_of(const Piece* pieces, const float* const* queries, int64_t H, float scale,
                        float* const* out, int64_t first) {
  constexpr int L = sizeof(Vec) / sizeof(float), P = 16 / L;
  Vec acc[NR][P][TG] = {};
  for (int64_t h = 0; h < H; ++h) {
    Vec key[NR][P];
    for (int r = 0; r < NR; ++r)
      for (int p = 0; p < P; ++p)
        std::memcpy(&key[r][p], pieces[r].p + h * pieces[r].stride + L * p, sizeof(Vec));
    for (int g = 0; g < TG; ++g) {
      const float feature = queries[g][h];
      for (int r = 0; r < NR; ++r)
        for (int p = 0; p < P; ++p) acc[r][p][g] += feature * key[r][p];
    }
  }
  for (int g = 0; g < TG; ++g)
    for (int r = 0; r < NR; ++r)
      for (int p = 0; p < P; ++p) {
        const Vec scaled = acc[r][p][g] * scale;
        std::memcpy(out[g] + 16 * (first + r) + L * p, &scaled, sizeof scaled);
      }
}

template <int TG, int NR>
INLINE void key_runs(const Piece* pieces, const float* const* queries, int64_t H, float scale,
                     float* const* out) {
  if (wide_vectors()) return key_runs_of<f32x16, TG, NR>(pieces, queries, H, scale, out, 0);
  for (int r = 0; r < NR; ++r)  // TG x 2 accumulators of AVX2's 16 registers
    key_runs_of<f32x8, TG, 1>(pieces + r, queries, H, scale, out, r);
}

// A row's context is cut at every kChunk positions (whole blocks: `chunk_blocks`): each
// piece of work is a chunk's positions (of one kv head, or of all of a row's), whose
// softmax states are merged in order afterwards. One stream over a long context then keeps
// both cores busy (SmolLM2's 3 kv heads alone split 2:1: one stream over 1,000 positions,
// 0.085 -> 0.068 ms a layer), and a row's arithmetic is the same alone or in any step.
constexpr int64_t kChunk = 512;
INLINE int64_t chunk_blocks(int64_t BS) { return std::max<int64_t>(1, kChunk / BS); }

// TG query heads (from g0) of each kv head in [kh0, kh1) of one row (q [K, G, H]), over
// the n positions from block b0's first (its table's entries b0 …): their states into
// `states` (a query's at states + (kh * G + g) * (H + 2)). Every key and value vector is
// loaded once for all TG, so a row's keys cross the memory bus once per kv head, not once
// per query head; and a block's kv heads are read one after the other. Blocks lie
// scattered through memory, and on a 2-core CPU random runs of 12 KB stream at about 17
// GB/s (both cores), of 48 KB at 25 (a SmolLM2 block of 64 positions, keys or values of
// all three kv heads), where long runs stream at 30: the kv heads of a row are one piece
// of work where a step has rows enough for the cores.
template <int TG, typename T>
INLINE void heads(const Shapes& s, const float* q, const T* kpool, const T* vpool, int64_t b0,
                  int64_t n, const int32_t* table, int32_t base, int64_t kh0, int64_t kh1,
                  int64_t g0, float scale, float* states) {
  const int64_t H = s.H, BS = s.BS, G = s.G, nk = kh1 - kh0;
  auto query = [&](int64_t kh, int g) { return q + (kh * G + g0 + g) * H; };
  auto state = [&](int64_t kh, int g) { return states + (kh * G + g0 + g) * (H + 2); };
  const int64_t nb = (n + BS - 1) / BS;
  const int64_t width = nb * BS;  // one query's scores
  thread_local std::vector<float> scores;
  thread_local std::vector<f32x16> sums;  // the values' products, [kv head][query][H / 16]
  thread_local std::vector<float> values;  // a float16 pool's block of values, widened
  const int64_t slices = H / 16;
  scores.resize(nk * TG * width);
  sums.assign(nk * TG * slices, f32x16{});
  values.resize(BS * H);
  auto row = [&](int64_t kh, int g) { return &scores[((kh - kh0) * TG + g) * width]; };
  auto block = [&](int64_t b) {  // the pool block behind entry b0 + b (clamped, as XLA's gather)
    return std::clamp<int64_t>(int64_t{table[b0 + b]} + base, 0, s.blocks - 1);
  };
  // Keys, up to four runs of 16 positions at a time (a block's, where blocks hold 64:
  // its rows read in order; each query feature loaded once for all: that many more
  // independent sums in flight, where a sum over H features is a chain of H dependent
  // multiply-adds).
  const int64_t runs = width / 16;
  thread_local std::vector<float> widened;  // a float16 pool's runs of keys
  widened.resize(4 * H * 16);
  auto keys = [&](int64_t run, int64_t kh, float* buffer) {  // [H] (see `floats`)
    const int64_t at = (block(run * 16 / BS) * s.K + kh) * H * BS + run * 16 % BS;
    return floats(kpool + at, BS, H, buffer);
  };
  for (int64_t run = 0; run < runs;) {
    const int64_t take = runs - run >= 4 ? 4 : runs - run >= 2 ? 2 : 1;
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      Piece pieces[4];
      for (int64_t r = 0; r < take; ++r) pieces[r] = keys(run + r, kh, &widened[r * H * 16]);
      const float* queries[TG];
      float* out[TG];
      for (int g = 0; g < TG; ++g) {
        queries[g] = query(kh, g);
        out[g] = row(kh, g) + run * 16;
      }
      if (take == 4) key_runs<TG, 4>(pieces, queries, H, scale, out);
      else if (take == 2) key_runs<TG, 2>(pieces, queries, H, scale, out);
      else key_runs<TG, 1>(pieces, queries, H, scale, out);
    }
    run += take;
  }
  thread_local std::vector<float> totals, tops;
  totals.resize(nk * TG);
  tops.resize(nk * TG);
  for (int64_t kh = kh0; kh < kh1; ++kh)
    for (int g = 0; g < TG; ++g) {
      float* r = row(kh, g);
      const float top = max_of(r, n, r[0]);
      tops[(kh - kh0) * TG + g] = top;
      // (the last block's positions past the context count for nothing)
      totals[(kh - kh0) * TG + g] = exp_run(r, width, n, top);
    }
  // Values: a feature slice of every query at once, over a block's positions in order.
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const int64_t used = std::min(BS, n - b * BS);
      // [BS, H] (a float16 pool's: its used rows, widened)
      const Piece vb = floats(vpool + (block(b) * s.K + kh) * BS * H, 16, used * slices,
                              values.data());
      f32x16* acc = &sums[(kh - kh0) * TG * slices];
      const float* weights[TG];  // each query's scores of this block's positions
      for (int g = 0; g < TG; ++g) weights[g] = row(kh, g) + b * BS;
      int64_t v = 0;
      for (; v + 4 <= slices; v += 4)
        value_slices<TG, 4>(vb.p + 16 * v, H, used, weights, acc + v, slices);
      for (; v < slices; ++v)
        value_slices<TG, 1>(vb.p + 16 * v, H, used, weights, acc + v, slices);
    }
  for (int64_t kh = kh0; kh < kh1; ++kh)
    for (int g = 0; g < TG; ++g) {
      float* out = state(kh, g);
      for (int64_t v = 0; v < slices; ++v)
        store16(out + 16 * v, sums[((kh - kh0) * TG + g) * slices + v]);
      out[H] = tops[(kh - kh0) * TG + g];
      out[H + 1] = totals[(kh - kh0) * TG + g];
    }
}


// The G query heads of kv heads [kh0, kh1) of one row over n positions from block b0,
// kGroupTile at a time, into their softmax states (see `heads`).
template <typename T>
INLINE void group_of(const Shapes& s, const float* q, const T* kpool, const T* vpool, int64_t b0,
                     int64_t n, const int32_t* table, int32_t base, int64_t kh0, int64_t kh1,
                     float scale, float* states) {
  for (int64_t g = 0; g < s.G; g += kGroupTile) {
#define JAXCHAT_HEADS(TG) \
  heads<TG>(s, q, kpool, vpool, b0, n, table, base, kh0, kh1, g, scale, states)
    switch (std::min(kGroupTile, s.G - g)) {
      case 1: JAXCHAT_HEADS(1); break;
      case 2: JAXCHAT_HEADS(2); break;
      case 3: JAXCHAT_HEADS(3); break;
      default: JAXCHAT_HEADS(4); break;
    }
#undef JAXCHAT_HEADS
  }
}

#define JAXCHAT_GROUP(T)                                                                     \
  JAXCHAT_TARGETS void group(const Shapes& s, const float* q, const T* kpool, const T* vpool, \
                             int64_t b0, int64_t n, const int32_t* table, int32_t base,      \
                             int64_t kh0, int64_t kh1, float scale, float* states) {         \
    group_of(s, q, kpool, vpool, b0, n, table, base, kh0, kh1, scale, states);              \
  }
JAXCHAT_GROUP(float)
JAXCHAT_GROUP(uint16_t)
#undef JAXCHAT_GROUP

// A query's output [H] from its chunks' softmax states (`heads`'s, `count` of them at
// `stride` floats), merged in order.
JAXCHAT_TARGETS
void merge(const float* states, int64_t count, int64_t stride, int64_t H, float* out) {
  float top = states[H];
  for (int64_t c = 1; c < count; ++c) top = std::max(top, states[c * stride + H]);
  float total = 0;
  for (int64_t v = 0; v < H; v += 16) store16(out + v, f32x16{});
  for (int64_t c = 0; c < count; ++c) {
    const float* state = states + c * stride;
    const float weight = count == 1 ? 1.0f : std::exp(state[H] - top);
    total += state[H + 1] * weight;
    for (int64_t v = 0; v < H; v += 16)
      store16(out + v, load16(out + v) + load16(state + v) * weight);
  }
  for (int64_t v = 0; v < H; v += 16) store16(out + v, load16(out + v) / total);
}

// The pool's element type: float32 or float16 (keys and values alike), or None.
std::optional<bool> halves(const ffi::AnyBuffer& k, const ffi::AnyBuffer& v) {
  const auto type = k.element_type();
  if (type != v.element_type()) return std::nullopt;
  if (type == ffi::DataType::F16) return true;
  if (type == ffi::DataType::F32) return false;
  return std::nullopt;
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::S32> context,
                               ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> base,
                               ffi::ResultBuffer<ffi::F32> out, float scale, int64_t threads) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "decode attention: q [R, K, G, H], k [NB, K, H, BS], v [NB, K, BS, H], tables [R, MB]");
  const int64_t R = qd[0];
  Shapes s{qd[1], qd[2], qd[3], kd[3], td[1], kd[0]};
  if (kd[1] != s.K || kd[2] != s.H || vd[0] != s.blocks || vd[1] != s.K || vd[2] != s.BS ||
      vd[3] != s.H || td[0] != R || static_cast<int64_t>(context.element_count()) != R)
    return ffi::Error::InvalidArgument("decode attention: q, pool and tables do not agree");
  if (s.H % 16 || s.H > kMaxHead || s.BS % 16)
    return ffi::Error::InvalidArgument("decode attention: head dim " + std::to_string(s.H) +
                                       " and block size " + std::to_string(s.BS) +
                                       " must be multiples of 16 (head dim up to 512)");
  const std::optional<bool> half = halves(k, v);
  if (!half) return ffi::Error::InvalidArgument("decode attention: a float32 or float16 pool");
  const float* qp = q.typed_data();
  const void *kp = k.untyped_data(), *vp = v.untyped_data();
  const int32_t *cp = context.typed_data(), *tp = tables.typed_data();
  const int32_t b0_base = base.typed_data()[0];
  float* op = out->typed_data();
  int64_t work = 0;
  for (int64_t r = 0; r < R; ++r) work += std::max(0, cp[r] + 1);
  int parts = threads > 0 ? static_cast<int>(threads) : jaxchat::Workers::get().size();
  // Below about 8k positions·heads the work is shorter than waking another thread.
  if (work * s.K * s.G < 8192) parts = 1;
  // A row's kv heads together where there are two rows a core, else each on its own; and
  // each chunk of a row's context on its own.
  const int64_t heads = R >= 2 * parts ? s.K : 1, pieces = s.K / heads;
  struct Item {
    int64_t r, kh, chunk;
  };
  std::vector<Item> items;
  const int64_t per = chunk_blocks(s.BS), most = (s.MB + per - 1) / per;  // (the longest)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = std::min<int64_t>(int64_t{cp[r]} + 1, s.MB * s.BS);
    for (int64_t c = 0; c * per * s.BS < n; ++c)
      for (int64_t piece = 0; piece < pieces; ++piece) items.push_back({r, piece * heads, c});
  }
  const int64_t stride = s.H + 2;  // a query's state
  thread_local std::vector<float> states;  // [R, K, G, chunks, H + 2]
  states.resize(R * s.K * s.G * most * stride);
  float* sp = states.data();
  jaxchat::Workers::get().run(static_cast<int64_t>(items.size()), parts, [&](int64_t i0,
                                                                              int64_t i1) {
    thread_local std::vector<float> chunk;  // a chunk's states, [K, G, H + 2]
    chunk.resize(s.K * s.G * stride);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& item = items[i];
      const int64_t r = item.r, b0 = item.chunk * per;
      const int64_t n = std::min<int64_t>(int64_t{cp[r]} + 1, s.MB * s.BS) - b0 * s.BS;
      const int64_t count = std::min(n, per * s.BS);
      const float* qr = qp + r * s.K * s.G * s.H;
      const int32_t* table = tp + r * s.MB;
      if (*half) {
        group(s, qr, static_cast<const uint16_t*>(kp), static_cast<const uint16_t*>(vp), b0,
              count, table, b0_base, item.kh, item.kh + heads, scale, chunk.data());
      } else {
        group(s, qr, static_cast<const float*>(kp), static_cast<const float*>(vp), b0, count,
              table, b0_base, item.kh, item.kh + heads, scale, chunk.data());
      }
      for (int64_t kh = item.kh; kh < item.kh + heads; ++kh)
        for (int64_t g = 0; g < s.G; ++g) {
          const float* from = &chunk[(kh * s.G + g) * stride];
          float* to = sp + (((r * s.K + kh) * s.G + g) * most + item.chunk) * stride;
          std::copy(from, from + stride, to);
        }
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = std::min<int64_t>(int64_t{cp[r]} + 1, s.MB * s.BS);
    const int64_t chunks = (n + per * s.BS - 1) / (per * s.BS);
    for (int64_t h = 0; h < s.K * s.G; ++h) {
      float* out = op + (r * s.K * s.G + h) * s.H;
      if (cp[r] < 0) {
        std::fill(out, out + s.H, 0.0f);
      } else {
        merge(sp + (r * s.K * s.G + h) * most * stride, chunks, stride, s.H, out);
      }
    }
  }
  return ffi::Error::Success();
}


constexpr int64_t kTile = 16;     // queries that share each key and value load (at most)
constexpr int64_t kGroup = 16;     // tiles that go through each span of keys and values together
constexpr int64_t kSpan = 256;    // positions whose scores are held at once
constexpr float kNegInf = -3.4028234663852886e38f;  // jnp.finfo(float32).min, as in JAX

// One query of the prompt attention: its head's queries start at `q` (q [H, P], positions
// minor) and it is query `p` of them; it sees positions before `limit`; its output is row
// `out` of out [K·G·P, H].
struct Query {
  const float* q;
  int64_t p, out, limit;
};

// The keys and values of one kv head of a segment: positions before `split` from the pool
// through block table `table` (the pool's blocks k [NB, K, H, BS], v [NB, K, BS, H]), the
// rest from the region (k [H, W], positions minor, W at least the region plus 16; v
// [P, H]), where position `split` is the region's entry `first`.
template <typename T>
struct PromptKeys {
  const T *kpool, *vpool;
  const float *k, *v;
  const int32_t* table;
  int64_t K, H, BS, blocks, kh, W, split, first;
  int32_t base;
  MEMBER int64_t block(int64_t pos) const {
    return std::clamp<int64_t>(int64_t{table[pos / BS]} + base, 0, blocks - 1);
  }
  MEMBER const T* pool_keys(int64_t pos) const {  // [H] with stride BS, 16 positions
    return kpool + (block(pos) * K + kh) * H * BS + pos % BS;
  }
  // Reads the pool's keys and values of positions [from, to) below split once, in address
  // order (a block's kv head is two runs of H·BS elements), ahead of the span's products.
  // Those read the keys as runs of 16 positions at the block's stride and the values a
  // slice of every position at a time; from memory that pattern streams at a fraction of
  // an in-order sweep's speed, from the caches it costs nothing more. A 4-token chunk
  // over 3,000 positions, each layer's blocks read once: 0.60 -> 0.42 ms a layer.
  MEMBER void read_ahead(int64_t from, int64_t to) const {
    uint64_t sink = 0;  // a word of every cache line (the load brings the line in)
    const int64_t bytes = H * BS * int64_t{sizeof(T)};
    for (int64_t pos = from - from % BS; pos < std::min(to, split); pos += BS) {
      const char* keys = reinterpret_cast<const char*>(kpool + (block(pos) * K + kh) * H * BS);
      const char* values = reinterpret_cast<const char*>(vpool + (block(pos) * K + kh) * BS * H);
      for (int64_t line = 0; line < bytes; line += 64) {
        uint64_t a, b;
        std::memcpy(&a, keys + line, sizeof a);
        std::memcpy(&b, values + line, sizeof b);
        sink ^= a ^ b;
      }
    }
    asm volatile("" : : "r"(sink));
  }
  MEMBER const float* region_keys(int64_t pos) const {  // [H] with stride W
    return k + first + pos - split;
  }
  // The value at pos, [H]: from the pool below split, as floats (widened into `buffer`
  // from a float16 pool).
  MEMBER const float* value(int64_t pos, float* buffer) const {
    if (pos >= split) return v + (first + pos - split) * H;
    return floats(vpool + (block(pos) * K + kh) * BS * H + (pos % BS) * H, 16, H / 16, buffer).p;
  }
};

// Scores of queries [t0, t0 + TQ) (their scaled features qt [H][TT]) over R runs of 16
// keys, into scores[t][j …], in vectors Vec.
template <typename Vec, int TT, int TQ, int R>
INLINE void span_scores(const Piece* runs, const float (*qt)[TT], int64_t H, int t0,
                        float (*scores)[kSpan], int64_t j) {
  constexpr int L = sizeof(Vec) / sizeof(float), P = 16 / L;
  Vec acc[R][P][TQ] = {};
  for (int64_t h = 0; h < H; ++h) {
    Vec key[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        std::memcpy(&key[r][p], runs[r].p + h * runs[r].stride + L * p, sizeof(Vec));
    for (int t = 0; t < TQ; ++t) {
      const float q = qt[h][t0 + t];
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p][t] += q * key[r][p];
    }
  }
  for (int t = 0; t < TQ; ++t)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        std::memcpy(&scores[t0 + t][j + 16 * r + L * p], &acc[r][p][t], sizeof(Vec));
}

// Feature slices [v, v + NV) (of 16) of queries [t0, t0 + TQ), their scores' weighted
// values over n positions added to acc (a query's at acc + t * kMaxHead), in vectors Vec.
template <typename Vec, int TQ, int NV>
INLINE void span_values(const float* const* values, int64_t n, const float (*scores)[kSpan],
                        int t0, float* acc, int64_t v) {
  weighted_values<Vec, TQ, NV>(
      n, [&](int64_t i) { return values[i] + 16 * v; },
      [&](int t, int64_t i) { return scores[t0 + t][i]; },
      [&](int t, int w) { return acc + (t0 + t) * kMaxHead + 16 * (v + w); });
}

// f(t0, TQ) over the TT queries in groups of up to 4 (2 TQ accumulators of vectors of 8 in
// AVX2's 16 registers), TQ a constant.
template <int TT, typename F>
INLINE void in_fours(F f) {
  int t0 = 0;
  for (; t0 + 4 <= TT; t0 += 4) f(t0, std::integral_constant<int, 4>());
  if constexpr (TT % 4 == 3) f(TT - 3, std::integral_constant<int, 3>());
  if constexpr (TT % 4 == 2) f(TT - 2, std::integral_constant<int, 2>());
  if constexpr (TT % 4 == 1) f(TT - 1, std::integral_constant<int, 1>());
}

// The TT queries `qs` (all of one kv head) over positions [from, to) of `src`, each seeing
// those before its limit: their softmax states into `states` (a query's at t * (H + 2)), or
// where `out` is given (the positions are all the query has), their outputs normalised into
// `out` [K·G·P, H] as `normalize` would; with `resume`, from the states there (those of
// the positions before `from`). `scaled`: the queries times the scale, [H][TT]. Every key
// and value vector is loaded once for all TT.
template <int TT, typename T>
INLINE void span(const PromptKeys<T>& src, int64_t H, const Query* qs, const float* scaled,
                 int64_t from, int64_t to, float* states, float* out, bool resume) {
  const int64_t nv = H / 16;
  const float(*qt)[TT] = reinterpret_cast<const float(*)[TT]>(scaled);  // [H][TT]
  float top[TT], total[TT] = {};
  std::fill(top, top + TT, kNegInf);
  f32x16 acc[TT][kMaxHead / 16] = {};
  for (int64_t t = 0; resume && t < TT; ++t) {  // the states of the positions before `from`
    const float* state = states + t * (H + 2);
    for (int64_t v = 0; v < nv; ++v) acc[t][v] = load16(state + 16 * v);
    top[t] = state[H];
    total[t] = state[H + 1];
  }
  alignas(64) float scores[TT][kSpan];
  alignas(64) float straddle[kMaxHead * 16];  // the 16 positions around `split`, if any
  Piece runs[kSpan / 16];  // keys of 16 positions from a multiple of 16: feature h at p + h stride
  const float* values[kSpan];
  thread_local std::vector<float> widened;  // a float16 pool's keys and values in this span
  widened.resize(2 * kSpan * H);
  float *widened_keys = widened.data(), *widened_values = widened_keys + kSpan * H;
  for (int64_t start = from; start < to; start += kSpan) {
    const int64_t n = std::min(kSpan, to - start);
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t pos = start + j;
      float* buffer = widened_keys + j * H;
      if (pos + 16 <= src.split) {
        runs[j / 16] = floats(src.pool_keys(pos), src.BS, H, buffer);
      } else if (pos >= src.split) {
        runs[j / 16] = {src.region_keys(pos), src.W};
      } else {  // pool below split, region from it
        const int64_t cut = src.split - pos;
        const Piece pooled = floats(src.pool_keys(pos), src.BS, H, buffer);
        const float* own = src.region_keys(src.split);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t l = 0; l < 16; ++l)
            straddle[h * 16 + l] =
                l < cut ? pooled.p[h * pooled.stride + l] : own[h * src.W + l - cut];
        runs[j / 16] = {straddle, 16};
      }
    }
    for (int64_t i = 0; i < n; ++i) values[i] = src.value(start + i, widened_values + i * H);
    // Scores, 32 positions at a time for up to 8 queries (each query feature loaded once
    // for two vectors of keys: twice the independent sums in flight), then 16; with
    // vectors of 8, 16 positions for up to 4 queries at a time.
    if (wide_vectors()) {
      int64_t j = 0;
      for (; TT <= 8 && j + 32 <= n; j += 32)
        span_scores<f32x16, TT, TT, 2>(&runs[j / 16], qt, H, 0, scores, j);
      for (; j < n; j += 16) span_scores<f32x16, TT, TT, 1>(&runs[j / 16], qt, H, 0, scores, j);
    } else {
      for (int64_t j = 0; j < n; j += 16)
        in_fours<TT>([&](int t0, auto tq) {
          span_scores<f32x8, TT, decltype(tq)::value, 1>(&runs[j / 16], qt, H, t0, scores, j);
        });
    }
    for (int64_t t = 0; t < TT; ++t) {
      float* row = scores[t];
      const int64_t seen = std::clamp<int64_t>(qs[t].limit - start, 0, n);
      const float new_top = max_of(row, seen, top[t]);
      const float rescale = std::exp(top[t] - new_top);
      top[t] = new_top;
      total[t] = total[t] * rescale + exp_run(row, n, seen, new_top);
      for (int64_t v = 0; v < nv; ++v) acc[t][v] *= rescale;
    }
    // Values: for up to 8 queries two feature slices at once (each weight loaded once for
    // both), then one; with vectors of 8, one slice for up to 4 queries at a time.
    float* sums = reinterpret_cast<float*>(acc);
    if (wide_vectors()) {
      int64_t v = 0;
      for (; TT <= 8 && v + 2 <= nv; v += 2) span_values<f32x16, TT, 2>(values, n, scores, 0, sums, v);
      for (; v < nv; ++v) span_values<f32x16, TT, 1>(values, n, scores, 0, sums, v);
    } else {
      for (int64_t v = 0; v < nv; ++v)
        in_fours<TT>([&](int t0, auto tq) {
          span_values<f32x8, decltype(tq)::value, 1>(values, n, scores, t0, sums, v);
        });
    }
  }
  for (int64_t t = 0; t < TT; ++t) {
    if (out) {
      for (int64_t v = 0; v < nv; ++v) store16(out + qs[t].out * H + 16 * v, acc[t][v] / total[t]);
      continue;
    }
    float* state = states + t * (H + 2);
    for (int64_t v = 0; v < nv; ++v) store16(state + 16 * v, acc[t][v]);
    state[H] = top[t];
    state[H + 1] = total[t];
  }
}

// `span` for `count` (1 … kTile) queries: a part-filled tile costs its own queries only.
template <typename T>
INLINE void prompt_tile_of(int64_t count, const PromptKeys<T>& src, int64_t H,
                           const Query* qs, const float* scaled, int64_t from, int64_t to,
                           float* states, float* out, bool resume) {
  switch (count) {
#define JAXCHAT_TILE(TT) \
  case TT:               \
    return span<TT>(src, H, qs, scaled, from, to, states, out, resume);
    JAXCHAT_TILE(1)
    JAXCHAT_TILE(2)
    JAXCHAT_TILE(3)
    JAXCHAT_TILE(4)
    JAXCHAT_TILE(5)
    JAXCHAT_TILE(6)
    JAXCHAT_TILE(7)
    JAXCHAT_TILE(8)
    JAXCHAT_TILE(9)
    JAXCHAT_TILE(10)
    JAXCHAT_TILE(11)
    JAXCHAT_TILE(12)
    JAXCHAT_TILE(13)
    JAXCHAT_TILE(14)
    JAXCHAT_TILE(15)
    default:
      return span<kTile>(src, H, qs, scaled, from, to, states, out, resume);
#undef JAXCHAT_TILE
  }
}

#define JAXCHAT_PROMPT_TILE(T)                                                              \
  JAXCHAT_TARGETS void prompt_tile(int64_t count, const PromptKeys<T>& src, int64_t H,      \
                                   const Query* qs, const float* scaled, int64_t from,       \
                                   int64_t to, float* states, float* out, bool resume) {     \
    prompt_tile_of(count, src, H, qs, scaled, from, to, states, out, resume);               \
  }
JAXCHAT_PROMPT_TILE(float)
JAXCHAT_PROMPT_TILE(uint16_t)
#undef JAXCHAT_PROMPT_TILE

// Positions per chunk of a prompt token's attention: its softmax runs online within a
// chunk (over spans of kSpan), the chunks' states (`span`'s) are merged in order (`merge`),
// so a token's output is the same to the bit whichever way the work is shared out (the
// chunks counted from position 0, as the spans).
constexpr int64_t kPromptChunk = 1024;

// One tile: its queries, their segment's first region entry, and its kv head.
struct Tile {
  int64_t count, first, kh;
};

ffi::Error PromptAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::AnyBuffer kpool,
                               ffi::AnyBuffer vpool, ffi::Buffer<ffi::S32> segments,
                               ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> sees,
                               ffi::Buffer<ffi::S32> prior, ffi::Buffer<ffi::S32> tables,
                               ffi::Buffer<ffi::S32> base, ffi::ResultBuffer<ffi::F32> out,
                               float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto pk = kpool.dimensions(), pv = vpool.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3 || pk.size() != 4 || pv.size() != 4 ||
      td.size() != 2)
    return ffi::Error::InvalidArgument(
        "prompt attention: q [K, G, H, P], k [K, H, W] (W >= P + 16), v [K, P, H], pool k "
        "[NB, K, H, BS] and v [NB, K, BS, H], tables [groups, MB]");
  const int64_t K = qd[0], G = qd[1], H = qd[2], P = qd[3], W = kd[2];
  const int64_t NB = pk[0], BS = pk[3], groups = td[0], MB = td[1];
  const auto n = [](auto& buffer) { return static_cast<int64_t>(buffer.element_count()); };
  if (kd[0] != K || kd[1] != H || W < P + 16 || vd[0] != K || vd[1] != P || vd[2] != H ||
      pk[1] != K || pk[2] != H || pv[0] != NB || pv[1] != K || pv[2] != BS || pv[3] != H ||
      n(segments) != P || n(positions) != P || n(sees) != P || n(prior) != groups)
    return ffi::Error::InvalidArgument("prompt attention: q, keys, pool and layout disagree");
  if (H % 16 || H > kMaxHead || BS % 16)
    return ffi::Error::InvalidArgument("prompt attention: head dim " + std::to_string(H) +
                                       " and block size " + std::to_string(BS) +
                                       " must be multiples of 16 (head dim up to 512)");
  const std::optional<bool> half = halves(kpool, vpool);
  if (!half) return ffi::Error::InvalidArgument("prompt attention: a float32 or float16 pool");
  const int32_t *seg = segments.typed_data(), *pos = positions.typed_data();
  const int32_t *group = sees.typed_data(), *pp = prior.typed_data();
  float* op = out->typed_data();
  std::fill(op, op + K * G * P * H, 0.0f);  // padding stays so
  // Tiles of one kv head: a segment's positions in order, each with its G query heads. A
  // segment continues its prior group (its first position is the group's length) or starts
  // at position 0.
  const float* qp = q.typed_data();
  std::vector<Query> queries;
  std::vector<Tile> tiles;
  int64_t work = 0;
  for (int64_t a = 0, b; a < P; a = b) {
    for (b = a + 1; b < P && seg[b] == seg[a]; ++b) {
    }
    if (seg[a] < 0) continue;
    const int64_t g = group[a], from = pos[a];
    const bool continues = g >= 0 && g < groups && from == pp[g] && from <= MB * BS;
    if (!(continues || (g < 0 && from == 0)))
      return ffi::Error::InvalidArgument(
          "prompt attention: a segment starts neither at 0 nor where its prior group ends");
    // A short segment's queries of a kv head are one tile (up to kTile: its prior read
    // once, where a step's prompt chunk is a few tokens beside decode rows); a longer one's
    // in tiles of kTile / 2, which go through their keys and values with fewer loads.
    const int64_t per = (b - a) * G <= kTile ? kTile : kTile / 2;
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t j = 0; j < (b - a) * G; ++j) {
        if (j % per == 0) {
          tiles.push_back({0, a, kh});
          queries.resize(tiles.size() * kTile);
        }
        const int64_t t = a + j / G, head = kh * G + j % G;
        queries[(tiles.size() - 1) * kTile + j % per] = {qp + head * H * P, t, head * P + t,
                                                         from + t - a + 1};
        ++tiles.back().count;
        work += from + t - a + 1;
      }
  }
  if (tiles.empty()) return ffi::Error::Success();
  const int parts = work < 8192 ? 1 : jaxchat::Workers::get().size();
  const int32_t b0 = base.typed_data()[0];
  // Sets: up to kGroup tiles of one segment's kv head, which read the same keys and
  // values; each span of them is read once from memory, in address order (`read_ahead`),
  // and goes through every tile of the set while it is in the caches. A tile's positions
  // are cut in chunks of kPromptChunk: where the sets are too few to share out among the
  // cores, each (set, chunk) is a piece of work, the chunks' states merged afterwards;
  // else each set is, merging its tiles' chunks itself. The same sums either way (a
  // tile's state carried from span to span through memory), and for a tile of one chunk
  // the same as normalising its one state at once (`merge` takes it times 1), which is
  // what is done then. A tile's states: chunk c's query t at (c * kTile + t) * stride.
  const int64_t stride = H + 2, count = static_cast<int64_t>(tiles.size());
  auto limit = [&](int64_t u) { return queries[u * kTile + tiles[u].count - 1].limit; };
  auto chunks = [&](int64_t u) { return (limit(u) + kPromptChunk - 1) / kPromptChunk; };
  std::vector<std::pair<int64_t, int64_t>> sets;  // [first tile, past the last)
  for (int64_t u = 0; u < count; ++u) {
    if (sets.empty() || sets.back().second - sets.back().first == kGroup ||
        tiles[u - 1].first != tiles[u].first || tiles[u - 1].kh != tiles[u].kh)
      sets.push_back({u, u});
    sets.back().second = u + 1;
  }
  const int64_t n_sets = static_cast<int64_t>(sets.size());
  const bool split = n_sets < 4 * parts;
  int64_t most = 0;
  std::vector<std::pair<int64_t, int64_t>> pieces;  // (set, chunk or -1: all of them)
  for (int64_t i = 0; i < n_sets; ++i) {
    const int64_t group_chunks = chunks(sets[i].second - 1);  // its last tile's are the most
    most = std::max(most, group_chunks);
    if (!split) pieces.push_back({i, -1});
    for (int64_t c = 0; split && c < group_chunks; ++c) pieces.push_back({i, c});
  }
  std::vector<float> states(split ? count * most * kTile * stride : 0);
  auto merged = [&](int64_t u, const float* tile_states) {  // its queries' outputs
    for (int64_t t = 0; t < tiles[u].count; ++t)
      merge(tile_states + t * stride, chunks(u), kTile * stride, H,
            op + queries[u * kTile + t].out * H);
  };
  jaxchat::Workers::get().run(static_cast<int64_t>(pieces.size()), parts, [&](int64_t i0,
                                                                               int64_t i1) {
    thread_local std::vector<float> local;   // a set's tiles' states, chunk by chunk
    thread_local std::vector<float> scaled;  // its tiles' queries times the scale, [H][count]
    for (int64_t i = i0; i < i1; ++i) {
      const auto [gi, c] = pieces[i];
      const auto [u0, u1] = sets[gi];
      scaled.resize((u1 - u0) * H * kTile);
      for (int64_t u = u0; u < u1; ++u) {
        const Query* qs = &queries[u * kTile];
        float* into = &scaled[(u - u0) * H * kTile];
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < tiles[u].count; ++t)
            into[h * tiles[u].count + t] = qs[t].q[h * P + qs[t].p] * scale;
      }
      const Tile& lead = tiles[u0];
      const int64_t g = std::max(0, group[lead.first]);
      // Chunk `at` of the set's tiles: tile u's states at into(u), or its outputs.
      auto chunk = [&](int64_t at, auto into) {
        const int64_t from = at * kPromptChunk;
        auto run = [&](auto* pool_k, auto* pool_v) {
          using T = std::remove_const_t<std::remove_pointer_t<decltype(pool_k)>>;
          const PromptKeys<T> src{pool_k, pool_v, k.typed_data() + lead.kh * H * W,
                                  v.typed_data() + lead.kh * P * H,
                                  tables.typed_data() + g * MB, K, H, BS, NB, lead.kh, W,
                                  pos[lead.first], lead.first, b0};
          const int64_t end = std::min(limit(u1 - 1), from + kPromptChunk);
          for (int64_t start = from; start < end; start += kSpan) {
            src.read_ahead(start, std::min(end, start + kSpan));
            for (int64_t u = u0; u < u1; ++u) {
              const int64_t to = std::min(limit(u), from + kPromptChunk);
              if (start >= to) continue;
              const bool last = start + kSpan >= to;
              prompt_tile(tiles[u].count, src, H, &queries[u * kTile],
                          &scaled[(u - u0) * H * kTile], start, std::min(to, start + kSpan),
                          into(u), last && chunks(u) == 1 ? op : nullptr, start > from);
            }
          }
        };
        if (*half) {
          run(static_cast<const uint16_t*>(kpool.untyped_data()),
              static_cast<const uint16_t*>(vpool.untyped_data()));
        } else {
          run(static_cast<const float*>(kpool.untyped_data()),
              static_cast<const float*>(vpool.untyped_data()));
        }
      };
      if (c >= 0) {
        chunk(c, [&](int64_t u) { return &states[(u * most + c) * kTile * stride]; });
        continue;
      }
      const int64_t group_chunks = chunks(u1 - 1), per_tile = group_chunks * kTile * stride;
      local.resize((u1 - u0) * per_tile);
      for (int64_t at = 0; at < group_chunks; ++at)
        chunk(at, [&](int64_t u) { return &local[(u - u0) * per_tile + at * kTile * stride]; });
      for (int64_t u = u0; u < u1; ++u)
        if (chunks(u) > 1) merged(u, &local[(u - u0) * per_tile]);
    }
  });
  for (int64_t u = 0; split && u < count; ++u)
    if (chunks(u) > 1) merged(u, &states[u * most * kTile * stride]);  // (one: out already)
  return ffi::Error::Success();
}

}  // namespace

// Each way of widening float16 for the tests, which hold every one to the exact conversion
// whichever the CPU picks: `way` 0 AVX-512, 1 F16C, 2 the scalar conversion, on `rows` runs
// of 16 halves into out. Returns 0 (out untouched) where the CPU lacks the way.
extern "C" int JaxchatWiden(int32_t way, const uint16_t* p, int64_t rows, float* out) {
  if (way == 0 && __builtin_cpu_supports("avx512f")) return widen512(p, 16, rows, out), 1;
  if (way == 1 && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx"))
    return widen256(p, 16, rows, out), 1;
  if (way == 2) return widen_scalar(p, 16, rows, out), 1;
  return 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatPromptAttention, PromptAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
