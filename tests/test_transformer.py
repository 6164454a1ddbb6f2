"""The transformer on a tiny random config: KV-cache decoding equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import Transformer, init_cache

CONFIG = ModelConfig.tiny()


def _init(config=CONFIG):
    model = Transformer(config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = model.init(
        jax.random.PRNGKey(0), tokens, tokens, jnp.zeros((1,), jnp.int32),
        init_cache(config, 1, 4, jnp.float32), 4,
    )
    return model, variables["params"]


def _full_logits(model, params, tokens):
    t = tokens.shape[1]
    positions = jnp.arange(t)[None]
    caches = init_cache(model.config, 1, t, jnp.float32)
    hidden, _ = model.apply({"params": params}, tokens, positions, jnp.zeros((1,), jnp.int32), caches, t)
    return model.apply({"params": params}, hidden, method=Transformer.logits)[0]


def test_prefill_then_decode_equals_full_forward():
    model, params = _init()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 24)), jnp.int32)
    full = _full_logits(model, params, tokens)

    cache_len, split = 64, 10
    caches = init_cache(CONFIG, 1, cache_len, jnp.float32)
    hidden, caches = model.apply(
        {"params": params}, tokens[:, :split], jnp.arange(split)[None],
        jnp.zeros((1,), jnp.int32), caches, cache_len,
    )
    stepped = [model.apply({"params": params}, hidden, method=Transformer.logits)[0]]
    for pos in range(split, tokens.shape[1]):
        hidden, caches = model.apply(
            {"params": params}, tokens[:, pos : pos + 1], jnp.array([[pos]]),
            jnp.array([pos]), caches, cache_len,
        )
        stepped.append(model.apply({"params": params}, hidden, method=Transformer.logits)[0])
    np.testing.assert_allclose(np.concatenate(stepped), full, atol=1e-5)


def test_batch_rows_at_different_positions_are_independent():
    """Two slots decoding at different offsets give each row's own logits."""
    model, params = _init()
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 9)), jnp.int32)
    b = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 5)), jnp.int32)
    cache_len = 16
    caches = init_cache(CONFIG, 2, cache_len, jnp.float32)
    # Fill each row's history one token at a time, then decode one more for both.
    for row, seq in ((0, a), (1, b)):
        for pos in range(seq.shape[1] - 1):
            tokens = jnp.zeros((2, 1), jnp.int32).at[row, 0].set(seq[0, pos])
            positions = jnp.full((2, 1), cache_len - 1).at[row, 0].set(pos)
            _, caches = model.apply({"params": params}, tokens, positions, positions[:, 0], caches, cache_len)
    last = jnp.array([[a[0, -1]], [b[0, -1]]])
    positions = jnp.array([[a.shape[1] - 1], [b.shape[1] - 1]])
    hidden, _ = model.apply({"params": params}, last, positions, positions[:, 0], caches, cache_len)
    logits = model.apply({"params": params}, hidden, method=Transformer.logits)[:, 0]
    np.testing.assert_allclose(logits[0], _full_logits(model, params, a)[-1], atol=1e-5)
    np.testing.assert_allclose(logits[1], _full_logits(model, params, b)[-1], atol=1e-5)


def test_rope_rotates_pairs_of_halves():
    """Position p rotates (x[i], x[i+H/2]) by p·θ^(-2i/H), as HF's rotate_half does."""
    from model.transformer import rope

    h, theta, pos = 8, 10000.0, 3
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, 1, h)), jnp.float32)
    out = np.asarray(rope(x, jnp.array([[pos]]), theta))[0, 0, 0]
    xs = np.asarray(x)[0, 0, 0]
    for i in range(h // 2):
        angle = pos * theta ** (-2 * i / h)
        c, s = np.cos(angle), np.sin(angle)
        np.testing.assert_allclose(out[i], xs[i] * c - xs[i + h // 2] * s, rtol=1e-5)
        np.testing.assert_allclose(out[i + h // 2], xs[i + h // 2] * c + xs[i] * s, rtol=1e-5)
