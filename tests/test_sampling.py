"""Sampling transforms and the composed sampler, on hand-computable logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.nn.sampling import (
    DRAW_BLOCK,
    NEG_INF,
    SlotSampling,
    apply_penalties,
    filter_cutoff,
    first_max,
    inverse_cdf,
    take_rows,
)
from model.nn.sampling import sample as eager_sample

_sample = jax.jit(eager_sample)


def sample(logits, s, allowed=None):
    out = _sample(logits, s, allowed)
    return out.tokens, out.logprobs, out.top_ids, out.top_logprobs, out.sampling


def settings(temperature, top_p, top_k, seeds):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(list(seeds)))
    return SlotSampling.create(temperature, top_p, top_k, keys)


def reference_cutoff(logits: np.ndarray, top_k: int, top_p: float) -> float:
    """The smallest logit top-k then top-p keep, by sorting (float64): the top_k largest,
    then the smallest prefix of them whose renormalised probabilities reach top_p (the
    first always stays)."""
    ranked = np.sort(logits.astype(np.float64))[::-1]
    if 0 < top_k < len(ranked):
        ranked = ranked[:top_k]
    probs = np.exp(ranked - ranked[0])
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    return float(ranked[max(1, int(np.sum(before < top_p))) - 1])


def cutoffs(logits, top_k, top_p) -> np.ndarray:
    return np.asarray(
        jax.jit(filter_cutoff)(
            jnp.asarray(logits, jnp.float32), jnp.asarray(top_k), jnp.asarray(top_p, jnp.float32)
        )
    )


def test_top_k_and_top_p_cut_where_sorting_would():
    """Hand-computable rows: top-k keeps the k largest (0 all), top-p the smallest prefix
    reaching p (the top token always), top-p over top-k's renormalised mass, ties kept."""
    probs = np.log([0.05, 0.5, 0.15, 0.3])  # order 0.5, 0.3, 0.15, 0.05
    rows = [probs] * 6 + [np.log([0.4, 0.4, 0.1, 0.1])]
    top_k = [2, 0, 0, 0, 0, 3, 1]
    top_p = [1.0, 0.7, 0.81, 0.01, 0.0, 0.9, 1.0]
    got = cutoffs(np.array(rows), top_k, top_p)
    # 0.5 < 0.7 <= 0.8; 0.8 < 0.81 <= 0.95; of top-3 (0.5, 0.3, 0.15 / 0.95), 0.9 needs all
    expected = np.log([0.3, 0.3, 0.15, 0.5, 0.5, 0.15, 0.4]).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("spread", [0.5, 2.0, 8.0], ids=["flat", "middling", "peaked"])
def test_the_cutoff_is_the_sorted_one_over_a_real_vocabulary(spread):
    """Over 49,152 logits, flat to peaked, with masked (NEG_INF) tokens and repeated
    values: each row's cut is the one sorting finds, for top_k up to past the vocabulary
    and top_p from 0.05 to 1, whatever the other rows ask for."""
    rng = np.random.default_rng(int(spread * 10))
    v, rows = 49152, 12
    logits = (rng.standard_normal((rows, v)) * spread).astype(np.float32)
    logits[:, :500] = np.round(logits[:, :500], 1)  # ties
    logits[:, rng.choice(v, 3000, replace=False)] = NEG_INF
    top_k = [0, 0, 0, 0, 1, 40, 300, 5000, v + 9, 0, 40, 0]
    top_p = [0.05, 0.5, 0.9, 0.95, 1.0, 1.0, 0.9, 0.95, 0.8, 1.0, 0.3, 0.99]
    got = cutoffs(logits, top_k, top_p)
    for r in range(rows):
        if top_k[r] == 0 and top_p[r] == 1.0:
            continue  # `sample` takes no cut for such a row (filter_cutoff keeps every token)
        expected = reference_cutoff(logits[r], top_k[r], top_p[r])
        assert got[r] == np.float32(expected), (r, got[r], expected)


def test_temperature_zero_is_argmax_whatever_the_key():
    logits = jnp.array([[0.1, 2.0, 1.9, -1.0]] * 4)
    tokens, logprobs, *_ = sample(logits, settings([0.0] * 4, [1.0] * 4, [0] * 4, [1, 2, 3, 4]))
    assert tokens.tolist() == [1, 1, 1, 1]
    expected = np.asarray(jax.nn.log_softmax(logits[0]))[1]
    np.testing.assert_allclose(np.asarray(logprobs), expected, rtol=1e-6)


@pytest.mark.parametrize("vocabulary", [50, 49152, 32000])
def test_first_max_is_argmax_with_ties_to_the_first(vocabulary):
    """Ties go to the first maximum, within a block and across blocks (SmolLM2's 49,152:
    blocks of 512; 32,000: of 256; 50: no blocks), and a row of NaN gives the last index."""
    rng = np.random.default_rng(vocabulary)
    logits = rng.integers(-3, 4, (64, vocabulary)).astype(np.float32)  # many tied maxima
    logits[5] = 2.0  # all tied
    logits[6, [0, vocabulary - 1]] = 9.0
    logits[7, [vocabulary - 1, vocabulary // 2, vocabulary // 2 + 1]] = 9.0  # blocks apart
    logits[8, -3:] = 9.0  # in the last block only
    logits[9] = np.nan
    got = np.asarray(jax.jit(first_max)(jnp.asarray(logits)))
    expected = np.argmax(logits, axis=-1)
    expected[9] = vocabulary - 1
    np.testing.assert_array_equal(got, expected)


def test_rows_of_slots_read_the_slots_vocabulary_settings():
    """`sample` given slots: each row takes its slot's logit bias, prompt tokens and
    counts (read only because some row needs them), a row past the last slot none, and
    every row samples what it would with its slot's settings gathered beforehand."""
    v = 6
    bias = np.zeros((3, v), np.float32)
    bias[2, 4] = 50.0  # slot 2 forces token 4
    state = SlotSampling.create(
        [0.0, 0.0, 0.0],
        None,
        None,
        np.zeros((3, 2), np.uint32),
        logit_bias=bias,
        repetition_penalty=[1.0, 8.0, 1.0],
    )
    seen = np.zeros((3, v), bool)
    seen[1, 1] = True  # slot 1's prompt holds the top token: the penalty moves it down
    state = state.replace(seen=jnp.asarray(seen), counts=jnp.zeros((3, v), jnp.int32))
    logits = jnp.asarray(np.tile([0.0, 3.0, 2.5, 1.0, 0.0, -1.0], (4, 1)), jnp.float32)
    slots = jnp.array([2, 1, 0, 3])  # 3: no slot
    out = jax.jit(eager_sample)(logits, take_rows(state, slots), None, slots)
    assert np.asarray(out.tokens).tolist() == [4, 2, 1, 1]
    gathered = jax.tree.map(lambda a: a.at[slots].get(mode="fill", fill_value=0), state)
    assert np.asarray(jax.jit(eager_sample)(logits, gathered).tokens).tolist() == [4, 2, 1, 1]
    # The state's counts come back as they were: the engine counts a step's tokens.
    np.testing.assert_array_equal(np.asarray(out.sampling.counts), 0)


def test_a_row_of_no_slot_reads_every_setting_disabled():
    """A step's padding rows (slot past the last) read the disabled settings, not zeros:
    a top_p or repetition penalty of 0 would make every step with padding beside a
    sampled row sort the vocabulary and apply the penalties for all of its rows."""
    state = SlotSampling.create(
        [0.7, 1.2], [0.9, 0.5], [5, 0], np.zeros((2, 2), np.uint32), vocab_size=8,
        min_p=[0.1, 0.0], repetition_penalty=[1.3, 1.1], frequency_penalty=[0.5, 0.0],
        presence_penalty=[0.0, 0.4], top_logprobs=[2, 0],
    )  # fmt: skip
    padding = take_rows(state, jnp.array([1, 2, 7]))  # slot 1, then two past the last
    disabled = SlotSampling.create(np.zeros(1), None, None, np.zeros((1, 2), np.uint32))
    for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "top_logprobs", "has_bias"):  # fmt: skip
        field = np.asarray(getattr(padding, name))
        assert field[0] == np.asarray(getattr(state, name))[1], name
        np.testing.assert_array_equal(field[1:], np.asarray(getattr(disabled, name))[0], name)


def test_mixed_batch_each_slot_follows_its_own_settings():
    logits = jnp.array([[0.0, 1.0, 3.0, 2.0]] * 3)
    # greedy, top_k=1 (so effectively greedy), and top_p tiny (only the top token)
    tokens, *_ = sample(logits, settings([0.0, 1.5, 1.0], [1.0, 1.0, 1e-3], [0, 1, 0], [7, 8, 9]))
    assert tokens.tolist() == [2, 2, 2]


def test_a_rows_draw_does_not_depend_on_its_neighbours_filters():
    """An unfiltered row draws the same token whether or not another row needs the sort."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300)), jnp.float32)
    for seed in range(20):
        plain, *_ = sample(logits, settings([1.0, 1.0], [1.0, 1.0], [0, 0], [seed, 99]))
        mixed, *_ = sample(logits, settings([1.0, 1.0], [1.0, 0.5], [0, 3], [seed, 99]))
        assert int(plain[0]) == int(mixed[0])


def test_a_draw_inverts_the_distribution_in_token_order():
    """`inverse_cdf` at uniform u draws the token where the cumulative probability first
    exceeds u (numpy's searchsorted over float64 sums), across the blocks it searches
    first; evenly spaced u give each token its share of draws to within one; a token of
    probability 0 is never drawn, not even at u just below 1."""
    rng = np.random.default_rng(3)
    v = 3 * DRAW_BLOCK + 77  # blocks, and a part-filled last one
    logits = rng.standard_normal(v).astype(np.float32) * 2
    logits[rng.choice(v, 400, replace=False)] = NEG_INF  # masked: a grammar, top-k or top-p
    logits[-5:] = NEG_INF  # the last tokens too
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    n = 20000
    u = (np.arange(n) + 0.5) / n
    draws = np.asarray(jax.jit(inverse_cdf)(jnp.tile(jnp.asarray(logits), (n, 1)), jnp.asarray(u)))
    expected = np.searchsorted(np.cumsum(probs), u, side="right")
    assert np.mean(draws == expected) > 0.999  # (float32 sums: ties within rounding differ)
    assert np.all(np.abs(np.bincount(draws, minlength=v) - n * probs) <= 1 + 1e-9)
    assert np.all(probs[draws] > 0)
    edge = jnp.asarray([np.float32(1) - np.float32(2**-24), 0.0], jnp.float32)
    ends = np.asarray(jax.jit(inverse_cdf)(jnp.tile(jnp.asarray(logits), (2, 1)), edge))
    last = min(np.searchsorted(np.cumsum(probs), float(edge[0]), side="right"), v - 1)
    assert ends.tolist() == [min(last, np.flatnonzero(probs)[-1]), np.flatnonzero(probs)[0]]


def test_same_key_same_draws_and_keys_advance():
    logits = jnp.zeros((1, 50))
    s = settings([1.0], [1.0], [0], [42])
    first, _, _, _, s1 = sample(logits, s)
    again, *_ = sample(logits, s)
    assert first.tolist() == again.tolist()
    draws = []
    for _ in range(20):
        token, _, _, _, s1 = sample(logits, s1)
        draws.append(int(token[0]))
    assert len(set(draws)) > 5  # advancing keys give fresh draws from a uniform distribution


def test_top_k_sampling_follows_the_renormalised_distribution():
    """With top_k=2 over probabilities (0.6, 0.3, 0.1), draws split 2:1 between the top two."""
    n = 4000
    logits = jnp.log(jnp.array([[0.3, 0.1, 0.6]] * n))
    tokens, *_ = sample(logits, settings([1.0] * n, [1.0] * n, [2] * n, range(n)))
    counts = np.bincount(np.asarray(tokens), minlength=3)
    assert counts[1] == 0
    assert abs(counts[2] / n - 2 / 3) < 0.03


def with_history(s: SlotSampling, counts, seen) -> SlotSampling:
    return s.replace(counts=jnp.asarray(counts, jnp.int32), seen=jnp.asarray(seen, bool))


def test_frequency_presence_and_repetition_penalties_by_hand():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]] * 3)
    s = SlotSampling.create(
        [0.0] * 3,
        None,
        None,
        np.zeros((3, 2), np.uint32),
        vocab_size=4,
        frequency_penalty=[0.5, 0.0, 0.0],
        presence_penalty=[0.0, 1.0, 0.0],
        repetition_penalty=[1.0, 1.0, 2.0],
    )
    counts = [[3, 0, 1, 0], [3, 0, 1, 0], [0, 1, 0, 0]]  # generated so far
    seen = [[False] * 4, [False] * 4, [True, False, False, False]]  # in the prompt
    out = np.asarray(apply_penalties(logits, with_history(s, counts, seen)))
    np.testing.assert_allclose(out[0], [2.0 - 1.5, -1.0, 0.5 - 0.5, 3.0])  # 0.5 per occurrence
    np.testing.assert_allclose(out[1], [1.0, -1.0, -0.5, 3.0])  # 1.0 once per generated token
    np.testing.assert_allclose(out[2], [1.0, -2.0, 0.5, 3.0])  # prompt and output: /2 or *2


def test_logit_bias_moves_the_greedy_choice_and_penalties_change_what_is_sampled():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]] * 2)
    bias = np.zeros((2, 4), np.float32)
    bias[0, 1] = 100.0  # force token 1
    bias[1, 3] = -100.0  # ban token 3
    s = SlotSampling.create([0.0, 0.0], None, None, np.zeros((2, 2), np.uint32), logit_bias=bias)
    tokens, logprobs, *_ = sample(logits, s)
    assert tokens.tolist() == [1, 0]
    # Reported log-probabilities are the model's, before the bias.
    expected = np.asarray(jax.nn.log_softmax(logits[0]))
    np.testing.assert_allclose(np.asarray(logprobs), expected[[1, 0]], rtol=1e-6)
    # A frequency penalty on the top token flips greedy to the runner-up.
    s = SlotSampling.create(
        [0.0], None, None, np.zeros((1, 2), np.uint32), vocab_size=4, frequency_penalty=[2.0]
    )
    tokens, *_ = sample(logits[:1], with_history(s, [[0, 0, 0, 1]], [[False] * 4]))
    assert tokens.tolist() == [0]


def test_counts_track_the_sampled_tokens():
    logits = jnp.array([[0.0, 5.0, 1.0]])
    s = SlotSampling.create([0.0], None, None, np.zeros((1, 2), np.uint32), vocab_size=3)
    *_, s1 = sample(logits, s)
    *_, s2 = sample(logits, s1)
    assert np.asarray(s2.counts).tolist() == [[0, 2, 0]]


def test_grammar_bitmask_allows_only_its_tokens():
    v = 40  # two 32-bit words
    logits = jnp.asarray(np.arange(v, dtype=np.float32)[None].repeat(3, 0))  # 39 is the argmax
    allowed = np.full((3, 2), -1, np.int32)
    allowed[0] = [1 << 5, 0]  # only token 5
    allowed[1] = [0, (1 << 1) | (1 << 3)]  # tokens 33 and 35
    s = SlotSampling.create([0.0, 1.0, 0.0], None, None, np.arange(6).reshape(3, 2), vocab_size=v)
    for _ in range(5):
        tokens, *_, s = sample(logits, s, jnp.asarray(allowed))
        assert int(tokens[0]) == 5 and int(tokens[1]) in (33, 35) and int(tokens[2]) == 39


def test_min_p_drops_tokens_below_the_fraction_of_the_top_probability():
    n = 3000
    probs = np.array([0.5, 0.3, 0.15, 0.05])  # min_p 0.2: keep p >= 0.1 → tokens 0, 1, 2
    logits = jnp.log(jnp.asarray(probs[None].repeat(n, 0), jnp.float32))
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))
    s = SlotSampling.create([1.0] * n, None, None, keys, vocab_size=4, min_p=[0.2] * n)
    tokens, *_ = sample(logits, s)
    counts = np.bincount(np.asarray(tokens), minlength=4) / n
    assert counts[3] == 0
    np.testing.assert_allclose(counts[:3], probs[:3] / 0.95, atol=0.03)


def test_top_logprobs_are_the_most_likely_tokens_in_order():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 100)), jnp.float32)
    s = SlotSampling.create(
        [0.0, 0.0], None, None, np.zeros((2, 2), np.uint32), vocab_size=100, top_logprobs=[3, 0]
    )
    _, _, top_ids, top_logprobs, _ = sample(logits, s)
    reference = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    order = np.argsort(-reference, axis=-1)[:, :20]
    assert np.asarray(top_ids).tolist() == order.tolist()
    np.testing.assert_allclose(
        np.asarray(top_logprobs), np.take_along_axis(reference, order, 1), rtol=1e-5
    )
