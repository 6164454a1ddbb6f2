"""What the scheduler is doing, for metrics (handler/metrics.py reads it through LLM.stats)."""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.engine.state import StepOutputs

if TYPE_CHECKING:
    from model.engine.scheduler import Scheduler


@dataclass(frozen=True)
class SchedulerStats:
    """What the scheduler is doing, for metrics: counts now, and totals since start."""

    running: int  # sequences in slots
    waiting: int  # requests queued for slots or blocks
    pool_blocks: int
    used_blocks: int  # held by sequences (cached but idle blocks are free to take)
    prefix_hit_blocks: int  # blocks served from the prefix cache, ever
    prefix_hit_tokens: int  # prompt positions not computed: those blocks', and copied ones
    steps: int  # engine steps delivered, ever
    step_seconds: float  # their time from dispatch to delivered tokens, summed
    draft_tokens: int  # speculative drafts verified, ever
    accepted_tokens: int  # ... and taken
    pending_executables: int  # required steps and upgrades not yet in memory

    @classmethod
    def of(cls, scheduler: "Scheduler", pending_executables: int = 0) -> "SchedulerStats":
        """The scheduler's counts now (read from another thread: approximate)."""
        s, times, drafting = scheduler, scheduler.step_times, scheduler.speculation
        held = s.pool.blocks - s.pool.available
        return cls(
            s.active,
            len(s.waiting),
            s.pool.blocks,
            held,
            s.pool.hits,
            s.pool.hits * s.pool.block_size + s.pool.partial_hits,
            times.steps,
            times.seconds,
            drafting.drafted,
            drafting.accepted,
            pending_executables,
        )


@dataclass
class StepTimes:
    """Engine steps delivered, and their summed time from dispatch to delivered tokens;
    `last`: the latest step's own time, from when the device could start it (its dispatch,
    or the previous step's delivery if later: the device runs steps in order) to its
    delivery."""

    steps: int = 0
    seconds: float = 0.0
    last: float = 0.0
    _delivered: float = 0.0

    def read(self, outputs: StepOutputs, dispatched: float) -> tuple[np.ndarray, np.ndarray]:
        """A step's sampled tokens and logprobs on the host (waiting for the step, sent
        at perf_counter() `dispatched`), timed."""
        tokens, logprobs = np.asarray(outputs.tokens), np.asarray(outputs.logprobs)
        now = time.perf_counter()
        self.steps += 1
        self.seconds += now - dispatched
        self.last = now - max(dispatched, self._delivered)
        self._delivered = now
        return tokens, logprobs
