"""A float16 KV pool (JAXCHAT_KV_DTYPE=float16): half the memory of float32, read by the
CPU kernels too, with the reference's tokens and next-token distributions (KL 1.1e-6
against HF's float32 where a float32 pool gives 3.5e-7; llama.cpp's, with its float16
cache, 3e-3), and a prompt's logits still the same to the bit however it is cut (on CPUs
without AVX-512 VNNI, into chunks of over 8 tokens)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.quality import compare, dense, kernel_logprobs, prompt_logits, prompt_logprobs
from benchmarks.quality import reference as quality_reference
from model import LLM
from model.types import SamplingParams
from tests.numerics import rounds_prompts


@pytest.fixture(scope="module")
def half():
    return LLM(
        max_seq_len=512,
        batch=8,
        dtype="float32",
        kv_dtype="float16",
        compile_cache=os.environ["JAXCHAT_COMPILE_CACHE"],
    )


def test_the_pool_holds_float16_in_half_the_bytes(half, llm):
    pool, full = half.engine.init_state().pool, llm.engine.init_state().pool
    assert pool.k.dtype == pool.v.dtype == jnp.float16 and full.k.dtype == jnp.float32
    assert pool.k.nbytes * 2 == full.k.nbytes * half.engine.pool_blocks // llm.engine.pool_blocks
    assert half.describe()["kv_dtype"] == "float16"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_float16_pool_gives_the_reference_greedy_tokens(half, golden, index):
    prompt = golden["prompts"][index]
    params = SamplingParams(temperature=0, max_tokens=len(prompt["greedy"]), ignore_eos=True)
    assert list(half.generate(prompt["ids"], params).token_ids) == prompt["greedy"]


def test_a_float16_pool_keeps_the_reference_distributions(half):
    """As decode rows and as a prompt's steps; a shifted distribution still shows."""
    for ids, top_ids, top_logprobs in quality_reference():
        decoded = kernel_logprobs(half, ids)
        kl, agree = compare(top_ids, top_logprobs, dense(decoded))
        assert kl < 3e-6 and agree == 1.0
        kl, agree = compare(top_ids, top_logprobs, dense(prompt_logprobs(half, ids)))
        assert kl < 3e-6 and agree == 1.0
        decoded[len(ids) // 2] = np.roll(decoded[len(ids) // 2], 1)
        assert compare(top_ids, top_logprobs, dense(decoded))[0] > 1e-3


def test_a_prompts_logits_do_not_depend_on_its_chunks_with_a_float16_pool(half, llm, golden):
    """A chunk's own keys are rounded as the pool holds them, so a token sees the same keys
    whether they were computed beside it or read back from the pool: the same to the bit
    where a token's products do not depend on its chunk (every token rounded to integers,
    with AVX-512 VNNI; elsewhere, chunks of over 8 tokens, whose f32 products each column
    takes alike). Without VNNI a chunk of up to 8 takes the few-row path, its f32 sums in
    another order, and a value that lay near a float16 rounding boundary may land a whole
    step away, not at most half: up to twice what the pool's rounding moves the logits."""
    ids = golden["prompts"][2]["ids"]
    one = prompt_logits(half, ids, [])
    rounding = np.abs(one - prompt_logits(llm, ids, [])).max()
    for cuts in ([9, 20, 36], [1], [len(ids) - 1]):
        chunked = prompt_logits(half, ids, cuts)
        sizes = np.diff([0, *cuts, len(ids)])
        if rounds_prompts(half) or (sizes > 8).all():
            np.testing.assert_array_equal(chunked, one)
        else:
            np.testing.assert_allclose(chunked, one, rtol=0, atol=2 * (rounding + 2e-3))
