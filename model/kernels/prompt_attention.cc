// Prompt attention over the paged KV pool, for XLA:CPU through jax.ffi (the decode rows':
// attention.cc, the pool's layout: model/nn/attention.py).
//
// Prompt attention (PromptAttentionImpl) is the prefill region's: each segment's queries
// over the positions its sequence already has in the pool (a later chunk of a long prompt,
// a cached prefix: its prior group's, read through the group's block table) and then the
// segment's own keys up to their position, in tiles of up to 16 queries of one kv head (a
// run of the segment's positions, each with its query heads), each key and value vector
// loaded once per tile, no work for other segments' keys or past the diagonal's tile.
// Where a kv head's tiles are few, each span's pool blocks are first read in address order.
//
// A query's softmax runs online over spans of kSpan positions counted from position 0,
// whichever of the pool and the region holds them, in one pass: so a token's output is
// the same to the bit however its prompt was cut into chunks, or however much of it came
// from the prefix cache (the scores' lanes are positions modulo 16, its sums in position
// order).

#include "attention.h"

namespace {

constexpr int64_t kTile = 16;     // queries that share each key and value load (at most)
constexpr int64_t kGroup = 16;     // tiles that go through each span of keys and values together
constexpr int64_t kSpan = 256;    // positions whose scores are held at once
constexpr float kNegInf = -3.4028234663852886e38f;  // jnp.finfo(float32).min, as in JAX

// One query of the prompt attention: its head's queries start at `q` (q [H, P], positions
// minor) and it is query `p` of them; it sees positions before `limit`; its output is row
// `out` of out [K·G·P, H].
struct Query {
  const float* q;
  int64_t p, out, limit;
};

// The keys and values of one kv head of a segment: positions before `split` from the pool
// through block table `table` (the pool's blocks k [NB, K, H, BS], v [NB, K, BS, H]), the
// rest from the region (k [H, W], positions minor, W at least the region plus 16; v
// [P, H]), where position `split` is the region's entry `first`.
template <typename T>
struct PromptKeys {
  const T *kpool, *vpool;
  const float *k, *v;
  const int32_t* table;
  int64_t K, H, BS, blocks, kh, W, split, first;
  int32_t base;
  MEMBER int64_t block(int64_t pos) const {
    return std::clamp<int64_t>(int64_t{table[pos / BS]} + base, 0, blocks - 1);
  }
  MEMBER const T* pool_keys(int64_t pos) const {  // [H] with stride BS, 16 positions
    return kpool + (block(pos) * K + kh) * H * BS + pos % BS;
  }
  // Reads the pool's keys and values of positions [from, to) below split once, in address
  // order (a block's kv head is two runs of H·BS elements), ahead of the span's products.
  // Those read the keys as runs of 16 positions at the block's stride and the values a
  // slice of every position at a time; from memory that pattern streams at a fraction of
  // an in-order sweep's speed, from the caches it costs nothing more. A 4-token chunk
  // over 3,000 positions, each layer's blocks read once: 0.60 -> 0.42 ms a layer.
  MEMBER void read_ahead(int64_t from, int64_t to) const {
    uint64_t sink = 0;  // a word of every cache line (the load brings the line in)
    const int64_t bytes = H * BS * int64_t{sizeof(T)};
    for (int64_t pos = from - from % BS; pos < std::min(to, split); pos += BS) {
      const char* keys = reinterpret_cast<const char*>(kpool + (block(pos) * K + kh) * H * BS);
      const char* values = reinterpret_cast<const char*>(vpool + (block(pos) * K + kh) * BS * H);
      for (int64_t line = 0; line < bytes; line += 64) {
        uint64_t a, b;
        std::memcpy(&a, keys + line, sizeof a);
        std::memcpy(&b, values + line, sizeof b);
        sink ^= a ^ b;
      }
    }
    asm volatile("" : : "r"(sink));
  }
  MEMBER const float* region_keys(int64_t pos) const {  // [H] with stride W
    return k + first + pos - split;
  }
  // The value at pos, [H]: from the pool below split, as floats (widened into `buffer`
  // from a float16 pool).
  MEMBER const float* value(int64_t pos, float* buffer) const {
    if (pos >= split) return v + (first + pos - split) * H;
    return floats(vpool + (block(pos) * K + kh) * BS * H + (pos % BS) * H, 16, H / 16, buffer).p;
  }
};

// Scores of queries [t0, t0 + TQ) (their scaled features qt [H][TT]) over R runs of 16
// keys, into scores[t][j …], in vectors Vec.
template <typename Vec, int TT, int TQ, int R>
INLINE void span_scores(const Piece* runs, const float (*qt)[TT], int64_t H, int t0,
                        float (*scores)[kSpan], int64_t j) {
  constexpr int L = sizeof(Vec) / sizeof(float);
  run_scores<Vec, TQ, R>(
      runs, H, [&](int64_t h, int t) { return qt[h][t0 + t]; },
      [&](int t, int r, int p, const Vec& sums) {
        std::memcpy(&scores[t0 + t][j + 16 * r + L * p], &sums, sizeof(Vec));
      });
}

// Feature slices [v, v + NV) (of 16) of queries [t0, t0 + TQ), their scores' weighted
// values over n positions added to acc (a query's at acc + t * kMaxHead), in vectors Vec.
template <typename Vec, int TQ, int NV>
INLINE void span_values(const float* const* values, int64_t n, const float (*scores)[kSpan],
                        int t0, float* acc, int64_t v) {
  weighted_values<Vec, TQ, NV>(
      n, [&](int64_t i) { return values[i] + 16 * v; },
      [&](int t, int64_t i) { return scores[t0 + t][i]; },
      [&](int t, int w) { return acc + (t0 + t) * kMaxHead + 16 * (v + w); });
}

// f(t0, TQ) over the TT queries in groups of up to 4 (2 TQ accumulators of vectors of 8 in
// AVX2's 16 registers), TQ a constant.
template <int TT, typename F>
INLINE void in_fours(F f) {
  int t0 = 0;
  for (; t0 + 4 <= TT; t0 += 4) f(t0, std::integral_constant<int, 4>());
  if constexpr (TT % 4 == 3) f(TT - 3, std::integral_constant<int, 3>());
  if constexpr (TT % 4 == 2) f(TT - 2, std::integral_constant<int, 2>());
  if constexpr (TT % 4 == 1) f(TT - 1, std::integral_constant<int, 1>());
}

// The TT queries `qs` (all of one kv head) over positions [from, to) of `src`, each seeing
// those before its limit: their softmax states into `states` (a query's at t * (H + 2)), or
// where `out` is given (the positions are all the query has), their outputs normalised into
// `out` [K·G·P, H] as `normalize` would; with `resume`, from the states there (those of
// the positions before `from`). `scaled`: the queries times the scale, [H][TT]. Every key
// and value vector is loaded once for all TT.
template <int TT, typename T>
INLINE void span(const PromptKeys<T>& src, int64_t H, const Query* qs, const float* scaled,
                 int64_t from, int64_t to, float* states, float* out, bool resume) {
  const int64_t nv = H / 16;
  const float(*qt)[TT] = reinterpret_cast<const float(*)[TT]>(scaled);  // [H][TT]
  float top[TT], total[TT] = {};
  std::fill(top, top + TT, kNegInf);
  f32x16 acc[TT][kMaxHead / 16] = {};
  for (int64_t t = 0; resume && t < TT; ++t) {  // the states of the positions before `from`
    const float* state = states + t * (H + 2);
    for (int64_t v = 0; v < nv; ++v) acc[t][v] = load16(state + 16 * v);
    top[t] = state[H];
    total[t] = state[H + 1];
  }
  alignas(64) float scores[TT][kSpan];
  alignas(64) float straddle[kMaxHead * 16];  // the 16 positions around `split`, if any
  Piece runs[kSpan / 16];  // keys of 16 positions from a multiple of 16: feature h at p + h stride
  const float* values[kSpan];
  thread_local std::vector<float> widened;  // a float16 pool's keys and values in this span
  widened.resize(2 * kSpan * H);
  float *widened_keys = widened.data(), *widened_values = widened_keys + kSpan * H;
  for (int64_t start = from; start < to; start += kSpan) {
    const int64_t n = std::min(kSpan, to - start);
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t pos = start + j;
      float* buffer = widened_keys + j * H;
      if (pos + 16 <= src.split) {
        runs[j / 16] = floats(src.pool_keys(pos), src.BS, H, buffer);
      } else if (pos >= src.split) {
        runs[j / 16] = {src.region_keys(pos), src.W};
      } else {  // pool below split, region from it
        const int64_t cut = src.split - pos;
        const Piece pooled = floats(src.pool_keys(pos), src.BS, H, buffer);
        const float* own = src.region_keys(src.split);
        for (int64_t h = 0; h < H; ++h)
          for (int64_t l = 0; l < 16; ++l)
            straddle[h * 16 + l] =
                l < cut ? pooled.p[h * pooled.stride + l] : own[h * src.W + l - cut];
        runs[j / 16] = {straddle, 16};
      }
    }
    for (int64_t i = 0; i < n; ++i) values[i] = src.value(start + i, widened_values + i * H);
    // Scores, 32 positions at a time for up to 8 queries (each query feature loaded once
    // for two vectors of keys: twice the independent sums in flight), then 16; with
    // vectors of 8, 16 positions for up to 4 queries at a time.
    if (wide_vectors()) {
      int64_t j = 0;
      for (; TT <= 8 && j + 32 <= n; j += 32)
        span_scores<f32x16, TT, TT, 2>(&runs[j / 16], qt, H, 0, scores, j);
      for (; j < n; j += 16) span_scores<f32x16, TT, TT, 1>(&runs[j / 16], qt, H, 0, scores, j);
    } else {
      for (int64_t j = 0; j < n; j += 16)
        in_fours<TT>([&](int t0, auto tq) {
          span_scores<f32x8, TT, decltype(tq)::value, 1>(&runs[j / 16], qt, H, t0, scores, j);
        });
    }
    for (int64_t t = 0; t < TT; ++t) {
      float* row = scores[t];
      const int64_t seen = std::clamp<int64_t>(qs[t].limit - start, 0, n);
      const float new_top = max_of(row, seen, top[t]);
      const float rescale = std::exp(top[t] - new_top);
      top[t] = new_top;
      total[t] = total[t] * rescale + exp_run(row, n, seen, new_top);
      for (int64_t v = 0; v < nv; ++v) acc[t][v] *= rescale;
    }
    // Values: for up to 8 queries two feature slices at once (each weight loaded once for
    // both), then one; with vectors of 8, one slice for up to 4 queries at a time.
    float* sums = reinterpret_cast<float*>(acc);
    if (wide_vectors()) {
      int64_t v = 0;
      for (; TT <= 8 && v + 2 <= nv; v += 2) span_values<f32x16, TT, 2>(values, n, scores, 0, sums, v);
      for (; v < nv; ++v) span_values<f32x16, TT, 1>(values, n, scores, 0, sums, v);
    } else {
      for (int64_t v = 0; v < nv; ++v)
        in_fours<TT>([&](int t0, auto tq) {
          span_values<f32x8, decltype(tq)::value, 1>(values, n, scores, t0, sums, v);
        });
    }
  }
  for (int64_t t = 0; t < TT; ++t) {
    if (out) {
      for (int64_t v = 0; v < nv; ++v) store16(out + qs[t].out * H + 16 * v, acc[t][v] / total[t]);
      continue;
    }
    float* state = states + t * (H + 2);
    for (int64_t v = 0; v < nv; ++v) store16(state + 16 * v, acc[t][v]);
    state[H] = top[t];
    state[H + 1] = total[t];
  }
}

// The tile sizes `span` is compiled for (each size is a copy of its loops: every size from
// 1 to kTile took 28 s of -O3 on a 2-core EPYC). A tile of another count runs as pieces of
// these, the largest first (`pieces_of`), each piece's scaled queries [H][size] one after
// the other; a query's sums are the same in any piece.
constexpr int kSizes[] = {16, 8, 4, 2, 1};

// f(t0, size) for the pieces of a tile of `count` queries.
template <typename F>
INLINE void pieces_of(int64_t count, F f) {
  int64_t t0 = 0;
  for (const int size : kSizes)
    for (; count - t0 >= size; t0 += size) f(t0, size);
}

// `span` for `count` (1 … kTile) queries, in pieces: a part-filled tile costs its own
// queries only.
template <typename T>
INLINE void prompt_tile_of(int64_t count, const PromptKeys<T>& src, int64_t H,
                           const Query* qs, const float* scaled, int64_t from, int64_t to,
                           float* states, float* out, bool resume) {
  pieces_of(count, [&](int64_t t0, int size) {
    const Query* piece = qs + t0;
    const float* q = scaled + t0 * H;
    float* state = states + t0 * (H + 2);
    switch (size) {
#define JAXCHAT_TILE(TT) \
  case TT:               \
    return span<TT>(src, H, piece, q, from, to, state, out, resume);
      JAXCHAT_TILE(1)
      JAXCHAT_TILE(2)
      JAXCHAT_TILE(4)
      JAXCHAT_TILE(8)
      JAXCHAT_TILE(16)
#undef JAXCHAT_TILE
    }
  });
}

#define JAXCHAT_PROMPT_TILE(T)                                                              \
  JAXCHAT_TARGETS void prompt_tile(int64_t count, const PromptKeys<T>& src, int64_t H,      \
                                   const Query* qs, const float* scaled, int64_t from,       \
                                   int64_t to, float* states, float* out, bool resume) {     \
    prompt_tile_of(count, src, H, qs, scaled, from, to, states, out, resume);               \
  }
JAXCHAT_PROMPT_TILE(float)
JAXCHAT_PROMPT_TILE(uint16_t)
#undef JAXCHAT_PROMPT_TILE

// Positions per chunk of a prompt token's attention: its softmax runs online within a
// chunk (over spans of kSpan), the chunks' states (`span`'s) are merged in order (`merge`),
// so a token's output is the same to the bit whichever way the work is shared out (the
// chunks counted from position 0, as the spans).
constexpr int64_t kPromptChunk = 1024;

// One tile: its queries, their segment's first region entry, and its kv head.
struct Tile {
  int64_t count, first, kh;
};

ffi::Error PromptAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::AnyBuffer kpool,
                               ffi::AnyBuffer vpool, ffi::Buffer<ffi::S32> segments,
                               ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> sees,
                               ffi::Buffer<ffi::S32> prior, ffi::Buffer<ffi::S32> tables,
                               ffi::Buffer<ffi::S32> base, ffi::ResultBuffer<ffi::F32> out,
                               float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  auto pk = kpool.dimensions(), pv = vpool.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || vd.size() != 3 || pk.size() != 4 || pv.size() != 4 ||
      td.size() != 2)
    return ffi::Error::InvalidArgument(
        "prompt attention: q [K, G, H, P], k [K, H, W] (W >= P + 16), v [K, P, H], pool k "
        "[NB, K, H, BS] and v [NB, K, BS, H], tables [groups, MB]");
  const int64_t K = qd[0], G = qd[1], H = qd[2], P = qd[3], W = kd[2];
  const int64_t NB = pk[0], BS = pk[3], groups = td[0], MB = td[1];
  const auto n = [](auto& buffer) { return static_cast<int64_t>(buffer.element_count()); };
  if (kd[0] != K || kd[1] != H || W < P + 16 || vd[0] != K || vd[1] != P || vd[2] != H ||
      pk[1] != K || pk[2] != H || pv[0] != NB || pv[1] != K || pv[2] != BS || pv[3] != H ||
      n(segments) != P || n(positions) != P || n(sees) != P || n(prior) != groups)
    return ffi::Error::InvalidArgument("prompt attention: q, keys, pool and layout disagree");
  if (H % 16 || H > kMaxHead || BS % 16)
    return ffi::Error::InvalidArgument("prompt attention: head dim " + std::to_string(H) +
                                       " and block size " + std::to_string(BS) +
                                       " must be multiples of 16 (head dim up to 512)");
  const std::optional<bool> half = halves(kpool, vpool);
  if (!half) return ffi::Error::InvalidArgument("prompt attention: a float32 or float16 pool");
  const int32_t *seg = segments.typed_data(), *pos = positions.typed_data();
  const int32_t *group = sees.typed_data(), *pp = prior.typed_data();
  float* op = out->typed_data();
  std::fill(op, op + K * G * P * H, 0.0f);  // padding stays so
  // Tiles of one kv head: a segment's positions in order, each with its G query heads. A
  // segment continues its prior group (its first position is the group's length) or starts
  // at position 0.
  const float* qp = q.typed_data();
  std::vector<Query> queries;
  std::vector<Tile> tiles;
  int64_t work = 0;
  for (int64_t a = 0, b; a < P; a = b) {
    for (b = a + 1; b < P && seg[b] == seg[a]; ++b) {
    }
    if (seg[a] < 0) continue;
    const int64_t g = group[a], from = pos[a];
    const bool continues = g >= 0 && g < groups && from == pp[g] && from <= MB * BS;
    if (!(continues || (g < 0 && from == 0)))
      return ffi::Error::InvalidArgument(
          "prompt attention: a segment starts neither at 0 nor where its prior group ends");
    // A short segment's queries of a kv head are one tile (up to kTile: each span of its
    // prior read from memory once, its pieces going through it in turn while it is in the
    // caches, where a step's prompt chunk is a few tokens beside decode rows); a longer
    // one's in tiles of kTile / 2, which go through their keys and values with fewer loads.
    const int64_t per = (b - a) * G <= kTile ? kTile : kTile / 2;
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t j = 0; j < (b - a) * G; ++j) {
        if (j % per == 0) {
          tiles.push_back({0, a, kh});
          queries.resize(tiles.size() * kTile);
        }
        const int64_t t = a + j / G, head = kh * G + j % G;
        queries[(tiles.size() - 1) * kTile + j % per] = {qp + head * H * P, t, head * P + t,
                                                         from + t - a + 1};
        ++tiles.back().count;
        work += from + t - a + 1;
      }
  }
  if (tiles.empty()) return ffi::Error::Success();
  const int parts = work < 8192 ? 1 : jaxchat::Workers::get().size();
  const int32_t b0 = base.typed_data()[0];
  // Sets: up to kGroup tiles of one segment's kv head, which read the same keys and
  // values; each span of them is read once from memory, in address order (`read_ahead`),
  // and goes through every tile of the set while it is in the caches. A tile's positions
  // are cut in chunks of kPromptChunk: where the sets are too few to share out among the
  // cores, each (set, chunk) is a piece of work, the chunks' states merged afterwards;
  // else each set is, merging its tiles' chunks itself. The same sums either way (a
  // tile's state carried from span to span through memory), and for a tile of one chunk
  // the same as normalising its one state at once (`merge` takes it times 1), which is
  // what is done then. A tile's states: chunk c's query t at (c * kTile + t) * stride.
  const int64_t stride = H + 2, count = static_cast<int64_t>(tiles.size());
  auto limit = [&](int64_t u) { return queries[u * kTile + tiles[u].count - 1].limit; };
  auto chunks = [&](int64_t u) { return (limit(u) + kPromptChunk - 1) / kPromptChunk; };
  std::vector<std::pair<int64_t, int64_t>> sets;  // [first tile, past the last)
  for (int64_t u = 0; u < count; ++u) {
    if (sets.empty() || sets.back().second - sets.back().first == kGroup ||
        tiles[u - 1].first != tiles[u].first || tiles[u - 1].kh != tiles[u].kh)
      sets.push_back({u, u});
    sets.back().second = u + 1;
  }
  const int64_t n_sets = static_cast<int64_t>(sets.size());
  const bool split = n_sets < 4 * parts;
  int64_t most = 0;
  std::vector<std::pair<int64_t, int64_t>> pieces;  // (set, chunk or -1: all of them)
  for (int64_t i = 0; i < n_sets; ++i) {
    const int64_t group_chunks = chunks(sets[i].second - 1);  // its last tile's are the most
    most = std::max(most, group_chunks);
    if (!split) pieces.push_back({i, -1});
    for (int64_t c = 0; split && c < group_chunks; ++c) pieces.push_back({i, c});
  }
  std::vector<float> states(split ? count * most * kTile * stride : 0);
  auto merged = [&](int64_t u, const float* tile_states) {  // its queries' outputs
    for (int64_t t = 0; t < tiles[u].count; ++t)
      merge(tile_states + t * stride, chunks(u), kTile * stride, H,
            op + queries[u * kTile + t].out * H);
  };
  jaxchat::Workers::get().run(static_cast<int64_t>(pieces.size()), parts, [&](int64_t i0,
                                                                               int64_t i1) {
    thread_local std::vector<float> local;   // a set's tiles' states, chunk by chunk
    thread_local std::vector<float> scaled;  // its tiles' queries times the scale, [H][count]
    for (int64_t i = i0; i < i1; ++i) {
      const auto [gi, c] = pieces[i];
      const auto [u0, u1] = sets[gi];
      scaled.resize((u1 - u0) * H * kTile);
      for (int64_t u = u0; u < u1; ++u) {
        const Query* qs = &queries[u * kTile];
        float* into = &scaled[(u - u0) * H * kTile];
        pieces_of(tiles[u].count, [&](int64_t t0, int size) {  // [H][size] each
          for (int64_t h = 0; h < H; ++h)
            for (int64_t t = t0; t < t0 + size; ++t)
              into[t0 * H + h * size + t - t0] = qs[t].q[h * P + qs[t].p] * scale;
        });
      }
      const Tile& lead = tiles[u0];
      const int64_t g = std::max(0, group[lead.first]);
      // Chunk `at` of the set's tiles: tile u's states at into(u), or its outputs.
      auto chunk = [&](int64_t at, auto into) {
        const int64_t from = at * kPromptChunk;
        auto run = [&](auto* pool_k, auto* pool_v) {
          using T = std::remove_const_t<std::remove_pointer_t<decltype(pool_k)>>;
          const PromptKeys<T> src{pool_k, pool_v, k.typed_data() + lead.kh * H * W,
                                  v.typed_data() + lead.kh * P * H,
                                  tables.typed_data() + g * MB, K, H, BS, NB, lead.kh, W,
                                  pos[lead.first], lead.first, b0};
          const int64_t end = std::min(limit(u1 - 1), from + kPromptChunk);
          for (int64_t start = from; start < end; start += kSpan) {
            src.read_ahead(start, std::min(end, start + kSpan));
            for (int64_t u = u0; u < u1; ++u) {
              const int64_t to = std::min(limit(u), from + kPromptChunk);
              if (start >= to) continue;
              const bool last = start + kSpan >= to;
              prompt_tile(tiles[u].count, src, H, &queries[u * kTile],
                          &scaled[(u - u0) * H * kTile], start, std::min(to, start + kSpan),
                          into(u), last && chunks(u) == 1 ? op : nullptr, start > from);
            }
          }
        };
        if (*half) {
          run(static_cast<const uint16_t*>(kpool.untyped_data()),
              static_cast<const uint16_t*>(vpool.untyped_data()));
        } else {
          run(static_cast<const float*>(kpool.untyped_data()),
              static_cast<const float*>(vpool.untyped_data()));
        }
      };
      if (c >= 0) {
        chunk(c, [&](int64_t u) { return &states[(u * most + c) * kTile * stride]; });
        continue;
      }
      const int64_t group_chunks = chunks(u1 - 1), per_tile = group_chunks * kTile * stride;
      local.resize((u1 - u0) * per_tile);
      for (int64_t at = 0; at < group_chunks; ++at)
        chunk(at, [&](int64_t u) { return &local[(u - u0) * per_tile + at * kTile * stride]; });
      for (int64_t u = u0; u < u1; ++u)
        if (chunks(u) > 1) merged(u, &local[(u - u0) * per_tile]);
    }
  });
  for (int64_t u = 0; split && u < count; ++u)
    if (chunks(u) > 1) merged(u, &states[u * most * kTile * stride]);  // (one: out already)
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatPromptAttention, PromptAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
