"""What the scheduler is doing, for metrics (handler/metrics.py reads it through LLM.stats)."""

import time
from dataclasses import dataclass

import numpy as np

from model.engine.state import StepOutputs


@dataclass(frozen=True)
class SchedulerStats:
    """What the scheduler is doing, for metrics: counts now, and totals since start."""

    running: int  # sequences in slots
    waiting: int  # requests queued for slots or blocks
    pool_blocks: int
    used_blocks: int  # held by sequences (cached but idle blocks are free to take)
    prefix_hit_blocks: int  # blocks served from the prefix cache, ever
    steps: int  # engine steps delivered, ever
    step_seconds: float  # their time from dispatch to delivered tokens, summed


@dataclass
class StepTimes:
    """Engine steps delivered, and their summed time from dispatch to delivered tokens."""

    steps: int = 0
    seconds: float = 0.0

    def read(self, outputs: StepOutputs, dispatched: float) -> tuple[np.ndarray, np.ndarray]:
        """A step's sampled tokens and logprobs on the host (waiting for the step, sent
        at perf_counter() `dispatched`), timed."""
        tokens, logprobs = np.asarray(outputs.tokens), np.asarray(outputs.logprobs)
        self.steps += 1
        self.seconds += time.perf_counter() - dispatched
        return tokens, logprobs
