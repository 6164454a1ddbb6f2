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
// idle: output 0. (The prompt tokens' attention: prompt_attention.cc.)

#include "attention.h"

namespace {

struct Shapes {
  int64_t K, G, H, BS, MB, blocks;  // kv heads, group, head dim, block size, table width, pool
};

constexpr int64_t kGroupTile = 4;  // query heads of one kv head that share each load

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
// pieces[r].p + h * pieces[r].stride), into out[g][16 r …], in vectors Vec.
template <typename Vec, int TG, int NR>
INLINE void key_runs_of(const Piece* pieces, const float* const* queries, int64_t H, float scale,
                        float* const* out, int64_t first) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  run_scores<Vec, TG, NR>(
      pieces, H, [&](int64_t h, int g) { return queries[g][h]; },
      [&](int g, int r, int p, const Vec& sums) {
        const Vec scaled = sums * scale;
        std::memcpy(out[g] + 16 * (first + r) + L * p, &scaled, sizeof scaled);
      });
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
