// RMSNorm over the features of a step's tokens, for XLA:CPU through jax.ffi.
//
//   y[:, t] = x[:, t] / sqrt(mean(x[:, t]^2) + eps) * scale
//
// for x [D, T] (feature-major, as the model holds activations), its first `used` columns
// (the step's real tokens; the rest of the step's fixed shape is padding, left zero).
// XLA's reduction sums a column's squares in an order that depends on the step's shape,
// so a token's norm moved in its last bits with the tokens beside it. Here each column's
// sum runs over the features in order, 16 columns to a vector, the last few through a
// zero-padded copy: a token's output is the same to the bit in any step (with the
// attention kernels' prompt attention, a prompt's keys and values do not depend on how
// it was cut into chunks).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Columns of x (x's row d at x + d * stride), a vector Vec of them, into y (likewise).
template <typename Vec>
INLINE void norm_lanes(const float* x, int64_t stride, const float* scale, int64_t D, float eps,
                       float* y) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  auto at = [&](int64_t d) {
    Vec v;
    std::memcpy(&v, x + d * stride, sizeof v);
    return v;
  };
  Vec squares{};
  for (int64_t d = 0; d < D; ++d) squares += at(d) * at(d);
  Vec inv{};  // (every lane set below)
  for (int l = 0; l < L; ++l) inv[l] = 1.0f / std::sqrt(squares[l] / D + eps);
  for (int64_t d = 0; d < D; ++d) {
    const Vec v = at(d) * inv * scale[d];
    std::memcpy(y + d * stride, &v, sizeof v);
  }
}

// 16 columns of x into y: as one vector, or where the CPU lacks AVX-512 (whose vectors of
// 16 GCC keeps in memory) as two of 8, each lane's arithmetic the same.
JAXCHAT_TARGETS
void norm16(const float* x, int64_t stride, const float* scale, int64_t D, float eps,
            float* y) {
  if (wide_vectors()) return norm_lanes<f32x16>(x, stride, scale, D, eps, y);
  norm_lanes<f32x8>(x, stride, scale, D, eps, y);
  norm_lanes<f32x8>(x + 8, stride, scale, D, eps, y + 8);
}

// Columns [16 c0, 16 c1) of x [D, T] into y; the last group may be partial (columns up
// to U): it goes through a copy padded with zeros, so its columns take the same vector
// arithmetic as any other's.
void norm_columns(const float* x, const float* scale, int64_t D, int64_t T, int64_t U,
                  float eps, float* y, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t t0 = 16 * c, n = std::min<int64_t>(16, U - t0);
    if (n == 16) {
      norm16(x + t0, T, scale, D, eps, y + t0);
      continue;
    }
    thread_local std::vector<float> padded;
    padded.assign(D * 16, 0.0f);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = 0; l < n; ++l) padded[d * 16 + l] = x[d * T + t0 + l];
    norm16(padded.data(), 16, scale, D, eps, padded.data());
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = 0; l < n; ++l) y[d * T + t0 + l] = padded[d * 16 + l];
  }
}

ffi::Error RmsNormImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::S32> used, ffi::ResultBuffer<ffi::F32> y, float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.element_count() != static_cast<size_t>(xd[0]) ||
      used.element_count() != 1)
    return ffi::Error::InvalidArgument("rms norm: x [D, T], scale [D] and used []");
  const int64_t D = xd[0], T = xd[1];
  const int64_t U = std::clamp<int64_t>(used.typed_data()[0], 0, T);
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  float* yp = y->typed_data();
  for (int64_t d = 0; d < D; ++d) std::fill(yp + d * T + U, yp + (d + 1) * T, 0.0f);
  const int64_t groups = (U + 15) / 16;
  // Below about 16k values the work is shorter than waking another thread.
  const int parts = D * U < 16384 ? 1 : jaxchat::Workers::get().size();
  jaxchat::Workers::get().run(groups, parts, [&](int64_t c0, int64_t c1) {
    norm_columns(xp, sp, D, T, U, eps, yp, c0, c1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatRmsNorm, RmsNormImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
