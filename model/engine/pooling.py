"""Embeddings through the scheduler: prompts prefilled only, their hidden states pooled.

An embedding input is a prefill-only request (`Scheduler.submit(..., embed=True)`):
it takes a slot and KV blocks like a prompt, is prefilled in chunks beside running
generations, and the steps return each chunk's summed final hidden states, which
the sequence adds up (model/engine/requests.py's `Seq.pool`). No executable of its
own and no second copy of the weights.
"""

from collections import deque
from collections.abc import Sequence

import numpy as np

from model.engine.requests import Handle
from model.engine.scheduler import Scheduler
from model.types import Pooled, SamplingParams


def mean_hidden_states(
    scheduler: Scheduler, engine, prompts: Sequence[Sequence[int]], window: int
) -> np.ndarray:
    """Each prompt's mean final hidden state [N, D] float32, at most `window` prompts in
    the scheduler at once (so a large batch neither fills the queue nor takes every
    slot). `engine` gives the unused sampling row each sequence's slot needs. Raises
    what `submit` raises, or RequestFailed; the prompts not done are then cancelled."""
    row = engine.sampling(SamplingParams(), 0)
    vectors = np.zeros((len(prompts), engine.config.dim), np.float32)
    running: deque[tuple[int, Handle[Pooled]]] = deque()

    def collect() -> None:
        i, handle = running.popleft()
        (pooled,) = handle
        vectors[i] = pooled.vector

    try:
        for i, prompt in enumerate(prompts):
            running.append((i, scheduler.submit(prompt, [row], 0, embed=True)))
            if len(running) >= window:
                collect()
        while running:
            collect()
    finally:
        for _, handle in running:  # after a failure: free their slots
            handle.cancel()
    return vectors
