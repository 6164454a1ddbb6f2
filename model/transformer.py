"""The Llama-family decoder as Flax modules.

Axis letters, used in every einsum and shape comment:
B batch/slots, T query length, S key length, N query heads, K kv heads,
G query heads per kv head, H head dim, D model dim, F MLP dim, V vocab.

One call serves both prefill and decode: the new tokens' keys and values are
written into a per-layer cache at each row's `start` offset, then the queries
attend over the first `attn_len` cache positions, masked to keys at or before
their own position. Prefill passes a fresh cache as long as the padded prompt;
decode passes the slot cache and T=1.

Activations are feature-major, [D, B, T], and weights [out, in] (the layout of
GGUF and HF checkpoints): every projection is `W @ x`. XLA:CPU runs that form
about twice as fast as `x @ W` for the few-row matrices of batched decoding.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from model.config import ModelConfig


@flax.struct.dataclass
class LayerCache:
    """Keys and values of one layer: k, v [B, K, S, H].

    Slots and KV heads lead, so attention is a batched matmul over (B, K) with
    no transpose of the cache.
    """

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, batch: int, length: int, dtype) -> list[LayerCache]:
    """Zeroed per-layer caches [batch, K, length, H]."""
    shape = (batch, config.n_kv_heads, length, config.head_dim)
    return [
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)
    ]


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, the rotate-half layout of HF Llama.

    x [heads, H, B, T], positions [B, T] → same shape. Angles in f32.
    """
    half = x.shape[1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # [H/2]
    angles = inv_freq[:, None, None] * positions.astype(jnp.float32)  # [H/2, B, T]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    return out.astype(x.dtype)


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, K, S, H] with new [b, K, T, H] written in rows 0..b-1 from position start[b].

    b may be less than B: a decode step over the first b slots leaves the
    other rows alone. One scatter, done in place when the cache is donated.
    """
    b, _, t, _ = new.shape
    rows = jnp.arange(b)[:, None]  # [b, 1]
    cols = start[:, None] + jnp.arange(t)  # [b, T]
    return cache.at[rows, :, cols].set(new.transpose(0, 2, 1, 3))  # indexed as [b, T, K, H]


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
        attn_len: int,
    ) -> tuple[jax.Array, LayerCache]:
        c = self.config
        n, k, h = c.n_heads, c.n_kv_heads, c.head_dim
        init = nn.initializers.normal(0.02)
        w_qkv = self.param("qkv", init, ((n + 2 * k) * h, c.dim), self.dtype)  # [E, D]
        w_o = self.param("o", init, (c.dim, n * h), self.dtype)
        qkv = jnp.einsum("ED,DBT->EBT", w_qkv, x)  # E = (N+2K)·H
        if c.qkv_bias:
            bias = self.param("qkv_bias", nn.initializers.zeros, ((n + 2 * k) * h,), self.dtype)
            qkv = qkv + bias[:, None, None]
        b, t = x.shape[1:]
        q, key, value = jnp.split(qkv.reshape(n + 2 * k, h, b, t), [n, n + k])
        q = rope(q, positions, c.rope_theta)  # [N, H, B, T]
        key = rope(key, positions, c.rope_theta).transpose(2, 0, 3, 1)  # [B, K, T, H]
        value = value.transpose(2, 0, 3, 1)
        cache = LayerCache(write_rows(cache.k, key, start), write_rows(cache.v, value, start))

        keys = cache.k[:b, :, :attn_len]  # [B, K, S, H]: the rows computed here
        values = cache.v[:b, :, :attn_len]
        g = c.group_size
        # Q = G·T query rows per KV head: [B, K, Q, H], the cache's batch layout.
        q = q.reshape(k, g, h, b, t).transpose(3, 0, 1, 4, 2).reshape(b, k, g * t, h)
        scores = jnp.einsum("BKQH,BKSH->BKQS", q, keys).astype(jnp.float32) * (h**-0.5)
        visible = jnp.arange(attn_len)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        scores = scores.reshape(b, k, g, t, attn_len)
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype).reshape(b, k, g * t, attn_len)
        out = jnp.einsum("BKQS,BKSH->BKQH", probs, values)  # [B, K, G·T, H]
        out = out.reshape(b, k, g, t, h).transpose(1, 2, 4, 0, 3).reshape(n * h, b, t)
        return jnp.einsum("DE,EBT->DBT", w_o, out), cache


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
        gate, up = jnp.split(jnp.einsum("FD,DBT->FBT", gate_up, x), 2)
        return jnp.einsum("DF,FBT->DBT", down, jax.nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, start, cache: LayerCache, attn_len: int):
        c = self.config
        h, cache = Attention(c, self.dtype, name="attn")(
            RMSNorm(c.norm_eps, self.dtype, name="attn_norm")(x), positions, start, cache, attn_len
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
        attn_len: int,
    ) -> tuple[jax.Array, list[LayerCache]]:
        x = self.embed(tokens).transpose(2, 0, 1)  # [D, B, T]
        new_caches = []
        # Layers are unrolled, each with its own cache buffer, so XLA updates
        # every buffer in place instead of copying a stacked cache per step.
        for layer, cache in zip(self.layers, caches, strict=True):
            x, cache = layer(x, positions, start, cache, attn_len)
            new_caches.append(cache)
        return self.final_norm(x), new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [D, ...] → logits [..., V] in f32."""
        head = self.embed.embedding if self.config.tie_embeddings else self.lm_head  # [V, D]
        out = jnp.einsum("VD,D...->V...", head, hidden)
        return jnp.moveaxis(out, 0, -1).astype(jnp.float32)
