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

// Whether the loops take vectors of 16 (the CPU has AVX-512's registers) or of 8.
// JAXCHAT_KERNEL_VECTORS=8 or 16 overrides the CPU's choice when the library loads, and
// JaxchatSetWideVectors at run time, so that the tests run each width's code, in one
// process, on any CPU with AVX2 (neither needs more).
inline bool cpu_wide_vectors() {
  const char* forced = std::getenv("JAXCHAT_KERNEL_VECTORS");
  if (forced != nullptr && std::strcmp(forced, "8") == 0) return false;
  if (forced != nullptr && std::strcmp(forced, "16") == 0) return true;
  __builtin_cpu_init();  // (this runs as the library loads, maybe before libgcc's own)
  return __builtin_cpu_supports("avx512f") != 0;
}
inline std::atomic<bool> wide_vectors_now{cpu_wide_vectors()};  // one for the library

INLINE bool wide_vectors() { return wide_vectors_now.load(std::memory_order_relaxed); }

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
