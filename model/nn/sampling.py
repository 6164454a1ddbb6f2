"""Token sampling on device, per slot: penalties, logit bias, grammar masks, greedy,
temperature, top-k, top-p and min-p, plus the log-probabilities clients ask for.

Every setting is a per-slot array, so one compiled step serves a batch that
mixes greedy, sampled, penalised and constrained requests. Each transform is a
small function of logits [B, V]; `sample` composes them, and skips (under
`lax.cond`) the ones no slot in the batch uses: a batch of plain greedy rows
(no penalty, bias, mask or temperature) takes one max and one min over the
logits, and not even the rows of the [B, V] settings are read.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.nn.pytree import PyTreeNode

NEG_INF = jnp.finfo(jnp.float32).min
TOP_LOGPROBS = 20  # the most alternatives a client may ask for per token (OpenAI's bound)
# The XLA custom-call target of jaxchat's CPU sampler (model/kernels/sample.cc).
SAMPLE_TARGET = "jaxchat_sample"


class SlotSampling(PyTreeNode):
    """Sampling settings and state of B slots.

    [B] f32: temperature (0 is greedy), top_p (1 disables), min_p (0 disables),
    frequency_penalty, presence_penalty (0 disable), repetition_penalty (1 disables).
    [B] i32: top_k (0 disables), top_logprobs (alternatives to report; 0 none).
    [B] bool: has_bias (logit_bias is not all zero).
    [B, V]: logit_bias f32; counts i32 (times each token was generated);
    seen bool (tokens of the prompt, for the repetition penalty).
    key [B, 2] u32: the slot's PRNG key, advanced every draw.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    min_p: jax.Array
    frequency_penalty: jax.Array
    presence_penalty: jax.Array
    repetition_penalty: jax.Array
    top_logprobs: jax.Array
    has_bias: jax.Array
    logit_bias: jax.Array
    counts: jax.Array
    seen: jax.Array
    key: jax.Array

    @classmethod
    def create(
        cls,
        temperature,
        top_p,
        top_k,
        key,
        *,
        vocab_size: int | None = None,
        min_p=None,
        frequency_penalty=None,
        presence_penalty=None,
        repetition_penalty=None,
        top_logprobs=None,
        logit_bias=None,
        xp=jnp,
    ) -> "SlotSampling":
        """Settings for len(temperature) slots; omitted ones are disabled.

        vocab_size defaults to logit_bias's width (else 1: a batch that never
        uses penalties, bias or counts, as in tests of the basic transforms).
        xp=numpy builds host arrays, for an argument of a compiled step: eager
        jnp calls would each compile a small executable on first use.
        """
        b = len(temperature)
        v = vocab_size or (np.shape(logit_bias)[1] if logit_bias is not None else 1)

        def per_slot(value, default, dtype):
            return xp.asarray(np.full(b, default) if value is None else value, dtype)

        bias = np.zeros((b, v), np.float32) if logit_bias is None else np.asarray(logit_bias)
        return cls(
            temperature=per_slot(temperature, 1.0, jnp.float32),
            top_p=per_slot(top_p, 1.0, jnp.float32),
            top_k=per_slot(top_k, 0, jnp.int32),
            min_p=per_slot(min_p, 0.0, jnp.float32),
            frequency_penalty=per_slot(frequency_penalty, 0.0, jnp.float32),
            presence_penalty=per_slot(presence_penalty, 0.0, jnp.float32),
            repetition_penalty=per_slot(repetition_penalty, 1.0, jnp.float32),
            top_logprobs=per_slot(top_logprobs, 0, jnp.int32),
            has_bias=xp.asarray(np.any(bias != 0, axis=1)),
            logit_bias=xp.asarray(bias, jnp.float32),
            counts=xp.zeros((b, v), jnp.int32),
            seen=xp.zeros((b, v), bool),
            key=xp.asarray(key, jnp.uint32),
        )


class Sampled(PyTreeNode):
    """What `sample` returns for B rows.

    tokens [B] i32; logprobs [B] f32: the model's log-probability of each token
    (before any transform); top_ids [B, TOP_LOGPROBS] i32 and top_logprobs
    [B, TOP_LOGPROBS] f32: the most likely tokens (zeros unless some slot asked);
    sampling: the settings with advanced keys and updated counts.
    """

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    sampling: SlotSampling


def scale_by_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide [B, V] logits by [B] temperatures (0 is treated as 1: greedy takes argmax)."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    return logits / t[:, None]


def min_p_cutoff(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """The smallest logit min-p keeps [B]: probability at least min_p times the top one's."""
    top = jnp.max(logits, axis=-1)
    return jnp.where(min_p > 0, top + jnp.log(jnp.maximum(min_p, 1e-30)), NEG_INF)


def apply_penalties(logits: jax.Array, s: SlotSampling) -> jax.Array:
    """Repetition, frequency and presence penalties, then the logit bias, on [B, V] logits.

    repetition_penalty (as in transformers and vLLM) divides positive and
    multiplies negative logits of tokens in the prompt or the output so far;
    frequency and presence penalties (as OpenAI defines them) subtract
    count * frequency_penalty + (count > 0) * presence_penalty for generated tokens.
    """
    generated = s.counts > 0
    r = s.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(generated | s.seen, repeated, logits)
    logits = logits - s.frequency_penalty[:, None] * s.counts
    logits = logits - s.presence_penalty[:, None] * generated
    return logits + s.logit_bias


def apply_token_mask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Keep the tokens whose bit is set in `allowed` [B, ceil(V/32)] i32 (llguidance's layout:
    bit j of word i is token 32*i + j)."""
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    keep = bits.reshape(allowed.shape[0], -1)[:, : logits.shape[-1]] != 0
    return jnp.where(keep, logits, NEG_INF)


def _ordered(x: jax.Array) -> jax.Array:
    """float32 as int32 in the same order (its own inverse, through a bitcast back)."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def filter_cutoff(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest logit that top-k and top-p keep, per row [B]: top-k keeps the top_k
    largest logits, then top-p the largest whose probabilities, renormalised over those,
    reach top_p (as in transformers and vLLM; a logit tied with the last one kept is kept
    too). By bisection over the logits' order instead of a sort: the smallest value t (of
    the 2**32 float32s, as ordered integers) with fewer than top_k logits above it, then
    the smallest with less than top_p of the kept mass above it, each a pass over the
    vocabulary per halving (32). XLA:CPU sorts a vocabulary of 49,152 for 8 rows in 75 ms;
    this takes 2.5 (32 rows: 300 and 10)."""
    v = logits.shape[-1]
    keys = _ordered(logits)
    low = jnp.full(logits.shape[:1], jnp.iinfo(jnp.int32).min, jnp.int32)

    def smallest(holds) -> jax.Array:  # the smallest t where `holds` (true at the largest key)
        def halve(_, bounds):
            lo, hi = bounds
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
            ok = holds(mid[:, None])
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

        return lax.fori_loop(0, 32, halve, (low, jnp.max(keys, axis=-1)))[1]

    count = jnp.where((top_k > 0) & (top_k < v), top_k, v + 1)
    k_cut = lax.cond(
        jnp.any(count <= v),
        lambda: smallest(lambda t: jnp.sum(keys > t, axis=-1) < count),
        lambda: low,
    )
    weights = jnp.where(
        keys >= k_cut[:, None], jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0
    )
    mass = top_p * jnp.sum(weights, axis=-1)  # (top-k's cut bounds this one: none above)
    p_cut = smallest(lambda t: jnp.sum(jnp.where(keys > t, weights, 0.0), axis=-1) < mass)
    return lax.bitcast_convert_type(_ordered(p_cut), jnp.float32)


def _no_cutoff(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    return jnp.full(logits.shape[:1], NEG_INF)


def _draw(logits: jax.Array, s: SlotSampling, keys: jax.Array) -> jax.Array:
    """One categorical draw per row over the logits top-k, top-p and min-p keep.

    Filters become a per-row cutoff and the draw always runs over the
    vocabulary in token order, so a row's token depends only on its own
    logits, settings and key, never on which other rows needed a filter.
    """
    scaled = scale_by_temperature(logits, s.temperature)
    filtered = jnp.any((s.top_k > 0) | (s.top_p < 1.0))
    cutoff = lax.cond(filtered, filter_cutoff, _no_cutoff, scaled, s.top_k, s.top_p)
    cutoff = jnp.maximum(cutoff, min_p_cutoff(scaled, s.min_p))
    kept = jnp.where(scaled >= cutoff[:, None], scaled, NEG_INF)
    return inverse_cdf(kept, jax.vmap(jax.random.uniform)(keys))


DRAW_BLOCK = 512  # tokens per block of `inverse_cdf`'s first search


def inverse_cdf(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Categorical draws over logits [B, V] by inverting their distribution at `uniform`
    [B] in [0, 1): the token where the cumulative probability, in token order, first
    exceeds it. Found in two steps (the block of DRAW_BLOCK tokens by the blocks' masses,
    then the token within it), so the work over the vocabulary is one exp and a sum; a
    Gumbel draw (jax.random.categorical) makes V random numbers and two logarithms a row,
    which took 29 ms for 32 rows of 49,152 on a 2-core CPU. A token of probability 0 (a
    logit of NEG_INF) is never drawn, whatever the rounding of the sums."""
    b, v = logits.shape
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, -v % DRAW_BLOCK))).reshape(b, -1, DRAW_BLOCK)
    mass = probs.sum(axis=-1)  # [B, blocks]
    ends = jnp.cumsum(mass, axis=-1)
    target = uniform * ends[:, -1]
    block = _first_past(ends, target, mass > 0)
    before = jnp.take_along_axis(ends - mass, block[:, None], axis=-1)[:, 0]
    inside = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    within = _first_past(jnp.cumsum(inside, axis=-1), target - before, inside > 0)
    return block * DRAW_BLOCK + within


def _first_past(ends: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Per row, the first index whose running sum `ends` exceeds `target`; where rounding
    leaves none, the last index of positive mass (0 where there is none)."""
    past = ends > target[:, None]
    last = ends.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.where(jnp.any(past, axis=-1), jnp.argmax(past, axis=-1), last).astype(jnp.int32)


def _top(logits: jax.Array, normaliser: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The TOP_LOGPROBS most likely tokens and their log-probabilities (logit - normaliser)."""
    k = min(TOP_LOGPROBS, logits.shape[-1])  # tiny test vocabularies: pad to the fixed width
    values, ids = lax.top_k(logits, k)
    pad = ((0, 0), (0, TOP_LOGPROBS - k))
    values = values - normaliser[:, None]
    return jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(values, pad, constant_values=-jnp.inf)


def _no_top(logits: jax.Array, normaliser: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = (logits.shape[0], TOP_LOGPROBS)
    return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)


BIG = ("logit_bias", "counts", "seen")  # SlotSampling's [B, V] fields
# What a row of no slot (a step's padding) reads where zero is not the disabled value:
# zeros would read as top_p 0 and repetition penalty 0, and a step with padding rows and
# a sampled one would sort the vocabulary and apply the penalties for all of its rows (9
# streams in a 32-row step: about 280 ms a step instead of 50).
DISABLED = {"top_p": 1.0, "repetition_penalty": 1.0}


def take_rows(s: SlotSampling, slots: jax.Array, names: tuple[str, ...] = ()) -> SlotSampling:
    """Slots `slots` [R]'s settings as R rows (a slot past the last: disabled): the fields
    `names`, by default all but the [B, V] ones (BIG), which stay the B slots' (`sample`
    takes their rows if it needs them)."""
    names = names or tuple(name for name in s.__dataclass_fields__ if name not in BIG)
    return s.replace(
        **{
            name: getattr(s, name).at[slots].get(mode="fill", fill_value=DISABLED.get(name, 0))
            for name in names
        }
    )


FIRST_MAX_BLOCK = 512  # logits per block in `first_max`'s second reduction


def first_max(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first of equal maxima) as plain reductions, which
    XLA:CPU runs several times faster than its arg-max: the maximum, then the first block
    of FIRST_MAX_BLOCK logits that holds it, then the first position in that block that
    does (32 rows of 49,152 logits: 0.29 ms, against 0.85 for a min over every position
    holding the maximum, 3.6 for jnp.argmax). A row with no maximum (NaN) gives the last
    index."""
    n = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    block = math.gcd(n, FIRST_MAX_BLOCK)
    if block < 64:  # a vocabulary that cuts into no useful blocks: a min over every position
        first = jnp.min(jnp.where(logits == top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
        return jnp.minimum(first, n - 1).astype(jnp.int32)
    blocks = logits.reshape(*logits.shape[:-1], n // block, block)
    holds = jnp.max(blocks, axis=-1) == top  # [..., blocks]
    which = jnp.argmax(holds, axis=-1)  # the first block that holds it (few: cheap)
    inside = jnp.take_along_axis(blocks, which[..., None, None], axis=-2)[..., 0, :]
    at = inside == top  # (XLA:CPU's max may pass over NaN: then no position holds it)
    first = which * block + jnp.argmax(at, axis=-1)
    return jnp.where(jnp.any(at, axis=-1), first, n - 1).astype(jnp.int32)


def sample(
    logits: jax.Array,
    s: SlotSampling,
    allowed: jax.Array | None = None,
    slots: jax.Array | None = None,
) -> Sampled:
    """Sample one token per row of logits [B, V] f32.

    allowed: an optional grammar bitmask [B, ceil(V/32)] i32 (all bits set for
    unconstrained rows). Reported log-probabilities are the model's, before
    penalties, bias, mask and temperature. Each stage runs only when some slot
    needs it, so an all-greedy batch pays for a max, a min and a log-sum-exp (no
    [B, V] log-softmax is materialised). slots: given, `s` is `take_rows(state,
    slots)`: its [B, V] fields are still the state's, read by row only where a row is
    penalised or biased, and the returned counts are the state's as they were (the
    caller counts the tokens).
    """
    split = jax.vmap(lambda k: jax.random.split(k, 2))(s.key)  # [B, 2, 2]
    next_keys, keys = split[:, 0], split[:, 1]
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [B]: log-probability = logit - this
    adjusted = (
        (s.frequency_penalty != 0)
        | (s.presence_penalty != 0)
        | (s.repetition_penalty != 1)
        | s.has_bias
    )
    constrained = jnp.any(allowed != -1) if allowed is not None else jnp.bool_(False)
    drawn = jnp.any(s.temperature > 0)

    def choose() -> jax.Array:
        rows = s if slots is None else take_rows(s, slots, BIG)
        x = lax.cond(jnp.any(adjusted), apply_penalties, lambda x, _: x, logits, rows)
        if allowed is not None:
            x = lax.cond(constrained, apply_token_mask, lambda x, _: x, x, allowed)
        greedy = first_max(x)
        sampled = lax.cond(drawn, lambda: _draw(x, s, keys).astype(jnp.int32), lambda: greedy)
        return jnp.where(s.temperature > 0, sampled, greedy)

    plain = ~(jnp.any(adjusted) | constrained | drawn)
    greedy = first_max(logits)
    tokens = lax.cond(plain, lambda: greedy, choose)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normaliser
    wants_top = jnp.any(s.top_logprobs > 0)
    top_ids, top_logprobs = lax.cond(wants_top, _top, _no_top, logits, normaliser)
    counts = s.counts
    if slots is None:
        rows = jnp.arange(tokens.shape[0])
        counts = counts.at[rows, jnp.minimum(tokens, counts.shape[1] - 1)].add(1)
    return Sampled(tokens, chosen, top_ids, top_logprobs, s.replace(key=next_keys, counts=counts))


# The kernel's per-slot settings, in the order sample.cc reads them.
PENALTIES = ("frequency_penalty", "presence_penalty", "repetition_penalty")
KERNEL_FLOATS = ("temperature", "top_p", "min_p", *PENALTIES)
KERNEL_INTS = ("top_k", "top_logprobs", "has_bias")


def kernel_sample(
    logits: jax.Array, s: SlotSampling, slots: jax.Array, positions: jax.Array, allowed: jax.Array
) -> Sampled:
    """`sample(logits, take_rows(s, slots).replace(key=fold_in(row keys, positions)),
    allowed, slots)` through jaxchat's CPU kernel (model/kernels/sample.cc), for the B
    slots' settings `s`: row i samples with slot slots[i]'s settings (B or more: greedy,
    every setting off), drawing with its key folded with positions[i]. The same tokens and
    log-probabilities (to float rounding), except that a draw whose uniform falls within
    rounding of a token's boundary may take its neighbour. The returned settings are `s`."""
    r = logits.shape[0]
    floats = jnp.stack([getattr(s, name).astype(jnp.float32) for name in KERNEL_FLOATS], 1)
    ints = jnp.stack([getattr(s, name).astype(jnp.int32) for name in KERNEL_INTS], 1)
    shapes = (
        jax.ShapeDtypeStruct((r,), jnp.int32),
        jax.ShapeDtypeStruct((r,), jnp.float32),
        jax.ShapeDtypeStruct((r, TOP_LOGPROBS), jnp.int32),
        jax.ShapeDtypeStruct((r, TOP_LOGPROBS), jnp.float32),
    )
    tokens, chosen, top_ids, top_logprobs = jax.ffi.ffi_call(SAMPLE_TARGET, shapes)(
        logits.astype(jnp.float32),
        floats,
        ints,
        slots.astype(jnp.int32),
        s.logit_bias,
        s.counts,
        s.seen,
        allowed,
        s.key.astype(jnp.uint32),
        positions.astype(jnp.int32),
    )
    return Sampled(tokens, chosen, top_ids, top_logprobs, s)
