"""The Llama-family decoder as Flax modules.

Axis letters, used in every einsum and shape comment:
B batch/slots, T query length, S key length, N query heads, K kv heads,
G query heads per kv head, H head dim, D model dim, F MLP dim, V vocab.

One call serves both prefill and decode: the new tokens' keys and values are
written into a per-layer cache at each row's `start` offset, then the queries
attend over every cache position, masked to keys at or before their own
position. Prefill passes a fresh cache as long as the padded prompt; decode
passes the slot cache, sized by the engine to the longest active sequence's
bucket, and T=1. The cache is never sliced to a shorter length inside the
step: on XLA:CPU a strided slice of a longer cache costs more than the
attention itself.

Activations are feature-major, [D, B, T], and weights [out, in] (the layout of
GGUF and HF checkpoints): every projection is `W @ x`. XLA:CPU runs that form
about twice as fast as `x @ W` for the few-row matrices of batched decoding.
A projection weight may also be an int8 `QuantizedWeight` (model/quantize.py):
`dense` turns it back into a compute-dtype matrix inside the jitted step.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.config import ModelConfig
from model.quantize import dense


@flax.struct.dataclass
class LayerCache:
    """Keys and values of one layer: k [B, K, H, S], v [B, K, S, H].

    Slots and KV heads lead. Keys keep positions minor and values keep
    features minor, so both attention products run along contiguous memory:
    scores reduce over H with S in vector lanes, outputs reduce over S with H
    in lanes.
    """

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, batch: int, length: int, dtype) -> list[LayerCache]:
    """Zeroed per-layer caches: k [batch, K, H, length], v [batch, K, length, H]."""
    k, h = config.n_kv_heads, config.head_dim
    return [
        LayerCache(jnp.zeros((batch, k, h, length), dtype), jnp.zeros((batch, k, length, h), dtype))
        for _ in range(config.n_layers)
    ]


def resize_cache(cache: LayerCache, length: int) -> LayerCache:
    """The cache cut or zero-padded to `length` positions."""

    def fit(a: jax.Array, axis: int) -> jax.Array:
        if length <= a.shape[axis]:
            return lax.slice_in_dim(a, 0, length, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, length - a.shape[axis])
        return jnp.pad(a, pad)

    return LayerCache(fit(cache.k, 3), fit(cache.v, 2))


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, the rotate-half layout of HF Llama.

    x [heads, H, B, T], positions [B, T], inv_freq [H/2] (ModelConfig.rope_frequencies)
    → same shape as x. Angles in f32.
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    angles = inv_freq[:, None, None] * positions.astype(jnp.float32)  # [H/2, B, T]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    return out.astype(x.dtype)


def write_rows(cache: LayerCache, key: jax.Array, value: jax.Array, start: jax.Array) -> LayerCache:
    """The cache with key, value [b, T, K, H] written in rows 0..b-1 from position start[b].

    b may be less than B: a decode step over the first b slots leaves the
    other rows alone. One scatter per buffer, in place when the cache is donated.
    """
    b, t = key.shape[:2]
    rows = jnp.arange(b)[:, None]  # [b, 1]
    cols = start[:, None] + jnp.arange(t)  # [b, T]
    # Advanced indices split by slices index the update as [b, T, K, H]. Callers keep
    # positions inside the cache; promising so spares XLA a guard that copies it.
    in_bounds = "promise_in_bounds"
    return LayerCache(
        cache.k.at[rows, :, :, cols].set(key, mode=in_bounds),
        cache.v.at[rows, :, cols].set(value, mode=in_bounds),
    )


class RMSNorm(nn.Module):
    """Normalises over the feature axis, axis 0 of [D, ...]."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[0],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return (normed * scale).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query attention with one fused [q; k; v] projection."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [D, B, T]
        positions: jax.Array,  # [B, T]
        start: jax.Array,  # [B] cache row where x[:, :, 0] is written
        cache: LayerCache,
    ) -> tuple[jax.Array, LayerCache]:
        c = self.config
        n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
        init = nn.initializers.normal(0.02)
        w_qkv = self.param("qkv", init, ((n + 2 * k) * h, c.dim), self.dtype)  # [E, D]
        w_o = self.param("o", init, (c.dim, n * h), self.dtype)
        qkv = jnp.einsum("ED,DBT->EBT", dense(w_qkv, self.dtype), x)  # E = (N+2K)·H
        if c.qkv_bias:
            bias = self.param("qkv_bias", nn.initializers.zeros, ((n + 2 * k) * h,), self.dtype)
            qkv = qkv + bias[:, None, None]
        b, t = x.shape[1:]
        q, key, value = jnp.split(qkv.reshape(n + 2 * k, h, b, t), [n, n + k])
        inv_freq = c.rope_frequencies()
        q = rope(q, positions, inv_freq)  # [N, H, B, T]
        key = rope(key, positions, inv_freq).transpose(2, 3, 0, 1)  # [B, T, K, H]
        cache = write_rows(cache, key, value.transpose(2, 3, 0, 1), start)

        keys, values = cache.k[:b], cache.v[:b]  # [B, K, H, S], [B, K, S, H]: rows computed here
        s = values.shape[2]
        g = c.group_size
        # Q = G·T query rows per KV head: [B, K, Q, H], the cache's batch layout.
        q = q.reshape(k, g, h, b, t).transpose(3, 0, 1, 4, 2).reshape(b, k, g * t, h)
        if t == 1:
            # Decode: G query rows per (slot, head) is too few for a batched
            # matmul; a fused multiply-reduce streams the cache once.
            scores = jnp.sum(q[..., None] * keys[:, :, None], axis=3, dtype=jnp.float32)
        else:
            scores = jnp.einsum("BKQH,BKHS->BKQS", q, keys).astype(jnp.float32)
        scores = scores.reshape(b, k, g, t, s) * (h**-0.5)
        visible = jnp.arange(s)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, k, g * t, s)
        if t == 1:
            out = jnp.sum(probs[..., None] * values[:, :, None], axis=3)  # [B, K, G, H]
        else:
            out = jnp.einsum("BKQS,BKSH->BKQH", probs, values)  # [B, K, G·T, H]
        out = out.reshape(b, k, g, t, h).transpose(1, 2, 4, 0, 3).reshape(n * h, b, t)
        return jnp.einsum("DE,EBT->DBT", dense(w_o, self.dtype), out), cache


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one [2F, D] matrix."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [D, B, T]
        c = self.config
        init = nn.initializers.normal(0.02)
        gate_up = self.param("gate_up", init, (2 * c.ffn_dim, c.dim), self.dtype)
        down = self.param("down", init, (c.dim, c.ffn_dim), self.dtype)
        gate, up = jnp.split(jnp.einsum("FD,DBT->FBT", dense(gate_up, self.dtype), x), 2)
        return jnp.einsum("DF,FBT->DBT", dense(down, self.dtype), jax.nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, start, cache: LayerCache):
        c = self.config
        h, cache = Attention(c, self.dtype, name="attn")(
            RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x), positions, start, cache
        )
        x = x + h
        x = x + MLP(c, self.dtype, name="mlp")(RMSNorm(c.norm_eps, self.dtype, name="mlp_norm")(x))
        return x, cache


class Transformer(nn.Module):
    """tokens [B, T] → (hidden [D, B, T], updated caches). `logits` maps hidden to V."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [Block(c, self.dtype) for _ in range(c.n_layers)]
        self.final_norm = RMSNorm(c.norm_eps, self.dtype)
        if not c.tie_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.dim), self.dtype
            )

    def __call__(
        self,
        tokens: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        start: jax.Array,  # [B]
        caches: list[LayerCache],
    ) -> tuple[jax.Array, list[LayerCache]]:
        x = self.embed(tokens).transpose(2, 0, 1)  # [D, B, T]
        new_caches = []
        # Layers are unrolled, each with its own cache buffer, so XLA updates
        # every buffer in place instead of copying a stacked cache per step.
        for layer, cache in zip(self.layers, caches, strict=True):
            x, cache = layer(x, positions, start, cache)
            new_caches.append(cache)
        return self.final_norm(x), new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [D, ...] → logits [..., V] in f32."""
        tied = self.config.tie_embeddings
        head = self.embed.embedding if tied else dense(self.lm_head, self.dtype)  # [V, D]
        out = jnp.einsum("VD,D...->V...", head, hidden)
        # The barrier keeps XLA from folding the transpose into the product:
        # XLA:CPU runs the [V, B] product about twice as fast as [B, V].
        out = lax.optimization_barrier(out)
        return jnp.moveaxis(out, 0, -1).astype(jnp.float32)
