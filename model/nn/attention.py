"""Attention over a paged KV pool, for one step that mixes decode rows and prefill chunks.

Axis letters: T step tokens, R decode rows, P prefill-region tokens (T = R + P),
N query heads, K kv heads, G = N / K, H head dim, C key positions per chunk,
NB pool blocks, BS positions per block, MB blocks per sequence.

The pool holds every sequence's keys and values in fixed-size blocks, all
layers in one pair of arrays: k [L·NB, K, H, BS] and v [L·NB, K, BS, H], layer
l's blocks at l·NB … (l+1)·NB (keys keep positions minor and values keep
features minor, so both products run along contiguous memory). One array lets
a loop over the layers (`scan`) carry the pool and pick its layer by offset. A
sequence's block table lists its blocks in order, the same in every layer;
position p of the sequence lives in block table[p // BS] at offset p % BS.

A step's tokens are laid out by a `Layout`:
- the first R tokens are decode rows, one per slot: row r is slot r's newest
  token at position context[r], attending to its keys 0..context[r] through its
  block table (context -1: the row is idle);
- the other P tokens are the prefill region: chunks of prompts, each a
  "segment" of consecutive positions. They attend to each other (same segment,
  causal), and a segment that does not start at position 0 also to the positions
  its sequence already has in the pool (a later chunk of a long prompt, or a
  prompt whose prefix was cached): its prior group's. A step has up to
  PRIOR_GROUPS groups, each a number of positions and a block table; segments
  that continue the same cached blocks (prompts with one system prompt, say)
  share a group, so those blocks are read once for all of them.

Every token's key and value are written to the pool first (`write` is its flat
position block * BS + offset within a layer, or NB·BS or more for none), then read back:
writing before reading is what lets XLA update the pool in place. Softmax runs
online over chunks of C keys, so the work follows the longest context in the
step, while the shapes (and so the compiled program) do not depend on it.
"""

from functools import partial
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.nn.pytree import PyTreeNode

NEG_INF = jnp.finfo(jnp.float32).min
# Keys per loop iteration. Decode rows with tables of their own each gather their
# chunk (small chunks gather less past a short context); rows sharing one table, and
# the region's prior context, gather theirs once (large chunks: fewer iterations,
# whose overhead is most of a lone row's attention on CPU).
DECODE_CHUNK = 64
SHARED_CHUNK = 256
PRIOR_CHUNK = 1024
# The XLA custom-call target of jaxchat's CPU decode attention (model/kernels/attention.cc,
# registered by model/kernels): the rows read their blocks in place, no gather.
ATTENTION_TARGET = "jaxchat_decode_attention"
# And of the prefill region's attention (model/kernels/prompt_attention.cc): each token
# over its prior group's positions in the pool, read in place, then its segment's own keys,
# in one online softmax whose spans start at position 0 wherever the keys lie, so a
# prompt's tokens get the same output however it was cut into chunks or served from the
# cache.
PROMPT_TARGET = "jaxchat_prompt_attention"
# Prior groups a step's prefill region may continue from (distinct cached prefixes, or
# long prompts' earlier chunks): each is a row of block table, so a few KB per step. As
# many as the default slots: a prompt whose cached prefix ends inside a block continues
# from a copy of that block's start, a prior of its own, so a burst of repeated prompts
# (retries, one question from many clients) needs one each. 32 chat prompts at once, 8
# distinct, all cached, on a 2-core CPU in-process: 16 groups left 16 of them to prefill
# whole, 143 tokens in a 430-ms step; with 32, 20 tokens in 208 ms (TTFT p50 0.61 ->
# 0.28 s).
PRIOR_GROUPS = 32
# The target that returns a zeroed array without touching its pages (model/kernels/pool.cc):
# the pool then costs time and memory as it fills, not all at start-up.
ZEROS_TARGET = "jaxchat_zeros"


class Pool(PyTreeNode):
    """Every layer's keys and values: k [L·NB, K, H, BS], v [L·NB, K, BS, H]."""

    k: jax.Array
    v: jax.Array

    @property
    def block_size(self) -> int:
        return self.k.shape[-1]


def init_pool(
    n_layers: int,
    blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype,
    kernel: bool = False,
):
    """A zeroed pool of `blocks` blocks of `block_size` positions per layer. kernel: zeroed
    by jaxchat's CPU kernel, which leaves the pages untouched until written (one CPU
    device; model/kernels must be loaded)."""
    k, h, bs, nb = kv_heads, head_dim, block_size, n_layers * blocks
    zeros = _kernel_zeros if kernel else jnp.zeros
    return Pool(zeros((nb, k, h, bs), dtype), zeros((nb, k, bs, h), dtype))


def _kernel_zeros(shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.ffi.ffi_call(ZEROS_TARGET, jax.ShapeDtypeStruct(shape, dtype))()


class Layout(PyTreeNode):
    """Where a step's T tokens are: positions, decode rows, prefill segments, writes.

    positions [T] i32; context [R] i32 (decode row r's position, -1 idle);
    block_tables [R, MB] i32 (decode rows' blocks); segments [P] i32 (prefill
    token's segment, -1 padding); prior [Q] i32 (each prior group's positions
    already in the pool); prior_blocks [Q, MB] i32 (each group's blocks);
    prior_group [P] i32 (the group whose positions a prefill token sees, -1 none);
    write [T] i32 (flat pool position of each token's key and value; NB * BS or
    more: none).
    """

    positions: jax.Array
    context: jax.Array
    block_tables: jax.Array
    segments: jax.Array
    prior: jax.Array
    prior_blocks: jax.Array
    prior_group: jax.Array
    write: jax.Array

    @property
    def rows(self) -> int:
        """R: decode rows."""
        return self.context.shape[0]

    def used(self) -> jax.Array:
        """The step's tokens up to its last real one (a decode row with a context, a
        prefill token with a segment): what is past it is padding, which the quantized
        kernel need not multiply."""
        rows = jnp.where(self.context >= 0, jnp.arange(1, self.rows + 1), 0)
        prefill = self.rows + jnp.arange(1, self.segments.shape[0] + 1)
        prefill = jnp.where(self.segments >= 0, prefill, 0)
        return jnp.max(jnp.concatenate([rows, prefill, jnp.zeros(1, rows.dtype)]))

    @classmethod
    def host(cls, **arrays: np.ndarray | np.generic) -> "Layout":
        """A layout of host arrays (filled in place before a step). jit traces them as
        jax.Array, the type the fields carry."""
        return cls(**cast(dict[str, jax.Array], arrays))


def write_pool(
    pool: Pool, key: jax.Array, value: jax.Array, write: jax.Array, base, blocks: int
) -> Pool:
    """The pool with key, value [K, H, T] stored at flat positions write [T] of the layer
    whose blocks start at `base` (a layer has `blocks` blocks; a position beyond: none)."""
    bs = pool.block_size
    block = write // bs
    # Beyond the whole pool is the "no write" marker: mode="drop" skips it.
    block = jnp.where(block < blocks, block + base, pool.k.shape[0])
    offset = write % bs
    k, v = key.transpose(2, 0, 1).astype(pool.k.dtype), value.transpose(2, 0, 1)
    return Pool(
        pool.k.at[block, :, :, offset].set(k, mode="drop"),
        pool.v.at[block, :, offset, :].set(v.astype(pool.v.dtype), mode="drop"),
    )


def chunk_blocks(positions: int, block_size: int, table_width: int) -> int:
    """Blocks per loop iteration for chunks of about `positions` keys: it must divide the
    block-table width, or the last chunk's slice would be shifted back to fit."""
    blocks = max(1, min(positions // block_size, table_width))
    while table_width % blocks:
        blocks -= 1
    return blocks


def _online(state, scores, values):
    """One online-softmax update: state (max, sum, acc) [..., Q] / [..., Q, H];
    scores [..., Q, C] already masked; values(probs) → [..., Q, H]."""
    top, total, acc = state
    new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
    rescale = jnp.exp(top - new_top)
    # A query with every key masked so far has new_top = NEG_INF: keep its probabilities 0.
    probs = jnp.where(scores > NEG_INF, jnp.exp(scores - new_top[..., None]), 0.0)
    return (
        new_top,
        total * rescale + jnp.sum(probs, axis=-1),
        acc * rescale[..., None] + values(probs),
    )


def _finish(state) -> jax.Array:
    _, total, acc = state
    return acc / jnp.maximum(total, 1e-30)[..., None]  # an idle row has total 0: output 0


def _empty(shape: tuple[int, ...], head_dim: int):
    return (
        jnp.full(shape, NEG_INF, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )


def decode_attention(
    q: jax.Array,
    pool: Pool,
    context: jax.Array,
    block_tables: jax.Array,
    base=0,
    chunk: int = DECODE_CHUNK,
    shared_chunk: int = SHARED_CHUNK,
    kernel: bool = False,
) -> jax.Array:
    """Decode rows: q [R, K, G, H] → [R, K, G, H], each row over its keys 0..context[r] in
    the layer whose blocks start at `base`, `chunk` keys per loop iteration.

    Gathering each row's blocks is most of the cost. When every active row has the same
    block table (one sequence: a lone stream's newest token and its drafts), the blocks
    are gathered once for all rows instead, `shared_chunk` keys per iteration.
    kernel: through jaxchat's CPU kernel, which gathers nothing (`kernel_fits` says where
    it applies; model/kernels must be loaded)."""
    if kernel and kernel_fits(pool, q.shape[-1]):
        return _kernel_attention(q, pool, context, block_tables, base)
    active = context[:, None] >= 0
    shared = jnp.all((block_tables == block_tables[:1]) | ~active)
    return lax.cond(
        shared,
        partial(_rows_attention, chunk=shared_chunk, shared=True),
        partial(_rows_attention, chunk=chunk, shared=False),
        q,
        pool,
        context,
        block_tables,
        base,
    )


def kernel_fits(pool: Pool, head_dim: int) -> bool:
    """Whether the CPU kernel takes this pool: float32 or float16, blocks and heads in
    multiples of 16."""
    return (
        pool.k.dtype in (jnp.float32, jnp.float16)
        and pool.block_size % 16 == 0
        and head_dim % 16 == 0
        and head_dim <= 512
    )


def _kernel_attention(q, pool: Pool, context, block_tables, base) -> jax.Array:
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(
        q.astype(jnp.float32),
        pool.k,
        pool.v,
        context.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        jnp.asarray(base, jnp.int32),
        scale=np.float32(q.shape[-1] ** -0.5),
        threads=np.int64(0),
    )
    return out.astype(q.dtype)


def _rows_attention(
    q, pool: Pool, context, block_tables, base, chunk: int, shared: bool
) -> jax.Array:
    """decode_attention's rows, each through its own block table, or (`shared`) all through
    row 0's: one gather per chunk for every row."""
    rows, k, g, h = q.shape
    bs = pool.block_size
    per_chunk = chunk_blocks(chunk, bs, block_tables.shape[1])
    width = per_chunk * bs
    scale = h**-0.5
    chunks = (jnp.max(context) + width) // width  # covers position max(context); 0 if all idle
    tables = block_tables[0] if shared else block_tables
    r = "" if shared else "r"  # the gathered blocks' row axis, if each row has its own

    def body(c, state):
        ids = lax.dynamic_slice_in_dim(tables, c * per_chunk, per_chunk, axis=-1) + base
        keys = pool.k[ids].astype(q.dtype)  # [(R,) n, K, H, BS]
        values = pool.v[ids].astype(q.dtype)  # [(R,) n, K, BS, H]
        s = jnp.einsum(f"rkgh,{r}nkhs->rkgns", q, keys).astype(jnp.float32) * scale
        pos = c * width + jnp.arange(width).reshape(per_chunk, bs)
        visible = pos[None] <= context[:, None, None]  # [R, n, BS]
        s = jnp.where(visible[:, None, None], s, NEG_INF).reshape(rows, k, g, width)

        def weighted(p):
            p = p.reshape(rows, k, g, per_chunk, bs).astype(values.dtype)
            return jnp.einsum(f"rkgns,{r}nksh->rkgh", p, values).astype(jnp.float32)

        return _online(state, s, weighted)

    state = lax.fori_loop(0, chunks, body, _empty((rows, k, g), h))
    return _finish(state).astype(q.dtype)


def region_attention(
    q: jax.Array,
    key: jax.Array,
    value: jax.Array,
    layout: Layout,
    pool: Pool | None,
    base=0,
    prior_chunk: int = PRIOR_CHUNK,
    kernel: bool = False,
) -> jax.Array:
    """Prefill region: q [K, G, H, P], its own key and value [K, H, P] → [K, G, H, P].

    Each token sees the tokens of its segment at or before its position, and the
    positions of its prior group in the pool (the layer whose blocks start at `base`;
    `prior_chunk` keys per loop iteration; kernel: through jaxchat's CPU kernel, where
    `kernel_fits`).
    """
    k, g, h, p = q.shape
    if pool is not None and kernel and kernel_fits(pool, h):
        return _kernel_prompt(q, key, value, layout, pool, base).transpose(0, 1, 3, 2)
    scale = h**-0.5
    seg, pos = layout.segments, layout.positions[layout.rows :]
    s = jnp.einsum("kghq,khp->kgqp", q, key).astype(jnp.float32) * scale
    visible = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]) & (seg[:, None] >= 0)
    s = jnp.where(visible, s, NEG_INF)
    weighted = lambda probs: jnp.einsum("kgqp,khp->kgqh", probs.astype(value.dtype), value)  # noqa: E731
    state = _online(_empty((k, g, p), h), s, lambda probs: weighted(probs).astype(jnp.float32))
    if pool is not None:
        state = _prior_attention(q, pool, layout, state, base, prior_chunk)
    return _finish(state).astype(q.dtype).transpose(0, 1, 3, 2)


def _kernel_prompt(q: jax.Array, key: jax.Array, value: jax.Array, layout: Layout, pool, base):
    """The region's attention through jaxchat's CPU kernel: [K, G, P, H]."""
    h = q.shape[2]
    call = jax.ffi.ffi_call(
        PROMPT_TARGET, jax.ShapeDtypeStruct(q.shape[:2] + q.shape[3:] + (h,), jnp.float32)
    )
    # Keys with 16 positions of padding (the kernel loads 16 at a time), values features-minor.
    keys = jnp.pad(key.astype(jnp.float32), ((0, 0), (0, 0), (0, 16)))
    out = call(
        q.astype(jnp.float32),
        keys,
        value.astype(jnp.float32).transpose(0, 2, 1),
        pool.k,
        pool.v,
        layout.segments.astype(jnp.int32),
        layout.positions[layout.rows :].astype(jnp.int32),
        jnp.where(layout.segments >= 0, layout.prior_group, -1).astype(jnp.int32),
        layout.prior.astype(jnp.int32),
        layout.prior_blocks.astype(jnp.int32),
        jnp.asarray(base, jnp.int32),
        scale=np.float32(h**-0.5),
    )
    return out.astype(q.dtype)


def _prior_attention(q: jax.Array, pool: Pool, layout: Layout, state, base, chunk: int):
    """Adds each prior group's positions (from the pool) to the softmax of its tokens, in
    one loop over every group's chunks (nested loops made XLA copy the pool per layer)."""
    k, g, h, p = q.shape
    per_chunk = chunk_blocks(chunk, pool.block_size, layout.prior_blocks.shape[1])
    width = per_chunk * pool.block_size
    sees = jnp.where(layout.segments >= 0, layout.prior_group, -1)  # [P]
    chunks = (layout.prior + width - 1) // width  # [Q]
    ends = jnp.cumsum(chunks)  # each group's last loop chunk + 1

    def body(i, state):
        j = jnp.sum(i >= ends)  # the group of loop chunk i, and its chunk c
        c = i - ends[j] + chunks[j]
        ids = lax.dynamic_slice_in_dim(layout.prior_blocks[j], c * per_chunk, per_chunk) + base
        keys = pool.k[ids].astype(q.dtype).transpose(1, 2, 0, 3).reshape(k, h, width)  # [K, H, C]
        values = pool.v[ids].astype(q.dtype).transpose(1, 0, 2, 3).reshape(k, width, h)
        s = jnp.einsum("kghq,khc->kgqc", q, keys).astype(jnp.float32) * h**-0.5
        visible = (sees == j)[:, None] & (c * width + jnp.arange(width) < layout.prior[j])[None, :]

        def weighted(probs):
            out = jnp.einsum("kgqc,kch->kgqh", probs.astype(values.dtype), values)
            return out.astype(jnp.float32)

        return _online(state, jnp.where(visible, s, NEG_INF), weighted)

    return lax.fori_loop(0, ends[-1], body, state)
