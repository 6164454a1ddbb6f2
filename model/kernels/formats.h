// GGUF's block formats (and jaxchat's int8 rows) expanded to f32, and the f32 products
// that read them: qmatmul.cc's few-row path (`rows_of`) and its panels' expansion
// (`expand_row`), on vectors Vec. qmatmul.cc includes this file twice: in namespace
// by16 for its target clones (vectors of 16), and in namespace by8 compiled for AVX2
// (vectors of 8, whose byte-widening helpers are AVX2 intrinsics, which only a function
// compiled for AVX2 may inline). So it has no include guard, and it uses what qmatmul.cc
// defines before it: the format ids, kTile, and the helpers on bytes and vectors.

// Each format as: bytes per block, values per block, and `expand`, which writes a
// block's values as vectors Vec (values 16 g .. 16 g + 15 in w[S g .. S g + S), S =
// kSplit<Vec>) into `w`. A format's 16 values come from 16 bytes (or nibbles of them), the
// h-th vector of them from the h-th kLanes<Vec> of those bytes.
struct Q8_0 {
  static constexpr int kBytes = 34, kValues = 32;
  template <typename Vec>
  INLINE void expand(const uint8_t* b, Vec* w) {
    float d = half_to_float(b);
    for (int i = 0; i < 2 * kSplit<Vec>; ++i) w[i] = signed_at(b + 2 + kLanes<Vec> * i, Vec{}) * d;
  }
};

struct Q4_0 {  // values 0-15 in the low nibbles, 16-31 in the high ones; w = d (q - 8)
  static constexpr int kBytes = 18, kValues = 32;
  template <typename Vec>
  INLINE void expand(const uint8_t* b, Vec* w) {
    constexpr int S = kSplit<Vec>;
    float d = half_to_float(b);
    for (int h = 0; h < S; ++h) {
      Vec low, high;
      nibbles_at(b + 2 + kLanes<Vec> * h, Vec{}, &low, &high);
      w[h] = (low - 8.0f) * d;
      w[S + h] = (high - 8.0f) * d;
    }
  }
};

struct Q4_1 {  // w = d q + m
  static constexpr int kBytes = 20, kValues = 32;
  template <typename Vec>
  INLINE void expand(const uint8_t* b, Vec* w) {
    constexpr int S = kSplit<Vec>;
    float d = half_to_float(b), m = half_to_float(b + 2);
    for (int h = 0; h < S; ++h) {
      Vec low, high;
      nibbles_at(b + 4 + kLanes<Vec> * h, Vec{}, &low, &high);
      w[h] = low * d + m;
      w[S + h] = high * d + m;
    }
  }
};

// Q4_K: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min
// (w = d sc q - dmin m); the 4-bit values of sub-blocks 2j and 2j+1 share 32 bytes.
struct Q4_K {
  static constexpr int kBytes = 144, kValues = 256;
  INLINE void scale_min(int j, const uint8_t* s, int* sc, int* m) {
    if (j < 4) {
      *sc = s[j] & 63;
      *m = s[j + 4] & 63;
    } else {
      *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
      *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
  }
  template <typename Vec>
  INLINE void expand(const uint8_t* b, Vec* w) {
    constexpr int S = kSplit<Vec>;
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qs = b + 16;
    for (int j = 0; j < 4; ++j) {  // 64 values: two sub-blocks
      int sc0, m0, sc1, m1;
      scale_min(2 * j, scales, &sc0, &m0);
      scale_min(2 * j + 1, scales, &sc1, &m1);
      float d0 = d * sc0, d1 = d * sc1, n0 = dmin * m0, n1 = dmin * m1;
      for (int h = 0; h < 2; ++h)
        for (int s = 0; s < S; ++s) {
          Vec low, high;
          nibbles_at(qs + 32 * j + 16 * h + kLanes<Vec> * s, Vec{}, &low, &high);
          w[(4 * j + h) * S + s] = low * d0 - n0;
          w[(4 * j + 2 + h) * S + s] = high * d1 - n1;
        }
    }
  }
};

// Q6_K: 256 values in 16 sub-blocks of 16 with int8 scales; each value's low 4 bits in
// ql, high 2 bits in qh, offset by 32.
struct Q6_K {
  static constexpr int kBytes = 210, kValues = 256;
  template <typename Vec>
  INLINE void expand(const uint8_t* b, Vec* w) {
    constexpr int S = kSplit<Vec>;
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    float d = half_to_float(b + 208);
    for (int n = 0; n < 2; ++n) {  // 128 values
      for (int h = 0; h < 2; ++h) {  // values l = 16 h .. 16 h + 15 of each quarter
        for (int s = 0; s < S; ++s) {
          const int at = 16 * h + kLanes<Vec> * s;
          Vec q[4];
          six_bits_at(ql + 64 * n + at, ql + 64 * n + 32 + at, qh + 32 * n + at, Vec{}, q);
          for (int k = 0; k < 4; ++k) {
            float scale = d * sc[8 * n + 2 * k + h];
            w[(8 * n + 2 * k + h) * S + s] = (q[k] - 32.0f) * scale;
          }
        }
      }
    }
  }
};

// y[n, t0 .. t0+TT) for one weight row of a block format.
template <typename F, typename Vec, int TT>
INLINE void block_row(const uint8_t* row, const float* x, int64_t K, float* y) {
  constexpr int L = kLanes<Vec>, V = F::kValues / L;
  Vec acc[TT] = {};
  Vec w[V];
  for (int64_t b = 0; b < K / F::kValues; ++b) {
    F().expand(row + b * F::kBytes, w);
    const float* xb = x + b * F::kValues;
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < V; ++v) acc[t] += w[v] * load<Vec>(xb + t * K + L * v);
  }
  for (int t = 0; t < TT; ++t) y[t] = sum_of(acc[t]);
}

// jaxchat's int8 rows: a row is an f32 scale, then K int8 values; any K.
template <typename Vec, int TT>
INLINE void int8_row(const uint8_t* row, const float* x, int64_t K, float* y) {
  constexpr int L = kLanes<Vec>;
  float scale;
  std::memcpy(&scale, row, 4);
  const uint8_t* q = row + 4;
  Vec acc[TT] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    Vec w = signed_at(q + k, Vec{});
    for (int t = 0; t < TT; ++t) acc[t] += w * load<Vec>(x + t * K + k);
  }
  for (int t = 0; t < TT; ++t) {
    float s = sum_of(acc[t]);
    for (int64_t j = k; j < K; ++j) s += static_cast<int8_t>(q[j]) * x[t * K + j];
    y[t] = s * scale;
  }
}

template <typename Vec, int TT>
INLINE void one_row(int64_t kind, const uint8_t* row, const float* x, int64_t K, float* y) {
  switch (kind) {
    case kQ8_0: return block_row<Q8_0, Vec, TT>(row, x, K, y);
    case kQ4_0: return block_row<Q4_0, Vec, TT>(row, x, K, y);
    case kQ4_1: return block_row<Q4_1, Vec, TT>(row, x, K, y);
    case kQ4_K: return block_row<Q4_K, Vec, TT>(row, x, K, y);
    case kQ6_K: return block_row<Q6_K, Vec, TT>(row, x, K, y);
    default: return int8_row<Vec, TT>(row, x, K, y);
  }
}

// Weight rows [n0, n1) against columns [from, U) of x, given as rows [U - from, K]: y is
// [N, T], those columns of it written, and its columns from U on zero.
template <typename Vec>
INLINE void rows_of(int64_t kind, const uint8_t* w, int64_t row_bytes, const float* x,
                    int64_t T, int64_t from, int64_t U, int64_t K, float* y, int64_t n0,
                    int64_t n1) {
  float out[kTile];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    std::fill(y + n * T + U, y + (n + 1) * T, 0.0f);
    for (int64_t t0 = from; t0 < U; t0 += kTile) {
      const float* xt = x + (t0 - from) * K;
      switch (std::min<int64_t>(kTile, U - t0)) {
        case 1: one_row<Vec, 1>(kind, row, xt, K, out); break;
        case 2: one_row<Vec, 2>(kind, row, xt, K, out); break;
        case 3: one_row<Vec, 3>(kind, row, xt, K, out); break;
        case 4: one_row<Vec, 4>(kind, row, xt, K, out); break;
        case 5: one_row<Vec, 5>(kind, row, xt, K, out); break;
        case 6: one_row<Vec, 6>(kind, row, xt, K, out); break;
        case 7: one_row<Vec, 7>(kind, row, xt, K, out); break;
        default: one_row<Vec, 8>(kind, row, xt, K, out); break;
      }
      for (int64_t t = t0; t < std::min<int64_t>(U, t0 + kTile); ++t) y[n * T + t] = out[t - t0];
    }
  }
}

template <typename F, typename Vec>
INLINE void expand_blocks(const uint8_t* row, int64_t K, float* out) {
  Vec w[F::kValues / kLanes<Vec>];
  for (int64_t b = 0; b < K / F::kValues; ++b) {
    F().expand(row + b * F::kBytes, w);
    // A store per vector: a copy of the array went through the stack, 16 bytes at a time.
    for (int v = 0; v < F::kValues / kLanes<Vec>; ++v) {
      const Vec value = w[v];
      std::memcpy(out + b * F::kValues + kLanes<Vec> * v, &value, sizeof value);
    }
  }
}

INLINE void expand_int8(const uint8_t* row, int64_t K, float* out) {
  float scale;
  std::memcpy(&scale, row, 4);
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<int8_t>(row[4 + k]) * scale;
}

// One weight row as K floats.
template <typename Vec>
INLINE void expand_row(int64_t kind, const uint8_t* row, int64_t K, float* out) {
  switch (kind) {
    case kQ8_0: return expand_blocks<Q8_0, Vec>(row, K, out);
    case kQ4_0: return expand_blocks<Q4_0, Vec>(row, K, out);
    case kQ4_1: return expand_blocks<Q4_1, Vec>(row, K, out);
    case kQ4_K: return expand_blocks<Q4_K, Vec>(row, K, out);
    case kQ6_K: return expand_blocks<Q6_K, Vec>(row, K, out);
    default: return expand_int8(row, K, out);
  }
}

