// GGUF's blocks of 32 values (Q8_0, Q4_0, Q4_1) as 16-bit integers: the integer products
// of qmatmul.cc (few rows) and int_gemm.cc (many rows) both start from these.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace jaxchat {

constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;  // GGML's type ids

// Bytes of one block: an f16 scale d (Q4_1: and an f16 offset m), then the values.
template <int64_t Kind>
constexpr int64_t kIntBytes = Kind == kQ8_0 ? 34 : Kind == kQ4_1 ? 20 : 18;

// A block's 32 weights as 32 int16 in order (Q4_0: q - 8), with its d and Q4_1's m (zero
// for the others): one AVX-512 register.
template <int64_t Kind>
__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"), always_inline)) inline __m512i
int_block512(const uint8_t* b, float* d, float* m) {
  uint32_t halves;  // d, and Q4_1's m: both converted by one instruction
  std::memcpy(&halves, b, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(halves)));
  *d = _mm_cvtss_f32(dm);
  *m = Kind == kQ4_1 ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : 0.0f;
  if constexpr (Kind == kQ8_0) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)));
  } else {  // values 0-15 in the low nibbles, 16-31 in the high ones
    const __m128i nibbles =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Kind == kQ4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(15);
    const __m256i bytes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(nibbles, 4), low),
                                           _mm_and_si128(nibbles, low));
    const __m512i w = _mm512_cvtepu8_epi16(bytes);
    return Kind == kQ4_0 ? _mm512_sub_epi16(w, _mm512_set1_epi16(8)) : w;
  }
}

// A block's 32 weights as two vectors of 16 int16 (values 0-15, 16-31), its scale, and
// the offset per unit of x (Q4_1's m; zero for the others): AVX2's registers.
struct IntBlock8 {
  __m256i lo, hi;
  float d, m;
};

template <int64_t Kind>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline IntBlock8 int_block8(
    const uint8_t* b) {
  IntBlock8 w;
  uint32_t halves;  // d, and Q4_1's m: both converted by one instruction
  std::memcpy(&halves, b, 4);
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(halves)));
  w.d = _mm_cvtss_f32(dm);
  w.m = Kind == kQ4_1 ? _mm_cvtss_f32(_mm_movehdup_ps(dm)) : 0.0f;
  if constexpr (Kind == kQ8_0) {
    w.lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
    w.hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
  } else {
    const __m128i nibbles =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Kind == kQ4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(15);
    w.lo = _mm256_cvtepu8_epi16(_mm_and_si128(nibbles, low));
    w.hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(nibbles, 4), low));
    if constexpr (Kind == kQ4_0) {  // q - 8
      w.lo = _mm256_sub_epi16(w.lo, _mm256_set1_epi16(8));
      w.hi = _mm256_sub_epi16(w.hi, _mm256_set1_epi16(8));
    }
  }
  return w;
}

}  // namespace jaxchat
