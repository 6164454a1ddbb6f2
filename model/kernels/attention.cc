// Decode attention over the paged KV pool, for XLA:CPU through jax.ffi.
//
//   out[r, k, g] = softmax(q[r, k, g] · keys / sqrt(H)) @ values
//
// over positions 0..context[r] of row r, read block by block through its block table
// (model/nn/attention.py lays out the pool: k [L·NB, K, H, BS], v [L·NB, K, BS, H]).
// XLA gathers each chunk's blocks into a new array before its two products; for the
// one to eight rows of a decode step that copy and the loop around it cost more than
// the arithmetic. Here each (row, kv head, query head) reads its blocks in place: the
// scores 16 positions at a time (positions are minor in a key block), then one
// softmax, then the values (features minor). Rows with context -1 are idle: output 0.
//
// Prior attention (PriorAttentionImpl) is the prefill region's part over the positions its
// sequences already have in the pool (a later chunk of a long prompt, a cached prefix),
// one prior group (positions and block table) after another: the queries that see a
// group read its blocks in place, in tiles of up to 8 queries of one kv head (its query
// heads at each seeing position), each key and value vector loaded once per tile; a few
// tiles over a long prior split its positions among the cores. They return their online-softmax state (max, sum and unnormalised
// output), which model/nn/attention.py merges with the region's own part.
//
// Region attention (RegionAttentionImpl) is that own part: each segment's queries over
// the segment's keys up to their own position, in the same tiles (runs of a segment's
// positions with their group's query heads), so no work goes to other segments' keys or
// past the diagonal, which XLA's dense [P, P] scores spend most of a step of many short
// prompts on.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "vec16.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#define MEMBER inline __attribute__((always_inline))

// The largest of `start` and row[0 … n), 16 at a time (a scalar max is a chain of
// dependent instructions, as long as the scores' products).
INLINE float max_of(const float* row, int64_t n, float start) {
  f32x16 most = f32x16{} + start;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const f32x16 v = load16(row + i);
    most = most > v ? most : v;
  }
  float top = start;
  for (int l = 0; l < 16; ++l) top = std::max(top, most[l]);
  for (; i < n; ++i) top = std::max(top, row[i]);
  return top;
}

// e with its lanes for positions i … i + 15 at or past `n` zeroed.
INLINE f32x16 before(f32x16 e, int64_t i, int64_t n) {
  const i32x16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i32x16 keep = lanes < static_cast<int32_t>(std::clamp<int64_t>(n - i, 0, 16));
  return keep ? e : f32x16{};
}

constexpr int kMaxHead = 512;  // head dims up to this (multiples of 16)

struct Shapes {
  int64_t K, G, H, BS, MB, blocks;  // kv heads, group, head dim, block size, table width, pool
};

constexpr int64_t kGroupTile = 4;  // query heads of one kv head that share each load

// TG query heads of one kv head of one row (q and out [TG, H]), each over the row's
// positions 0..context. Every key and value vector is loaded once for all TG, so a row's
// keys cross the memory bus once per kv head, not once per query head.
template <int TG>
INLINE void heads(const Shapes& s, const float* q, const float* kpool, const float* vpool,
                  int32_t context, const int32_t* table, int32_t base, int64_t kh, float scale,
                  float* out) {
  const int64_t H = s.H, BS = s.BS;
  if (context < 0) {
    std::fill(out, out + TG * H, 0.0f);
    return;
  }
  const int64_t n = std::min<int64_t>(int64_t{context} + 1, s.MB * BS), nb = (n + BS - 1) / BS;
  const int64_t width = nb * BS;  // one query's scores
  thread_local std::vector<float> scores;
  scores.resize(TG * width);
  auto block = [&](int64_t b) {  // the pool block behind table entry b (clamped, as XLA's gather)
    return std::clamp<int64_t>(int64_t{table[b]} + base, 0, s.blocks - 1);
  };
  for (int64_t b = 0; b < nb; ++b) {
    const float* kb = kpool + (block(b) * s.K + kh) * H * BS;  // [H, BS]
    for (int64_t j = 0; j < BS; j += 16) {
      f32x16 acc[TG] = {};
      for (int64_t h = 0; h < H; ++h) {
        const f32x16 key = load16(kb + h * BS + j);
        for (int g = 0; g < TG; ++g) acc[g] += q[g * H + h] * key;
      }
      for (int g = 0; g < TG; ++g) store16(&scores[g * width + b * BS + j], acc[g] * scale);
    }
  }
  float sum[TG];
  for (int g = 0; g < TG; ++g) {
    float* row = &scores[g * width];
    const float top = max_of(row, n, row[0]);
    f32x16 total = {};
    for (int64_t i = 0; i < width; i += 16) {
      // (the last block's positions past the context count for nothing)
      const f32x16 e = before(exp16(load16(row + i) - top), i, n);
      store16(row + i, e);
      total += e;
    }
    sum[g] = 0;
    for (int l = 0; l < 16; ++l) sum[g] += total[l];
  }
  for (int64_t v = 0; v < H / 16; ++v) {  // values: one feature slice of every query at once
    f32x16 acc[TG] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const float* vb = vpool + (block(b) * s.K + kh) * BS * H;  // [BS, H]
      for (int64_t p = 0; p < std::min(BS, n - b * BS); ++p) {
        const f32x16 value = load16(vb + p * H + 16 * v);
        for (int g = 0; g < TG; ++g) acc[g] += scores[g * width + b * BS + p] * value;
      }
    }
    for (int g = 0; g < TG; ++g) store16(out + g * H + 16 * v, acc[g] / sum[g]);
  }
}

// The G query heads of kv head kh of one row, kGroupTile at a time.
JAXCHAT_TARGETS
void group(const Shapes& s, const float* q, const float* kpool, const float* vpool,
           int32_t context, const int32_t* table, int32_t base, int64_t kh, float scale,
           float* out) {
  for (int64_t g = 0; g < s.G; g += kGroupTile) {
    const float* qg = q + g * s.H;
    float* og = out + g * s.H;
    switch (std::min(kGroupTile, s.G - g)) {
      case 1: heads<1>(s, qg, kpool, vpool, context, table, base, kh, scale, og); break;
      case 2: heads<2>(s, qg, kpool, vpool, context, table, base, kh, scale, og); break;
      case 3: heads<3>(s, qg, kpool, vpool, context, table, base, kh, scale, og); break;
      default: heads<4>(s, qg, kpool, vpool, context, table, base, kh, scale, og); break;
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> context,
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
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *cp = context.typed_data(), *tp = tables.typed_data();
  const int32_t b0 = base.typed_data()[0];
  float* op = out->typed_data();
  int64_t work = 0;
  for (int64_t r = 0; r < R; ++r) work += std::max(0, cp[r] + 1);
  int parts = threads > 0 ? static_cast<int>(threads) : jaxchat::Workers::get().size();
  // Below about 8k positions·heads the work is shorter than waking another thread.
  if (work * s.K * s.G < 8192) parts = 1;
  jaxchat::Workers::get().run(R * s.K, parts, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // (row, kv head): its G query heads
      const int64_t r = i / s.K, kh = i % s.K, at = i * s.G * s.H;
      group(s, qp + at, kp, vp, cp[r], tp + r * s.MB, b0, kh, scale, op + at);
    }
  });
  return ffi::Error::Success();
}


constexpr int64_t kTile = 8;      // queries that share each key and value load
constexpr int64_t kSpan = 256;    // positions whose scores are held at once
constexpr float kNegInf = -3.4028234663852886e38f;  // jnp.finfo(float32).min, as in JAX

struct PriorShapes {
  int64_t K, G, H, P, BS, blocks;  // kv heads, group, head dim, region, block size, pool
};

// One query of the prior or region attention: its head's queries start at `q` (q [H, P],
// positions minor) and it is query `p` of them; it sees keys before `limit` (an index into
// the key source); its outputs are entry `out` of acc [K·G·P, H] and top/total [K·G·P].
struct Query {
  const float* q;
  int64_t p, out, limit;
};

// An online-softmax state of kTile queries over some positions: max, sum, unnormalised
// output (plain floats: a std::vector holds these, with no more than its default alignment).
struct Partial {
  float top[kTile], total[kTile];
  float acc[kTile][kMaxHead];
};

// Keys and values of one kv head of a sequence in the pool, read through its block table.
struct PoolKeys {
  const float *kpool, *vpool;
  const int32_t* table;
  int64_t K, H, BS, blocks, kh;
  int32_t base;
  MEMBER int64_t block(int64_t b) const {
    return std::clamp<int64_t>(int64_t{table[b]} + base, 0, blocks - 1);
  }
  // Keys pos … pos + 15 (pos a multiple of 16, BS too), feature h.
  MEMBER f32x16 keys(int64_t pos, int64_t h) const {
    return load16(kpool + (block(pos / BS) * K + kh) * H * BS + pos % BS + h * BS);
  }
  // Features 16v … 16v + 15 of the value at pos.
  MEMBER f32x16 value(int64_t pos, int64_t v) const {
    return load16(vpool + (block(pos / BS) * K + kh) * BS * H + (pos % BS) * H + 16 * v);
  }
};

// Keys and values of one kv head of the prefill region: k [H, W] (positions minor, W at
// least the region plus 16, so a load of 16 never leaves it), v [P, H].
struct RegionKeys {
  const float *k, *v;
  int64_t W, H;
  MEMBER f32x16 keys(int64_t pos, int64_t h) const { return load16(k + h * W + pos); }
  MEMBER f32x16 value(int64_t pos, int64_t v_) const { return load16(v + pos * H + 16 * v_); }
};

// The TT queries `qs` (all of one kv head) over keys [from, to) of `src`, each seeing those
// before its limit, into `out`. Every key and value vector is loaded once for all TT.
template <int TT, class Keys>
INLINE void span(const Keys& src, int64_t H, int64_t P, const Query* qs, int64_t from,
                 int64_t to, float scale, Partial& out) {
  const int64_t nv = H / 16;
  float qt[kMaxHead][TT];  // the queries, feature-major, scaled
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < TT; ++t) qt[h][t] = qs[t].q[h * P + qs[t].p] * scale;
  float top[TT], total[TT] = {};
  std::fill(top, top + TT, kNegInf);
  f32x16 acc[TT][kMaxHead / 16] = {};
  alignas(64) float scores[TT][kSpan];
  for (int64_t start = from; start < to; start += kSpan) {
    const int64_t n = std::min(kSpan, to - start);
    // Scores, 32 positions at a time (each query feature loaded once for two vectors of
    // keys: twice the independent sums in flight), then 16.
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      f32x16 lo[TT] = {}, hi[TT] = {};
      for (int64_t h = 0; h < H; ++h) {
        const f32x16 key_lo = src.keys(start + j, h), key_hi = src.keys(start + j + 16, h);
        for (int64_t t = 0; t < TT; ++t) {
          lo[t] += qt[h][t] * key_lo;
          hi[t] += qt[h][t] * key_hi;
        }
      }
      for (int64_t t = 0; t < TT; ++t) {
        store16(&scores[t][j], lo[t]);
        store16(&scores[t][j + 16], hi[t]);
      }
    }
    for (; j < n; j += 16) {
      f32x16 sc[TT] = {};
      for (int64_t h = 0; h < H; ++h) {
        const f32x16 key = src.keys(start + j, h);
        for (int64_t t = 0; t < TT; ++t) sc[t] += qt[h][t] * key;
      }
      for (int64_t t = 0; t < TT; ++t) store16(&scores[t][j], sc[t]);
    }
    for (int64_t t = 0; t < TT; ++t) {
      float* row = scores[t];
      const int64_t seen = std::clamp<int64_t>(qs[t].limit - start, 0, n);
      const float new_top = max_of(row, seen, top[t]);
      const float rescale = std::exp(top[t] - new_top);
      top[t] = new_top;
      f32x16 sum = {};
      for (int64_t i = 0; i < n; i += 16) {
        const f32x16 e = before(exp16(load16(row + i) - new_top), i, seen);
        store16(row + i, e);
        sum += e;
      }
      float add = 0;
      for (int l = 0; l < 16; ++l) add += sum[l];
      total[t] = total[t] * rescale + add;
      for (int64_t v = 0; v < nv; ++v) acc[t][v] *= rescale;
    }
    // Values: two feature slices of every query at once (each weight loaded once for
    // both), then one.
    int64_t v = 0;
    for (; v + 2 <= nv; v += 2) {
      f32x16 lo[TT], hi[TT];
      for (int64_t t = 0; t < TT; ++t) lo[t] = acc[t][v], hi[t] = acc[t][v + 1];
      for (int64_t i = 0; i < n; ++i) {
        const f32x16 value_lo = src.value(start + i, v), value_hi = src.value(start + i, v + 1);
        for (int64_t t = 0; t < TT; ++t) {
          lo[t] += scores[t][i] * value_lo;
          hi[t] += scores[t][i] * value_hi;
        }
      }
      for (int64_t t = 0; t < TT; ++t) acc[t][v] = lo[t], acc[t][v + 1] = hi[t];
    }
    for (; v < nv; ++v) {
      f32x16 part[TT];
      for (int64_t t = 0; t < TT; ++t) part[t] = acc[t][v];
      for (int64_t i = 0; i < n; ++i) {
        const f32x16 value = src.value(start + i, v);
        for (int64_t t = 0; t < TT; ++t) part[t] += scores[t][i] * value;
      }
      for (int64_t t = 0; t < TT; ++t) acc[t][v] = part[t];
    }
  }
  for (int64_t t = 0; t < TT; ++t) {
    out.top[t] = top[t];
    out.total[t] = total[t];
    for (int64_t v = 0; v < nv; ++v) store16(&out.acc[t][16 * v], acc[t][v]);
  }
}

// `span` for `count` (1 … kTile) queries: a part-filled tile costs its own queries only.
template <class Keys>
INLINE void tile_of(int64_t count, const Keys& src, int64_t H, int64_t P, const Query* qs,
                    int64_t from, int64_t to, float scale, Partial& out) {
  switch (count) {
#define JAXCHAT_TILE(TT) \
  case TT:               \
    return span<TT>(src, H, P, qs, from, to, scale, out);
    JAXCHAT_TILE(1)
    JAXCHAT_TILE(2)
    JAXCHAT_TILE(3)
    JAXCHAT_TILE(4)
    JAXCHAT_TILE(5)
    JAXCHAT_TILE(6)
    JAXCHAT_TILE(7)
    default:
      return span<kTile>(src, H, P, qs, from, to, scale, out);
#undef JAXCHAT_TILE
  }
}

JAXCHAT_TARGETS
void prior_tile(int64_t count, const PoolKeys& src, int64_t H, int64_t P, const Query* qs,
                int64_t from, int64_t to, float scale, Partial& out) {
  tile_of(count, src, H, P, qs, from, to, scale, out);
}

JAXCHAT_TARGETS
void region_tile(int64_t count, const RegionKeys& src, int64_t H, int64_t P, const Query* qs,
                 int64_t from, int64_t to, float scale, Partial& out) {
  tile_of(count, src, H, P, qs, from, to, scale, out);
}

// The state of `n` queries that see no keys: max -inf, sum 0, output 0.
void no_keys(int64_t n, int64_t H, float* ap, float* tp, float* sp) {
  std::fill(ap, ap + n * H, 0.0f);
  std::fill(tp, tp + n, kNegInf);
  std::fill(sp, sp + n, 0.0f);
}

// Each query's merged state from its tile's partial states over `splits` ranges of keys.
void merge_into(const std::vector<Partial>& partials, const std::vector<Query>& queries,
                const std::vector<int64_t>& counts, int64_t splits, int64_t H, float* ap,
                float* tp, float* sp) {
  for (size_t unit = 0; unit < counts.size(); ++unit) {
    for (int64_t t = 0; t < counts[unit]; ++t) {
      float best = kNegInf;
      for (int64_t split = 0; split < splits; ++split)
        best = std::max(best, partials[unit * splits + split].top[t]);
      float sum = 0;
      f32x16 out[kMaxHead / 16] = {};
      for (int64_t split = 0; split < splits; ++split) {
        const Partial& part = partials[unit * splits + split];
        const float weight = std::exp(part.top[t] - best);
        sum += part.total[t] * weight;
        for (int64_t v = 0; v < H / 16; ++v) out[v] += weight * load16(&part.acc[t][16 * v]);
      }
      const int64_t o = queries[unit * kTile + t].out;
      tp[o] = best;
      sp[o] = sum;
      for (int64_t v = 0; v < H / 16; ++v) store16(ap + o * H + 16 * v, out[v]);
    }
  }
}

// One prior group's attention: the queries at `seeing` positions over `n` positions
// through block table `bp`, their states written to ap, tp, sp.
void prior_group(const PriorShapes& s, const float* qp, const float* kp, const float* vp,
                 const int32_t* bp, int32_t b0, int64_t n, const std::vector<int64_t>& seeing,
                 float scale, float* ap, float* tp, float* sp) {
  // Each kv head's queries (every query head of its group, at every seeing position) in
  // tiles of up to kTile, so a few seeing positions still fill tiles with the group's heads.
  const int64_t seen = static_cast<int64_t>(seeing.size()), per_head = s.G * seen;
  const int64_t tiles = (per_head + kTile - 1) / kTile, units = s.K * tiles;
  std::vector<Query> queries(units * kTile);
  std::vector<int64_t> counts(units);
  for (int64_t kh = 0; kh < s.K; ++kh)
    for (int64_t j = 0; j < per_head; ++j) {
      const int64_t head = kh * s.G + j / seen, p = seeing[j % seen];
      queries[(kh * tiles + j / kTile) * kTile + j % kTile] = {qp + head * s.H * s.P, p,
                                                               head * s.P + p, n};
      ++counts[kh * tiles + j / kTile];
    }
  // A few tiles over a long prior are split into ranges of positions (each a multiple of
  // kSpan long) that run in parallel, their states merged after: every core has work.
  const int parts = n * per_head < 8192 ? 1 : jaxchat::Workers::get().size();
  const int64_t spans = (n + kSpan - 1) / kSpan;
  const int64_t splits = std::clamp<int64_t>((4 * parts + units - 1) / units, 1, spans);
  std::vector<Partial> partials(units * splits);
  jaxchat::Workers::get().run(units * splits, parts, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t unit = i / splits, split = i % splits, kh = unit / tiles;
      const PoolKeys src{kp, vp, bp, s.K, s.H, s.BS, s.blocks, kh, b0};
      const int64_t from = spans * split / splits * kSpan;
      const int64_t to = std::min(n, spans * (split + 1) / splits * kSpan);
      prior_tile(counts[unit], src, s.H, s.P, &queries[unit * kTile], from, to, scale,
                 partials[i]);
    }
  });
  merge_into(partials, queries, counts, splits, s.H, ap, tp, sp);
}

ffi::Error PriorAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table,
                              ffi::Buffer<ffi::S32> prior, ffi::Buffer<ffi::S32> sees,
                              ffi::Buffer<ffi::S32> base, ffi::ResultBuffer<ffi::F32> acc,
                              ffi::ResultBuffer<ffi::F32> top, ffi::ResultBuffer<ffi::F32> total,
                              float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "prior attention: q [K, G, H, P], k [NB, K, H, BS], v [NB, K, BS, H], tables [Q, MB]");
  PriorShapes s{qd[0], qd[1], qd[2], qd[3], kd[3], kd[0]};
  const int64_t groups = td[0], width = td[1];
  if (kd[1] != s.K || kd[2] != s.H || vd[0] != s.blocks || vd[1] != s.K || vd[2] != s.BS ||
      vd[3] != s.H || static_cast<int64_t>(sees.element_count()) != s.P ||
      static_cast<int64_t>(prior.element_count()) != groups)
    return ffi::Error::InvalidArgument("prior attention: q, pool, groups and tokens disagree");
  if (s.H % 16 || s.H > kMaxHead || s.BS % 16)
    return ffi::Error::InvalidArgument("prior attention: head dim " + std::to_string(s.H) +
                                       " and block size " + std::to_string(s.BS) +
                                       " must be multiples of 16 (head dim up to 512)");
  const int32_t* group = sees.typed_data();
  float *ap = acc->typed_data(), *tp = top->typed_data(), *sp = total->typed_data();
  no_keys(s.K * s.G * s.P, s.H, ap, tp, sp);  // the seeing queries are set below
  std::vector<int64_t> seeing;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n = std::clamp<int64_t>(prior.typed_data()[g], 0, width * s.BS);
    seeing.clear();
    for (int64_t p = 0; p < s.P; ++p)
      if (group[p] == g) seeing.push_back(p);
    if (n == 0 || seeing.empty()) continue;
    prior_group(s, q.typed_data(), k.typed_data(), v.typed_data(),
                table.typed_data() + g * width, base.typed_data()[0], n, seeing, scale, ap, tp,
                sp);
  }
  return ffi::Error::Success();
}

// The prefill region's attention within each segment (causal): query t of a segment that
// starts at a sees the region's keys a … t. Its tiles are runs of the segment's positions
// (each with its group's query heads), so a tile's keys end at its last position: no work
// for other segments' keys or for keys past the diagonal's tile.
ffi::Error RegionAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segments,
                               ffi::ResultBuffer<ffi::F32> acc, ffi::ResultBuffer<ffi::F32> top,
                               ffi::ResultBuffer<ffi::F32> total, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument(
        "region attention: q [K, G, H, P], k [K, H, W] (W >= P + 16), v [K, P, H]");
  const int64_t K = qd[0], G = qd[1], H = qd[2], P = qd[3], W = kd[2];
  if (kd[0] != K || kd[1] != H || W < P + 16 || vd[0] != K || vd[1] != P || vd[2] != H ||
      static_cast<int64_t>(segments.element_count()) != P)
    return ffi::Error::InvalidArgument("region attention: q, keys, values and segments disagree");
  if (H % 16 || H > kMaxHead)
    return ffi::Error::InvalidArgument("region attention: head dim " + std::to_string(H) +
                                       " must be a multiple of 16 up to 512");
  const int32_t* seg = segments.typed_data();
  float *ap = acc->typed_data(), *tp = top->typed_data(), *sp = total->typed_data();
  no_keys(K * G * P, H, ap, tp, sp);  // padding stays so
  // Tiles of one kv head: a segment's positions in order, each with its G query heads.
  const float* qp = q.typed_data();
  std::vector<Query> queries;
  std::vector<int64_t> counts, starts;  // per tile: queries, the segment's first position
  for (int64_t kh = 0; kh < K; ++kh)
    for (int64_t a = 0, b; a < P; a = b) {
      for (b = a + 1; b < P && seg[b] == seg[a]; ++b) {
      }
      if (seg[a] < 0) continue;
      for (int64_t j = 0; j < (b - a) * G; ++j) {
        if (j % kTile == 0) {
          counts.push_back(0);
          starts.push_back(a);
          queries.resize(counts.size() * kTile);
        }
        const int64_t t = a + j / G, head = kh * G + j % G;
        queries[(counts.size() - 1) * kTile + j % kTile] = {qp + head * H * P, t, head * P + t,
                                                            t + 1};
        ++counts.back();
      }
    }
  const int64_t units = static_cast<int64_t>(counts.size());
  if (units == 0) return ffi::Error::Success();
  std::vector<Partial> partials(units);
  int64_t work = 0;
  for (int64_t u = 0; u < units; ++u) work += queries[u * kTile + counts[u] - 1].limit - starts[u];
  const int parts = work * kTile < 8192 ? 1 : jaxchat::Workers::get().size();
  const float *kp = k.typed_data(), *vp = v.typed_data();
  jaxchat::Workers::get().run(units, parts, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Query* qs = &queries[u * kTile];
      const int64_t kh = (qs[0].out / P) / G;
      const RegionKeys src{kp + kh * H * W, vp + kh * P * H, W, H};
      region_tile(counts[u], src, H, P, qs, starts[u], qs[counts[u] - 1].limit, scale,
                  partials[u]);
    }
  });
  merge_into(partials, queries, counts, 1, H, ap, tp, sp);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatPriorAttention, PriorAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatRegionAttention, RegionAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
