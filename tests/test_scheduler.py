"""The scheduler against a mock engine whose outputs are worked out by hand.

The mock stores each step's tokens in a NumPy "pool" at the plan's write positions,
and samples a slot's next token from what the pool holds for it, read through the
plan's block tables and the attention's visibility rules (a decode row sees its
positions 0..context; a prefill token its segment's earlier tokens and its prior
its prior group's positions): token = 50 + (sum of the visible tokens + salt) % 50,
where salt is the slot's setting. Token 99 is the stop token. A wrong block table,
position or write shows as a wrong token.
"""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from model.engine import ledger as ledger_module
from model.engine.blocks import BlockPool
from model.engine.ledger import Ledger
from model.engine.pacing import Pacing
from model.engine.requests import Group
from model.engine.scheduler import EngineFailed, QueueFull, RequestFailed
from model.engine.state import COPIES, StepPlan
from model.engine.variants import (
    BURST_PROMPTS,
    BURST_SHARE,
    LARGE_CHUNK,
    SMALL_CHUNK,
    SMALL_PREFILL_MAX,
    StepShape,
    step_shapes,
)
from model.nn.attention import PRIOR_GROUPS, Layout
from model.nn.config import ModelConfig

STOP = 99
CONFIG = ModelConfig(100, 64, 2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
BS = 4


def expected(prompt: list[int], budget: int, salt: int = 0) -> tuple[list[int], str]:
    """The mock's tokens for `prompt` and its finish reason."""
    tokens, out = list(prompt), []
    while len(out) < budget:
        out.append(50 + (sum(tokens) + salt) % 50)
        tokens.append(out[-1])
        if out[-1] == STOP:
            return out, "stop"
    return out, "length"


@dataclass
class MockOutputs:
    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    pooled: np.ndarray


class MockEngine:
    """The engine's contract on NumPy; records what each step carried."""

    def __init__(self, batch: int, pool_blocks: int = 256, max_seq_len: int = 1024, **faults):
        self.config = CONFIG
        self.batch = batch
        self.block_size = BS
        self.pool_blocks = pool_blocks
        self.table_width = -(-max_seq_len // BS)
        self.stop_ids = np.array([STOP])
        self.shapes = step_shapes(batch, max_seq_len)
        self.step_delay = faults.get("step_delay", 0.0)
        self.fail_at_step = faults.get("fail_at_step")
        self.fail_admit = faults.get("fail_admit")  # a salt whose admission raises
        self.steps: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        # Until it holds, the next admission waits (the requests after it queue meanwhile,
        # and the scheduler then admits them all before it plans a step).
        self.hold: Callable[[], bool] | None = None

    def runnable(self):
        return self.shapes

    def init_state(self):
        return {
            "pool": np.full(self.pool_blocks * BS, -1),
            "tokens": np.zeros(self.batch, int),
            "salt": np.zeros(self.batch, int),
        }

    def admit(self, state, slot, row):
        if self.hold is not None:
            hold, self.hold = self.hold, None
            deadline = time.monotonic() + 30
            while not hold() and time.monotonic() < deadline:
                time.sleep(0.001)
        if row == self.fail_admit:
            raise RuntimeError("admission failed")
        state["salt"][slot] = row
        state["tokens"][slot] = 0
        return state

    def empty_plan(self, shape: StepShape) -> StepPlan:
        r, t = shape.rows, shape.tokens
        layout = Layout(
            positions=np.zeros(t, np.int32),
            context=np.full(r, -1, np.int32),
            block_tables=np.zeros((r, self.table_width), np.int32),
            segments=np.full(shape.prefill, -1, np.int32),
            prior=np.zeros(PRIOR_GROUPS, np.int32),
            prior_blocks=np.zeros((PRIOR_GROUPS, self.table_width), np.int32),
            prior_group=np.full(shape.prefill, -1, np.int32),
            write=np.full(t, self.pool_blocks * BS, np.int32),
        )
        return StepPlan(
            np.zeros(t, np.int32), layout, np.full(r, self.batch, np.int32), np.zeros(r, bool),
            np.zeros(r, np.int32), np.zeros(r, bool), np.full((r, 1), -1, np.int32),
            np.zeros(r, np.int32), np.full((COPIES, 2), self.pool_blocks, np.int32),
        )  # fmt: skip

    def step(self, state, plan: StepPlan):
        self.gate.wait()
        if self.fail_at_step == len(self.steps) + 1:
            raise RuntimeError("device fell over")
        time.sleep(self.step_delay)
        lay, pool, r = plan.layout, state["pool"], plan.layout.rows
        for src, dst in plan.copies[plan.copies[:, 1] < self.pool_blocks]:  # before the step
            pool[dst * BS : (dst + 1) * BS] = pool[src * BS : (src + 1) * BS]
        self.copied = getattr(self, "copied", 0) + int((plan.copies[:, 1] < self.pool_blocks).sum())
        tokens = plan.tokens.copy()
        slots = plan.slots
        owned = slots[(slots < self.batch) & (plan.draft == 0)]  # a slot's first row
        assert len(set(owned.tolist())) == len(owned)
        newest = state["tokens"][np.minimum(slots, self.batch - 1)]
        tokens[:r] = np.where(plan.decode, newest, tokens[:r])
        seg, pos = lay.segments, lay.positions[r:]
        group = lay.prior_group
        for g in set(seg[seg >= 0].tolist()):
            # A segment with a prior group continues from its positions (blocks it may
            # share with others: a cached prefix); the others start a prompt.
            (first,) = np.flatnonzero(seg == g)[:1]
            start = int(lay.prior[group[first]]) if group[first] >= 0 else 0
            assert (group[seg == g] == group[first]).all(), "a segment reads two priors"
            assert pos[seg == g].min() == start, "a segment does not start where it reads"
        for t, where in enumerate(lay.write):
            if where < len(pool):
                pool[where] = tokens[t]
        out = np.zeros(r, int)
        for row in np.flatnonzero(plan.sample):
            src = plan.sample_from[row]
            if src < r:  # a decode row: its positions 0..context through its blocks
                flat = self._flat(lay.block_tables[row], lay.context[row] + 1)
                total = pool[flat].sum()
            else:  # a prefill token: its segment up to it, and its prior group's positions
                i = src - r
                mine = (seg == seg[i]) & (pos <= pos[i])
                total = tokens[r:][mine].sum()
                if group[i] >= 0:
                    j = group[i]
                    total += pool[self._flat(lay.prior_blocks[j], int(lay.prior[j]))].sum()
            assert (pool[self._flat(lay.block_tables[row], 0)] >= 0).all()
            out[row] = 50 + (total + state["salt"][slots[row]]) % 50
            if plan.draft[row] == 0:  # draft rows leave the slot's state alone
                state["tokens"][slots[row]] = out[row]
        self.steps.append(
            {
                "rows": r,
                "decode": int(plan.decode.sum()),
                "drafts": int((plan.draft > 0).sum()),
                "prefill": int((seg >= 0).sum()),
                "segments": len(set(seg[seg >= 0].tolist())),
                "groups": len(set(group[group >= 0].tolist())),
            }
        )
        # Per segment: the sum of its tokens and their count (an embedding's "mean" is
        # then [mean token, 1]).
        pooled = np.zeros((self.batch, 2))
        for g in set(seg[seg >= 0].tolist()):
            pooled[g] = tokens[r:][seg == g].sum(), (seg == g).sum()
        zeros = np.zeros((r, 20))
        return state, MockOutputs(out, np.full(r, -0.25), zeros, zeros, pooled)

    def _flat(self, table, length: int) -> np.ndarray:
        p = np.arange(length)
        return table[p // BS] * BS + p % BS


def run(handle) -> tuple[list[int], str]:
    events = list(handle)
    assert all(e.finish_reason is None for e in events[:-1])
    return [e.token for e in events], events[-1].finish_reason


def by_choice(handle) -> dict[int, tuple[list[int], str]]:
    out: dict[int, list] = {}
    for event in handle:
        out.setdefault(event.index, []).append(event)
    return {i: ([e.token for e in es], es[-1].finish_reason) for i, es in out.items()}


def test_each_request_gets_its_own_sequence_and_finish_reason(make):
    engine = MockEngine(batch=1)
    engine.gate.clear()  # steps block: nothing finishes
    scheduler = make(engine, max_queue=2)
    first = scheduler.submit([1, 2], [0], 3)
    while scheduler.active == 0:  # wait until the first request took the slot
        time.sleep(0.001)
    queued = [scheduler.submit([2], [0], 3), scheduler.submit([3, 4, 5], [7], 6)]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        scheduler.submit([4], [0], 3)
    engine.gate.set()
    assert run(first) == expected([1, 2], 3)
    assert [run(h) for h in queued] == [expected([2], 3), expected([3, 4, 5], 6, salt=7)]


def test_a_stop_token_or_a_budget_ends_a_sequence(make):
    scheduler = make(MockEngine(batch=2))
    assert run(scheduler.submit([49], [0], 10)) == ([99], "stop")  # 50 + 49 = 99
    assert run(scheduler.submit([1], [0], 1)) == ([51], "length")
    tokens, reason = run(scheduler.submit([49], [0], 10, stop_at_eos=False))
    assert tokens == expected([49], 10)[0][:1] + tokens[1:] and len(tokens) == 10
    assert reason == "length"


def test_slots_are_reused_and_never_oversubscribed(make):
    engine = MockEngine(batch=2, step_delay=0.002)
    scheduler = make(engine)
    prompts = [[i, i + 1] for i in range(7)]
    handles = [scheduler.submit(p, [0], 5) for p in prompts]
    assert [run(h) for h in handles] == [expected(p, 5) for p in prompts]
    assert max(s["decode"] for s in engine.steps) <= 2
    assert scheduler.active == 0 and scheduler.pool.available == engine.pool_blocks


def test_cancelled_request_frees_its_slot_within_a_step(make):
    engine = MockEngine(batch=1, step_delay=0.005)
    scheduler = make(engine)
    endless = scheduler.submit([1], [0], 10_000, stop_at_eos=False)
    next(iter(endless))
    endless.cancel()
    steps_at_cancel = len(engine.steps)
    assert run(scheduler.submit([5], [0], 3)) == expected([5], 3)
    assert len(engine.steps) - steps_at_cancel <= 6


def test_full_queue_raises_and_recovers(make):
    engine = MockEngine(batch=1)
    engine.gate.clear()
    scheduler = make(engine, max_queue=1)
    running = scheduler.submit([1], [0], 2)
    while scheduler.active == 0:
        time.sleep(0.001)
    waiting = scheduler.submit([2], [0], 2)
    with pytest.raises(QueueFull):
        scheduler.submit([3], [0], 2)
    engine.gate.set()
    assert [run(running), run(waiting)] == [expected([1], 2), expected([2], 2)]
    assert run(scheduler.submit([3], [0], 2)) == expected([3], 2)


def test_engine_failure_reaches_every_request_and_later_submits(make):
    engine = MockEngine(batch=2, fail_at_step=3)
    scheduler = make(engine)
    handles = [scheduler.submit([i], [0], 50, stop_at_eos=False) for i in range(4)]
    for handle in handles:
        with pytest.raises(EngineFailed, match="device fell over"):
            list(handle)
    with pytest.raises(EngineFailed):
        scheduler.submit([1], [0], 5)
    assert scheduler.failed


# ---- prefill: chunks, sharing, prefix caching ---------------------------------------


@pytest.mark.parametrize("ends_by", ["budget", "stop"])
def test_a_slot_freed_by_a_budget_takes_the_waiting_request_in_the_next_step(make, ends_by):
    """One slot, a stream and a request waiting for it. A stream whose budget ends in the
    step in flight is read before the next step is planned, so the waiting prompt goes
    in the next step; one that ends by a stop token (which the host cannot foresee) has
    its row run once more (dropped), and the waiting prompt goes in the step after."""
    engine = MockEngine(batch=1, step_delay=0.002)
    scheduler = make(engine)
    # [5, 44]'s first token is the stop token; [3, 4] runs to its budget of 6.
    prompt, budget = ([3, 4], 6) if ends_by == "budget" else ([5, 44], 6)
    stream = scheduler.submit(prompt, [0], budget)
    waiting = scheduler.submit([5], [1], 1, stop_at_eos=False)
    tokens, reason = expected(prompt, budget)
    assert reason == ("length" if ends_by == "budget" else "stop")
    assert run(stream) == (tokens, reason)
    assert run(waiting) == expected([5], 1, salt=1)
    # The stream's prompt (its 1st token), a decode step for each other token, then the
    # waiting prompt, or first the stream's row once more.
    kinds = ["prefill" if s["prefill"] else "decode" for s in engine.steps]
    wasted = ["decode"] if ends_by == "stop" else []
    decodes = ["decode"] * (len(tokens) - 1)
    assert kinds[: kinds.index("prefill", 1) + 1] == ["prefill", *decodes, *wasted, "prefill"]


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(make):
    engine = MockEngine(batch=4, step_delay=0.001)
    scheduler = make(engine)
    short = scheduler.submit([3], [0], 60, stop_at_eos=False)
    next(iter(short))  # decoding
    long_prompt = list(range(1, 301))
    long = scheduler.submit(long_prompt, [1], 4, stop_at_eos=False)
    assert run(long) == expected(long_prompt, 4, salt=1)
    steps = [s for s in engine.steps if s["prefill"]][1:]  # the 1st is the short prompt's
    # The 300 tokens came in chunks of at most SMALL_CHUNK, every one beside a decode row.
    assert len(steps) >= 300 // SMALL_CHUNK and all(s["prefill"] <= SMALL_CHUNK for s in steps)
    assert all(s["decode"] >= 1 for s in steps)
    short.cancel()


def test_a_burst_of_prompts_beside_a_stream_gets_the_large_region(make):
    """Four new prompts of 80 tokens (more than SMALL_PREFILL_MAX in all) while a stream
    decodes: one large step takes them all, where one long prompt goes in small chunks."""
    engine = MockEngine(batch=8)
    scheduler = make(engine)
    short = scheduler.submit([9], [0], 60, stop_at_eos=False)
    next(iter(short))  # decoding
    first = len(engine.steps)
    prompts = [[i + 1] * 80 for i in range(BURST_PROMPTS)]
    engine.hold = lambda: len(scheduler.waiting) == len(prompts) - 1  # one burst
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    burst = [s for s in engine.steps[first:] if s["prefill"]]
    assert burst[0]["prefill"] == 80 * BURST_PROMPTS > SMALL_PREFILL_MAX
    assert burst[0]["decode"] == 1 and burst[0]["segments"] == BURST_PROMPTS
    short.cancel()


@pytest.mark.parametrize("decoding", [False, True])
def test_a_burst_fits_the_regions_of_a_context_shorter_than_the_large_one(make, decoding):
    """With a context below LARGE_CHUNK the largest region is the context: a burst of
    prompts that asks for the large region gets that one, in as many steps as it takes,
    and every stream is right (the region was once overrun, failing the engine)."""
    engine = MockEngine(batch=8, max_seq_len=96)
    largest = max(s.prefill for s in engine.shapes)
    assert largest == 96 < LARGE_CHUNK
    scheduler = make(engine)
    # The pacing aside (with a decode-only step timed, it may hold the burst to a prompt
    # a step: whether one was depends on the machine's timing): this is about the region.
    scheduler.ledger.pacing.room = lambda: None
    short = scheduler.submit([9], [0], 60, stop_at_eos=False) if decoding else None
    if short is not None:
        next(iter(short))
    first = len(engine.steps)
    prompts = [[i + 1] * 60 for i in range(BURST_PROMPTS)]
    # One burst: the first prompt's admission waits for the others (waiting for them all
    # to queue could wait forever where the scheduler had taken the first already).
    engine.hold = lambda: len(scheduler.waiting) == len(prompts) - 1
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    steps = [s for s in engine.steps[first:] if s["prefill"]]
    assert max(s["prefill"] for s in steps) == largest
    if short is not None:
        short.cancel()


def test_a_burst_with_nothing_decoding_goes_in_two_steps(make):
    """Ten new prompts of 80 tokens (the large region) with nothing decoding: the first
    step takes the first BURST_SHARE of them, the next step the rest beside their
    streams, so most first tokens come after about half the work."""
    engine = MockEngine(batch=16)
    engine.hold = lambda: len(scheduler.waiting) == len(prompts) - 1  # one burst
    scheduler = make(engine)
    prompts = [[i + 1] * 80 for i in range(10)]
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    first = math.ceil(BURST_SHARE * len(prompts))
    steps = engine.steps[:2]
    assert [s["segments"] for s in steps] == [first, len(prompts) - first]
    assert [s["decode"] for s in steps] == [0, first]
    assert sum(len(p) for p in prompts) > SMALL_PREFILL_MAX


def test_several_new_prompts_share_a_step(make):
    engine = MockEngine(batch=8)
    engine.hold = lambda: len(scheduler.waiting) == 4  # one burst of 5
    scheduler = make(engine)
    prompts = [[i] * (i + 2) for i in range(1, 6)]
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    assert engine.steps[0]["segments"] == 5  # all five prompts in the first step


def test_choices_share_the_prompt_and_compute_only_its_last_block(make):
    engine = MockEngine(batch=4)
    scheduler = make(engine)
    prompt = list(range(1, 11))  # 10 tokens: two full blocks of 4, then 2 more
    handle = scheduler.submit(prompt, [0, 3, 40], 6, stop_at_eos=False)
    assert by_choice(handle) == {i: expected(prompt, 6, s) for i, s in enumerate([0, 3, 40])}
    # 10 prompt tokens for the 1st choice; each other copies the begun block's first
    # position and computes only the last token.
    assert sum(s["prefill"] for s in engine.steps) == 10 + 1 + 1
    assert engine.copied == 2


def test_a_cached_prefix_is_not_computed_again(make):
    engine = MockEngine(batch=2)
    scheduler = make(engine)
    system = list(range(1, 26))  # 25 tokens: 6 full blocks
    first = system + [7, 8]
    assert run(scheduler.submit(first, [0], 3)) == expected(first, 3)
    computed = sum(s["prefill"] for s in engine.steps)
    second = system + [9, 9, 9]
    assert run(scheduler.submit(second, [0], 3)) == expected(second, 3)
    # 24 positions from cached blocks, and one (system's 25th token) copied from the first
    # request's begun block.
    assert sum(s["prefill"] for s in engine.steps) - computed == len(second) - 24 - 1
    assert scheduler.pool.hits >= 6 and scheduler.pool.partial_hits == 1


def test_a_repeated_prompt_copies_its_begun_block_and_computes_one_token(make):
    """The same prompt again, and one that shares part of a begun block: the block's
    start is copied (its positions computed once, read by both: a wrong copy shows as
    wrong tokens), the rest computed; a block taken by another sequence since is not."""
    engine = MockEngine(batch=2, pool_blocks=12)
    scheduler = make(engine)
    prompt = list(range(1, 12))  # 2 full blocks of 4, then 3 tokens in a begun block
    assert run(scheduler.submit(prompt, [0], 3)) == expected(prompt, 3)
    before = sum(s["prefill"] for s in engine.steps)
    assert run(scheduler.submit(prompt, [1], 3)) == expected(prompt, 3, salt=1)
    assert sum(s["prefill"] for s in engine.steps) - before == 1  # the last token only
    assert scheduler.pool.partial_hits == 2
    before = sum(s["prefill"] for s in engine.steps)
    other = prompt[:9] + [40, 41]
    assert run(scheduler.submit(other, [2], 3)) == expected(other, 3, salt=2)
    assert sum(s["prefill"] for s in engine.steps) - before == 2  # 9 positions reused
    # Every block taken by a long sequence (its notes are gone): computed in full.
    filler = [60 + i % 30 for i in range(44)]
    assert run(scheduler.submit(filler, [3], 3)) == expected(filler, 3, salt=3)
    before = sum(s["prefill"] for s in engine.steps)
    assert run(scheduler.submit(prompt, [4], 3)) == expected(prompt, 3, salt=4)
    assert sum(s["prefill"] for s in engine.steps) - before == len(prompt)


def test_a_burst_of_one_prompt_computes_it_once(make):
    """Identical prompts at once, and another: one of the twins is computed beside the
    other prompt, and the rest wait a step for its blocks and compute their last token
    (computed side by side, each would take every position of the prompt)."""
    engine = MockEngine(batch=8)
    engine.hold = lambda: len(scheduler.waiting) == 4  # one burst of 5
    scheduler = make(engine)
    prompt, other = list(range(1, 12)), [7] * 6  # 2 full blocks of 4, then 3 tokens
    prompts = [prompt, prompt, other, prompt, prompt]
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    prefills = [(s["segments"], s["prefill"]) for s in engine.steps if s["prefill"]]
    assert prefills == [(2, len(prompt) + len(other)), (3, 3)]
    assert scheduler.pool.partial_hits == 3 * 2


def test_a_copied_start_leaves_the_region_to_the_positions_after_it(make):
    """A prompt that continues a noted block copies its start, and the step's region goes
    to the positions after it: a prompt that fits the region less its copied start is
    prefilled in one step (were the copied positions counted against the region, its last
    ones would take a step of their own, and its first token would wait for it)."""
    engine = MockEngine(batch=2)
    scheduler = make(engine)
    start = [1, 2, 3]  # a begun block, noted
    assert run(scheduler.submit(start, [0], 1)) == expected(start, 1)
    prompt = start + list(range(10, 10 + SMALL_CHUNK))
    first = len(engine.steps)
    assert run(scheduler.submit(prompt, [1], 1)) == expected(prompt, 1, salt=1)
    assert scheduler.pool.partial_hits == len(start)
    prefills = [s["prefill"] for s in engine.steps[first:] if s["prefill"]]
    assert prefills == [SMALL_CHUNK]


def test_a_burst_with_cached_prefixes_is_prefilled_in_one_step(make):
    """Prompts that start with the same cached blocks (a shared system prompt) read them
    together in one step, beside a new prompt and a prompt with another cached prefix
    (a second prior group), each stream still right."""
    engine = MockEngine(batch=8)
    scheduler = make(engine)
    # 3 and 2 full blocks of 4, no more (a block begun would be copied: see below).
    system, other = list(range(1, 13)), list(range(30, 38))
    assert run(scheduler.submit(system + [5], [0], 2)) == expected(system + [5], 2)
    assert run(scheduler.submit(other + [6], [0], 2)) == expected(other + [6], 2)
    engine.hold = lambda: len(scheduler.waiting) == len(prompts) - 1  # one burst
    first = len(engine.steps)
    prompts = [system + [i] * i for i in range(1, 5)] + [[20, 21, 22], other + [9, 9]]
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    # One step: the four past the system prompt's 12 cached positions, the new prompt,
    # and the other past its 8.
    assert engine.steps[first]["segments"] == 6
    assert engine.steps[first]["groups"] == 2
    want = sum(len(p) - 12 for p in prompts[:4]) + 3 + len(prompts[5]) - 8
    assert engine.steps[first]["prefill"] == want


def test_a_step_reads_at_most_prior_groups_cached_prefixes(make, monkeypatch):
    """More distinct cached prefixes than a step has prior groups: the first PRIOR_GROUPS
    prompts go in one step, the others in the next, each stream right. (The limit is
    lowered to 6 here, so that the burst fits the small region.)"""
    limit = 6
    assert limit < PRIOR_GROUPS
    monkeypatch.setattr(ledger_module, "PRIOR_GROUPS", limit)
    count = limit + 2
    engine = MockEngine(batch=count, pool_blocks=8 * count)
    scheduler = make(engine)
    prefixes = [[i + 1] * 4 for i in range(count)]  # a full block of 4 each
    for prefix in prefixes:
        assert run(scheduler.submit(prefix + [60], [0], 1)) == expected(prefix + [60], 1)
    engine.hold = lambda: len(scheduler.waiting) == count - 1  # one burst
    first = len(engine.steps)
    prompts = [prefix + [61] for prefix in prefixes]  # one token each past its prefix
    # Few prompt tokens in all (the small region, and no burst split), all fitting it.
    assert sum(map(len, prompts)) <= SMALL_PREFILL_MAX and count <= SMALL_CHUNK
    handles = [scheduler.submit(p, [i], 3) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 3, i) for i, p in enumerate(prompts)]
    steps = engine.steps[first : first + 2]
    assert [s["groups"] for s in steps] == [limit, 2]
    assert [s["prefill"] for s in steps] == [limit, 2]


def test_when_the_pool_is_full_requests_wait_then_complete(make):
    # 24 blocks of 4: a 28-token prompt takes 8 (its first token's position too), so
    # three are admitted at a time and the others wait in the queue.
    engine = MockEngine(batch=8, pool_blocks=24, step_delay=0.001)
    scheduler = make(engine)
    prompts = [[i + 1] * 28 for i in range(8)]
    handles = [scheduler.submit(p, [i], 10, stop_at_eos=False) for i, p in enumerate(prompts)]
    assert [run(h) for h in handles] == [expected(p, 10, i) for i, p in enumerate(prompts)]
    assert max(s["decode"] + s["segments"] for s in engine.steps) <= 3
    assert scheduler.pool.available == 24


def test_a_preempted_stream_resumes_with_the_same_tokens(make):
    # Two long generations that cannot both fit: one is preempted and prefilled again.
    engine = MockEngine(batch=2, pool_blocks=12, max_seq_len=48)
    scheduler = make(engine)
    a = scheduler.submit([1, 2, 3], [0], 40, stop_at_eos=False)
    b = scheduler.submit([4, 5], [9], 40, stop_at_eos=False)
    assert run(a) == expected([1, 2, 3], 40)
    assert run(b) == expected([4, 5], 40, salt=9)
    assert sum(s["prefill"] for s in engine.steps) > 5  # something was computed twice


# ---- a failure on one request's path fails that request alone -------------------------


def test_a_request_failing_at_admission_fails_alone(make):
    engine = MockEngine(batch=3, step_delay=0.002, fail_admit=13)
    scheduler = make(engine)
    handles = {salt: scheduler.submit([salt, 1], [salt], 8) for salt in (1, 13, 2, 3)}
    with pytest.raises(RequestFailed, match="RuntimeError: admission failed"):
        list(handles.pop(13))
    for salt, handle in handles.items():
        assert run(handle) == expected([salt, 1], 8, salt)
    assert not scheduler.failed and scheduler.active == 0


class FailingConstraint:
    """A grammar whose mask fails at its `fail_at`-th fill (or accept)."""

    def __init__(self, fail_at: int, in_accept: bool = False):
        self.fail_at, self.in_accept, self.calls = fail_at, in_accept, 0

    def _count(self, accepting: bool) -> None:
        if accepting == self.in_accept:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("the grammar engine broke")

    def fill(self, bitmask, row):
        self._count(False)

    def accept(self, token):
        self._count(True)
        return True


@pytest.mark.parametrize("in_accept", [False, True], ids=["fill", "accept"])
def test_a_grammar_failing_mid_stream_fails_its_request_alone(make, in_accept):
    engine = MockEngine(batch=2, step_delay=0.002)
    scheduler = make(engine)
    constraint = FailingConstraint(4, in_accept)
    broken = scheduler.submit([0], [0], 30, constraints=[constraint], stop_at_eos=False)
    plain = scheduler.submit([5], [0], 20, stop_at_eos=False)
    tokens = []
    with pytest.raises(RequestFailed, match="the grammar engine broke"):
        tokens.extend(e.token for e in broken)
    assert 1 <= len(tokens) <= 4 and tokens == expected([0], len(tokens))[0]
    assert run(plain) == expected([5], 20)
    again = [scheduler.submit([i], [0], 5) for i in (6, 7)]
    assert [run(h) for h in again] == [expected([6], 5), expected([7], 5)]
    assert not scheduler.failed


class Consumed(np.ndarray):
    """A state buffer that a failed call consumed (as donation does)."""

    def is_deleted(self) -> bool:
        return True


class StateLosingEngine(MockEngine):
    """An admission that fails after consuming the shared state: an engine fault."""

    def admit(self, state, slot, row):
        if row == 13:
            state["tokens"] = state["tokens"].view(Consumed)
            raise RuntimeError("the device lost the state")
        return super().admit(state, slot, row)


def test_losing_the_state_fails_every_request_at_once(make):
    engine = StateLosingEngine(batch=2, step_delay=0.01)
    scheduler = make(engine)
    running = scheduler.submit([1], [0], 1000, stop_at_eos=False)
    next(iter(running))
    doomed = scheduler.submit([2], [13], 5)
    waiting = [scheduler.submit([i], [0], 5) for i in (2, 3, 4)]
    for handle in [running, doomed, *waiting]:
        with pytest.raises(EngineFailed, match="the device lost the state"):
            list(handle)
    assert scheduler.failed


# ---- embeddings: prefill only, every token pooled once ---------------------------------


def embedded(handle) -> np.ndarray:
    (event,) = list(handle)
    assert event.finish_reason == "stop" and event.tokens > 0
    return event.vector


def test_an_embedding_pools_every_token_once_across_chunks_and_cached_prefixes(make):
    engine = MockEngine(batch=4)
    scheduler = make(engine)
    long = [(i * 7) % 40 + 1 for i in range(150)]  # three chunks while something decodes
    # Its first blocks are in the prefix cache: an embedding computes them anyway.
    assert run(scheduler.submit(long[:40], [0], 2)) == expected(long[:40], 2)
    busy = scheduler.submit([5, 6], [3], 60, stop_at_eos=False)
    vector = embedded(scheduler.submit(long, [0], 0, embed=True))
    assert vector.tolist() == pytest.approx([np.mean(long), 1.0])
    assert run(busy) == expected([5, 6], 60, salt=3)  # the stream beside it is unchanged
    assert embedded(scheduler.submit([9], [0], 0, embed=True)).tolist() == [9.0, 1.0]
    assert scheduler.pool.available == engine.pool_blocks


def test_embeddings_preempted_by_streams_start_over_and_stay_exact(make, caplog):
    # A pool too small for everything at once: the streams' blocks preempt embeddings
    # part-way through their prompts, which are then pooled again from the start.
    engine = MockEngine(batch=4, pool_blocks=40, max_seq_len=160, step_delay=0.0005)
    scheduler = make(engine)
    streams = [scheduler.submit([i + 1, 2, 3], [i], 100, stop_at_eos=False) for i in range(2)]
    inputs = [[(i * 13 + j) % 30 + 1 for j in range(70 + 5 * i)] for i in range(12)]
    with caplog.at_level("INFO", logger="model.engine.ledger"):
        handles = [scheduler.submit(x, [0], 0, embed=True) for x in inputs]
        vectors = [embedded(h) for h in handles]
        outputs = [run(s) for s in streams]
    assert [v.tolist() for v in vectors] == [pytest.approx([np.mean(x), 1.0]) for x in inputs]
    assert outputs == [expected([i + 1, 2, 3], 100, salt=i) for i in range(2)]
    assert "preempting" in caplog.text
    assert scheduler.pool.available == engine.pool_blocks


def test_an_embedding_preempted_part_way_pools_its_prompt_again_from_the_start():
    pool = BlockPool(5, BS)  # 3 blocks for the embedding's first chunk, 2 for the stream
    ledger = Ledger(pool, Pacing(CONFIG))
    prompt = list(range(1, 21))
    (embedding,) = Group.create(prompt, [0], 0, True, [None], 0, embed=True).choices
    (stream,) = Group.create([1, 2], [0], 5, True, [None], 0).choices
    for order, seq in enumerate((stream, embedding)):
        seq.order, seq.length, seq.target = order, len(seq.tokens), len(seq.tokens)
    assert ledger.grow(embedding, 12)
    embedding.ran(12)
    assert not embedding.pool(np.array([sum(prompt[:12]), 12.0]), 12)  # one chunk in
    assert ledger.grow(stream, 8)  # the pool is out: the stream needs a block
    assert not ledger.grow(stream, 12)
    ledger.preempt(stream, [stream, embedding])
    assert embedding.computed == 0 and not embedding.blocks
    assert embedding.pool(np.array([sum(prompt), 20.0]), 20)  # all of it, again
    (event,) = list(embedding.handle)
    assert event.vector.tolist() == [np.mean(prompt), 1.0] and event.tokens == 20


def test_a_lone_sequence_in_a_high_slot_runs_the_smallest_step(make):
    """Rows are handed out in order, whatever slot a sequence holds: once the others end,
    the straggler in slot 5 decodes in one-row steps."""
    engine = MockEngine(batch=8)
    engine.hold = lambda: len(scheduler.waiting) == 5  # one burst of 6
    scheduler = make(engine)
    short = [scheduler.submit([i + 1], [i], 2, stop_at_eos=False) for i in range(5)]
    long = scheduler.submit([7, 7], [5], 30, stop_at_eos=False)
    assert [run(h) for h in short] == [expected([i + 1], 2, i) for i in range(5)]
    assert run(long) == expected([7, 7], 30, salt=5)
    assert [s["rows"] for s in engine.steps[-20:]] == [1] * 20
