"""The transformer on a tiny random config: KV-cache decoding equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.transformer import Transformer, init_cache, rope

CONFIG = ModelConfig.tiny()
MODEL = Transformer(CONFIG)


@pytest.fixture(scope="module")
def params():
    tokens = jnp.zeros((1, 4), jnp.int32)
    start = jnp.zeros((1,), jnp.int32)
    variables = MODEL.init(
        jax.random.PRNGKey(0), tokens, tokens, start, init_cache(CONFIG, 1, 4, jnp.float32)
    )
    return variables["params"]


@jax.jit
def step(params, tokens, positions, start, caches):
    """tokens [B, T] at positions [B, T] written from start [B] → (logits [B, T, V], caches)."""
    hidden, caches = MODEL.apply({"params": params}, tokens, positions, start, caches)
    return MODEL.apply({"params": params}, hidden, method=Transformer.logits), caches


def full_logits(params, tokens):
    """Logits [T, V] of a fresh pass over tokens [1, T]."""
    t = tokens.shape[1]
    caches = init_cache(CONFIG, 1, t, jnp.float32)
    logits, _ = step(params, tokens, jnp.arange(t)[None], jnp.zeros((1,), jnp.int32), caches)
    return logits[0]


def test_prefill_then_decode_equals_full_forward(params):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 24)), jnp.int32)
    full = full_logits(params, tokens)

    cache_len, split = 64, 10
    caches = init_cache(CONFIG, 1, cache_len, jnp.float32)
    start = jnp.zeros((1,), jnp.int32)
    logits, caches = step(params, tokens[:, :split], jnp.arange(split)[None], start, caches)
    stepped = [logits[0]]
    for pos in range(split, tokens.shape[1]):
        one = tokens[:, pos : pos + 1]
        logits, caches = step(params, one, jnp.array([[pos]]), jnp.array([pos]), caches)
        stepped.append(logits[0])
    np.testing.assert_allclose(np.concatenate(stepped), full, atol=1e-5)


def test_batch_rows_at_different_positions_are_independent(params):
    """Two slots decoding at different offsets give each row's own logits."""
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 9)), jnp.int32)
    b = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 5)), jnp.int32)
    cache_len = 16
    caches = init_cache(CONFIG, 2, cache_len, jnp.float32)
    # Fill each row's history one token at a time (the other row writes to its
    # last cache position, which nothing reads), then decode one more for both.
    for row, seq in ((0, a), (1, b)):
        for pos in range(seq.shape[1] - 1):
            tokens = jnp.zeros((2, 1), jnp.int32).at[row, 0].set(seq[0, pos])
            positions = jnp.full((2, 1), cache_len - 1).at[row, 0].set(pos)
            _, caches = step(params, tokens, positions, positions[:, 0], caches)
    last = jnp.array([[a[0, -1]], [b[0, -1]]])
    positions = jnp.array([[a.shape[1] - 1], [b.shape[1] - 1]])
    logits, _ = step(params, last, positions, positions[:, 0], caches)
    np.testing.assert_allclose(logits[0, 0], full_logits(params, a)[-1], atol=1e-5)
    np.testing.assert_allclose(logits[1, 0], full_logits(params, b)[-1], atol=1e-5)


def test_rope_rotates_pairs_of_halves():
    """Position p rotates (x[i], x[i+H/2]) by p·θ^(-2i/H), as HF's rotate_half does."""
    h, theta, pos = 8, 10000.0, 3
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, h, 1, 1)), jnp.float32)
    inv_freq = 1.0 / theta ** (np.arange(h // 2) / (h // 2))
    out = np.asarray(rope(x, jnp.array([[pos]]), inv_freq))[0, :, 0, 0]
    xs = np.asarray(x)[0, :, 0, 0]
    for i in range(h // 2):
        angle = pos * theta ** (-2 * i / h)
        c, s = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(out[i], xs[i] * c - xs[i + h // 2] * s, rtol=1e-5)
        np.testing.assert_allclose(out[i + h // 2], xs[i + h // 2] * c + xs[i] * s, rtol=1e-5)
