"""What both completion routes do with the engine: check, start, collect.

A route checks the request against the loaded model (`check_request`: the
rules live in model/limits.py), then starts generating (`start_generation`).
Generation starts before the response does: the first delta is awaited while
the request can still fail as an ordinary HTTP error. Afterwards the deltas
are gathered per choice (`Choices`), all at once for a JSON reply (`collect`)
or as they come for a stream (handler/sse.py frames it).
"""

import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel

from handler.errors import (
    engine_failed,
    internal_error,
    invalid_request,
    overloaded,
    refused,
)
from handler.model_host import ServedModel
from model import limits
from model.types import ChoiceResult, Choices, Delta, SamplingParams


@dataclass(frozen=True)
class ReplyHeader:
    """The fields every object of one reply shares (all chunks of a stream)."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, prefix: str, model: str, system_fingerprint: str) -> "ReplyHeader":
        """A header with a fresh id, `prefix` ("chatcmpl", "cmpl") and a random hex."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, system_fingerprint)

    def fields(self) -> dict[str, Any]:
        """The header as keyword arguments of a `responses.Reply` model."""
        return asdict(self)


def check_request(
    llm: ServedModel,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    names: limits.Names,
    batch_index: int | None = None,
) -> int:
    """The request's completion budget (tokens per choice); a 400 naming the request's
    own field unless `llm` can serve the request (the rules: model/limits.py).

    `names` say what the request calls its prompt and its completion budget. In a
    batch of prompts, `batch_index` is the prompt's: a message about this prompt says so.
    """
    try:
        return llm.check(prompt_ids, params, names)
    except limits.InvalidRequest as exc:
        if batch_index is not None and exc.param in (names.prompt, names.max_tokens):
            exc = limits.InvalidRequest(f"Prompt {batch_index}: {exc}", exc.param, exc.code)
        raise refused(exc) from None


@dataclass
class Reply:
    """A route's answer before it is HTTP: a JSON body, or SSE events, from `generations`;
    `close` cancels them."""

    generations: Sequence["Generation"]
    body: BaseModel | None = None
    events: Iterator[str] | None = None
    close: Callable[[], None] = lambda: None

    def used(self) -> int:
        """Prompt and completion tokens so far."""
        return self.prompt_tokens() + self.completion_tokens()

    def prompt_tokens(self) -> int:
        return sum(g.prompt_tokens for g in self.generations)

    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)

    def finish_reasons(self) -> list[str]:
        return [reason for g in self.generations for reason in g.finish_reasons]

    def first_token_at(self) -> float | None:
        """When the first generation's first delta arrived (time.monotonic())."""
        return min((g.first_at for g in self.generations), default=None)


class Generation:
    """One prompt's generation, started: its deltas, the first already received, and the
    completion tokens and finish reasons read from them so far.

    `close` cancels it (a no-op once it finished).
    """

    def __init__(self, engine_stream: Iterator[Delta], first: Delta, prompt_tokens: int) -> None:
        self._engine_stream = engine_stream
        self.deltas: Iterator[Delta] = self._counted(itertools.chain([first], engine_stream))
        self.prompt_tokens = prompt_tokens
        self.first_at = time.monotonic()  # `first` has just arrived
        self.completion_tokens = 0
        self.finish_reasons: list[str] = []

    def _counted(self, deltas: Iterator[Delta]) -> Iterator[Delta]:
        for delta in deltas:
            self.completion_tokens += len(delta.token_ids)
            if delta.finish_reason:
                self.finish_reasons.append(delta.finish_reason)
            yield delta

    def close(self) -> None:
        # `LLM.stream` is a generator: closing it cancels the request in the engine.
        if isinstance(self._engine_stream, Generator):
            self._engine_stream.close()


def start_generation(
    llm: ServedModel, prompt_ids: Sequence[int], params: SamplingParams
) -> Generation:
    """Start generating and wait for the first delta, while errors can still be plain
    HTTP (`engine_errors`)."""
    with engine_errors():
        engine_stream = llm.stream(prompt_ids, params)
        first = next(engine_stream, None)
    if first is None:
        raise RuntimeError("the engine's stream ended without any delta")
    return Generation(engine_stream, first, len(prompt_ids))


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Turn what the engine raises for a request into HTTP errors: a request the engine
    refuses is a 400 (naming the field when model/limits.py does); a full queue a 503
    with Retry-After; a request that failed in the engine a 500; a failed engine a 503."""
    # The scheduler imports JAX, which the gunicorn master must not (handler/model_host.py):
    # its errors are imported once a model is loaded.
    from model.engine.scheduler import EngineFailed, QueueFull, RequestFailed

    try:
        yield
    except limits.InvalidRequest as exc:
        raise refused(exc) from None
    except ValueError as exc:
        raise invalid_request(str(exc)) from None
    except QueueFull as exc:
        raise overloaded(str(exc)) from None
    except EngineFailed:
        raise engine_failed() from None
    except RequestFailed:
        raise internal_error() from None  # the scheduler logged why


def start_generations(
    llm: ServedModel, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> list[Generation]:
    """Start every prompt's generation before reading any, so that they batch together;
    when one cannot start, the others are cancelled."""
    started: list[Generation] = []
    try:
        for prompt_ids in prompts:
            started.append(start_generation(llm, prompt_ids, params))
    except BaseException:
        close_all(started)
        raise
    return started


def close_all(generations: Sequence[Generation]) -> None:
    for generation in generations:
        generation.close()


def collect(generations: Sequence[Generation], n: int) -> list[list[ChoiceResult]]:
    """Every generation run to its end, then closed: its n finished choices each."""
    try:
        gathered = []
        for generation in generations:
            choices = Choices(n)
            for delta in generation.deltas:
                choices.add(delta)
            choices.check_finished()
            gathered.append(choices.results)
        return gathered
    finally:
        close_all(generations)
