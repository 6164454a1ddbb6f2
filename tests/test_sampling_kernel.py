"""jaxchat's CPU sampler (model/kernels/sample.cc, called by `kernel_sample`) against the
XLA sampler it stands in for on CPU (model/nn/sampling.py's `sample`, tested on its own in
tests/test_sampling.py): the same tokens, log-probabilities and alternatives for rows that
mix every setting, slots and rows of no slot, grammar masks and penalties."""

import jax
import numpy as np
import pytest

from model import kernels
from model.nn.sampling import TOP_LOGPROBS, SlotSampling, kernel_sample, sample, take_rows


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert kernels.load(), "the kernels are built by `make setup` (python -m model.kernels)"


@jax.jit
def reference(logits, s, slots, positions, allowed):
    """The engine's XLA path (model/engine/state.py's `sample_rows`): each row draws with
    its slot's key folded with the position it samples from."""
    rows = take_rows(s, slots)
    keys = jax.vmap(jax.random.fold_in)(rows.key, positions)
    return sample(logits, rows.replace(key=keys), allowed, slots)


kernel = jax.jit(kernel_sample)


def mixed(rng, slots: int, rows: int, vocab: int):
    """Logits [rows, vocab] and the arguments of both samplers: `slots` slots of random
    settings (some greedy, some filtered, penalised or biased, some asking for top
    logprobs), rows of random slots (one past the last: a row of no slot), the first row
    constrained by a random grammar mask, each row at a random position."""
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    bias = np.zeros((slots, vocab), np.float32)
    bias[1, :10], bias[2, 3] = 5.0, -100.0
    s = SlotSampling.create(
        rng.choice([0.0, 0.7, 1.0, 1.5], slots),
        rng.choice([1.0, 0.9, 0.5], slots),
        rng.choice([0, 5, 50], slots),
        rng.integers(0, 2**31, (slots, 2)).astype(np.uint32),
        vocab_size=vocab,
        min_p=rng.choice([0.0, 0.05], slots),
        frequency_penalty=rng.choice([0.0, 0.5], slots),
        presence_penalty=rng.choice([0.0, 0.3], slots),
        repetition_penalty=rng.choice([1.0, 1.2], slots),
        top_logprobs=rng.choice([0, 3], slots),
        logit_bias=bias,
        xp=np,
    )
    counts = rng.integers(0, 3, (slots, vocab)) * (rng.random((slots, vocab)) < 0.01)
    s = s.replace(counts=counts.astype(np.int32), seen=rng.random((slots, vocab)) < 0.02)
    row_slots = rng.integers(0, slots + 1, rows).astype(np.int32)
    allowed = np.full((rows, (vocab + 31) // 32), -1, np.int32)
    allowed[0] = rng.integers(-(2**31), 2**31, allowed.shape[1])
    positions = rng.integers(0, 8192, rows).astype(np.int32)
    return logits, s, row_slots, positions, allowed


@pytest.mark.parametrize("vocab", [49152, 1000, 50])
def test_the_kernel_samples_what_the_xla_sampler_does(vocab):
    """Over 10 batches of 32 rows: every token, its log-probability and the alternatives a
    row asks for. The kernel hashes each draw's uniform from the slot's key and the row's
    position as JAX does; a draw could differ only where its uniform falls within float
    rounding of a token's boundary (the two sum probabilities in different orders): none
    of these do."""
    rng = np.random.default_rng(vocab)
    differ = drawn = 0
    for _ in range(10):
        args = mixed(rng, 6, 32, vocab)
        want, got = reference(*args), kernel(*args)
        logits, s, slots = args[:3]
        settings = {
            k: np.where(slots < 6, getattr(s, k)[np.minimum(slots, 5)], 0)
            for k in ("temperature", "top_logprobs")
        }
        sampled = settings["temperature"] > 0
        same = np.asarray(want.tokens) == np.asarray(got.tokens)
        assert same[~sampled].all()  # greedy rows: the first maximum, after penalties and mask
        differ, drawn = differ + int((~same[sampled]).sum()), drawn + int(sampled.sum())
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)
        asked = settings["top_logprobs"] > 0
        np.testing.assert_array_equal(
            np.asarray(got.top_ids)[asked], np.asarray(want.top_ids)[asked]
        )
        np.testing.assert_allclose(
            np.asarray(got.top_logprobs)[asked], np.asarray(want.top_logprobs)[asked], atol=2e-5
        )
        assert got.top_ids.shape == (32, TOP_LOGPROBS)
    assert drawn > 100 and differ == 0


def test_a_row_of_nan_or_every_token_masked_takes_the_reference_token():
    """Greedy rows at the edges: all NaN (the last index), all masked by the grammar (the
    first token), a tie (the first of the equal maxima), one NaN among numbers (the last
    index: XLA's maximum is NaN)."""
    rng = np.random.default_rng(1)
    logits, s, slots, positions, allowed = mixed(rng, 3, 4, 200)
    s = s.replace(
        temperature=np.zeros(3, np.float32),
        frequency_penalty=np.zeros(3, np.float32),
        presence_penalty=np.zeros(3, np.float32),
        repetition_penalty=np.ones(3, np.float32),
        has_bias=np.zeros(3, bool),
    )
    logits[0] = np.nan
    allowed[1] = 0
    logits[2, [7, 9]] = 50.0
    logits[3, 5], logits[3, 6] = np.nan, 60.0
    want, got = (
        reference(logits, s, slots, positions, allowed),
        kernel(logits, s, slots, positions, allowed),
    )
    assert np.asarray(got.tokens).tolist() == np.asarray(want.tokens).tolist() == [199, 0, 7, 199]
