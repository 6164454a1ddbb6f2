// Vectors of 16 lanes (GCC's vector extensions: AVX-512 registers where the target has
// them, pairs of AVX2 ones or four SSE ones elsewhere) and what the kernels do with them.
#pragma once

#include <cstdint>
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

// e^x for x <= 0 (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial
// for e^r, 2^n through the exponent bits); below -87 it returns e^-87, about 1.6e-38.
INLINE f32x16 exp16(f32x16 x) {
  x = x < -87.0f ? f32x16{} - 87.0f : x;
  f32x16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f32x16 p = f32x16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
