"""Speculative decoding (model/engine/speculative.py): prompt-lookup drafts, the policy
that decides when a step carries them, the scheduler's verification against the mock
engine of tests/test_scheduler.py, and the real engine: sampled tokens keep the model's
distribution (tiny model, exact probabilities), greedy tokens stay the same (SmolLM2).
"""

import dataclasses
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import stats

from model import LLM
from model.engine import speculative
from model.engine.requests import Seq
from model.engine.speculative import Speculation, propose
from model.engine.state import sampling_row
from model.engine.variants import SMALL_CHUNK, StepShape, small_shapes, step_shapes
from model.types import SamplingParams
from tests.test_scheduler import MockEngine, expected, run
from tests.tiny_models import TINY_LLAMA, write_tiny_gguf

# ---- drafting ---------------------------------------------------------------------------


def test_the_longest_latest_earlier_ngram_proposes_what_followed_it():
    # The last 3 tokens (7, 8, 9) occurred at 1 and at 6; the latest wins, unless fewer
    # than k tokens follow it: then the earliest, which the most tokens follow.
    tokens = [0, 7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 5, 7, 8, 9]
    assert propose(tokens, 2) == [3, 4]
    assert propose(tokens, 6) == [3, 4, 5, 7, 8, 9]
    assert propose(tokens, 7) == [1, 2, 7, 8, 9, 3, 4]
    assert propose([6] * 12, 4) == [6] * 4  # a run: not the latest match, one token back
    # A 4-gram beats a later 2-gram: (5, 6, 1, 2) occurred at 0, (1, 2) alone at 6.
    assert propose([5, 6, 1, 2, 40, 41, 1, 2, 50, 5, 6, 1, 2], 3) == [40, 41, 1]
    # A single repeated token is not enough (MIN_NGRAM = 2), nor is k = 0.
    assert propose([1, 2, 3, 4, 1], 3) == []
    assert propose(tokens, 0) == []


def seq(hits: float = 8.0, misses: float = 1.0, row=None, **fields) -> Seq:
    s = Seq(0, None, row, 100, True, [1, 2, 3], **fields)  # type: ignore[arg-type]
    s.acceptance = (hits, misses)
    return s


SHAPES = step_shapes(32, 1024)  # rows 1, 8, 32; SMALL_CHUNK with 8 and 32 rows; 512


def test_a_lone_stream_grows_its_step_only_when_its_acceptance_pays_for_it():
    drafting = Speculation("ngram", 7)
    drafting.costs = {StepShape(1, 0): 0.020, StepShape(8, 0): 0.036}  # 1.8x
    good, poor = seq(8, 1), seq(1, 8)  # acceptance rates 0.89 and 0.11
    drafts = drafting.plan({good: [5] * 7}, 1, 0, SHAPES)
    assert drafts == {good: [5] * 7}  # 1 + .89 + .89**2 + … ≈ 5.2 tokens for 1.8x the time
    assert drafting.plan({poor: [5] * 7}, 1, 0, SHAPES) == {}  # 1.12 tokens: not worth it
    # The measured cost decides: at 8x the time even the good stream stays at one row.
    drafting.costs[StepShape(8, 0)] = 0.160
    assert drafting.plan({good: [5] * 7}, 1, 0, SHAPES) == {}


def test_a_small_step_shape_once_compiled_carries_a_few_drafts():
    """With the unrolled 2- and 4-row steps runnable, as measured on a 2-core CPU (4 rows
    1.5x one row, 8 rows 3x), a stream accepting 60% of its drafts verifies 3 in a 4-row
    step (1 + .6 + .36 + .22 = 2.2 tokens for 1.5x the time), where 7 in 8 rows (2.5
    tokens for 3x) would not pay."""
    drafting = Speculation("ngram", 7)
    one, two, four, eight = (StepShape(r, 0) for r in (1, 2, 4, 8))
    drafting.costs = {one: 0.015, two: 0.017, four: 0.022, eight: 0.045}
    fair = seq(3, 2)
    assert drafting.plan({fair: [5] * 7}, 1, 0, SHAPES) == {}
    runnable = sorted((*SHAPES, *small_shapes(32)))
    assert drafting.plan({fair: [5] * 7}, 1, 0, runnable) == {fair: [5] * 3}


def test_drafts_fill_the_rows_a_step_runs_anyway_best_first_and_never_grow_a_full_batch():
    drafting = Speculation("ngram", 7)
    good, fair, poor = seq(8, 1), seq(3, 1), seq(1, 8)
    proposals = {good: [5] * 7, fair: [6] * 7, poor: [7] * 7}
    drafts = drafting.plan(proposals, 3, 0, [StepShape(1, 0), StepShape(8, 0)])
    # Five spare rows of the 8-row step, each to the draft adding the most: of the good
    # stream's (.89, .79, .70, .62, .55 …) and the fair one's (.75, .56 …), the best five.
    assert {s: len(d) for s, d in drafts.items()} == {good: 4, fair: 1}
    # A batch that fills its rows gets none, however good its drafts.
    assert drafting.plan(proposals, 32, 0, SHAPES) == {}
    # A step with a prompt chunk fills its spare rows but does not grow.
    assert sum(map(len, drafting.plan({good: [5] * 7}, 8, SMALL_CHUNK, SHAPES).values())) == 0
    assert len(drafting.plan({good: [5] * 7}, 3, SMALL_CHUNK, SHAPES)[good]) == 5


def test_steps_are_planned_ahead_unless_drafts_are_verified_or_looked_for():
    """Planning a step while the previous one runs hides the host's work, but cannot draft
    (the newest token is not known): drafting sequences wait for the tokens, others look
    for drafts every PROBE_EVERY steps."""
    drafting = Speculation("ngram", 4)
    live = [seq(may_draft=True, looked_up=True)]
    assert live[0].decoding
    waits = [drafting.wants(live) for _ in range(2 * speculative.PROBE_EVERY)]
    assert waits.index(True) == speculative.PROBE_EVERY - 1
    drafting.drafting, drafting.idle = True, 0  # what drafts() leaves after a drafting step
    assert all(drafting.wants(live) for _ in range(20))
    live[0].may_draft = False
    assert not drafting.wants(live)


def test_grammars_and_penalties_do_not_draft():
    drafting = Speculation("ngram", 4)
    assert drafting.allows(seq())
    assert not drafting.allows(seq(constraint=object()))  # type: ignore[arg-type]
    for penalty in ({"frequency_penalty": 0.5}, {"presence_penalty": -1.0}):
        row = sampling_row(SamplingParams(**penalty), 0, [1, 2], 16)
        assert not drafting.allows(seq(row=row))
    plain = sampling_row(SamplingParams(temperature=0, logit_bias={3: 5.0}, top_k=4), 0, [1, 2], 16)
    assert drafting.allows(seq(row=plain))
    assert not drafting.allows(seq(embed=True))
    sampled = sampling_row(SamplingParams(temperature=0.7, seed=1), 0, [1, 2], 16)
    assert drafting.allows(seq(row=sampled))  # keys by position: the same tokens
    assert not Speculation("off", 4).allows(seq())
    with pytest.raises(ValueError, match="must be one of"):
        Speculation("eagle", 4)


# ---- verification in the scheduler, on the mock engine ----------------------------------


class Oracle(Speculation):
    """Drafts the mock's true next tokens, with a wrong one at draft `wrong` (None: all
    right), on every step (no policy, no planning ahead)."""

    def __init__(self, tokens: int, wrong: int | None, within_budget: bool = True):
        super().__init__("ngram", tokens)
        self.wrong, self.within_budget = wrong, within_budget

    def proposals(self, decode):
        found = {}
        for s in decode:
            budget = s.max_new - s.generated - 1 if self.within_budget else self.tokens
            k = min(self.tokens, budget)
            if k > 0:
                true = expected(s.tokens, k, salt=s.row)[0]
                true += [50] * (k - len(true))  # past a stop: anything
                if self.wrong is not None and self.wrong < len(true):
                    true[self.wrong] = 50 + (true[self.wrong] + 1 - 50) % 50
                found[s] = true
        return found

    def plan(self, proposals, rows, prefill, shapes):
        return fill_rows(proposals, max(s.rows for s in shapes) - rows)

    def wants(self, live):  # every step
        return any(s.decoding and s.may_draft for s in live)


def fill_rows(proposals, spare: int) -> dict:
    """Every proposal, in order, as far as the largest step's spare rows go."""
    drafts = {}
    for s, d in proposals.items():
        drafts[s] = list(d[: max(spare, 0)])
        spare -= len(drafts[s])
    return {s: d for s, d in drafts.items() if d}


@pytest.mark.parametrize(
    ("wrong", "drafted", "accepted"),
    # Per stream of 21 tokens (the first from the prompt's step), 3 drafts a step:
    # all right: 5 steps take 4 each; the first wrong: 20 steps take 1 (17 with 3
    # drafts, then 2, 1, 0 as the budget runs out); the third wrong: 6 steps take 3,
    # then one takes 2.
    [(None, 15, 15), (0, 54, 0), (2, 19, 13)],
)
def test_verified_drafts_give_the_same_streams(make, wrong, drafted, accepted):
    engine = MockEngine(batch=16)
    oracle = Oracle(3, wrong)
    scheduler = make(engine, speculation=oracle)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3]]
    handles = [scheduler.submit(p, [i], 21) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 21, i) for i, p in enumerate(prompts)]
    assert all(expected(p, 21, i)[1] == "length" for i, p in enumerate(prompts))
    assert (oracle.drafted, oracle.accepted) == (3 * drafted, 3 * accepted)
    assert scheduler.pool.available == engine.pool_blocks


def test_a_stop_token_or_the_budget_inside_accepted_drafts_ends_the_stream(make):
    engine = MockEngine(batch=8)
    stream = expected([3, 1, 4], 30)[0]
    engine.stop_ids = np.array([stream[9]])  # the 10th token stops it
    assert stream[9] not in stream[:9]
    # Seven right drafts a step, even past the budget: the stream still ends where it must.
    oracle = Oracle(7, None, within_budget=False)
    scheduler = make(engine, speculation=oracle)
    assert run(scheduler.submit([3, 1, 4], [0], 30)) == (stream[:10], "stop")
    assert run(scheduler.submit([3, 1, 4], [0], 6)) == (stream[:6], "length")
    assert run(scheduler.submit([3, 1, 4], [0], 30, stop_at_eos=False))[0] == stream
    assert oracle.accepted > 0
    assert scheduler.active == 0 and scheduler.pool.available == engine.pool_blocks


def test_drafts_never_preempt_and_a_preempted_drafter_resumes_exactly(make):
    # A pool too small for both streams' drafts and contexts: drafts are cut to the
    # blocks a sequence has, and a preempted stream comes back with the same tokens.
    engine = MockEngine(batch=8, pool_blocks=12, max_seq_len=48)
    oracle = Oracle(3, 1)
    scheduler = make(engine, speculation=oracle)
    a = scheduler.submit([1, 2, 3], [0], 40, stop_at_eos=False)
    b = scheduler.submit([4, 5], [9], 40, stop_at_eos=False)
    assert run(a) == expected([1, 2, 3], 40)
    assert run(b) == expected([4, 5], 40, salt=9)
    assert scheduler.pool.available == 12
    assert oracle.accepted > 0
    assert sum(s["prefill"] for s in engine.steps) > 5  # something was computed twice


def test_prompt_lookup_drafts_on_the_mock_match_its_streams(make):
    """The real proposer and policy on a mock stream that repeats: drafts are verified
    and taken, and the stream is the mock's."""
    engine = MockEngine(batch=8)
    drafting = Speculation("ngram", 7)
    scheduler = make(engine, speculation=drafting)
    prompt = [10, 20] * 25  # sums grow by 30 each two tokens: the mock's stream cycles
    assert run(scheduler.submit(prompt, [0], 60, stop_at_eos=False)) == expected(prompt, 60)
    assert drafting.drafted > 0 and drafting.accepted > 0


# ---- the real engine --------------------------------------------------------------------


class Forced(Speculation):
    """Every decoding sequence drafts `drafts`, on every step."""

    def __init__(self, drafts: list[int]):
        super().__init__("ngram", len(drafts))
        self.fixed = drafts

    def proposals(self, decode):
        return {s: self.fixed[: s.max_new - s.generated - 1] for s in decode}

    def plan(self, proposals, rows, prefill, shapes):
        return fill_rows(proposals, max(s.rows for s in shapes) - rows)

    def wants(self, live):  # every step, sampled sequences too (the policy's may_draft aside)
        return any(s.decoding for s in live)


class Following(Forced):
    """Every decoding sequence drafts what `tokens` hold at its next positions (up to
    `k`): one that draws `tokens` takes them all, the others mostly none."""

    def __init__(self, tokens: list[int], k: int):
        super().__init__(tokens[:k])
        self.tokens = tokens

    def proposals(self, decode):
        k = len(self.fixed)
        return {
            s: self.tokens[s.generated : s.generated + min(k, s.max_new - s.generated - 1)]
            for s in decode
        }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("spec"), TINY_LLAMA, seed=3)
    llm = LLM(str(path), max_seq_len=64, batch=32, unrolled_decode=False)
    yield llm
    llm.scheduler.stop()


PROMPT = [7, 19, 45, 3, 101, 64, 9]
TOP_K, STEPS, TEMPERATURE = 3, 4, 0.25  # four tokens, each of the top 3: 81 outcomes


def exact_joint(llm: LLM) -> dict[tuple[int, ...], float]:
    """P(t0 … t3 | PROMPT) at TEMPERATURE with top_k 3, from the model's full-sequence
    logits (one forward pass per prefix). The tiny model's top logits lie close together:
    a low temperature makes each token's distribution depend on the ones before."""
    joint = {(): 1.0}
    for _ in range(STEPS):
        prefixes = list(joint)
        logits = np.asarray(llm.engine.forward([PROMPT + list(p) for p in prefixes]))[:, -1]
        grown = {}
        for prefix, row in zip(prefixes, logits, strict=True):
            top = np.argsort(row)[-TOP_K:]
            probs = np.exp((row[top] - row[top].max()).astype(np.float64) / TEMPERATURE)
            for token, prob in zip(top, probs / probs.sum(), strict=True):
                grown[(*prefix, int(token))] = joint[prefix] * prob
        joint = grown
    return joint


def sampled_counts(llm: LLM, requests: int) -> dict[tuple[int, ...], int]:
    """Counts of the continuations of `requests` seeded requests of 8 choices each, three
    requests at a time (24 sequences: the batch's other 8 rows always hold drafts, where
    with 32 sequences only a step with a request between two had any; a seeded draw does
    not depend on what shares its step)."""
    params = SamplingParams(TEMPERATURE, top_k=TOP_K, max_tokens=STEPS, n=8, ignore_eos=True)
    run = lambda r: llm.generate_choices(PROMPT, dataclasses.replace(params, seed=1000 + r))  # noqa: E731
    counts: dict[tuple[int, ...], int] = {}
    with ThreadPoolExecutor(3) as pool:
        for choices in pool.map(run, range(requests)):
            for c in choices:
                key = tuple(c.token_ids)
                counts[key] = counts.get(key, 0) + 1
    return counts


def chi_square_p(counts: dict[tuple[int, ...], int], joint: dict[tuple[int, ...], float]) -> float:
    """The p-value of the counts against `joint`, cells with few expected draws pooled
    (0 if a sequence outside the top-k occurred)."""
    total = sum(counts.values())
    if not set(counts) <= set(joint):
        return 0.0
    cells = sorted(joint, key=joint.get, reverse=True)  # type: ignore[arg-type]
    observed, wanted = [], []
    small_o, small_e = 0, 0.0
    for cell in cells:
        e = joint[cell] * total
        if e >= 5:
            observed.append(counts.get(cell, 0))
            wanted.append(e)
        else:
            small_o, small_e = small_o + counts.get(cell, 0), small_e + e
    if small_e > 0:
        observed.append(small_o)
        wanted.append(small_e)
    expect = np.asarray(wanted) * total / sum(wanted)  # rounding of the products
    return float(stats.chisquare(observed, expect).pvalue)


def test_sampled_tokens_with_drafts_follow_the_models_distribution(tiny, monkeypatch):
    """4,096 sampled 4-token continuations, every decode step carrying two drafts (the
    likeliest path's tokens, so all of accepted, rejected and bonus tokens occur), match
    the exact distribution; a verifier that takes every draft is caught by the same test."""
    joint = exact_joint(tiny)
    likeliest = max(joint, key=joint.get)  # type: ignore[arg-type]
    forced = Forced(list(likeliest[1:3]))
    tiny.scheduler.speculation = forced
    counts = sampled_counts(tiny, 512)
    assert forced.drafted > 1000 and 0.1 < forced.accepted / forced.drafted < 0.9
    assert chi_square_p(counts, joint) > 1e-3
    # The test has power: a verifier that takes every draft gives sequences the model
    # would not.
    monkeypatch.setattr("model.engine.scheduler.taken", lambda sampled, drafts: len(drafts))
    counts = sampled_counts(tiny, 128)
    assert chi_square_p(counts, joint) < 1e-6


def test_a_seeded_sampled_stream_draws_the_same_tokens_with_drafts(tiny):
    """Each position draws with the slot's key folded with the position: a seeded request
    gets the same tokens whether its positions were drafts (taken or not) or plain decode
    rows, alone or beside other requests. Every sequence drafts the first stream's own
    next tokens, so that stream takes its drafts and the others mostly reject theirs;
    8 sequences with 3 drafts each fill a 32-row step exactly, so no sequence's drafts
    are left out of a step (with more, whose were depended on the threads' timing)."""
    params = SamplingParams(0.8, max_tokens=12, ignore_eos=True, n=2)
    seeds = [11, 12, 13, 14]
    saved = tiny.scheduler.speculation
    try:
        tiny.scheduler.speculation = Speculation("off", 1)
        plain = [
            [
                c.token_ids
                for c in tiny.generate_choices(PROMPT, dataclasses.replace(params, seed=s))
            ]
            for s in seeds
        ]
        forced = Following(plain[0][0], 3)
        tiny.scheduler.speculation = forced
        drafted = [None] * len(seeds)

        def run(i: int) -> None:
            choices = tiny.generate_choices(PROMPT, dataclasses.replace(params, seed=seeds[i]))
            drafted[i] = [c.token_ids for c in choices]  # type: ignore[call-overload]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seeds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tiny.scheduler.speculation = saved
    assert forced.drafted > 50 and 0 < forced.accepted < forced.drafted
    assert drafted == plain
    assert len({tuple(c) for r in plain for c in r}) > 1  # the seeds do differ


GREEDY = [
    (
        "Add a docstring to this function and return it unchanged otherwise:\n\n"
        "def moving_average(values, window):\n"
        "    sums = [0]\n"
        "    for v in values:\n"
        "        sums.append(sums[-1] + v)\n"
        "    return [(sums[i + window] - sums[i]) / window "
        "for i in range(len(values) - window + 1)]\n"
    ),
    (
        "Summarise in two sentences: The Rhine rises in the Swiss Alps, flows through "
        "Lake Constance, forms part of the border between Germany and France, and reaches "
        "the North Sea in the Netherlands. The Rhine is one of Europe's busiest waterways."
    ),
    "What should I pack for a weekend of hiking in the mountains?",
]


def test_greedy_tokens_are_the_same_with_and_without_drafts(llm):
    """The bundled model, greedy, three prompts: the tokens, and every position's
    log-probabilities to the bit, do not change with prompt lookup on, and on the code and
    summary prompts drafts are taken. (A step verifying drafts runs more rows than one
    without: every op must compute a row as it would alone. XLA's fused norm did not:
    the summary's log-probabilities moved by 1e-4 from its first drafted step, and in
    some runs a near tie at token 53, 1.7e-3 apart, went the other way.)"""
    params = SamplingParams(temperature=0, max_tokens=80, logprobs=True, top_logprobs=2)
    scheduler = llm.scheduler
    saved = scheduler.speculation
    assert saved.mode == "ngram"  # the default
    # A fresh policy, so that no step time measured by an earlier test stops it drafting.
    drafting = scheduler.speculation = Speculation("ngram", saved.tokens)
    try:
        with_drafts = [llm.generate(llm.encode_chat(p), params) for p in GREEDY]
        scheduler.speculation = Speculation("off", 1)
        without = [llm.generate(llm.encode_chat(p), params) for p in GREEDY]
    finally:
        scheduler.speculation = saved
    assert [c.token_ids for c in with_drafts] == [c.token_ids for c in without]
    assert [c.logprobs for c in with_drafts] == [c.logprobs for c in without]
    assert drafting.drafted > 0 and drafting.accepted > 0


def test_the_acceptance_rate_decays_toward_recent_steps():
    s = seq(1.0, 1.0)
    drafting = Speculation("ngram", 4)
    for _ in range(10):
        drafting.verified(s, 4, 4)
    assert speculative.rate(s) > 0.95
    for _ in range(20):
        drafting.verified(s, 4, 0)
    assert speculative.rate(s) < 0.1
    assert (drafting.drafted, drafting.accepted) == (120, 40)


def test_every_outcome_count_is_covered():
    """The chi-square helper pools small cells and sees every outcome."""
    joint = {c: 1 / 8 for c in itertools.product([0, 1], repeat=3)}
    counts = {c: 125 for c in joint}
    assert chi_square_p(counts, joint) > 0.99
    counts[(0, 0, 0)] += 300
    assert chi_square_p(counts, joint) < 1e-6
