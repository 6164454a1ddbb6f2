"""Continuous batching with chunked prefill: one thread owns the devices and plans every step.

The engine (model/engine/engine.py) runs a step of R decode rows and a prefill
region of P prompt tokens, over a KV pool of fixed-size blocks. This thread
decides what goes in each step:

- `submit` puts a request on a bounded waiting queue and returns a `Handle` at
  once; a full queue raises `QueueFull` (the server answers 503). A request may
  ask for n choices: each is a sequence with a slot of its own.
- Admission: a waiting request takes free slots (all its choices at once) when
  the pool can hold its prompt besides what running sequences need. Its prompt's
  longest cached prefix is reused at once (automatic prefix caching,
  model/engine/blocks.py), so only the rest is prefilled. The 2nd…nth choices
  wait until the first's prompt is computed, then reuse its blocks (the last one's
  start copied) and compute only its last token, with their own PRNG keys.
- Every step carries a decode row for each decoding sequence and fills the
  prefill region with prompt chunks: a small region (SMALL_CHUNK tokens) while
  few prompt tokens wait (SMALL_PREFILL_MAX), or while streams decode and fewer
  than BURST_PROMPTS prompts wait; a large one otherwise (nothing decodes, or a
  burst of new requests, which then get their first tokens in a step or two).
  Beside decoding streams, prompt chunks are sized by measured step costs
  (model/engine/pacing.py), so they lengthen the streams' steps by a bounded share.
  Several prompts share a region: new ones, and chunks that continue from
  positions in the pool (a prompt begun earlier, the ones with the least left
  first, or a cached prefix), up to PRIOR_GROUPS distinct priors a step. Prompts
  whose cached prefix is the same blocks share one (a burst of requests with one
  system prompt is prefilled together, each reading that prefix once), and a
  burst of chats with histories of their own is prefilled together too. A
  prompt's last chunk samples its first token in the same step.
- The host does not wait for the step it just dispatched: it reads the tokens of the
  previous step while the device computes the next. A sequence that ended in step n
  has already run in step n+1; that token is dropped, since each step remembers which
  sequence owned which row when it was dispatched. Each step's tokens are read before
  the next is planned while a sequence has a grammar (`Constraint`: its mask needs the
  previous token) or drafts, where a budget ends in it (the slot takes a request in
  the next step), and while a slot is free if steps are long (`Pacing.long_steps`).
- Pool exhaustion: new requests wait in the queue. If a decoding sequence needs
  a block and none is free, the most recently admitted running sequence is
  preempted: it keeps its slot (so its sampling state, PRNG key included) and
  its tokens, gives back its blocks, and is later prefilled again from its
  tokens (mostly from the prefix cache, if its blocks were not reused
  meanwhile). Its stream continues with exactly the tokens it would have had.
- A consumer that stops listening cancels its `Handle`; the sequence's slot
  and blocks are freed before the next step.
- A failure on one request's path (its admission, its grammar's mask or
  bookkeeping) fails that request alone with `RequestFailed`. Only a fault that
  loses the shared state (a failed step, or an admission that consumed the
  state) fails the engine: then every waiting and running request receives
  `EngineFailed` at once, and `submit` raises it from then on.

The scheduler knows nothing of text: detokenizing and stop strings happen in
the consumer's thread (see `LLM.stream`), which cancels when it sees a stop.
"""

import atexit
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import numpy as np

from model.engine.blocks import BlockPool
from model.engine.ledger import Ledger, Sampler, build_plan
from model.engine.pacing import Pacing
from model.engine.requests import (
    Constraint,
    EngineFailed,
    Group,
    Handle,
    QueueFull,
    RequestFailed,
    Seq,
    WaitingLine,
)
from model.engine.speculative import Speculation, taken
from model.engine.state import StepOutputs, StepPlan
from model.engine.stats import StepTimes
from model.engine.variants import StepShape, pick_shape
from model.limits import DEFAULT_PREFILL_SHARE
from model.nn.config import ModelConfig
from model.nn.sampling import SlotSampling

log = logging.getLogger(__name__)

__all__ = ["EngineFailed", "Handle", "QueueFull", "RequestFailed", "Scheduler"]


class Engine(Protocol):
    """What the scheduler needs of an engine (see model/engine/engine.py)."""

    config: ModelConfig
    batch: int
    block_size: int
    pool_blocks: int
    table_width: int
    stop_ids: np.ndarray

    @property
    def shapes(self) -> Sequence[StepShape]: ...

    def runnable(self) -> Sequence[StepShape]: ...

    def init_state(self): ...
    def admit(self, state, slot: int, row: SlotSampling): ...
    def step(self, state, plan): ...
    def empty_plan(self, shape: StepShape): ...


@dataclass
class _Step:
    """A dispatched step: its outputs (device arrays, read on delivery), who samples,
    and which embeddings' chunks it pools."""

    outputs: StepOutputs
    samplers: list[Sampler]  # (row, sequence, drafts) for every sampling sequence
    poolers: list[tuple[int, int, Seq]]  # (segment, tokens, embedding) per pooled chunk
    shape: StepShape
    dispatched: float  # perf_counter() when it was sent
    decoding: bool  # whether it has decode rows
    units: float  # its prompt work (Pacing.units)


class _Sync(Exception):
    """Planning needs the step in flight delivered first (to preempt a sequence)."""


class Scheduler:
    """Owns an engine, its state and its pool's blocks; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        max_queue: int = 256,
        speculation: Speculation | None = None,
        prefill_share: float = DEFAULT_PREFILL_SHARE,
    ):
        self.engine = engine
        self.speculation = speculation or Speculation("off")
        self.pool = BlockPool(engine.pool_blocks, engine.block_size)
        largest = max(s.prefill for s in engine.shapes)
        self.ledger = Ledger(self.pool, Pacing(engine.config, prefill_share), largest)
        self.waiting = WaitingLine(max_queue)
        self._slots: list[Seq | None] = [None] * engine.batch
        self._state = None  # the engine's state; only the scheduler thread touches it
        self._stop_ids = frozenset(int(t) for t in engine.stop_ids)
        self._admitted = 0
        self.step_times = StepTimes()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        # A daemon thread still inside XLA when the interpreter finalises aborts
        # the process ("terminate called ..."); stop it cleanly at exit instead.
        atexit.register(self.stop)

    # ---- any thread -----------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        rows: Sequence[SlotSampling],
        max_new: int,
        stop_at_eos: bool = True,
        *,
        constraints: Sequence[Constraint | None] | None = None,
        top_logprobs: int = 0,
        embed: bool = False,
    ) -> Handle:
        """Queue a request for len(rows) choices of up to `max_new` tokens each.

        rows[i]: choice i's [1]-shaped sampling settings (Engine.sampling: its
        own key); constraints[i] its grammar, if any. Stop tokens end a choice if
        `stop_at_eos`. top_logprobs: alternatives to report per token. embed: instead,
        prefill the prompt (one row) and send the mean of its final hidden states as a
        Pooled. Raises QueueFull at the queue's bound, EngineFailed after an engine
        failure, ValueError if the prompt cannot fit the pool.
        """
        if self._error is not None:
            raise EngineFailed(f"the engine failed: {self._error}")
        n = len(rows)  # at most the decode slots (model/limits.py checks requests)
        self.ledger.check_fits(len(prompt_ids))
        group = Group.create(
            prompt_ids, rows, max_new, stop_at_eos, constraints or [None] * n, top_logprobs, embed
        )
        self.waiting.put(group)
        if self._error is not None:  # failed while we queued: nobody will serve it
            self._fail_all(self._error)
        return group.handle

    @property
    def active(self) -> int:
        """Slots holding a sequence right now."""
        return sum(s is not None for s in self._slots)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return self.active == 0 and self.waiting.empty()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def stop(self) -> None:
        """Finish the step in flight and end the scheduler thread."""
        self._stopping.set()
        self._thread.join(timeout=10)

    # ---- the scheduler thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the clients
            log.exception("engine failed; failing every request")
            self._error = exc
            self._fail_all(exc)

    def _loop(self) -> None:
        self._state = self.engine.init_state()
        in_flight: _Step | None = None
        while not self._stopping.is_set():
            for seq in (s for s in self._live() if s.cancelled):
                self._finish(seq)
            self._admit(block=in_flight is None and self.active == 0)
            # Newest tokens first: a grammar's mask, a draft; a slot free or freed in flight.
            live = self._live()
            first = any(s.constraint is not None for s in live) or self.speculation.wants(live)
            free = len(live) < len(self._slots) and self.ledger.pacing.long_steps
            if in_flight is not None and (first or free or any(s.ends_in_flight for s in live)):
                self._deliver(in_flight)
                in_flight = None
                if not first:
                    continue  # to admit to the slots it freed
            try:
                step = self._dispatch(in_flight is not None)
            except _Sync:
                assert in_flight is not None  # _Sync is only raised with a step in flight
                self._deliver(in_flight)
                in_flight = None
                continue
            if in_flight is not None:
                self._deliver(in_flight)
            elif step is None:
                self._stopping.wait(0.001)  # nothing to run now: waiting on blocks or choices
            in_flight = step

    def _live(self) -> list[Seq]:
        return [s for s in self._slots if s is not None]

    def _finish(self, seq: Seq) -> None:
        """Free the sequence's slot and blocks (a step in flight may still write them:
        the device runs steps in order, so a later owner's writes come after)."""
        seq.finished = True
        self.ledger.release(seq)
        self._slots[seq.slot] = None

    # ---- admission ------------------------------------------------------------------

    def _admit(self, *, block: bool) -> None:
        """Admit waiting requests while slots and blocks allow; the first in line waits
        until all its choices fit."""
        while (group := self.waiting.first(block)) is not None:
            block = False
            free = [i for i, s in enumerate(self._slots) if s is None]
            fits = self.ledger.room_for(group.choices[0], self._live())
            if len(free) < len(group.choices) or not fits:
                return
            self.waiting.pop()
            try:
                for seq, slot in zip(group.choices, free, strict=False):
                    self._state = self.engine.admit(self._state, slot, seq.row)
                    seq.slot, seq.order = slot, self._admitted
                    seq.may_draft = self.speculation.allows(seq)
                    seq.length = seq.target = len(seq.tokens)
                    self._admitted += 1
                    self._slots[slot] = seq
            except Exception as exc:
                self._fail_request(group.handle, exc)

    # ---- planning and dispatch ------------------------------------------------------

    def _dispatch(self, in_flight: bool) -> _Step | None:
        """Plan a step, dispatch it, and update the host's view as if it ran."""
        decode = [s for s in self._live() if s.decoding]
        for seq in decode:
            if seq.decoding:  # not preempted for an earlier one
                self._ensure_blocks(seq, seq.length, in_flight)
        decode = [s for s in decode if s.decoding]  # one preempted meanwhile prefills again
        budget = self.ledger.prefill_budget(self._live(), bool(decode))
        segments = self.ledger.prompt_chunks(self._live(), budget, bool(decode))
        if not decode and not segments:
            return None
        rows = len(decode) + sum(s.samples_after(n) for s, n in segments)
        prefill = sum(n for _, n in segments)
        drafts = {} if in_flight else self.speculation.drafts(decode, rows, prefill, self)
        rows += sum(map(len, drafts.values()))
        shape = pick_shape(self.engine.runnable(), max(rows, 1), prefill)
        plan, bs, copies = self.engine.empty_plan(shape), self.engine.block_size, self.ledger.copies
        plan, samplers = build_plan(plan, decode, segments, bs, drafts, copies)
        fill_masks(plan, samplers, self._fail_request)
        units = sum(self.ledger.pacing.units(s.computed, n) for s, n in segments)
        self._state, outputs = self.engine.step(self._state, plan)
        for seq, n in [*((s, 1) for s in decode), *segments]:
            seq.ran(n)
            if not seq.finished:  # a request that failed while planning is gone
                self.ledger.register(seq)
        poolers = [(g, n, seq) for g, (seq, n) in enumerate(segments) if seq.embed]
        return _Step(outputs, samplers, poolers, shape, time.perf_counter(), bool(decode), units)

    def _ensure_blocks(self, seq: Seq, positions: int, in_flight: bool) -> None:
        """Blocks for the sequence's first `positions` positions; when the pool is out,
        preempt the newest other sequence (after delivering the step in flight)."""
        while not self.ledger.grow(seq, positions):
            if in_flight:
                raise _Sync
            self.ledger.preempt(seq, self._live())

    # ---- delivery -------------------------------------------------------------------

    def _deliver(self, step: _Step) -> None:
        out = step.outputs
        tokens, logprobs = self.step_times.read(out, step.dispatched)
        self.speculation.measured(step.shape, self.step_times.last)
        self.ledger.pacing.measured(step.shape, step.decoding, step.units, self.step_times.last)
        wants_top = any(seq.top_logprobs for _, seq, _ in step.samplers)
        top_ids = np.asarray(out.top_ids) if wants_top else None
        top_logprobs = np.asarray(out.top_logprobs) if wants_top else None
        for first, seq, drafts in step.samplers:
            if seq.finished:
                continue  # freed, cancelled or finished after this step was sent
            accepted = taken(tokens[first : first + len(drafts)], drafts)
            if drafts:
                self.speculation.verified(seq, len(drafts), accepted)
            rows = range(first, first + accepted + 1)  # the tokens it takes
            try:
                tops = [_top(top_ids, top_logprobs, row, seq.top_logprobs) for row in rows]
                # A sequence's slot is free before its caller hears the end.
                seq.deliver(
                    tokens[rows], logprobs[rows], tops, accepted, self._stop_ids, self._finish
                )
            except Exception as exc:
                self._fail_request(seq.handle, exc)
                continue
            if not seq.finished:
                self.ledger.register(seq)
        pooled = np.asarray(out.pooled) if step.poolers else np.empty(0)
        for g, n, seq in step.poolers:
            if not seq.finished and seq.pool(pooled[g], n):
                self._finish(seq)

    # ---- failures -------------------------------------------------------------------

    def _fail_request(self, handle: Handle, exc: Exception) -> None:
        """Fail one request and free its slots, unless `exc` lost the shared state (an
        admission that consumed it): that is the engine's failure, raised on."""
        if not _intact(self._state):
            handle.fail(EngineFailed(f"the engine failed: {exc}"))  # in no slot nor queue yet
            raise exc
        log.error("a request failed; the others go on", exc_info=exc)
        for seq in self._live():
            if seq.handle is handle:
                self._finish(seq)
        handle.fail(RequestFailed(f"{type(exc).__name__}: {exc}"))

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineFailed(f"the engine failed: {exc}")
        for seq in self._live():
            seq.handle.fail(error)
            self._slots[seq.slot] = None
        self.waiting.fail_all(error)


def fill_masks(plan: StepPlan, samplers: list[Sampler], fail) -> None:
    """Each constrained sampler's grammar mask; a failing grammar fails its request
    (`fail(handle, exc)`)."""
    for row, seq, _ in samplers:
        if seq.constraint is not None:
            try:
                seq.constraint.fill(np.asarray(plan.allowed), row)  # in place
            except Exception as exc:
                fail(seq.handle, exc)


def _intact(state) -> bool:
    """Whether no buffer of the state was consumed (donated to a call that failed)."""
    leaves = jax.tree_util.tree_leaves(state)
    return not any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves)


def _top(ids, logprobs, row: int, k: int) -> tuple[tuple[int, float], ...]:
    """Row `row`'s k most likely (token id, logprob) pairs from the step's top arrays."""
    if not k:
        return ()
    pairs = zip(ids[row][:k], logprobs[row][:k], strict=True)
    return tuple((int(i), float(lp)) for i, lp in pairs)
