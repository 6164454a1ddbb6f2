"""Continuous batching on the real model: sharing the batch changes nobody's tokens."""

import random
import threading
import time

import numpy as np

from model import SamplingParams
from tests.numerics import rounds_prompts


def run_concurrently(llm, jobs, stagger: float) -> list[tuple[int, ...]]:
    """Submit (prompt_ids, params) jobs from threads, `stagger` seconds apart."""
    results: list = [None] * len(jobs)

    def work(i, ids, params):
        results[i] = llm.generate(ids, params).token_ids

    threads = []
    for i, (ids, params) in enumerate(jobs):
        threads.append(threading.Thread(target=work, args=(i, ids, params)))
        threads[-1].start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(timeout=600)
    return results


def test_batched_greedy_equals_the_reference(llm, golden):
    """The reference's 32 greedy tokens come out while the prompts share the batch."""
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = golden["prompts"] * 2  # 6 requests: mixed lengths 34, 37 and 63
    results = run_concurrently(llm, [(p["ids"], params) for p in prompts], stagger=0.15)
    for prompt, tokens in zip(prompts, results, strict=True):
        assert list(tokens) == prompt["greedy"]


def test_batched_equals_alone_with_mixed_lengths_and_settings(llm, golden):
    """Each request's tokens alone == its tokens among others (greedy and seeded)."""
    rng = random.Random(5)
    base = golden["prompts"][2]["ids"] * 6
    jobs = []
    for i in range(6):
        ids = base[: rng.randint(5, 300)]
        temperature = 0.0 if i % 2 else 0.9
        params = SamplingParams(
            temperature=temperature, top_p=0.95, max_tokens=rng.randint(3, 24), seed=i
        )
        jobs.append((ids, params))
    alone = [llm.generate(ids, params).token_ids for ids, params in jobs]
    together = run_concurrently(llm, jobs, stagger=0.05)
    assert together == alone


def test_prompts_prefilled_in_chunks_beside_decoding_streams_keep_their_tokens(llm, golden):
    """Long prompts arrive while others decode: they are prefilled in small chunks
    beside the decode rows, crossing blocks; nobody's tokens change."""
    base = golden["prompts"][2]["ids"] * 8
    jobs = [
        (base[:20], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
        (base[:300], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
        (base[:170], SamplingParams(temperature=0.8, max_tokens=12, seed=3, ignore_eos=True)),
    ]
    alone = [llm.generate(ids, params).token_ids for ids, params in jobs]
    together = run_concurrently(llm, jobs, stagger=0.3)
    assert together == alone


def test_a_cached_prefix_gives_the_same_tokens(llm, golden):
    """A second request sharing a long prefix reuses its blocks (the full ones from the
    prefix cache, the begun one copied, only the last token computed); greedy tokens agree
    with a request that computed everything, and where every prompt token takes the
    integer products (AVX-512 VNNI: a token's keys, values and logits then do not depend
    on the step around it) so do their log-probabilities, to the bit."""
    prefix = golden["prompts"][2]["ids"] * 3  # 189 tokens
    params = SamplingParams(
        temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    computed = llm.generate(prefix + [100, 200], params)
    first = computed.token_ids
    hits, copied = llm.scheduler.pool.hits, llm.scheduler.pool.partial_hits
    served = llm.stats().prefix_hit_tokens
    cached = llm.generate(prefix + [100, 200], params)
    again = cached.token_ids
    if rounds_prompts(llm):
        assert cached.logprobs == computed.logprobs
    full = (len(prefix) + 1) // llm.engine.block_size
    assert llm.scheduler.pool.hits - hits == full
    assert (
        llm.scheduler.pool.partial_hits - copied == len(prefix) + 1 - full * llm.engine.block_size
    )
    assert llm.stats().prefix_hit_tokens - served == len(prefix) + 1  # all but the last
    assert again == first
    other = llm.generate(prefix + [300], params).token_ids
    assert llm.scheduler.pool.hits - hits > len(prefix) // llm.engine.block_size
    fresh = llm.engine.forward([prefix + [300]])[0, -1].argmax()
    assert other[0] == int(fresh)


def test_a_burst_over_several_cached_prefixes_is_prefilled_in_one_step(llm, golden, monkeypatch):
    """Requests whose prompts are cached (three prompts, twice each: each request copies
    its prompt's begun block, so six prior groups) are prefilled in one step, computing
    one token each, and keep the reference's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = golden["prompts"] * 2
    for prompt in prompts[:3]:
        llm.generate(prompt["ids"], params)  # their full blocks go to the prefix cache
    step, groups, prefilled, holding = llm.engine.step, [], [], threading.Event()

    def recording(state, plan):
        if not groups:  # another request's step: the burst queues meanwhile
            holding.set()
            deadline = time.monotonic() + 60
            while len(llm.scheduler.waiting) < len(prompts) and time.monotonic() < deadline:
                time.sleep(0.001)
        sees = np.asarray(plan.layout.prior_group)
        groups.append(len(set(sees[sees >= 0].tolist())))
        prefilled.append(int((np.asarray(plan.layout.segments) >= 0).sum()))
        return step(state, plan)

    monkeypatch.setattr(llm.engine, "step", recording)
    other = threading.Thread(target=llm.generate, args=([7, 8, 9], params))
    other.start()
    assert holding.wait(60)
    results = run_concurrently(llm, [(p["ids"], params) for p in prompts], stagger=0)
    other.join(60)
    for prompt, tokens in zip(prompts, results, strict=True):
        assert list(tokens) == prompt["greedy"][:8]
    assert groups[1] == 6  # after the other request's step, the burst's (six groups)
    assert prefilled[1] == len(prompts)


def test_burst_of_varied_requests_never_compiles(llm, golden):
    llm.warmup()
    compiled, loaded = llm.engine.compilations, llm.engine.loaded
    variants = llm.engine.variants
    assert compiled + loaded == len(variants.names) + len(variants.upgrades)
    # Six step shapes, and four unrolled upgrades (1, 2, 4 and 8 decode rows).
    assert sum(kind == "step" for kind, _ in variants.names + variants.upgrades) <= 10
    rng = random.Random(9)
    base = golden["prompts"][1]["ids"] * 20
    jobs = [
        (
            base[: rng.choice([1, 7, 33, 64, 65, 200, 480])],
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.3]),
                top_k=rng.choice([0, 5]),
                top_p=rng.choice([1.0, 0.8]),
                max_tokens=rng.randint(1, 30),
                seed=rng.randint(0, 2**40),
            ),
        )
        for _ in range(16)
    ]
    results = run_concurrently(llm, jobs, stagger=0.01)
    assert all(len(tokens) >= 1 for tokens in results)
    assert (llm.engine.compilations, llm.engine.loaded) == (compiled, loaded)
