// A step's token sampling, for XLA:CPU through jax.ffi: model/nn/sampling.py's `sample`
// (its reference, and the path on other devices) for R rows of logits, row by row.
//
// Per row: the model's log-probability normaliser; penalties and logit bias, then the
// grammar mask, where the row's slot uses them; the greedy token (the first maximum), or
// with a temperature the token where the cumulative probability, in token order, of
// what top-k, top-p and min-p keep first exceeds the row's uniform draw; and the
// TOP_LOGPROBS most likely tokens where the row asks for them. The uniform comes from the
// slot's key and the row's position through JAX's own hash, as the reference's does.
// Under XLA the sampler's many small operations, branches and hashes took about three
// quarters of every step executable's compile (SmolLM2's vocabulary, a 2-core CPU);
// here it is one call.
//
// Top-k keeps the k largest logits and any tied with the last one; top-p then the
// largest logits whose probabilities, renormalised over those, reach top_p, and any tied
// with the last one (the reference finds both cuts by bisection over the logits' order,
// 32 passes over the vocabulary; here by selecting the few largest, as many as the cut
// needs). Sums run in lanes of floats, then in double, in another order than XLA's: a
// draw can differ from the reference's only where its uniform falls within rounding of a
// token's boundary.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "vec16.h"
#include "workers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = std::numeric_limits<float>::lowest();  // jnp.finfo(f32).min
enum Float { kTemperature, kTopP, kMinP, kFrequency, kPresence, kRepetition, kFloats };
enum Int { kTopK, kTopLogprobs, kHasBias, kInts };

struct Inputs {
  const float* logits;   // [R, V]
  const float* floats;   // [B, kFloats]
  const int32_t* ints;   // [B, kInts]
  const int32_t* slots;  // [R]: the row's slot (B or more: none, every setting off)
  const float* bias;     // [B, V]
  const int32_t* counts;
  const bool* seen;
  const int32_t* allowed;  // [R, W]: bit j of word i allows token 32 i + j
  const uint32_t* keys;    // [B, 2]: the slots' PRNG keys
  const int32_t* positions;  // [R]: the position each row samples from
  int64_t V, B, W, K;
};

struct Outputs {
  int32_t* tokens;  // [R]
  float* chosen;    // [R]: the token's log-probability, before any transform
  int32_t* top_ids;  // [R, K]
  float* top_logprobs;
};

INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// JAX's threefry2x32 hash (jax.random's default PRNG): 20 rounds over two 32-bit words,
// keyed by two more.
std::pair<uint32_t, uint32_t> threefry(uint32_t k0, uint32_t k1, uint32_t x0, uint32_t x1) {
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  static constexpr int kRotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  x0 += ks[0], x1 += ks[1];
  for (uint32_t i = 0; i < 5; ++i) {
    for (int r : kRotations[i % 2]) x0 += x1, x1 = (x1 << r | x1 >> (32 - r)) ^ x0;
    x0 += ks[(i + 1) % 3], x1 += ks[(i + 2) % 3] + i + 1;
  }
  return {x0, x1};
}

// The uniform in [0, 1) a row draws at `position` with its slot's key (k0, k1): what
// model/nn/sampling.py's `sample` draws with the key jax.random.fold_in(key, position),
// that is jax.random.uniform(jax.random.split(that key)[1]) (JAX's partitionable threefry:
// split's i-th key hashes the count (0, i), 32 random bits hash (0, 0) and xor the two
// words, a float takes the top 23 as its mantissa).
float uniform_at(uint32_t k0, uint32_t k1, uint32_t position) {
  const auto [f0, f1] = threefry(k0, k1, 0, position);
  const auto [s0, s1] = threefry(f0, f1, 0, 1);
  const auto [b0, b1] = threefry(s0, s1, 0, 0);
  const uint32_t bits = ((b0 ^ b1) >> 9) | 0x3F800000u;
  float one_to_two;
  std::memcpy(&one_to_two, &bits, sizeof one_to_two);
  return one_to_two - 1.0f;
}

// The largest of x[0, n): NaN if any is, as XLA's maximum (-inf for none).
float max_of(const float* x, int64_t n) {
  f32x8 top = f32x8{} - INFINITY;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 v = load8(x + i);
    top = v > top || v != v ? v : top;
  }
  float m = -INFINITY;
  for (int l = 0; l < 8; ++l) m = top[l] > m || top[l] != top[l] ? top[l] : m;
  for (; i < n; ++i) m = x[i] > m || x[i] != x[i] ? x[i] : m;
  return m;
}

// e^(x - top) of x[0, n) into p where x >= cut, else 0; 0 too below e^-87 (a masked
// token's kNegInf, over any temperature, is never drawn).
void weights(const float* x, int64_t n, float top, float cut, float* p) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f32x8 v = load8(x + i);
    const f32x8 d = v - top;
    const f32x8 e = v >= cut && d > -87.0f ? exp_of<f32x8, i32x8>(d) : f32x8{};
    std::memcpy(p + i, &e, sizeof e);
  }
  for (; i < n; ++i) p[i] = x[i] >= cut && x[i] - top > -87.0f ? std::exp(x[i] - top) : 0.0f;
}

// The sum of p[0, n), in lanes of 8 then in double.
double sum_of(const float* p, int64_t n) {
  f32x8 lanes{};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) lanes += load8(p + i);
  double sum = 0;
  for (int l = 0; l < 8; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += p[i];
  return sum;
}

// The first index of the largest value, `top` (max_of's); the last index where there is
// none (a NaN).
int64_t first_max(const float* x, int64_t n, float top) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == top) return i;
  return n - 1;
}

// A logit and its weight, exp(logit - top).
struct Weighted {
  float value, weight;
};

// The weights of kept[lo, hi), summed in double.
double mass_of(const std::vector<Weighted>& kept, size_t lo, size_t hi) {
  double sum = 0;
  for (size_t i = lo; i < hi; ++i) sum += kept[i].weight;
  return sum;
}

// The smallest value top-p keeps among `kept` (the logits top-k kept, in any order, with
// their weights; no NaN): the largest values whose weights, ties included, reach `mass`.
// A selection weighted by the mass above a pivot (quickselect: expected a few passes over
// the values, however many the cut keeps), then a sort of the last few.
float top_p_cut(std::vector<Weighted>& kept, float top, double mass) {
  if (!(mass > 0) || kept.empty()) return top;  // the top logit alone
  size_t lo = 0, hi = kept.size();
  double need = mass;  // of the values in [lo, hi): those above have less than `mass`
  while (hi - lo > 64) {
    const float a = kept[lo].value, b = kept[lo + (hi - lo) / 2].value, c = kept[hi - 1].value;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median
    const auto above = std::partition(kept.begin() + lo, kept.begin() + hi,
                                      [pivot](const Weighted& y) { return y.value > pivot; });
    const size_t m = above - kept.begin();
    const double upper = mass_of(kept, lo, m);
    if (upper >= need) {  // the cut is above the pivot (m > lo: need > 0)
      hi = m;
      continue;
    }
    need -= upper;
    const auto equal = std::partition(above, kept.begin() + hi,
                                      [pivot](const Weighted& y) { return y.value == pivot; });
    const size_t e = equal - kept.begin();  // (e > m: the pivot is among them)
    const double group = mass_of(kept, m, e);
    if (group >= need || e == hi) return pivot;
    need -= group;
    lo = e;
  }
  std::sort(kept.begin() + lo, kept.begin() + hi,
            [](const Weighted& x, const Weighted& y) { return x.value > y.value; });
  double above = 0;  // the weights of the values in [lo, hi) greater than kept[i]'s
  for (size_t i = lo; i < hi;) {
    size_t j = i;
    double group = 0;
    for (; j < hi && kept[j].value == kept[i].value; ++j) group += kept[j].weight;
    if (above + group >= need || j == hi) return kept[i].value;
    above += group, i = j;
  }
  return kept[hi - 1].value;
}

// The token where the cumulative weight (`weights` over `cut`), in token order, first
// exceeds `uniform` times their sum: its block of kBlock tokens by the blocks' sums, then
// the token within; a token of weight 0 is never drawn, whatever the rounding.
int64_t draw(const float* x, int64_t V, float top, float cut, float uniform, float* p) {
  constexpr int64_t kBlock = 512;
  weights(x, V, top, cut, p);
  thread_local std::vector<double> blocks;
  blocks.resize((V + kBlock - 1) / kBlock);
  double sum = 0;
  for (size_t b = 0; b < blocks.size(); ++b)
    sum += blocks[b] = sum_of(p + b * kBlock, std::min<int64_t>(kBlock, V - b * kBlock));
  const double target = uniform * sum;
  double before = 0;
  int64_t block = -1, last = -1;  // the block that holds the target; the last of weight
  for (size_t b = 0; b < blocks.size() && block < 0; ++b) {
    if (blocks[b] <= 0) continue;
    last = b;
    if (before + blocks[b] > target) block = b;
    else before += blocks[b];
  }
  if (block < 0) {  // rounding left the target past the sum: the last token of weight
    if (last < 0) return 0;
    block = last, before -= blocks[last];
  }
  int64_t token = -1;
  for (int64_t v = block * kBlock; v < std::min(V, (block + 1) * kBlock); ++v) {
    if (p[v] <= 0) continue;
    token = v, before += p[v];
    if (before > target) break;
  }
  return token;
}

// A draw over logits x (after the temperature; their largest `top`) from what top-k,
// top-p and min-p keep (settings f and top_k) at `uniform`; p: room for V weights.
int64_t filtered_draw(const std::vector<float>& x, float top, const float* f, int32_t top_k,
                      float uniform, float* p) {
  const int64_t V = static_cast<int64_t>(x.size());
  float cut = kNegInf;
  if (top_k > 0 && top_k < V) {
    thread_local std::vector<float> values;
    values.assign(x.begin(), x.end());
    std::nth_element(values.begin(), values.begin() + (top_k - 1), values.end(), std::greater<>());
    cut = values[top_k - 1];
  }
  if (f[kTopP] < 1) {
    // Only the weights of at least half the mass top-p leaves out, spread evenly, can
    // reach the cut: those below add up to less than that, so the rest reach it alone.
    weights(x.data(), V, top, cut, p);
    const double total = sum_of(p, V), floor = 0.5 * (1 - f[kTopP]) * total / V;
    thread_local std::vector<Weighted> kept;
    kept.clear();
    for (int64_t v = 0; v < V; ++v)
      if (p[v] >= floor && x[v] >= cut) kept.push_back({x[v], p[v]});
    cut = top_p_cut(kept, top, f[kTopP] * total);
  }
  if (f[kMinP] > 0) cut = std::max(cut, top + std::log(std::max(f[kMinP], 1e-30f)));
  return draw(x.data(), V, top, cut, uniform, p);
}

void sample_row(const Inputs& in, const Outputs& out, int64_t r) {
  const int64_t V = in.V, slot = in.slots[r];
  const float* logits = in.logits + r * V;
  const bool has_slot = slot >= 0 && slot < in.B;
  static const float kOff[kFloats] = {0, 1, 0, 0, 0, 1};  // greedy, no filter or penalty
  const float* f = has_slot ? in.floats + slot * kFloats : kOff;
  const int32_t* n = has_slot ? in.ints + slot * kInts : nullptr;
  const int32_t top_k = n ? n[kTopK] : 0, top_logprobs = n ? n[kTopLogprobs] : 0;

  thread_local std::vector<float> p;
  p.resize(V);
  const float peak = max_of(logits, V);
  weights(logits, V, peak, -INFINITY, p.data());
  const float normaliser = static_cast<float>(peak + std::log(sum_of(p.data(), V)));

  const bool adjusted = f[kFrequency] != 0 || f[kPresence] != 0 || f[kRepetition] != 1 ||
                        (n && n[kHasBias]);
  const int32_t* allowed = in.allowed + r * in.W;
  const bool constrained = std::any_of(allowed, allowed + in.W, [](int32_t w) { return w != -1; });
  const bool drawn = f[kTemperature] > 0;
  int64_t token;
  if (!adjusted && !constrained && !drawn) {
    token = first_max(logits, V, peak);
  } else {
    thread_local std::vector<float> x;
    x.assign(logits, logits + V);
    if (adjusted) {
      const float *bias = in.bias + slot * V, rep = f[kRepetition];
      const int32_t* counts = in.counts + slot * V;
      const bool* seen = in.seen + slot * V;
      for (int64_t v = 0; v < V; ++v) {
        const bool generated = counts[v] > 0;
        float y = x[v];
        if (generated || seen[v]) y = y > 0 ? y / rep : y * rep;
        y = y - f[kFrequency] * static_cast<float>(counts[v]);
        y = y - f[kPresence] * static_cast<float>(generated);
        x[v] = y + bias[v];
      }
    }
    if (constrained)
      for (int64_t v = 0; v < V; ++v)
        if (!((allowed[v / 32] >> (v % 32)) & 1)) x[v] = kNegInf;
    if (!drawn) {
      token = first_max(x.data(), V, max_of(x.data(), V));
    } else {
      const float t = f[kTemperature];
      for (int64_t v = 0; v < V; ++v) x[v] /= t;
      const float top = max_of(x.data(), V);
      const float u = uniform_at(in.keys[2 * slot], in.keys[2 * slot + 1], in.positions[r]);
      // (A NaN logit: the last token, as the greedy choice.)
      token = std::isnan(top) ? V - 1 : filtered_draw(x, top, f, top_k, u, p.data());
    }
  }
  out.tokens[r] = static_cast<int32_t>(token);
  out.chosen[r] = logits[token] - normaliser;

  int32_t* ids = out.top_ids + r * in.K;
  float* values = out.top_logprobs + r * in.K;
  std::fill(ids, ids + in.K, 0);
  std::fill(values, values + in.K, top_logprobs > 0 ? -INFINITY : 0.0f);
  if (top_logprobs > 0) {
    const int64_t k = std::min(in.K, V);
    thread_local std::vector<int32_t> order;
    order.resize(V);
    for (int64_t v = 0; v < V; ++v) order[v] = static_cast<int32_t>(v);
    auto before = [&](int32_t a, int32_t b) {  // lax.top_k's order: larger, then lower index
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
    for (int64_t i = 0; i < k; ++i) ids[i] = order[i], values[i] = logits[order[i]] - normaliser;
  }
}

ffi::Error SampleImpl(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> floats,
                      ffi::Buffer<ffi::S32> ints, ffi::Buffer<ffi::S32> slots,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> counts,
                      ffi::Buffer<ffi::PRED> seen, ffi::Buffer<ffi::S32> allowed,
                      ffi::Buffer<ffi::U32> keys, ffi::Buffer<ffi::S32> positions,
                      ffi::ResultBuffer<ffi::S32> tokens,
                      ffi::ResultBuffer<ffi::F32> chosen, ffi::ResultBuffer<ffi::S32> top_ids,
                      ffi::ResultBuffer<ffi::F32> top_logprobs) {
  auto ld = logits.dimensions(), bd = bias.dimensions(), ad = allowed.dimensions();
  if (ld.size() != 2 || bd.size() != 2 || ad.size() != 2 || top_ids->dimensions().size() != 2)
    return ffi::Error::InvalidArgument("sample: logits [R, V], bias [B, V], allowed [R, W]");
  const int64_t R = ld[0], V = ld[1], B = bd[0];
  const bool shaped = bd[1] == V && counts.element_count() == size_t(B * V) &&
                      seen.element_count() == size_t(B * V) && ad[0] == R &&
                      ad[1] == (V + 31) / 32 && floats.element_count() == size_t(B * kFloats) &&
                      ints.element_count() == size_t(B * kInts) &&
                      slots.element_count() == size_t(R) && keys.element_count() == size_t(2 * B) &&
                      positions.element_count() == size_t(R);
  if (!shaped) return ffi::Error::InvalidArgument("sample: mismatched shapes");
  const Inputs in{logits.typed_data(), floats.typed_data(), ints.typed_data(),
                  slots.typed_data(),  bias.typed_data(),   counts.typed_data(),
                  seen.typed_data(),   allowed.typed_data(), keys.typed_data(), positions.typed_data(),
                  V,                   B,                    ad[1],
                  top_ids->dimensions()[1]};
  const Outputs out{tokens->typed_data(), chosen->typed_data(), top_ids->typed_data(),
                    top_logprobs->typed_data()};
  jaxchat::Workers::get().run(R, static_cast<int>(R), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) sample_row(in, out, r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchatSample, SampleImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
