"""Continuous batching: one thread owns the devices and keeps every slot busy.

The engine decodes B slots at once with a single compiled step. Requests do
not arrive in batches, so the scheduler fills slots as they free up:

- `submit` puts a request on a bounded waiting queue and returns a `Handle`
  at once; a full queue raises `QueueFull` (the server answers 503).
- The scheduler thread loops. Each turn it first drops cancelled requests
  (their slots free at once), then admits waiting requests into free slots:
  each is prefilled on its own (its first token comes from the prefill, so
  time to first token does not wait for the batch) and its KV cache inserted
  into the slot. Then it runs one `generate` step for all slots.
- The host never waits for the step it just dispatched: it reads the tokens
  of the previous step while the device computes the next one. A slot that
  finished in step n has therefore already run in step n+1; that token is
  dropped because each dispatched step remembers which request owned which
  slot when it was sent.
- Per-slot settings (temperature, top-p, top-k, PRNG key, remaining token
  budget) live on the device in the decode state, so a mixed batch is one
  compiled step. The step reports which slots are done (stop token or budget);
  the host delivers tokens and frees those slots.
- A consumer that stops listening calls `Handle.cancel()`; the slot is freed
  before the next step is dispatched.
- If the engine raises, every waiting and running request receives the error
  and the scheduler marks itself failed; `submit` then raises too.

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

import numpy as np

from model.sampling import SlotSampling
from model.sampling_params import FinishReason

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; try again later."""


class EngineFailed(RuntimeError):
    """The engine raised; the scheduler no longer serves requests."""


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of a request; finish_reason is set on its last token."""

    token: int
    logprob: float
    finish_reason: FinishReason | None = None


class Engine(Protocol):
    """What the scheduler needs of an engine (see model/engine.py)."""

    batch: int
    stop_ids: np.ndarray

    def init_state(self): ...
    def prefill(self, tokens: Sequence[int], sampling: SlotSampling): ...
    def insert(self, prefix, state, slot: int, remaining: int): ...
    def generate(self, state, max_position: int, rows: int): ...


class Handle:
    """A submitted request: iterate it for TokenEvents; `cancel()` stops it."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop generating; safe to call at any time, from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SlotSampling  # [1]-shaped settings for the prefill
    max_new: int
    stop_at_eos: bool
    handle: Handle
    position: int = 0  # where the slot's next token is written
    finished: bool = False

    def emit(self, token: int, logprob: float, reason: FinishReason | None = None) -> None:
        self.handle._events.put(TokenEvent(token, logprob, reason))
        self.finished = reason is not None


@dataclass
class _Step:
    """A dispatched generate step and the slot owners at dispatch time."""

    tokens: object  # device arrays, read on delivery
    logprobs: object
    done: object
    owners: list[_Request | None] = field(default_factory=list)


class Scheduler:
    """Owns an engine and its decode state; see the module docstring."""

    def __init__(self, engine: Engine, *, max_queue: int = 256, prefill_budget: int = 2048):
        self.engine = engine
        self.prefill_budget = prefill_budget
        self._waiting: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._slots: list[_Request | None] = [None] * engine.batch
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
    ) -> Handle:
        """Queue a request for up to `max_new` tokens; stop tokens end it if `stop_at_eos`.

        Raises QueueFull at the queue's bound, EngineFailed after an engine failure.
        """
        if self._error is not None:
            raise EngineFailed(f"the engine failed: {self._error}")
        request = _Request(list(prompt_ids), sampling, max_new, stop_at_eos, Handle())
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None
        if self._error is not None:  # failed while we queued: nobody will serve it
            self._fail_all(self._error)
        return request.handle

    @property
    def active(self) -> int:
        """Slots decoding right now."""
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

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
        state = self.engine.init_state()
        in_flight: _Step | None = None
        while not self._stopping.is_set():
            self._drop_cancelled()
            state = self._admit(state, block=in_flight is None and self.active == 0)
            step = None
            if self.active:
                step, state = self._dispatch(state)
            if in_flight is not None:
                self._deliver(in_flight)
            in_flight = step

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.handle.cancelled:
                request.finished = True
                self._slots[slot] = None

    def _admit(self, state, *, block: bool):
        """Prefill waiting requests into free slots, within the prefill token budget."""
        budget = self.prefill_budget
        while budget > 0 and None in self._slots:
            try:
                request = self._waiting.get(timeout=0.1) if block else self._waiting.get_nowait()
            except queue.Empty:
                return state
            block = False
            if request.handle.cancelled:
                continue
            budget -= len(request.prompt_ids)
            state = self._start(request, state)
        return state

    def _start(self, request: _Request, state):
        prefix = self.engine.prefill(request.prompt_ids, request.sampling)
        token, logprob = int(prefix.token), float(prefix.logprob)
        if request.stop_at_eos and token in self._stop_ids:
            request.emit(token, logprob, "stop")
        elif request.max_new <= 1:
            request.emit(token, logprob, "length")
        else:
            request.emit(token, logprob)
            slot = self._slots.index(None)
            state = self.engine.insert(
                prefix, state, slot, request.max_new - 1, request.stop_at_eos
            )
            request.position = len(request.prompt_ids)
            self._slots[slot] = request
        return state

    def _dispatch(self, state) -> tuple[_Step, object]:
        active = [r for r in self._slots if r is not None]
        # Slots fill lowest-first, so the step only needs rows up to the last busy one.
        rows = max(i for i, r in enumerate(self._slots) if r is not None) + 1
        max_position = max(r.position for r in active)
        state, tokens, logprobs, done = self.engine.generate(state, max_position, rows)
        for request in active:
            request.position += 1
        return _Step(tokens, logprobs, done, list(self._slots)), state

    def _deliver(self, step: _Step) -> None:
        tokens, logprobs, done = (np.asarray(a) for a in (step.tokens, step.logprobs, step.done))
        for slot, request in enumerate(step.owners):
            if request is None or request.finished:
                continue  # freed, cancelled or finished after this step was sent
            token = int(tokens[slot])
            reason = None
            if done[slot]:
                stopped = request.stop_at_eos and token in self._stop_ids
                reason = "stop" if stopped else "length"
                self._slots[slot] = None
            request.emit(token, float(logprobs[slot]), reason)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineFailed(f"the engine failed: {exc}")
        for slot, request in enumerate(self._slots):
            if request is not None:
                request.handle._events.put(error)
                self._slots[slot] = None
        while True:
            try:
                self._waiting.get_nowait().handle._events.put(error)
            except queue.Empty:
                return
