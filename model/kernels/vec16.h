// Vectors of 16 lanes (GCC's vector extensions: AVX-512 registers where the target has
// them, pairs of AVX2 ones or four SSE ones elsewhere) and what the kernels do with them.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#define INLINE static inline __attribute__((always_inline))

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// Vectors of 8 lanes: where the CPU lacks AVX-512, GCC keeps a vector of 16 in memory and
// moves it through general registers at every operation, so the hot loops take these.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// Whether the loops take vectors of 16 (the CPU has AVX-512's registers) or of 8: the
// CPU's choice, which JAXCHAT_KERNEL_VECTORS=8 or 16 overrides and JaxchatSetWideVectors
// changes while the library runs, so that the tests run each width's code on any CPU with
// AVX2 (neither needs more). One flag for every source of the library (an inline
// variable), -1 until chosen.
inline std::atomic<int> jaxchat_wide_vectors{-1};

INLINE bool wide_vectors() {
  int wide = jaxchat_wide_vectors.load(std::memory_order_relaxed);
  if (wide < 0) {
    const char* forced = std::getenv("JAXCHAT_KERNEL_VECTORS");
    if (forced != nullptr && std::strcmp(forced, "8") == 0) wide = 0;
    else if (forced != nullptr && std::strcmp(forced, "16") == 0) wide = 1;
    else wide = __builtin_cpu_supports("avx512f") != 0;
    jaxchat_wide_vectors.store(wide, std::memory_order_relaxed);
  }
  return wide != 0;
}

// e^x for x <= 0 (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial
// for e^r, 2^n through the exponent bits); below -87 it returns e^-87, about 1.6e-38. On
// vectors of floats F and of as many int32 I.
template <typename F, typename I>
INLINE F exp_of(F x) {
  x = x < -87.0f ? F{} - 87.0f : x;
  F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

INLINE f32x16 exp16(f32x16 x) { return exp_of<f32x16, i32x16>(x); }
