"""Pacing (model/engine/pacing.py): a long prompt's chunks beside decoding streams are
sized by measured step costs, so the streams' gaps stay within 1 + the share times
their length without the prompt."""

import dataclasses
import statistics
import threading
import time

import numpy as np
import pytest

from model.engine.pacing import FIRST_ROOM, LONG_STEP, Pacing, prior_scale
from model.engine.variants import SMALL_CHUNK, StepShape
from model.nn.config import ModelConfig
from tests.test_scheduler import MockEngine, expected, run

SMOLLM2 = ModelConfig(49152, 576, 30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536)
DECODE, MIXED = StepShape(8, 0), StepShape(8, SMALL_CHUNK)
SHARE = 0.75


def test_the_prior_scale_is_where_attention_costs_what_the_products_do():
    # SmolLM2-135M, per layer and token: q, k, v 576 x (576 + 2 x 192), o 576 x 576, gate,
    # up and down 3 x 576 x 1536: 3,538,944 weights, 2 FLOPs each; per prior position,
    # scores and values for 9 heads of 64: 4 x 576 FLOPs. 7,077,888 / 2,304 = 3,072.
    assert prior_scale(SMOLLM2) == 3072


def test_steps_are_long_by_the_median_of_the_decode_only_ones():
    pacing = Pacing(SMOLLM2, SHARE)
    assert not pacing.long_steps  # nothing timed yet
    pacing.measured(DECODE, True, 0, 9.0)  # a shape's first run is not counted
    for _ in range(3):
        pacing.measured(DECODE, True, 0, 0.5 * LONG_STEP)
    assert not pacing.long_steps
    for _ in range(4):
        pacing.measured(DECODE, True, 0, 1.5 * LONG_STEP)
        pacing.measured(MIXED, True, 8, 0.1 * LONG_STEP)  # steps with prompt tokens: not
    assert pacing.decode == 1.5 * LONG_STEP and pacing.long_steps


def test_the_room_converges_to_the_work_that_fills_the_share():
    pacing = Pacing(SMOLLM2, SHARE)
    assert pacing.room() is None  # no decode-only step timed: nothing to pace against
    pacing.measured(DECODE, True, 0, 9.0)  # a shape's first run is not counted
    for seconds in (0.030, 0.028, 0.5, 0.031, 0.030):  # a pause of the host among them
        pacing.measured(DECODE, True, 0, seconds)
    assert pacing.decode == 0.030
    assert pacing.room() == FIRST_ROOM
    pacing.measured(MIXED, True, 8, 5.0)  # first run

    def step(units: float) -> float:
        """A step with decode rows: 30 ms, plus 4 ms and 0.5 ms a unit with prompt work."""
        return 0.030 + 0.004 + 0.0005 * units

    want = (SHARE * 0.030 - 0.004) / 0.0005  # 37 units make a step 1.75x
    for _ in range(30):
        room = pacing.room()
        pacing.measured(MIXED, True, room, step(room))
    assert pacing.room() == pytest.approx(want, rel=0.05)
    pacing.measured(MIXED, True, 30, 2.0)  # an outlier: steers nothing
    pacing.measured(MIXED, False, 300, 0.2)  # no decode rows: nothing to pace
    assert pacing.room() == pytest.approx(want, rel=0.05)
    for _ in range(30):  # steps that use little of the room do not grow it
        pacing.measured(MIXED, True, 5, step(5))
    assert pacing.room() == pytest.approx(want, rel=0.05)
    for _ in range(40):  # the same work costs twice as much: half the room
        room = pacing.room()
        pacing.measured(MIXED, True, room, 0.030 + 2 * (0.004 + 0.0005 * room))
    assert pacing.room() == pytest.approx((SHARE * 0.030 - 0.008) / 0.001, rel=0.05)
    # A token over 3,072 prior positions is twice the work of one over none.
    assert [pacing.fit(prior, 37.0) for prior in (0, 3072, 6144)] == [37, 18, 12]
    assert pacing.units(3072, 18) == 36


def test_a_step_with_prompt_tokens_is_held_to_the_decode_only_steps_of_its_rows():
    """Streams that take drafts alternate 8-row decode-only steps (30 ms) with 32-row ones
    that carry their drafts (75 ms). A step with a prompt chunk has the 8 rows alone: the
    room is steered to 1.75 times the 8-row step, not the median of both kinds."""
    drafting = StepShape(32, 0)
    pacing = Pacing(SMOLLM2, SHARE)
    pacing.measured(DECODE, True, 0, 9.0)  # first runs are not counted
    pacing.measured(drafting, True, 0, 9.0)
    for _ in range(6):
        pacing.measured(DECODE, True, 0, 0.030)
        for _ in range(2):
            pacing.measured(drafting, True, 0, 0.075)
    assert pacing.decode == 0.075  # (the median of all, which sets `long_steps`)
    assert pacing.decode_of(8) == 0.030 and pacing.decode_of(32) == 0.075
    assert pacing.decode_of(1) == 0.075  # rows never timed alone: all of them
    pacing.measured(MIXED, True, 8, 5.0)  # first run
    for _ in range(30):
        room = pacing.room()
        pacing.measured(MIXED, True, room, 0.030 + 0.004 + 0.0005 * room)
    assert pacing.room() == pytest.approx((SHARE * 0.030 - 0.004) / 0.0005, rel=0.05)


@dataclasses.dataclass
class Pending:
    """A step's tokens, there once the emulated device finishes it (np.asarray waits)."""

    tokens: np.ndarray
    ready: float

    def __array__(self, dtype=None, copy=None):
        time.sleep(max(0.0, self.ready - time.perf_counter()))
        return self.tokens


class TimedEngine(MockEngine):
    """The mock engine on an emulated device that runs steps in order, each taking
    DECODE_S, plus FIXED_S and PER_TOKEN_S x (1 + its prior / 288) per prompt token when
    it carries any (288: the mock config's prior scale)."""

    DECODE_S, FIXED_S, PER_TOKEN_S = 0.02, 0.003, 0.0005

    def __init__(self, batch):
        super().__init__(batch, pool_blocks=1024)
        self.free_at = 0.0
        self.lock = threading.Lock()

    def step(self, state, plan):
        state, out = super().step(state, plan)
        prompt = self.steps[-1]["prefill"]
        prior = int(plan.layout.prior.max())
        cost = self.DECODE_S + (self.FIXED_S + prompt * self.PER_TOKEN_S * (1 + prior / 288)) * (
            prompt > 0
        )
        self.steps[-1].update(cost=cost, prior=prior)
        self.free_at = max(self.free_at, time.perf_counter()) + cost
        return state, dataclasses.replace(out, tokens=Pending(out.tokens, self.free_at))


def test_a_long_prompt_beside_streams_keeps_their_steps_within_the_share(make):
    engine = TimedEngine(batch=8)
    assert prior_scale(engine.config) == 288
    scheduler = make(engine, prefill_share=SHARE)
    streams = [scheduler.submit([3 + i], [i], 400, stop_at_eos=False) for i in range(4)]
    for stream in streams:
        next(iter(stream))
    time.sleep(0.3)  # decode-only steps, timed
    first = len(engine.steps)
    prompt = [1 + i % 40 for i in range(600)]
    long = scheduler.submit(prompt, [9], 4, stop_at_eos=False)
    while max(s.get("prior", 0) for s in engine.steps) < 300:
        time.sleep(0.005)
    # A new request meanwhile gets its reply long before the long prompt is done: its
    # prompt goes whole, the long prompt's chunk keeping to half the room.
    short, joined = [7] * 20, len(engine.steps)
    assert run(scheduler.submit(short, [5], 3)) == expected(short, 3, 5)
    assert max(s["prior"] for s in engine.steps) < 450
    assert any(s["segments"] == 2 and s["prefill"] > 20 for s in engine.steps[joined:])
    assert run(long) == expected(prompt, 4, 9)
    chunks = [s for s in engine.steps[first:] if s["prefill"]]
    assert all(s["decode"] >= 4 for s in chunks)  # every chunk rode beside the streams
    steady = chunks[10:]  # once the room has grown from its first 8 units
    alone = [s for s in steady if s in engine.steps[:joined] or s["prior"] > 450]
    # Every step with the long prompt alone within the share, give or take the host's
    # timing noise.
    limit = (1 + SHARE) * engine.DECODE_S
    assert statistics.median(s["cost"] for s in alone) <= 1.1 * limit
    assert max(s["cost"] for s in alone) <= 1.25 * limit
    # Using the share: the room is (0.75 x 20 - 3) ms / 0.5 ms = 24 units, a token over a
    # prior of p positions being 1 + p / 288 of them: 16 tokens over 150, 8 over 550.
    work = [s["prefill"] * (1 + s["prior"] / 288) for s in alone]
    assert 18 <= statistics.median(work) <= 30
    middle = [s["prefill"] for s in alone if 100 <= s["prior"] <= 200]
    late = [s["prefill"] for s in alone if s["prior"] > 500]
    # (16 in a quiet run; a loaded host measures the prompt steps longer than they were
    # simulated, and the room shrinks: 10 seen with the whole suite on two cores.)
    assert 8 <= statistics.median(middle) <= 20
    assert 6 <= statistics.median(late) <= 10 and max(late) < min(middle)
    for stream in streams:
        stream.cancel()
