// The many-row integer product of qmatmul.cc's 32-value formats (int_gemm.cc).

#pragma once

#include <cstdint>

namespace jaxchat {

// Whether this CPU multiplies every column of x (decode rows and prompt tokens, few or
// many) with weights of GGML type `kind` (Q8_0, Q4_0, Q4_1) as int_gemm computes it: x
// rounded to 16 bits per block of 32, each block's exact integer product scaled once
// (AVX-512 VNNI, or AVX2 with FMA and F16C).
bool int_gemm_path(int64_t kind);

// y [N, T]'s first D columns = W [N, row_bytes] @ x [K, T]'s first D columns, W's rows in
// format `kind`, on up to `parts` threads; y's other columns are left alone.
void int_gemm(int64_t kind, const uint8_t* w, int64_t row_bytes, int64_t N, const float* x,
              int64_t T, int64_t D, int64_t K, float* y, int parts);

}  // namespace jaxchat
