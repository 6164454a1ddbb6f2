"""The transformer on a tiny random config, through the paged pool: chunked prefill and
decode rows give the logits of one plain causal pass."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.nn.attention import Layout, init_pool
from model.nn.network import forward_layout
from model.nn.params import stack_layers
from model.nn.transformer import Transformer, rope
from tests.tiny_models import TINY_LLAMA, dense_logits

CONFIG = TINY_LLAMA
MODEL = Transformer(CONFIG)
BS, NB, MB = 4, 32, 24  # block size, pool blocks, blocks per sequence
NONE = NB * BS  # a write position beyond the pool: no write


@pytest.fixture(scope="module")
def params():
    tokens = jnp.zeros((4,), jnp.int32)
    return jax.jit(MODEL.init)(jax.random.PRNGKey(0), tokens, forward_layout(1, 4))["params"]


@partial(jax.jit, static_argnums=0)
def run(model, params, pool, tokens, layout):
    """Logits [T, V] of one step through the pool, and the pool."""
    hidden, pool = model.apply({"params": params}, tokens, layout, pool)
    return model.apply({"params": params}, hidden, method=Transformer.logits), pool


def pooled_step(params, pool, tokens, layout):
    return run(MODEL, params, pool, tokens, layout)


def flat(table: np.ndarray, positions) -> np.ndarray:
    positions = np.asarray(positions)
    return table[positions // BS] * BS + positions % BS


def chunk_layout(table: np.ndarray, start: int, length: int, pad: int) -> Layout:
    """A prefill region of one segment at positions start..start+length, then padding."""
    positions = np.arange(start, start + length)
    return Layout(
        positions=np.concatenate([positions, np.zeros(pad)]).astype(np.int32),
        context=np.zeros((0,), np.int32),
        block_tables=np.zeros((0, MB), np.int32),
        segments=np.concatenate([np.zeros(length), np.full(pad, -1)]).astype(np.int32),
        prior=np.array([start], np.int32),
        prior_blocks=table[None],
        prior_group=np.concatenate([np.zeros(length), np.full(pad, -1)]).astype(np.int32),
        write=np.concatenate([flat(table, positions), np.full(pad, NONE)]).astype(np.int32),
    )


def decode_layout(tables: np.ndarray, positions: list[int]) -> Layout:
    """One decode row per table, row r at positions[r]; no prefill region."""
    positions = np.asarray(positions, np.int32)
    return Layout(
        positions=positions,
        context=positions,
        block_tables=tables,
        segments=np.zeros((0,), np.int32),
        prior=np.zeros(1, np.int32),
        prior_blocks=tables[:1],
        prior_group=np.zeros((0,), np.int32),
        write=np.array([flat(t, p) for t, p in zip(tables, positions, strict=True)], np.int32),
    )


def new_pool():
    return init_pool(CONFIG.n_layers, NB, BS, CONFIG.n_kv_heads, CONFIG.head_dim, jnp.float32)


def random_table(rng, blocks: int) -> np.ndarray:
    return np.concatenate([rng.permutation(NB)[:blocks], np.zeros(MB - blocks)]).astype(np.int32)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_chunked_prefill_then_decode_equals_one_forward_pass(params, scan):
    """Also with the layers in one scan over stacked weights, as the engine runs its
    larger steps."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, 40).astype(np.int32)
    full = np.asarray(dense_logits(CONFIG)(params, jnp.asarray(tokens)[None]))[0]
    model = Transformer(CONFIG, scan_layers=scan)
    weights = stack_layers(params, CONFIG.n_layers) if scan else params

    def pooled_step(params, pool, tokens, layout):
        return run(model, weights, pool, tokens, layout)

    pool, table = new_pool(), random_table(rng, 12)
    got = []
    # Chunks of 7 then 13 tokens (crossing blocks), each padded to 16, then decode rows.
    for start, length in ((0, 7), (7, 13)):
        chunk = np.pad(tokens[start : start + length], (0, 16 - length))
        layout = chunk_layout(table, start, length, 16 - length)
        logits, pool = pooled_step(params, pool, jnp.asarray(chunk), layout)
        got.append(np.asarray(logits)[:length])
    for position in range(20, 40):
        step_tokens = jnp.asarray(tokens[position : position + 1])
        logits, pool = pooled_step(
            params, pool, step_tokens, decode_layout(table[None], [position])
        )
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got), full, atol=2e-5)


def test_decode_rows_at_different_positions_are_independent(params):
    """Two sequences prefilled apart, then decoded in one step: each gets its own logits."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, CONFIG.vocab_size, 9).astype(np.int32)
    b = rng.integers(0, CONFIG.vocab_size, 5).astype(np.int32)
    pool = new_pool()
    tables = np.stack([random_table(rng, 4), random_table(rng, 4)])
    tables[1, :4] = np.setdiff1d(np.arange(NB), tables[0, :4])[:4]  # disjoint blocks
    for seq, table in ((a, tables[0]), (b, tables[1])):
        n = len(seq) - 1
        _, pool = pooled_step(params, pool, jnp.asarray(seq[:n]), chunk_layout(table, 0, n, 0))
    last = jnp.asarray([a[-1], b[-1]])
    logits, _ = pooled_step(params, pool, last, decode_layout(tables, [len(a) - 1, len(b) - 1]))
    for row, seq in enumerate((a, b)):
        want = dense_logits(CONFIG)(params, jnp.asarray(seq)[None])[0, -1]
        np.testing.assert_allclose(logits[row], want, atol=2e-5)


def test_rope_rotates_pairs_of_halves():
    """Position p rotates (x[i], x[i+H/2]) by p·θ^(-2i/H), as HF's rotate_half does."""
    h, theta, pos = 8, 10000.0, 3
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, h, 1)), jnp.float32)
    inv_freq = 1.0 / theta ** (np.arange(h // 2) / (h // 2))
    out = np.asarray(rope(x, jnp.array([pos]), inv_freq))[0, :, 0]
    xs = np.asarray(x)[0, :, 0]
    for i in range(h // 2):
        angle = pos * theta ** (-2 * i / h)
        c, s = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(out[i], xs[i] * c - xs[i + h // 2] * s, rtol=1e-5)
        np.testing.assert_allclose(out[i + h // 2], xs[i + h // 2] * c + xs[i] * s, rtol=1e-5)
