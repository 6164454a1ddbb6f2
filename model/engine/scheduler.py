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
  wait until the first's prompt is computed, then reuse its blocks the same way
  and compute only the prompt's last, partial block with their own PRNG keys.
- Every step carries a decode row for each decoding sequence and fills the
  prefill region with prompt chunks: a small region (SMALL_CHUNK tokens) while
  anything decodes, so a long prompt never stalls running streams for long, and
  a large one otherwise. Several new prompts share a region; at most one chunk
  per step continues a prompt begun earlier (it reads that prefix from the pool).
  A prompt's last chunk samples its first token in the same step.
- The host does not wait for the step it just dispatched: it reads the tokens of
  the previous step while the device computes the next. A sequence that ended
  in step n has already run in step n+1; that token is dropped, since each step
  remembers which sequence owned which row when it was dispatched. A sequence
  with a grammar (`Constraint`) needs its mask before each step, which depends
  on the previous token: while one runs, each step's tokens are read before the
  next is dispatched.
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
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax
import numpy as np

from model.engine.blocks import BlockPool, Hash, chain_hash, prefix_hashes
from model.engine.variants import LARGE_CHUNK, SMALL_CHUNK, StepShape, pick_shape
from model.nn.sampling import SlotSampling
from model.types import TokenEvent

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; try again later."""


class EngineFailed(RuntimeError):
    """The engine raised; the scheduler no longer serves requests."""


class RequestFailed(RuntimeError):
    """One request failed inside the scheduler (a server fault, not the client's);
    every other request goes on."""


class Constraint(Protocol):
    """A grammar's state for one choice (see model/text/grammar.py)."""

    def fill(self, bitmask: np.ndarray, row: int) -> None: ...
    def accept(self, token: int) -> bool: ...


class Engine(Protocol):
    """What the scheduler needs of an engine (see model/engine/engine.py)."""

    batch: int
    block_size: int
    pool_blocks: int
    table_width: int
    stop_ids: np.ndarray
    shapes: Sequence[StepShape]

    def init_state(self): ...
    def admit(self, state, slot: int, row: SlotSampling): ...
    def step(self, state, plan): ...
    def empty_plan(self, shape: StepShape): ...


class Handle:
    """A submitted request: iterate it for the TokenEvents of all its choices.

    Iteration ends after every choice's last event. `cancel()` stops the
    request, `cancel(index)` one choice (which then sends no more events).
    """

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self._events: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._cancelled_choices: set[int] = set()
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        finished: set[int] = set()
        while any(i not in finished and not self.choice_cancelled(i) for i in range(self.n)):
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                finished.add(event.index)
        if self._error is not None:
            raise self._error

    def fail(self, error: BaseException) -> None:
        """End the request with `error` (raised to its consumer) and free its slots."""
        self._error = error
        self._events.put(error)
        self._cancelled.set()

    def cancel(self, index: int | None = None) -> None:
        """Stop generating (one choice, or all); safe at any time, from any thread."""
        if index is None:
            self._cancelled.set()
        else:
            self._cancelled_choices.add(index)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def choice_cancelled(self, index: int) -> bool:
        return self._cancelled.is_set() or index in self._cancelled_choices


@dataclass(eq=False)
class _Sequence:
    """One choice of a request: its slot, tokens and blocks, from admission to its end.

    tokens: the prompt and the tokens delivered so far; length: the same plus
    those sampled but not delivered yet. computed: positions whose keys and
    values are in the pool (or on their way, in a dispatched step). It prefills
    until `target` (the prompt, or after a preemption all but its newest token,
    which the device still holds as the slot's input), then decodes.
    """

    index: int
    handle: Handle
    row: SlotSampling
    max_new: int
    stop_at_eos: bool
    tokens: list[int]
    constraint: Constraint | None = None
    top_logprobs: int = 0
    first: "_Sequence | None" = None  # the 1st choice, whose prompt this one waits for
    slot: int = -1
    order: int = 0  # admission order (the newest is preempted first)
    length: int = 0
    computed: int = 0
    target: int = 0
    sample_at_target: bool = True
    blocks: list[int] = field(default_factory=list)
    hashes: list[Hash] = field(default_factory=list)  # of its leading registered blocks
    generated: int = 0
    finished: bool = False
    looked_up: bool = False

    @property
    def cancelled(self) -> bool:
        return self.handle.choice_cancelled(self.index)

    @property
    def decoding(self) -> bool:
        return self.looked_up and self.computed >= self.target

    def emit(self, token: int, logprob: float, reason, top) -> None:
        self.handle._events.put(TokenEvent(token, logprob, reason, self.index, top))


@dataclass
class _Group:
    """A submitted request: its choices, admitted together."""

    choices: list[_Sequence]

    @property
    def handle(self) -> Handle:
        return self.choices[0].handle


@dataclass
class _Step:
    """A dispatched step: its outputs (device arrays, read on delivery) and who samples."""

    outputs: object
    samplers: list[tuple[int, _Sequence]]  # (row, sequence) for every sampled row


class _Sync(Exception):
    """Planning needs the step in flight delivered first (to preempt a sequence)."""


class Scheduler:
    """Owns an engine, its state and its pool's blocks; see the module docstring."""

    def __init__(self, engine: Engine, *, max_queue: int = 256):
        self.engine = engine
        self.pool = BlockPool(engine.pool_blocks, engine.block_size)
        self._waiting: queue.Queue[_Group] = queue.Queue(maxsize=max_queue)
        self._next: _Group | None = None  # taken from the queue, waiting for slots or blocks
        self._slots: list[_Sequence | None] = [None] * engine.batch
        self._state = None  # the engine's state; only the scheduler thread touches it
        self._stop_ids = frozenset(int(t) for t in engine.stop_ids)
        self._admitted = 0
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
    ) -> Handle:
        """Queue a request for len(rows) choices of up to `max_new` tokens each.

        rows[i]: choice i's [1]-shaped sampling settings (Engine.sampling: its
        own key); constraints[i] its grammar, if any. Stop tokens end a choice if
        `stop_at_eos`. top_logprobs: alternatives to report per token. Raises
        QueueFull at the queue's bound, EngineFailed after an engine failure,
        ValueError if the prompt cannot fit the pool.
        """
        if self._error is not None:
            raise EngineFailed(f"the engine failed: {self._error}")
        n = len(rows)  # at most the decode slots (model/limits.py checks requests)
        need = -(-(len(prompt_ids) + 1) // self.engine.block_size)
        if need > self.engine.pool_blocks:
            raise ValueError(
                f"a prompt of {len(prompt_ids)} tokens does not fit the KV pool of "
                f"{self.engine.pool_blocks * self.engine.block_size} positions"
            )
        constraints = constraints or [None] * n
        handle = Handle(n)
        choices = [
            _Sequence(i, handle, rows[i], max_new, stop_at_eos, list(prompt_ids), constraints[i])
            for i in range(n)
        ]
        for choice in choices:
            choice.top_logprobs = top_logprobs
            choice.first = choices[0] if choice.index else None
        try:
            self._waiting.put_nowait(_Group(choices))
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None
        if self._error is not None:  # failed while we queued: nobody will serve it
            self._fail_all(self._error)
        return handle

    @property
    def max_queue(self) -> int:
        return self._waiting.maxsize

    @property
    def active(self) -> int:
        """Slots holding a sequence right now."""
        return sum(s is not None for s in self._slots)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return self.active == 0 and self._next is None and self._waiting.empty()

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
            self._drop_cancelled()
            self._admit(block=in_flight is None and self.active == 0)
            if in_flight is not None and self._constrained():
                # The next masks depend on the tokens in flight: read them first.
                self._deliver(in_flight)
                in_flight = None
            try:
                step = self._dispatch(in_flight is not None)
            except _Sync:
                self._deliver(in_flight)
                in_flight = None
                continue
            if in_flight is not None:
                self._deliver(in_flight)
            elif step is None:
                self._stopping.wait(0.001)  # nothing to run now: waiting on blocks or choices
            in_flight = step

    def _live(self) -> list[_Sequence]:
        return [s for s in self._slots if s is not None]

    def _constrained(self) -> bool:
        return any(s.constraint is not None for s in self._live())

    def _drop_cancelled(self) -> None:
        for seq in self._live():
            if seq.cancelled:
                self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        """Free the sequence's slot and blocks (a step in flight may still write them:
        the device runs steps in order, so a later owner's writes come after)."""
        seq.finished = True
        self.pool.release(seq.blocks)
        seq.blocks = []
        self._slots[seq.slot] = None

    # ---- admission ------------------------------------------------------------------

    def _admit(self, *, block: bool) -> None:
        """Admit waiting requests while slots and blocks allow; the first in line waits
        until all its choices fit."""
        while True:
            if self._next is None:
                try:
                    timeout = 0.1 if block else None
                    self._next = self._waiting.get(block=block, timeout=timeout)
                except queue.Empty:
                    return
            block = False
            group = self._next
            if group.handle.cancelled:
                self._next = None
                continue
            free = [i for i, s in enumerate(self._slots) if s is None]
            if len(free) < len(group.choices) or not self._room_for(group.choices[0]):
                return
            self._next = None
            try:
                for seq, slot in zip(group.choices, free, strict=False):
                    self._state = self.engine.admit(self._state, slot, seq.row)
                    seq.slot, seq.order = slot, self._admitted
                    seq.length = seq.target = len(seq.tokens)
                    self._admitted += 1
                    self._slots[slot] = seq
            except Exception as exc:
                self._fail_request(group.handle, exc)

    def _room_for(self, seq: _Sequence) -> bool:
        """Whether the pool can take this prompt besides what admitted sequences still need
        (the rest of their prompts, and a block each for decoding)."""
        bs = self.engine.block_size
        promised = sum(
            max(0, -(-(max(s.target, s.length) + 1) // bs) - len(s.blocks)) for s in self._live()
        )
        return -(-(len(seq.tokens) + 1) // bs) <= self.pool.available - promised

    def _look_up(self, seq: _Sequence) -> None:
        """Reuse the cached blocks of the sequence's longest cached prefix (at most all but
        the last token: its output is needed to sample the next)."""
        bs = self.engine.block_size
        count = (seq.target - 1) // bs if seq.sample_at_target else seq.target // bs
        hashes = prefix_hashes(seq.tokens, bs, count)
        seq.blocks = self.pool.lookup(hashes)
        seq.hashes = hashes[: len(seq.blocks)]
        seq.computed = len(seq.blocks) * bs
        seq.looked_up = True

    # ---- planning and dispatch ------------------------------------------------------

    def _dispatch(self, in_flight: bool) -> _Step | None:
        """Plan a step, dispatch it, and update the host's view as if it ran."""
        decode = [s for s in self._live() if s.decoding]
        for seq in decode:
            if seq.decoding:  # not preempted for an earlier one
                self._ensure_blocks(seq, seq.length, in_flight)
        decode = [s for s in decode if s.decoding]  # one preempted meanwhile prefills again
        budget = SMALL_CHUNK if decode else LARGE_CHUNK
        segments = self._segments(budget)
        if not decode and not segments:
            return None
        samplers = [s.slot for s in decode] + [
            s.slot for s, n in segments if s.computed + n == s.target and s.sample_at_target
        ]
        shape = pick_shape(
            self.engine.shapes, max(samplers, default=0) + 1, sum(n for _, n in segments)
        )
        plan, samplers = self._build(shape, decode, segments)
        self._state, outputs = self.engine.step(self._state, plan)
        for seq in decode:
            seq.computed = seq.length
            seq.length += 1
        for seq, n in segments:
            seq.computed += n
            if seq.computed == seq.target and seq.sample_at_target:
                seq.length += 1
        for seq in [*decode, *(s for s, _ in segments)]:
            if not seq.finished:  # a request that failed while planning is gone
                self._register(seq)
        return _Step(outputs, samplers)

    def _segments(self, budget: int) -> list[tuple[_Sequence, int]]:
        """Prompt chunks for the prefill region: the oldest begun prompt first (the only
        one that reads earlier positions from the pool), then new prompts."""
        pending = [s for s in self._live() if not s.decoding and self._ready(s)]
        pending.sort(key=lambda s: (s.computed == 0 if s.looked_up else True, s.order))
        segments: list[tuple[_Sequence, int]] = []
        for seq in pending:
            if budget <= 0:
                break
            if not seq.looked_up:
                self._look_up(seq)
            if segments and seq.computed > 0:
                continue  # only the first segment may read earlier positions
            n = min(seq.target - seq.computed, budget)
            if n <= 0:
                continue
            if not self._ensure_blocks(seq, seq.computed + n, in_flight=False, preempt=False):
                break  # the pool is full: the rest waits
            segments.append((seq, n))
            budget -= n
        return segments

    def _ready(self, seq: _Sequence) -> bool:
        """Whether a choice may prefill: the 1st choice's prompt must be in the pool."""
        first = seq.first
        return first is None or first.finished or first.computed >= first.target

    def _ensure_blocks(
        self, seq: _Sequence, positions: int, in_flight: bool, preempt: bool = True
    ) -> bool:
        """Blocks for the sequence's first `positions` positions; when the pool is out,
        preempt the newest other sequence (after delivering the step in flight)."""
        bs = self.engine.block_size
        while len(seq.blocks) * bs < positions:
            block = self.pool.allocate()
            if block is not None:
                seq.blocks.append(block)
                continue
            if not preempt:
                return False
            if in_flight:
                raise _Sync
            self._preempt(seq)
        return True

    def _preempt(self, needy: _Sequence) -> None:
        """Free the blocks of the newest running sequence other than `needy` (see the
        module docstring: it resumes with the same tokens)."""
        victims = [s for s in self._live() if s is not needy and s.blocks]
        if not victims:
            raise RuntimeError("the KV pool cannot hold one sequence's context")
        victim = max(victims, key=lambda s: s.order)
        log.info("KV pool full: preempting a sequence of %d tokens", victim.length)
        self.pool.release(victim.blocks)
        victim.blocks, victim.hashes = [], []
        victim.computed = 0
        victim.looked_up = False
        if victim.length > len(victim.tokens):  # a first token not delivered: impossible here
            raise RuntimeError("preempting a sequence with a token in flight")
        if victim.generated:  # its newest token is the slot's input; prefill the rest
            victim.target, victim.sample_at_target = len(victim.tokens) - 1, False

    def _register(self, seq: _Sequence) -> None:
        """Cache every full block whose tokens are known and whose keys are computed."""
        bs = self.engine.block_size
        while (len(seq.hashes) + 1) * bs <= min(seq.computed, len(seq.tokens)):
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            seq.hashes.append(chain_hash(parent, seq.tokens[i * bs : (i + 1) * bs]))
            self.pool.register(seq.blocks[i], seq.hashes[-1])

    def _build(self, shape: StepShape, decode, segments):
        """The StepPlan of a step, and its sampled (row, sequence) pairs."""
        plan = self.engine.empty_plan(shape)
        layout = plan.layout
        bs = self.engine.block_size
        samplers = []
        for seq in decode:
            r, p = seq.slot, seq.length - 1
            layout.positions[r] = layout.context[r] = p
            layout.block_tables[r, : len(seq.blocks)] = seq.blocks
            layout.write[r] = seq.blocks[p // bs] * bs + p % bs
            plan.decode[r] = plan.sample[r] = True
            plan.sample_from[r] = r
            samplers.append((r, seq))
        start = shape.rows
        for g, (seq, n) in enumerate(segments):
            c = seq.computed
            where = slice(start, start + n)
            positions = np.arange(c, c + n)
            plan.tokens[where] = seq.tokens[c : c + n]
            layout.positions[where] = positions
            layout.segments[start - shape.rows : start - shape.rows + n] = g
            blocks = np.asarray(seq.blocks)
            layout.write[where] = blocks[positions // bs] * bs + positions % bs
            if g == 0:
                layout = layout.replace(prior=np.int32(c))
                layout.prior_blocks[: len(seq.blocks)] = seq.blocks
            if c + n == seq.target and seq.sample_at_target:
                plan.sample[seq.slot] = True
                plan.sample_from[seq.slot] = start + n - 1
                samplers.append((seq.slot, seq))
            start += n
        for row, seq in samplers:
            if seq.constraint is not None:
                try:
                    seq.constraint.fill(plan.allowed, row)
                except Exception as exc:
                    self._fail_request(seq.handle, exc)
        return plan.replace(layout=layout), samplers

    # ---- delivery -------------------------------------------------------------------

    def _deliver(self, step: _Step) -> None:
        out = step.outputs
        tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
        wants_top = any(seq.top_logprobs for _, seq in step.samplers)
        top_ids = np.asarray(out.top_ids) if wants_top else None
        top_logprobs = np.asarray(out.top_logprobs) if wants_top else None
        for row, seq in step.samplers:
            if seq.finished:
                continue  # freed, cancelled or finished after this step was sent
            try:
                token = int(tokens[row])
                seq.tokens.append(token)
                seq.generated += 1
                reason = None
                if seq.stop_at_eos and token in self._stop_ids:
                    reason = "stop"
                elif seq.generated >= seq.max_new:
                    reason = "length"
                elif seq.constraint is not None and not seq.constraint.accept(token):
                    log.warning("a constrained choice sampled token %d outside its grammar", token)
                top = ()
                if seq.top_logprobs:
                    top = _top(top_ids[row], top_logprobs[row], seq.top_logprobs)
            except Exception as exc:
                self._fail_request(seq.handle, exc)
                continue
            seq.emit(token, float(logprobs[row]), reason, top)
            if reason is not None:
                self._finish(seq)
            else:
                self._register(seq)

    # ---- failures -------------------------------------------------------------------

    def _fail_request(self, handle: Handle, exc: Exception) -> None:
        """Fail one request and free its slots, unless `exc` lost the shared state (an
        admission that consumed it): that is the engine's failure, raised on."""
        if not _intact(self._state):
            handle.fail(EngineFailed(f"the engine failed: {exc}"))  # in no slot nor queue yet
            raise exc
        log.error("a request failed; the others go on", exc_info=exc)
        handle.fail(RequestFailed(f"{type(exc).__name__}: {exc}"))
        for seq in self._live():
            if seq.handle is handle:
                self._finish(seq)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineFailed(f"the engine failed: {exc}")
        for seq in self._live():
            seq.handle.fail(error)
            self._slots[seq.slot] = None
        if self._next is not None:
            self._next.handle.fail(error)
            self._next = None
        while True:
            try:
                self._waiting.get_nowait().handle.fail(error)
            except queue.Empty:
                return


def _intact(state) -> bool:
    """Whether no buffer of the state was consumed (donated to a call that failed)."""
    leaves = jax.tree_util.tree_leaves(state)
    return not any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves)


def _top(ids, logprobs, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (token id, logprob) pairs from the step's top arrays."""
    if not k:
        return ()
    pairs = zip(np.asarray(ids)[:k], np.asarray(logprobs)[:k], strict=True)
    return tuple((int(i), float(lp)) for i, lp in pairs)
