"""Token sampling on device, per slot: greedy, temperature, top-k and top-p.

Every setting is a per-slot array, so one compiled step serves a batch that
mixes greedy and sampled requests. Each transform is a small function of
logits [B, V]; `sample` composes them.
"""

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = jnp.finfo(jnp.float32).min


@flax.struct.dataclass
class SlotSampling:
    """Sampling settings of B slots: temperature, top_p [B] f32; top_k [B] i32; key [B, 2] u32.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    key: jax.Array

    @classmethod
    def create(cls, temperature, top_p, top_k, key) -> "SlotSampling":
        return cls(
            jnp.asarray(temperature, jnp.float32),
            jnp.asarray(top_p, jnp.float32),
            jnp.asarray(top_k, jnp.int32),
            jnp.asarray(key, jnp.uint32),
        )


def scale_by_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """Divide [B, V] logits by [B] temperatures (0 is treated as 1: greedy takes argmax)."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    return logits / t[:, None]


def top_k_mask(sorted_logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keep the top_k [B] largest of descending-sorted logits [B, V]; 0 keeps all."""
    rank = jnp.arange(sorted_logits.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    return jnp.where(keep, sorted_logits, NEG_INF)


def top_p_mask(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest prefix of descending-sorted logits whose mass reaches top_p [B]."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]  # the first token always stays
    return jnp.where(keep, sorted_logits, NEG_INF)


def _filter_cutoff(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The smallest logit that top-k and top-p keep, per row [B] (sorts the vocabulary)."""
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    kept = top_p_mask(top_k_mask(sorted_logits, top_k), top_p)
    return jnp.min(jnp.where(kept > NEG_INF, kept, jnp.inf), axis=-1)


def _no_cutoff(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    return jnp.full(logits.shape[:1], NEG_INF)


def _draw(logits: jax.Array, s: SlotSampling, keys: jax.Array) -> jax.Array:
    """One categorical draw per row over the logits top-k/top-p keep.

    Filters become a per-row cutoff and the draw always runs over the
    vocabulary in token order, so a row's token depends only on its own
    logits, settings and key, never on which other rows needed a sort.
    """
    scaled = scale_by_temperature(logits, s.temperature)
    needs_sort = jnp.any((s.top_k > 0) | (s.top_p < 1.0))
    cutoff = lax.cond(needs_sort, _filter_cutoff, _no_cutoff, scaled, s.top_k, s.top_p)
    kept = jnp.where(scaled >= cutoff[:, None], scaled, NEG_INF)
    return jax.vmap(jax.random.categorical)(keys, kept)


def sample(logits: jax.Array, s: SlotSampling) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V] f32 → (tokens [B], logprobs [B], next keys [B, 2]).

    logprobs are the model's log-probabilities of the chosen tokens before any
    sampling transform. Random draws (and the sort for top-k/top-p) run only
    when some slot needs them, so an all-greedy batch pays for an argmax.
    """
    split = jax.vmap(lambda k: jax.random.split(k, 2))(s.key)  # [B, 2, 2]
    next_keys, keys = split[:, 0], split[:, 1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = lax.cond(
        jnp.any(s.temperature > 0), lambda: _draw(logits, s, keys).astype(jnp.int32), lambda: greedy
    )
    tokens = jnp.where(s.temperature > 0, sampled, greedy)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, next_keys
