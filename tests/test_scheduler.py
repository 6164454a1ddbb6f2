"""The scheduler against a mock engine whose outputs are worked out by hand.

The mock's rules: a prompt's first token is 50 + sum(prompt) % 50; every decode
step adds 1 to each slot's last token; token 99 is the stop token. So a request
with prompt [p] and budget n yields 50+p, 51+p, … until 99 or n tokens. A
further choice with seed s starts from the next step at 50 + p + s.
"""

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from model.scheduler import EngineFailed, QueueFull, RequestFailed, Scheduler

STOP = 99


@dataclass
class MockPrefix:
    token: int
    logprob: float = -0.5
    top_ids: tuple = ()
    top_logprobs: tuple = ()


class MockEngine:
    """Engine API on NumPy; records every call for the tests to inspect."""

    def __init__(self, batch: int, step_delay: float = 0.0, fail_at_step: int | None = None):
        self.batch = batch
        self.stop_ids = np.array([STOP])
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.calls: list[tuple] = []
        self.steps = 0
        self.rows: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def unconstrained(self, rows):
        return np.full((rows, 1), -1, np.int32)

    def init_state(self):
        return {"tokens": np.zeros(self.batch, int), "remaining": np.zeros(self.batch, int)}

    def prefill(self, tokens, sampling, allowed=None):
        self.calls.append(("prefill", tuple(tokens)))
        return MockPrefix(50 + sum(tokens) % 50)

    def insert(self, prefix, state, slot, remaining, stop_at_eos=True, restart_seed=None):
        self.calls.append(("insert", slot, self.steps))
        # A restarted choice's first token comes from the next step: prefix token + seed.
        restarted = restart_seed is not None
        state["tokens"][slot] = prefix.token + restart_seed - 1 if restarted else prefix.token
        state["remaining"][slot] = remaining
        return state

    def generate(self, state, max_position, rows, allowed=None):
        self.rows.append(rows)
        self.gate.wait()
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("device fell over")
        time.sleep(self.step_delay)
        state = {"tokens": state["tokens"] + 1, "remaining": state["remaining"] - 1}
        done = (state["tokens"] == STOP) | (state["remaining"] <= 0)
        top = np.zeros((self.batch, 20))
        return state, state["tokens"].copy(), np.full(self.batch, -0.25), done, top, top


def expected(prompt: list[int], budget: int) -> tuple[list[int], str]:
    first = 50 + sum(prompt) % 50
    tokens = list(range(first, min(first + budget, STOP + 1)))
    return tokens, "stop" if tokens[-1] == STOP else "length"


def run(handle) -> tuple[list[int], str]:
    events = list(handle)
    assert all(e.finish_reason is None for e in events[:-1])
    return [e.token for e in events], events[-1].finish_reason


@pytest.fixture
def make():
    schedulers = []

    def build(engine, **kwargs):
        scheduler = Scheduler(engine, **kwargs)
        schedulers.append(scheduler)
        return scheduler

    yield build
    for scheduler in schedulers:
        scheduler.stop()


def test_each_request_gets_its_own_sequence_and_finish_reason(make):
    scheduler = make(MockEngine(batch=4))
    cases = [([1], 5), ([40], 100), ([3, 4], 1), ([49], 30), ([0], 89)]
    handles = [scheduler.submit(p, None, n) for p, n in cases]
    for (prompt, budget), handle in zip(cases, handles, strict=True):
        assert run(handle) == expected(prompt, budget)


def test_first_token_stop_or_budget_of_one_never_takes_a_slot(make):
    engine = MockEngine(batch=2)
    scheduler = make(engine)
    assert run(scheduler.submit([49], None, 10)) == ([STOP], "stop")
    assert run(scheduler.submit([5], None, 1)) == ([55], "length")
    assert [c[0] for c in engine.calls] == ["prefill", "prefill"]
    assert engine.steps == 0


def test_slots_are_reused_and_never_oversubscribed(make):
    engine = MockEngine(batch=2, step_delay=0.002)
    scheduler = make(engine)
    cases = [([i], 3 + i % 4) for i in range(7)]
    handles = [scheduler.submit(p, None, n) for p, n in cases]
    for (prompt, budget), handle in zip(cases, handles, strict=True):
        assert run(handle) == expected(prompt, budget)
    inserts = [c[1] for c in engine.calls if c[0] == "insert"]
    assert sorted(set(inserts)) == [0, 1]
    assert set(engine.rows) <= {1, 2} and 1 in engine.rows  # the last request runs alone
    assert len(inserts) == 7
    # Prefills happen in submission order (FIFO).
    assert [c[1] for c in engine.calls if c[0] == "prefill"] == [(i,) for i in range(7)]


def test_cancelled_request_frees_its_slot_within_a_step(make):
    engine = MockEngine(batch=1, step_delay=0.005)
    scheduler = make(engine)
    long = scheduler.submit([0], None, 10**6)
    events = iter(long)
    for _ in range(3):
        next(events)
    long.cancel()
    steps_at_cancel = engine.steps
    # The next request can only run once the single slot is free.
    assert run(scheduler.submit([2], None, 4)) == expected([2], 4)
    kind, slot, steps_at_insert = engine.calls[-1]
    assert (kind, slot) == ("insert", 0)
    # At most the step in flight when cancel() landed and one dispatched meanwhile.
    assert steps_at_insert - steps_at_cancel <= 2


def test_full_queue_raises_and_recovers(make):
    engine = MockEngine(batch=1)
    engine.gate.clear()  # decode steps block: nothing finishes
    scheduler = make(engine, max_queue=2)
    first = scheduler.submit([1], None, 3)
    while not engine.calls:  # wait until the first request left the queue for the slot
        time.sleep(0.001)
    queued = [scheduler.submit([2], None, 3), scheduler.submit([3], None, 3)]
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        scheduler.submit([4], None, 3)
    engine.gate.set()
    assert run(first) == expected([1], 3)
    assert [run(h) for h in queued] == [expected([2], 3), expected([3], 3)]


def test_engine_failure_reaches_every_request_and_later_submits(make):
    engine = MockEngine(batch=2, fail_at_step=3)
    scheduler = make(engine)
    handles = [scheduler.submit([i], None, 50) for i in range(4)]
    for handle in handles:
        with pytest.raises(EngineFailed, match="device fell over"):
            list(handle)
    with pytest.raises(EngineFailed):
        scheduler.submit([1], None, 5)
    assert scheduler.failed


def test_choices_share_one_prefill_and_each_finishes_once(make):
    engine = MockEngine(batch=4)
    scheduler = make(engine)
    handle = scheduler.submit([1], None, 6, seeds=[0, 3, 40])
    by_choice: dict[int, list] = {0: [], 1: [], 2: []}
    for event in handle:
        by_choice[event.index].append(event)
    assert [c[0] for c in engine.calls].count("prefill") == 1
    assert [e.token for e in by_choice[0]] == list(range(51, 57))
    assert [e.token for e in by_choice[1]] == list(range(54, 60))
    assert [e.token for e in by_choice[2]] == list(range(91, 97))
    for events in by_choice.values():
        assert [e.finish_reason for e in events] == [None] * 5 + ["length"]


def test_choices_wait_for_enough_free_slots(make):
    engine = MockEngine(batch=2, step_delay=0.002)
    scheduler = make(engine)
    first = scheduler.submit([0], None, 5)
    both = scheduler.submit([2], None, 3, seeds=[0, 1])
    assert run(first) == expected([0], 5)
    tokens = {0: [], 1: []}
    for event in both:
        tokens[event.index].append(event.token)
    assert tokens == {0: [52, 53, 54], 1: [53, 54, 55]}


def test_more_choices_than_slots_is_refused(make):
    scheduler = make(MockEngine(batch=2))
    with pytest.raises(ValueError, match="n=3 choices exceed the 2 decode slots"):
        scheduler.submit([1], None, 2, seeds=[0, 1, 2])


def test_cancelling_one_choice_leaves_the_others_running(make):
    engine = MockEngine(batch=2, step_delay=0.002)
    scheduler = make(engine)
    handle = scheduler.submit([0], None, 30, seeds=[0, 1])
    handle.cancel(1)
    events = list(handle)
    assert {e.index for e in events} <= {0, 1}
    assert [e.token for e in events if e.index == 0] == list(range(50, 80))
    assert all(e.finish_reason is None for e in events if e.index == 1)


# ---- a failure on one request's path fails that request alone -------------------------


class FaultyEngine(MockEngine):
    """MockEngine whose prefill or insert raises for the prompt [13]."""

    def __init__(self, batch: int, fail_in: str, **kwargs):
        super().__init__(batch, **kwargs)
        self.fail_in = fail_in
        self.prompt = ()

    def prefill(self, tokens, sampling, allowed=None):
        self.prompt = tuple(tokens)
        if self.fail_in == "prefill" and self.prompt == (13,):
            raise RuntimeError("prefill of an odd prompt failed")
        return super().prefill(tokens, sampling, allowed)

    def insert(self, prefix, state, slot, remaining, stop_at_eos=True, restart_seed=None):
        if self.fail_in == "insert" and self.prompt == (13,):
            raise RuntimeError("insert failed")
        return super().insert(prefix, state, slot, remaining, stop_at_eos, restart_seed)


@pytest.mark.parametrize("fail_in", ["prefill", "insert"])
def test_a_request_failing_in_the_engine_fails_alone(make, fail_in):
    engine = FaultyEngine(batch=3, fail_in=fail_in, step_delay=0.002)
    scheduler = make(engine)
    prompts = [[1], [13], [2], [3]]
    handles = [scheduler.submit(p, None, 8, seeds=[0, 5]) for p in prompts]
    results = {}
    for prompt, handle in zip(prompts, handles, strict=True):
        results[prompt[0]] = {}
        try:
            for event in handle:
                results[prompt[0]].setdefault(event.index, []).append(event.token)
        except RequestFailed as exc:
            results[prompt[0]] = str(exc)
    assert (
        results[13]
        == {
            "prefill": "RuntimeError: prefill of an odd prompt failed",
            "insert": "RuntimeError: insert failed",
        }[fail_in]
    )
    for p in (1, 2, 3):  # choice 0 from the prefill, choice 1 restarted with seed 5
        assert results[p] == {0: expected([p], 8)[0], 1: list(range(55 + p, 63 + p))}
    assert not scheduler.failed and scheduler.active == 0
    assert run(scheduler.submit([4], None, 3)) == expected([4], 3)


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
    broken = scheduler.submit([0], None, 30, constraints=[FailingConstraint(4, in_accept)])
    plain = scheduler.submit([5], None, 20)
    tokens = []
    with pytest.raises(RequestFailed, match="the grammar engine broke"):
        tokens.extend(e.token for e in broken)
    assert 1 <= len(tokens) <= 4 and tokens == list(range(50, 50 + len(tokens)))
    assert run(plain) == expected([5], 20)
    # The failed request's slot is free again: two requests run at once.
    again = [scheduler.submit([i], None, 5) for i in (6, 7)]
    assert [run(h) for h in again] == [expected([6], 5), expected([7], 5)]
    assert not scheduler.failed


class Consumed(np.ndarray):
    """A decode-state buffer that a failed call consumed (as donation does)."""

    def is_deleted(self) -> bool:
        return True


class StateLosingEngine(MockEngine):
    """An insert that fails after consuming the shared decode state: an engine fault."""

    def insert(self, prefix, state, slot, remaining, stop_at_eos=True, restart_seed=None):
        if prefix.token == 50 + 13:
            state["tokens"] = state["tokens"].view(Consumed)
            raise RuntimeError("the device lost the state")
        return super().insert(prefix, state, slot, remaining, stop_at_eos, restart_seed)


def test_losing_the_decode_state_fails_every_request_at_once(make):
    engine = StateLosingEngine(batch=2, step_delay=0.01)
    scheduler = make(engine)
    running = scheduler.submit([1], None, 1000)
    next(iter(running))  # decoding
    doomed = scheduler.submit([13], None, 5)
    waiting = [scheduler.submit([i], None, 5) for i in (2, 3, 4)]
    for handle in [running, doomed, *waiting]:
        with pytest.raises(EngineFailed, match="the device lost the state"):
            list(handle)
    assert scheduler.failed
