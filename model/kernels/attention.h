// What the decode (attention.cc) and prompt (prompt_attention.cc) attention kernels share:
// the softmax's pieces, the pool's float16 read as floats, the scores' and the weighted
// values' loops, and the merge of a query's chunks. In an anonymous namespace, so each kernel's translation
// unit has its own copy: the two compile side by side (as one file they took 44 s of the
// set-up's build on a 2-core CPU, more than all the other sources together).

#pragma once

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

// TQ queries' dot products with R runs of 16 keys (run r's feature h at runs[r].p + h *
// runs[r].stride; query t's feature h at query(h, t)), handed to store(t, r, p, sums) a
// vector Vec of keys at a time: R·TQ independent sums over the features. Decode and prompt
// attention lay out their queries and scores their own ways.
template <typename Vec, int TQ, int R, typename Query, typename Store>
INLINE void run_scores(const Piece* runs, int64_t H, Query query, Store store) {
  constexpr int L = sizeof(Vec) / sizeof(float), P = 16 / L;
  Vec acc[R][P][TQ] = {};
  for (int64_t h = 0; h < H; ++h) {
    Vec key[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        std::memcpy(&key[r][p], runs[r].p + h * runs[r].stride + L * p, sizeof(Vec));
    for (int t = 0; t < TQ; ++t) {
      const float q = query(h, t);
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) acc[r][p][t] += q * key[r][p];
    }
  }
  for (int t = 0; t < TQ; ++t)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) store(t, r, p, acc[r][p][t]);
}

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

}  // namespace
