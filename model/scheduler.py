"""Continuous batching: one thread owns the devices and keeps every slot busy.

The engine decodes B slots at once with a single compiled step. Requests do
not arrive in batches, so the scheduler fills slots as they free up:

- `submit` puts a request on a bounded waiting queue and returns a `Handle`
  at once; a full queue raises `QueueFull` (the server answers 503). A
  request may ask for n choices: they share one prefill and take n slots.
- The scheduler thread loops. Each turn it first drops cancelled requests
  (their slots free at once), then admits waiting requests into free slots:
  each is prefilled on its own (its first token comes from the prefill, so
  time to first token does not wait for the batch) and its KV cache inserted
  into the slot; further choices of the request are inserted "restarted", so
  the decode step samples their first tokens with their own keys. Then it
  runs one `generate` step for all slots.
- The host never waits for the step it just dispatched: it reads the tokens
  of the previous step while the device computes the next one. A slot that
  finished in step n has therefore already run in step n+1; that token is
  dropped because each dispatched step remembers which request owned which
  slot when it was sent.
- Per-slot settings (temperature, top-p, top-k, PRNG key, remaining token
  budget) live on the device in the decode state, so a mixed batch is one
  compiled step. The step reports which slots are done (stop token or budget);
  the host delivers tokens and frees those slots.
- A request with a grammar (`Constraint`) needs its token mask before each
  step, which depends on the token the previous step sampled. While such a
  request runs, the scheduler reads each step's tokens before dispatching
  the next (it stops overlapping host and device work); the others in the
  batch are otherwise unaffected.
- A consumer that stops listening calls `Handle.cancel()` (or cancels one
  choice); the slot is freed before the next step is dispatched.
- A failure on one request's path (its prefill, its insert, its grammar's
  mask or bookkeeping) fails that request alone with `RequestFailed`; the
  others keep decoding. Only a fault that loses the shared decode state (a
  failed decode step, or an insert that consumed the state) fails the
  engine: then every waiting and running request receives `EngineFailed` at
  once, and `submit` raises it from then on.

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

from model.sampling import SlotSampling
from model.sampling_params import FinishReason

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; try again later."""


class EngineFailed(RuntimeError):
    """The engine raised; the scheduler no longer serves requests."""


class RequestFailed(RuntimeError):
    """One request failed inside the scheduler (a server fault, not the client's);
    every other request goes on."""


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of choice `index`; finish_reason is set on its last token.

    top: the most likely tokens as (id, logprob) pairs, when the request asked.
    """

    token: int
    logprob: float
    finish_reason: FinishReason | None = None
    index: int = 0
    top: tuple[tuple[int, float], ...] = ()


class Constraint(Protocol):
    """A grammar's state for one choice (see model/grammar.py)."""

    def fill(self, bitmask: np.ndarray, row: int) -> None: ...
    def accept(self, token: int) -> bool: ...


class Engine(Protocol):
    """What the scheduler needs of an engine (see model/engine.py)."""

    batch: int
    stop_ids: np.ndarray

    def unconstrained(self, rows: int) -> np.ndarray: ...
    def init_state(self): ...
    def prefill(self, tokens: Sequence[int], sampling: SlotSampling, allowed=None): ...
    def insert(self, prefix, state, slot, remaining, stop_at_eos=True, restart_seed=None): ...
    def generate(self, state, max_position: int, rows: int, allowed=None): ...


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


@dataclass
class _Request:
    """One choice of a submitted request; it owns a slot while it decodes."""

    index: int
    handle: Handle
    max_new: int
    stop_at_eos: bool
    seed: int  # the 2nd…nth choices draw their first token in the step with this seed
    constraint: Constraint | None = None
    top_logprobs: int = 0
    position: int = 0  # where the slot's next token is written
    finished: bool = False

    def emit(
        self,
        token: int,
        logprob: float,
        reason: FinishReason | None = None,
        top: tuple[tuple[int, float], ...] = (),
    ) -> None:
        self.handle._events.put(TokenEvent(token, logprob, reason, self.index, top))
        self.finished = reason is not None

    @property
    def cancelled(self) -> bool:
        return self.handle.choice_cancelled(self.index)


@dataclass
class _Group:
    """A submitted request: one prompt, one prefill, its choices."""

    prompt_ids: list[int]
    sampling: SlotSampling  # [1]-shaped settings for the prefill
    choices: list[_Request]

    @property
    def handle(self) -> Handle:
        return self.choices[0].handle


@dataclass
class _Step:
    """A dispatched generate step and the slot owners at dispatch time."""

    tokens: object  # device arrays, read on delivery
    logprobs: object
    done: object
    top_ids: object
    top_logprobs: object
    owners: list[_Request | None] = field(default_factory=list)


class Scheduler:
    """Owns an engine and its decode state; see the module docstring."""

    def __init__(self, engine: Engine, *, max_queue: int = 256, prefill_budget: int = 2048):
        self.engine = engine
        self.prefill_budget = prefill_budget
        self._waiting: queue.Queue[_Group] = queue.Queue(maxsize=max_queue)
        self._next: _Group | None = None  # taken from the queue, waiting for enough free slots
        self._slots: list[_Request | None] = [None] * engine.batch
        self._state = None  # the engine's decode state; only the scheduler thread touches it
        self._stop_ids = frozenset(int(t) for t in engine.stop_ids)
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
        sampling: SlotSampling,
        max_new: int,
        stop_at_eos: bool = True,
        *,
        seeds: Sequence[int] = (0,),
        constraints: Sequence[Constraint | None] | None = None,
        top_logprobs: int = 0,
    ) -> Handle:
        """Queue a request for len(seeds) choices of up to `max_new` tokens each.

        Stop tokens end a choice if `stop_at_eos`. seeds[i] is choice i's seed
        (the first choice's key is already in `sampling`); constraints[i] its
        grammar, if any. top_logprobs: alternatives to report per token.
        Raises QueueFull at the queue's bound, EngineFailed after an engine
        failure, ValueError if the choices cannot fit the batch.
        """
        if self._error is not None:
            raise EngineFailed(f"the engine failed: {self._error}")
        n = len(seeds)
        if n > self.engine.batch:
            raise ValueError(f"n={n} choices exceed the {self.engine.batch} decode slots")
        constraints = constraints or [None] * n
        handle = Handle(n)
        choices = [
            _Request(i, handle, max_new, stop_at_eos, seeds[i], constraints[i], top_logprobs)
            for i in range(n)
        ]
        try:
            self._waiting.put_nowait(_Group(list(prompt_ids), sampling, choices))
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
        """Slots decoding right now."""
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize() + (self._next is not None)

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
            step = self._dispatch() if self.active else None
            if in_flight is not None:
                self._deliver(in_flight)
            in_flight = step

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                request.finished = True
                self._slots[slot] = None

    def _constrained(self) -> bool:
        return any(r is not None and r.constraint is not None for r in self._slots)

    def _admit(self, *, block: bool) -> None:
        """Prefill waiting requests into free slots, within the prefill token budget.

        A request waits (first in line) until all its choices fit.
        """
        budget = self.prefill_budget
        while budget > 0:
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
            if self._slots.count(None) < len(group.choices):
                return
            self._next = None
            budget -= len(group.prompt_ids)
            try:
                self._start(group)
            except Exception as exc:
                self._fail_request(group.handle, exc)

    def _start(self, group: _Group) -> None:
        """Prefill a request; its first choice continues from the prefill's token, the
        others are inserted to sample their first token in the next step."""
        first = group.choices[0]
        allowed = None
        if first.constraint is not None:
            allowed = self.engine.unconstrained(1)
            first.constraint.fill(allowed, 0)
        prefix = self.engine.prefill(group.prompt_ids, group.sampling, allowed)
        token, logprob = int(prefix.token), float(prefix.logprob)
        top = _top(prefix.top_ids, prefix.top_logprobs, first.top_logprobs)
        if first.constraint is not None and token not in self._stop_ids:
            first.constraint.accept(token)
        if first.cancelled:
            first.finished = True
        elif first.stop_at_eos and token in self._stop_ids:
            first.emit(token, logprob, "stop", top)
        elif first.max_new <= 1:
            first.emit(token, logprob, "length", top)
        else:
            first.emit(token, logprob, None, top)
            self._occupy(first, prefix, first.max_new - 1, len(group.prompt_ids))
        for choice in group.choices[1:]:
            self._occupy(choice, prefix, choice.max_new, len(group.prompt_ids) - 1, choice.seed)

    def _occupy(self, request: _Request, prefix, remaining, position, restart_seed=None):
        slot = self._slots.index(None)
        self._state = self.engine.insert(
            prefix, self._state, slot, remaining, request.stop_at_eos, restart_seed=restart_seed
        )
        request.position = position
        self._slots[slot] = request

    def _dispatch(self) -> _Step | None:
        allowed = None
        if self._constrained():
            allowed = self.engine.unconstrained(self.engine.batch)
            for slot, request in enumerate(self._slots):
                if request is not None and request.constraint is not None:
                    try:
                        request.constraint.fill(allowed, slot)
                    except Exception as exc:
                        self._fail_request(request.handle, exc)
        active = [r for r in self._slots if r is not None]
        if not active:
            return None
        # Slots fill lowest-first, so the step only needs rows up to the last busy one.
        rows = max(i for i, r in enumerate(self._slots) if r is not None) + 1
        max_position = max(r.position for r in active)
        self._state, *outputs = self.engine.generate(
            self._state, max_position, rows, allowed=allowed
        )
        for request in active:
            request.position += 1
        return _Step(*outputs, owners=list(self._slots))

    def _deliver(self, step: _Step) -> None:
        tokens, logprobs, done = (np.asarray(a) for a in (step.tokens, step.logprobs, step.done))
        wants_top = any(r is not None and r.top_logprobs for r in step.owners)
        top_ids = np.asarray(step.top_ids) if wants_top else None
        top_logprobs = np.asarray(step.top_logprobs) if wants_top else None
        for slot, request in enumerate(step.owners):
            if request is None or request.finished:
                continue  # freed, cancelled or finished after this step was sent
            try:
                token = int(tokens[slot])
                reason = None
                if done[slot]:
                    stopped = request.stop_at_eos and token in self._stop_ids
                    reason = "stop" if stopped else "length"
                elif (
                    request.constraint is not None
                    and token not in self._stop_ids
                    and not request.constraint.accept(token)
                ):
                    log.warning("a constrained choice sampled token %d outside its grammar", token)
                top = ()
                if request.top_logprobs:
                    top = _top(top_ids[slot], top_logprobs[slot], request.top_logprobs)
            except Exception as exc:
                self._fail_request(request.handle, exc)
                continue
            if reason is not None:
                self._slots[slot] = None
            request.emit(token, float(logprobs[slot]), reason, top)

    def _fail_request(self, handle: Handle, exc: Exception) -> None:
        """Fail one request and free its slots, unless `exc` lost the shared decode state
        (an insert that consumed it): that is the engine's failure, raised on."""
        if not _intact(self._state):
            handle.fail(EngineFailed(f"the engine failed: {exc}"))  # in no slot nor queue yet
            raise exc
        log.error("a request failed; the others go on", exc_info=exc)
        handle.fail(RequestFailed(f"{type(exc).__name__}: {exc}"))
        for slot, request in enumerate(self._slots):
            if request is not None and request.handle is handle:
                request.finished = True
                self._slots[slot] = None

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineFailed(f"the engine failed: {exc}")
        for slot, request in enumerate(self._slots):
            if request is not None:
                request.handle.fail(error)
                self._slots[slot] = None
        if self._next is not None:
            self._next.handle.fail(error)
            self._next = None
        while True:
            try:
                self._waiting.get_nowait().handle.fail(error)
            except queue.Empty:
                return


def _intact(state) -> bool:
    """Whether no buffer of the decode state was consumed (donated to a call that failed)."""
    leaves = jax.tree_util.tree_leaves(state)
    return not any(getattr(leaf, "is_deleted", lambda: False)() for leaf in leaves)


def _top(ids, logprobs, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (token id, logprob) pairs from the step's top arrays."""
    if not k:
        return ()
    pairs = zip(np.asarray(ids)[:k], np.asarray(logprobs)[:k], strict=True)
    return tuple((int(i), float(lp)) for i, lp in pairs)
