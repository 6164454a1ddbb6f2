"""The Llama-family decoder as Flax modules.

Axis letters, used in every einsum and shape comment:
T step tokens, R decode rows, P prefill tokens, N query heads, K kv heads,
G query heads per kv head, H head dim, D model dim, F MLP dim, V vocab.

One call runs a step's tokens, flat: decode rows and prefill chunks of any
sequences (model/nn/attention.py's `Layout` says which is which), reading and
writing keys and values in the paged pool. Without a pool it is a plain causal
forward pass over the segments (tests, scoring).

Activations are feature-major, [D, T], and weights [out, in] (the layout of
GGUF and HF checkpoints): every projection is `W @ x`. XLA:CPU runs that form
about twice as fast as `x @ W` for the few-row matrices of batched decoding.
A projection weight may also be an int8 `QuantizedWeight` (model/nn/quantize.py):
`dense` turns it back into a compute-dtype matrix inside the jitted step. Or it may be
quantized blocks (a `BlockWeight` under the tree's BLOCKS key, each layer weight
stacked over the layers), which `project` multiplies through jaxchat's CPU kernel
without expanding them in memory, reading the layer it is given in place.
The layers run unrolled (each with its own weights) or as one `nn.scan` over
stacked weights: the scan compiles 3-4x faster, but on XLA:CPU slicing a
layer's f32 weights out of the stack copies them every step (about 17 ms for
SmolLM2-135M), which only the smallest decode steps feel; blocks are never
sliced. The engine picks per step shape (model/engine/engine.py);
`stack_layers` (model/nn/params.py) turns one parameter tree into the other. Both read and write
the same pool.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.nn.attention import Layout, Pool, decode_attention, region_attention, write_pool
from model.nn.config import ModelConfig
from model.nn.network import forward_layout
from model.nn.norm import rms_norm
from model.nn.params import BLOCKS, LAYER_BLOCKS, LayerBlocks
from model.nn.quantize import BlockWeight, dense, project


def matmul_weight(
    module: nn.Module, name: str, shape: tuple[int, int], dtype, blocks: dict[str, BlockWeight]
) -> Any:
    """A projection weight [out, in]: the stacked BlockWeight in `blocks` if there is one,
    else the module's parameter."""
    if name in blocks:
        return blocks[name]
    return module.param(name, nn.initializers.normal(0.02), shape, dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, the rotate-half layout of HF Llama.

    x [heads, H, T], positions [T], inv_freq [H/2] (ModelConfig.rope_frequencies)
    → same shape as x. Angles in f32.
    """
    freq = jnp.asarray(inv_freq, jnp.float32)
    angles = freq[:, None] * positions.astype(jnp.float32)  # [H/2, T]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """Normalises over the feature axis, axis 0 of [D, ...]. kernel: x [D, T] through
    jaxchat's CPU kernel where `used` is given (its first `used` columns; the rest zero):
    each column's norm the same to the bit whatever the step's shape."""

    eps: float
    dtype: jnp.dtype
    kernel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, used=None) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[0],), self.dtype)
        return rms_norm(x, scale, self.eps, self.dtype, used if self.kernel else None)


class Attention(nn.Module):
    """Grouped-query attention with one fused [q; k; v] projection, over the paged pool.
    kernel: decode rows through jaxchat's CPU kernel (model/kernels). kv_dtype: the pool's
    element type, to which keys and values are rounded (None: the compute dtype)."""

    config: ModelConfig
    dtype: jnp.dtype
    kernel: bool = False
    kv_dtype: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array, layout: Layout, pool: Pool | None, layer, quantized: dict, used
    ) -> tuple[jax.Array, Pool | None]:
        """x [D, T] → (out [D, T], the pool with this step's keys and values in `layer`);
        `used`: the step's tokens up to its last real one (Layout.used)."""
        c = self.config
        n, k, h, g = c.n_heads, c.n_kv_heads, c.head_dim, c.group_size
        w_qkv = matmul_weight(self, "qkv", ((n + 2 * k) * h, c.dim), self.dtype, quantized)
        w_o = matmul_weight(self, "o", (c.dim, n * h), self.dtype, quantized)
        qkv = project(w_qkv, x, self.dtype, layer, used)  # [E, T], E = (N+2K)·H
        if c.qkv_bias:
            bias = self.param("qkv_bias", nn.initializers.zeros, ((n + 2 * k) * h,), self.dtype)
            qkv = qkv + bias[:, None]
        t = x.shape[1]
        q, key, value = jnp.split(qkv.reshape(n + 2 * k, h, t), [n, n + k])
        inv_freq = c.rope_frequencies()
        q = rope(q, layout.positions, inv_freq).reshape(k, g, h, t)  # [K, G, H, T]
        key = rope(key, layout.positions, inv_freq)  # [K, H, T]
        base = 0
        if self.kv_dtype is not None and jnp.dtype(self.kv_dtype) != key.dtype:
            # The step's own keys and values as the pool holds them (a float16 pool's:
            # rounded), so a prompt token sees the same keys whether they were computed in
            # its own chunk or read back from the pool (and a forward pass without a pool
            # computes what the steps do).
            key = key.astype(self.kv_dtype).astype(key.dtype)
            value = value.astype(self.kv_dtype).astype(value.dtype)
        if pool is not None:
            blocks = pool.k.shape[0] // c.n_layers
            base = layer * blocks
            pool = write_pool(pool, key, value, layout.write, base, blocks)
        r = layout.rows
        outs = []
        if r:
            assert pool is not None  # decode rows read their context from the pool
            decoded = decode_attention(
                q[..., :r].transpose(3, 0, 1, 2),
                pool,
                layout.context,
                layout.block_tables,
                base,
                kernel=self.kernel,
            )  # [R, K, G, H]
            outs.append(decoded.transpose(1, 2, 3, 0))
        if t > r:
            region = region_attention(
                q[..., r:], key[..., r:], value[..., r:], layout, pool, base, kernel=self.kernel
            )
            outs.append(region)
        out = jnp.concatenate(outs, axis=-1).reshape(n * h, t)
        return project(w_o, out, self.dtype, layer, used), pool


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one [2F, D] matrix."""

    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, layer, quantized: dict, used) -> jax.Array:  # [D, T]
        c = self.config
        gate_up = matmul_weight(self, "gate_up", (2 * c.ffn_dim, c.dim), self.dtype, quantized)
        down = matmul_weight(self, "down", (c.dim, c.ffn_dim), self.dtype, quantized)
        gated = project(gate_up, x, self.dtype, layer, used)  # [gate; up], [2F, T]
        return project(down, gated, self.dtype, layer, used, glu=True)  # silu(gate) * up


class Block(nn.Module):
    """One layer: carry (x [D, T], pool), the layer's index, the step's layout and the
    stacked blocks (LayerBlocks, may be empty) → (carry, None)."""

    config: ModelConfig
    dtype: jnp.dtype
    kernel: bool = False
    kv_dtype: Any = None

    @nn.compact
    def __call__(self, carry, layer, layout: Layout, blocks: LayerBlocks):
        c = self.config
        x, pool = carry
        # The quantized kernel multiplies no padding past the last real token, and may
        # round the decode rows' x (the first R columns), never the prompt tokens'.
        used = jnp.stack([layout.used(), jnp.asarray(layout.rows, jnp.int32)])
        # Norms through the kernel in every step, so that each token's is the same to the
        # bit whatever its step holds. XLA's fused norm sums a column's squares in another
        # order for 8 rows than for 1, so a stream's logits moved when its step verified
        # drafts and greedy replies could differ with them (tests/test_speculative.py);
        # the kernel's cost nothing measurable (one stream: 105-117 tok/s either way).
        h, pool = Attention(c, self.dtype, self.kernel, self.kv_dtype, name="attn")(
            RMSNorm(c.norm_eps, self.dtype, self.kernel, name="attn_norm")(x, used[0]),
            layout,
            pool,
            layer,
            blocks.get("attn", {}),
            used,
        )
        x = x + h
        normed = RMSNorm(c.norm_eps, self.dtype, self.kernel, name="mlp_norm")(x, used[0])
        x = x + MLP(c, self.dtype, name="mlp")(normed, layer, blocks.get("mlp", {}), used)
        return (x, pool), None


class Transformer(nn.Module):
    """tokens [T] laid out by a `Layout` → (hidden [D, T], the pool updated).

    `logits` maps hidden states to the vocabulary. Without a pool (None) the
    call is a causal forward pass over the layout's prefill segments.
    scan_layers: one `nn.scan` over stacked layer weights (params["layers"],
    each [L, ...]) instead of unrolled layers (params["layers_0"], …).
    kernels: decode attention through jaxchat's CPU kernel (model/kernels, loaded).
    kv_dtype: the KV pool's element type (None: the compute dtype).
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    kernels: bool = False
    kv_dtype: Any = None

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=self.dtype)
        if self.scan_layers:
            scanned = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.n_layers,
            )
            self.layers: Block | Sequence[Block] = scanned(
                c, self.dtype, self.kernels, self.kv_dtype
            )
        else:
            self.layers = [
                Block(c, self.dtype, self.kernels, self.kv_dtype) for _ in range(c.n_layers)
            ]
        self.final_norm = RMSNorm(c.norm_eps, self.dtype, self.kernels)
        if not c.tie_embeddings and not self.has_variable(BLOCKS, "lm_head"):
            self.lm_head = self.param(
                "lm_head", nn.initializers.normal(0.02), (c.vocab_size, c.dim), self.dtype
            )

    def __call__(
        self, tokens: jax.Array, layout: Layout, pool: Pool | None = None
    ) -> tuple[jax.Array, Pool | None]:
        carry = (self.embed(tokens).T, pool)  # x [D, T]
        blocks: LayerBlocks = {}
        if self.has_variable(BLOCKS, LAYER_BLOCKS):
            blocks = self.get_variable(BLOCKS, LAYER_BLOCKS)
        if isinstance(self.layers, Sequence):  # flax keeps a list as a tuple
            for index, layer in enumerate(self.layers):
                carry, _ = layer(carry, index, layout, blocks)
        else:  # one scanned Block over the stacked layers
            carry, _ = self.layers(carry, jnp.arange(self.config.n_layers), layout, blocks)
        x, pool = carry
        return self.final_norm(x, layout.used()), pool  # (the kernel's: see Block)

    def logits(self, hidden: jax.Array, used=None) -> jax.Array:
        """hidden [D, ...] → logits [..., V] in f32. `used`: what `project` takes, for
        the quantized head (the dense head computes every row)."""
        if self.has_variable(BLOCKS, "lm_head"):  # the head as blocks (tied or not)
            flat = hidden.reshape(hidden.shape[0], -1)
            blocks: BlockWeight = self.get_variable(BLOCKS, "lm_head")
            out = project(blocks, flat, self.dtype, used=used, rows=True)  # [rows, V]
            return out.reshape(*hidden.shape[1:], -1).astype(jnp.float32)
        tied = self.config.tie_embeddings
        head = self.embed.embedding if tied else dense(self.lm_head, self.dtype)  # [V, D]
        out = jnp.einsum("VD,D...->V...", head, hidden)
        # The barrier keeps XLA from folding the transpose into the product:
        # XLA:CPU runs the [V, B] product about twice as fast as [B, V].
        out = lax.optimization_barrier(out)
        return jnp.moveaxis(out, 0, -1).astype(jnp.float32)


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameter tree of Transformer(config, dtype) as ShapeDtypeStructs (nothing
    allocated)."""
    model = Transformer(config, dtype)
    tokens = np.zeros(4, np.int32)
    init = lambda: model.init(jax.random.PRNGKey(0), tokens, forward_layout(1, 4))  # noqa: E731
    return jax.eval_shape(init)["params"]
