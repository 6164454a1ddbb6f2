"""The engine's typed pytrees and host-side helpers: the device state, a step's plan
and outputs, an empty plan, a request's per-slot sampling row, and the pool's size."""

import math
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.engine.variants import StepShape
from model.nn.attention import (
    DECODE_CHUNK,
    PRIOR_CHUNK,
    PRIOR_GROUPS,
    SHARED_CHUNK,
    Layout,
    Pool,
)
from model.nn.config import ModelConfig
from model.nn.pytree import PyTreeNode
from model.nn.sampling import SlotSampling, kernel_sample, sample, take_rows
from model.types import SamplingParams

BLOCK_SIZE = 64  # positions per pool block
# Block copies a step may start with (one per prompt that reuses a partly filled block).
COPIES = 32


def copy_blocks(pool: Pool, copies: jax.Array, blocks: int) -> Pool:
    """The pool with each (source, destination) block of `copies` [C, 2] copied in every
    layer (`blocks` a layer; the copies first, then destinations past them: none)."""
    layers = pool.k.shape[0] // blocks

    def one(i, pool: Pool) -> Pool:
        def copy(array: jax.Array) -> jax.Array:
            view = array.reshape(layers, blocks, *array.shape[1:])
            block = lax.dynamic_index_in_dim(view, copies[i, 0], axis=1)
            view = lax.dynamic_update_index_in_dim(view, block, copies[i, 1], axis=1)
            return view.reshape(array.shape)

        return Pool(copy(pool.k), copy(pool.v))

    return lax.fori_loop(0, jnp.sum(copies[:, 1] < blocks), one, pool)


class EngineState(PyTreeNode):
    """What the device keeps between steps, for B slots.

    pool: every layer's keys and values of every sequence (model/nn/attention.py);
    tokens [B]: each slot's newest sampled token, the input of its next decode row;
    sampling: each slot's sampling settings and state (key, counts).
    """

    pool: Pool
    tokens: jax.Array
    sampling: SlotSampling


class StepPlan(PyTreeNode):
    """One step's inputs, host arrays shaped by a StepShape (R rows, P prefill tokens).

    tokens [T]: the prefill region's tokens (decode rows' entries are ignored);
    layout: positions, decode contexts and block tables, segments, writes;
    slots [R] i32: the slot whose sequence row r serves (B: none);
    decode [R] bool: row r is its slot's decode row (its token comes from the state);
    sample_from [R] i32: the token whose output row r samples from;
    sample [R] bool: row r samples a token for its slot this step;
    allowed [R, W] i32: grammar bitmasks (all bits set: unconstrained);
    draft [R] i32: 0, or i for the i-th draft row of a speculating slot (its token
    from `tokens`; it samples as any row, by its position, and leaves the slot's state alone:
    model/engine/speculative.py);
    copies [COPIES, 2] i32: blocks (source, destination) copied in every layer before the
    step (a prompt reusing the computed start of another sequence's partly filled block:
    model/engine/blocks.py); a destination past the pool: none.
    """

    tokens: jax.Array
    layout: Layout
    slots: jax.Array
    decode: jax.Array
    sample_from: jax.Array
    sample: jax.Array
    allowed: jax.Array
    draft: jax.Array
    copies: jax.Array

    @classmethod
    def host(cls, layout: Layout, **arrays: np.ndarray) -> "StepPlan":
        """A plan of host arrays (filled in place by the scheduler). jit traces them as
        jax.Array, the type the fields carry."""
        return cls(layout=layout, **cast(dict[str, jax.Array], arrays))

    def head_rows(self, batch: int) -> jax.Array:
        """What the quantized head multiplies of the R rows (`project`'s `used`): the rows
        up to the last that serves a slot (`batch`: none), each one token's logits, as
        decode rows (which it may round; never a prompt's pass)."""
        rows = jnp.arange(1, self.slots.shape[0] + 1)
        served = jnp.max(jnp.where(self.slots < batch, rows, 0), initial=0)
        return jnp.stack([served, served])


class StepOutputs(PyTreeNode):
    """Per row r: the sampled token and its log-probability, and the most likely
    tokens [R, TOP_LOGPROBS] (zeros unless some row asked). Rows not sampling: junk.

    pooled [B, D] f32: row g is the sum of the final hidden states (after the final
    norm) of the prefill region's segment g, for embeddings; rows past the last
    segment are zero."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    pooled: jax.Array


def default_pool_tokens(
    config: ModelConfig, dtype, batch: int, max_seq_len: int, spec: str | None = None
) -> int:
    """KV pool size in positions, from JAXCHAT_KV_POOL-style `spec`: a number of tokens
    ("65536"), a fraction of the memory that is free now ("0.5"), or None: on CPU
    32768 positions (about 1.5 GB for SmolLM2-135M in float32), else 85% of the free
    device memory. At least one full context, and never past batch × context."""
    c = config
    per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(dtype).itemsize
    if spec and "." not in spec:
        tokens = int(spec)
    elif spec or jax.default_backend() != "cpu":
        fraction = float(spec) if spec else 0.85
        tokens = int(fraction * free_memory_bytes() / per_token)
    else:
        tokens = 32768
    return max(max_seq_len, min(tokens, batch * max_seq_len))


def pool_blocks(config: ModelConfig, kv_dtype, batch: int, max_seq_len: int, tokens) -> int:
    """Blocks in the KV pool: for `tokens` positions (rounded down), or as
    `default_pool_tokens` says for JAXCHAT_KV_POOL-style `tokens` (a str, or None); at
    least one full context."""
    if not isinstance(tokens, int):
        tokens = default_pool_tokens(config, kv_dtype, batch, max_seq_len, tokens)
    return max(tokens // BLOCK_SIZE, -(-max_seq_len // BLOCK_SIZE))


def free_memory_bytes() -> int:
    """Free memory of the first device (accelerators), or the host's available memory."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def empty_plan(
    shape: StepShape, table_width: int, no_write: int, mask_words: int, batch: int, block_size: int
) -> StepPlan:
    """A plan of `shape` that changes nothing: idle rows of no slot (`batch`, past the
    last), padding, no writes (`no_write`: a flat pool position past the pool), no
    samples, every token allowed."""
    r, t, mb = shape.rows, shape.tokens, table_width
    groups = PRIOR_GROUPS if shape.prefill else 1
    layout = Layout.host(
        positions=np.zeros(t, np.int32),
        context=np.full(r, -1, np.int32),
        block_tables=np.zeros((r, mb), np.int32),
        segments=np.full(shape.prefill, -1, np.int32),
        prior=np.zeros(groups, np.int32),
        prior_blocks=np.zeros((groups, mb), np.int32),
        prior_group=np.full(shape.prefill, -1, np.int32),
        write=np.full(t, no_write, np.int32),
    )
    return StepPlan.host(
        layout,
        tokens=np.zeros(t, np.int32),
        slots=np.full(r, batch, np.int32),
        decode=np.zeros(r, bool),
        sample_from=np.zeros(r, np.int32),
        sample=np.zeros(r, bool),
        allowed=np.full((r, mask_words), -1, np.int32),
        draft=np.zeros(r, np.int32),
        copies=np.full((COPIES if shape.prefill else 1, 2), no_write // block_size, np.int32),
    )


def sampling_row(
    params: SamplingParams, seed: int, prompt_ids: Sequence[int], v: int
) -> SlotSampling:
    """[1]-shaped settings for one sequence of a vocabulary of `v` tokens: its key from
        `seed`, the prompt's tokens marked seen (for the repetition penalty). Token ids in
    `params.logit_bias` are in range (model/limits.py checks requests)."""
    bias = np.zeros((1, v), np.float32)
    for token, value in (params.logit_bias or {}).items():
        bias[0, token] = value
    row = SlotSampling.create(
        [params.temperature],
        [params.top_p],
        [min(params.top_k, v)],  # keeping more than the vocabulary keeps all of it
        prng_key(seed)[None],
        vocab_size=v,
        min_p=[params.min_p],
        frequency_penalty=[params.frequency_penalty],
        presence_penalty=[params.presence_penalty],
        repetition_penalty=[params.repetition_penalty],
        top_logprobs=[params.top_logprobs],
        logit_bias=bias,
        xp=np,
    )
    seen = np.zeros((1, v), bool)
    seen[0, np.asarray(prompt_ids, np.int64)] = True
    return row.replace(seen=seen)


def table_width(max_seq_len: int, block_size: int) -> int:
    """MB: blocks per block table, enough for `max_seq_len` positions and a multiple of
    every attention chunk's block count (so no chunk's slice runs past the table)."""
    needed = -(-max_seq_len // block_size)
    chunks = (DECODE_CHUNK, SHARED_CHUNK, PRIOR_CHUNK)
    step = math.lcm(*(max(1, chunk // block_size) for chunk in chunks))
    return -(-needed // step) * step


def prng_key(seed: int) -> np.ndarray:
    """A PRNG key [2] u32 from a 64-bit seed, computed on the host (no device work).

    Equal to jax.random.PRNGKey(seed) for seeds below 2**32; the high word
    takes the key's first half, so distinct int64 seeds give distinct keys.
    """
    seed &= 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def sample_rows(
    state: EngineState, newest, logits, plan: StepPlan, batch: int, kernel: str | None = None
):
    """Sample a token for each row of logits [R, V] with its slot's settings → (the B
    slots' sampling state and newest tokens, the sample). `newest` [R]: each row's slot's
    newest token. Rows of no slot (`batch`) and draft rows leave the state alone.

    A row draws with its slot's key folded with the position it samples from, and slot
    keys never advance: a seeded sequence draws the same token at a position (after the
    same tokens) whatever else shares the step, whether or not that position was a draft
    row, and after a preempted sequence is recomputed. kernel: the CPU kernels' digest where
    the step uses them (model/engine/quantized.py's `kernels`): the rows then sample
    through jaxchat's CPU sampler (model/nn/sampling.py's `kernel_sample`), which compiles
    in a fraction of the XLA sampler's time."""
    slots, keep, all_ = plan.slots, plan.sample, state.sampling
    positions = plan.layout.positions[plan.sample_from]
    if kernel is not None:
        out = kernel_sample(logits, all_, slots, positions, plan.allowed)
    else:
        rows = take_rows(all_, slots)  # the [B, V] settings are read by row only if needed
        keys = jax.vmap(jax.random.fold_in)(rows.key, positions)
        out = sample(logits, rows.replace(key=keys), plan.allowed, slots)
    # Only the rows that sample count their token: scatters of R entries, not a pass over
    # the [B, V] counts.
    owner = jnp.where(plan.draft == 0, slots, batch)
    counts = all_.counts.at[owner, out.tokens].add(keep.astype(jnp.int32), mode="drop")
    newest = jnp.where(keep, out.tokens, newest)
    return all_.replace(counts=counts), state.tokens.at[owner].set(newest, mode="drop"), out
