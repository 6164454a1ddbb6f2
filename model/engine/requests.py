"""A request inside the engine: its handle (what the caller iterates), its choices'
sequences (what the scheduler plans), and the errors a caller may get."""

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from model.engine.blocks import Hash
from model.nn.sampling import SlotSampling
from model.types import FinishReason, Pooled, TokenEvent

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


Event = TypeVar("Event", TokenEvent, Pooled)


class Handle(Generic[Event]):
    """A submitted request: iterate it for the events of all its choices (TokenEvents,
    or an embedding's one Pooled).

    Iteration ends after every choice's last event. `cancel()` stops the
    request, `cancel(index)` one choice (which then sends no more events).
    """

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self._events: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._cancelled_choices: set[int] = set()
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[Event]:
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

    def put(self, event: Event) -> None:
        """Send a choice's next event to the consumer (the scheduler thread calls this)."""
        self._events.put(event)

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
class Seq:
    """One choice of a request: its slot, tokens and blocks, from admission to its end.

    tokens: the prompt and the tokens delivered so far; length: the same plus
    those sampled but not delivered yet. computed: positions whose keys and
    values are in the pool (or on their way, in a dispatched step). It prefills
    until `target` (the prompt, or after a preemption all but its newest token,
    which the device still holds as the slot's input), then decodes.

    An embedding (`embed`) only prefills, without the prefix cache (every token's
    hidden state is needed), and adds up the steps' pooled sums until its last chunk's
    arrive; then it sends one Pooled.
    """

    index: int
    handle: Handle
    row: SlotSampling
    max_new: int
    stop_at_eos: bool
    tokens: list[int]
    constraint: Constraint | None = None
    top_logprobs: int = 0
    first: "Seq | None" = None  # the 1st choice, whose prompt this one waits for
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
    paced: bool = False  # its prompt goes in paced chunks (model/engine/pacing.py)
    embed: bool = False
    pooled: np.ndarray | None = None  # an embedding's sum of hidden states so far
    pooled_tokens: int = 0  # ... over this many tokens
    may_draft: bool = False  # speculative decoding (model/engine/speculative.py) ...
    acceptance: tuple[float, float] = (1.5, 1.0)  # ... its drafts taken and refused, decayed
    feed: bool = False  # the slot's newest token on the device is stale: the plan sends it

    def pool(self, total: np.ndarray, n: int) -> bool:
        """Add a chunk of n tokens' summed hidden states; at the last chunk, send the
        mean as a Pooled and return True (the embedding is done)."""
        self.pooled = total.astype(np.float64) + (0 if self.pooled is None else self.pooled)
        self.pooled_tokens += n
        if self.pooled_tokens < self.target:
            return False
        mean = (self.pooled / self.pooled_tokens).astype(np.float32)
        self.handle.put(Pooled(mean, self.pooled_tokens, self.index))
        return True

    @property
    def cancelled(self) -> bool:
        return self.handle.choice_cancelled(self.index)

    @property
    def may_prefill(self) -> bool:
        """Whether this choice may prefill: the 1st choice's prompt must be in the pool."""
        first = self.first
        return first is None or first.finished or first.computed >= first.target

    @property
    def decoding(self) -> bool:
        return self.looked_up and self.computed >= self.target and not self.embed

    @property
    def ends_in_flight(self) -> bool:
        """Whether a step sent but not read yet samples its last token (by its budget)."""
        return not self.embed and self.generated + self.length - len(self.tokens) >= self.max_new

    def samples_after(self, n: int) -> bool:
        """Whether a prompt chunk of n tokens ends the prompt and samples the first token."""
        return self.computed + n == self.target and self.sample_at_target

    def ran(self, n: int) -> None:
        """A dispatched step computes this sequence's next n positions (n = 1: a decode
        row, whose sampled token extends it; else a prompt chunk, which may sample)."""
        if self.decoding:
            self.computed = self.length
            self.length += 1
            self.feed = False
            return
        self.length += self.samples_after(n)
        self.computed += n

    def verified(self, accepted: int) -> None:
        """`accepted` drafts were taken: their positions are computed, and the device's
        newest token (the first row's) is stale if any were."""
        if accepted:
            self.computed += accepted
            self.length += accepted
            self.feed = True

    def deliver(
        self,
        tokens: np.ndarray,
        logprobs: np.ndarray,
        tops: list[tuple[tuple[int, float], ...]],
        accepted: int,
        stop_ids: frozenset[int],
        finish: Callable[["Seq"], None],
    ) -> None:
        """Take and send a step's tokens for this sequence (its newest token's and, if it
        drafted, those of the `accepted` drafts), up to one that ends it; `finish(self)`
        frees its slot before the last is sent."""
        self.verified(accepted)
        for token, logprob, top in zip(tokens.tolist(), logprobs.tolist(), tops, strict=True):
            reason = self.take(token, stop_ids)
            if reason is not None:
                finish(self)
            self.emit(token, logprob, reason, top)
            if reason is not None:
                return

    def take(self, token: int, stop_ids: frozenset[int]) -> FinishReason | None:
        """Append a delivered token; the finish reason if it ends the choice."""
        self.tokens.append(token)
        self.generated += 1
        if self.stop_at_eos and token in stop_ids:
            return "stop"
        if self.generated >= self.max_new:
            return "length"
        if self.constraint is not None and not self.constraint.accept(token):
            log.warning("a constrained choice sampled token %d outside its grammar", token)
        return None

    def emit(
        self,
        token: int,
        logprob: float,
        reason: FinishReason | None,
        top: tuple[tuple[int, float], ...],
    ) -> None:
        self.handle.put(TokenEvent(token, logprob, reason, self.index, top))


@dataclass
class Group:
    """A submitted request: its choices, admitted together."""

    choices: list[Seq]

    @classmethod
    def create(
        cls,
        prompt_ids: Sequence[int],
        rows: Sequence[SlotSampling],
        max_new: int,
        stop_at_eos: bool,
        constraints: Sequence[Constraint | None],
        top_logprobs: int,
        embed: bool = False,
    ) -> "Group":
        """A request of len(rows) choices, the 2nd…nth waiting for the 1st's prompt (an
        embedding: one)."""
        handle: Handle = Handle(len(rows))
        choices = [
            Seq(i, handle, row, max_new, stop_at_eos, list(prompt_ids), constraints[i])
            for i, row in enumerate(rows)
        ]
        for choice in choices:
            choice.top_logprobs, choice.embed = top_logprobs, embed
            choice.sample_at_target = not embed
            choice.first = choices[0] if choice.index else None
        return cls(choices)

    @property
    def handle(self) -> Handle:
        return self.choices[0].handle


class WaitingLine:
    """Submitted requests in order, at most `maxsize` (0: no bound), and the first in
    line, taken off the queue while it waits for slots or blocks."""

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[Group] = queue.Queue(maxsize=maxsize)
        self._first: Group | None = None
        self.maxsize = maxsize

    def put(self, group: Group) -> None:
        """Queue a request (any thread); QueueFull at the bound."""
        try:
            self._queue.put_nowait(group)
        except queue.Full:
            raise QueueFull(f"{self.maxsize} requests are already waiting") from None

    def first(self, block: bool) -> Group | None:
        """The first request in line that is not cancelled (waiting up to 0.1 s for one
        if `block`), or None."""
        while self._first is None or self._first.handle.cancelled:
            try:
                self._first = self._queue.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                self._first = None
                return None
        return self._first

    def pop(self) -> None:
        """The first in line was admitted."""
        self._first = None

    def empty(self) -> bool:
        return self._first is None and self._queue.empty()

    def __len__(self) -> int:
        """Requests waiting (approximately, while another thread adds or admits)."""
        return self._queue.qsize() + (self._first is not None)

    def fail_all(self, error: BaseException) -> None:
        """Fail every waiting request with `error`."""
        if self._first is not None:
            self._first.handle.fail(error)
            self._first = None
        while True:
            try:
                self._queue.get_nowait().handle.fail(error)
            except queue.Empty:
                return
