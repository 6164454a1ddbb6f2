"""Sampling transforms and the composed sampler, on hand-computable logits."""

import jax
import jax.numpy as jnp
import numpy as np

from model.sampling import NEG_INF, SlotSampling, top_k_mask, top_p_mask
from model.sampling import sample as eager_sample

sample = jax.jit(eager_sample)


def settings(temperature, top_p, top_k, seeds):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(list(seeds)))
    return SlotSampling.create(temperature, top_p, top_k, keys)


def test_top_k_mask_keeps_the_k_largest_of_sorted_logits():
    sorted_logits = jnp.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    out = np.asarray(top_k_mask(sorted_logits, jnp.array([2, 0])))
    assert out[0].tolist() == [4.0, 3.0, NEG_INF, NEG_INF]
    assert out[1].tolist() == [4.0, 3.0, 2.0, 1.0]  # 0 disables the filter


def test_top_p_mask_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sorted_logits = jnp.asarray(np.log(probs)[None].repeat(3, 0), jnp.float32)
    out = np.asarray(top_p_mask(sorted_logits, jnp.array([0.7, 0.81, 0.01])))
    kept = (out > NEG_INF).sum(-1).tolist()
    assert kept == [2, 3, 1]  # 0.5 < 0.7 ≤ 0.8; 0.8 < 0.81 ≤ 0.95; the top token always stays


def test_temperature_zero_is_argmax_whatever_the_key():
    logits = jnp.array([[0.1, 2.0, 1.9, -1.0]] * 4)
    tokens, logprobs, _ = sample(logits, settings([0.0] * 4, [1.0] * 4, [0] * 4, [1, 2, 3, 4]))
    assert tokens.tolist() == [1, 1, 1, 1]
    expected = np.asarray(jax.nn.log_softmax(logits[0]))[1]
    np.testing.assert_allclose(np.asarray(logprobs), expected, rtol=1e-6)


def test_mixed_batch_each_slot_follows_its_own_settings():
    logits = jnp.array([[0.0, 1.0, 3.0, 2.0]] * 3)
    # greedy, top_k=1 (so effectively greedy), and top_p tiny (only the top token)
    tokens, _, _ = sample(logits, settings([0.0, 1.5, 1.0], [1.0, 1.0, 1e-3], [0, 1, 0], [7, 8, 9]))
    assert tokens.tolist() == [2, 2, 2]


def test_a_rows_draw_does_not_depend_on_its_neighbours_filters():
    """An unfiltered row draws the same token whether or not another row needs the sort."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300)), jnp.float32)
    for seed in range(20):
        plain, _, _ = sample(logits, settings([1.0, 1.0], [1.0, 1.0], [0, 0], [seed, 99]))
        mixed, _, _ = sample(logits, settings([1.0, 1.0], [1.0, 0.5], [0, 3], [seed, 99]))
        assert int(plain[0]) == int(mixed[0])


def test_same_key_same_draws_and_keys_advance():
    logits = jnp.zeros((1, 50))
    s = settings([1.0], [1.0], [0], [42])
    first, _, keys = sample(logits, s)
    again, _, _ = sample(logits, s)
    assert first.tolist() == again.tolist()
    draws = []
    for _ in range(20):
        token, _, keys = sample(logits, s.replace(key=keys))
        draws.append(int(token[0]))
    assert len(set(draws)) > 5  # advancing keys give fresh draws from a uniform distribution


def test_top_k_sampling_follows_the_renormalised_distribution():
    """With top_k=2 over probabilities (0.6, 0.3, 0.1), draws split 2:1 between the top two."""
    n = 4000
    logits = jnp.log(jnp.array([[0.3, 0.1, 0.6]] * n))
    tokens, _, _ = sample(logits, settings([1.0] * n, [1.0] * n, [2] * n, range(n)))
    counts = np.bincount(np.asarray(tokens), minlength=3)
    assert counts[1] == 0
    assert abs(counts[2] / n - 2 / 3) < 0.03
