"""`POST /v1/chat/completions`: request → engine → JSON reply or SSE stream.

Generation starts before the response does: the first delta is awaited while
the request can still fail as an ordinary HTTP error. After the headers went
out, a failure becomes an SSE error event followed by `[DONE]`.
"""

import itertools
import logging
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flask
from pydantic import ValidationError

from handler import sse
from handler.errors import internal_error, invalid_request, overloaded
from handler.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    Usage,
    reject_unsupported,
    validation_error,
)
from model.sampling_params import Delta, SamplingParams
from model.scheduler import QueueFull

if TYPE_CHECKING:
    from model.llm import LLM

log = logging.getLogger(__name__)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises a 400 APIError naming the bad field."""
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if request.model_extra:
        # Names only: values may hold anything, including secrets.
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
    reject_unsupported(request)
    return request


@dataclass(frozen=True)
class ReplyHeader:
    """The fields every object of one reply shares (all chunks of a stream)."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, model: str, system_fingerprint: str) -> "ReplyHeader":
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, system_fingerprint)

    def chunk(
        self, delta: ChunkDelta | None, finish_reason: str | None = None, usage: Usage | None = None
    ) -> ChatCompletionChunk:
        """A chunk with one choice, or (delta None) the usage-only chunk with no choices."""
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage,
        )


def chat_completion(llm: "LLM", request: ChatCompletionRequest, fingerprint: str) -> flask.Response:
    """Generate the reply to a validated request, streamed or as one JSON object."""
    prompt_ids = encode_prompt(llm, request)
    check_context(llm.max_seq_len, len(prompt_ids), request)
    engine_stream, deltas = start_generation(llm, prompt_ids, request.sampling_params())
    header = ReplyHeader.new(request.model, fingerprint)
    if request.stream:
        events = stream_events(
            header, deltas, engine_stream, len(prompt_ids), request.include_usage
        )
        response = flask.Response(events, mimetype=sse.CONTENT_TYPE, headers=sse.HEADERS)
        # Also cancel the generation if the body is never iterated.
        response.call_on_close(engine_stream.close)
        return response
    try:
        text, completion_tokens, finish_reason = collect(deltas)
    finally:
        engine_stream.close()
    reply = ChatCompletion(
        id=header.id,
        created=header.created,
        model=header.model,
        system_fingerprint=header.system_fingerprint,
        choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish_reason)],
        usage=Usage.of(len(prompt_ids), completion_tokens),
    )
    return flask.Response(reply.model_dump_json(), mimetype="application/json")


def encode_prompt(llm: "LLM", request: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize; a template rejection is a 400."""
    try:
        return llm.encode_chat(request.template_messages())
    except ValueError as exc:
        raise invalid_request(str(exc), param="messages") from None


def check_context(max_seq_len: int, prompt_tokens: int, request: ChatCompletionRequest) -> None:
    """Raise a 400 with the counts when prompt plus completion cannot fit."""
    limit = f"This model's maximum context length is {max_seq_len} tokens"
    if prompt_tokens >= max_seq_len:
        raise invalid_request(
            f"{limit}, but the messages take {prompt_tokens} tokens, leaving no room for "
            "a completion. Shorten the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    budget = request.completion_budget
    if budget is not None and prompt_tokens + budget > max_seq_len:
        param = request.max_tokens_param
        raise invalid_request(
            f"{limit}. However, you requested {prompt_tokens + budget} tokens "
            f"({prompt_tokens} in the messages, {budget} in the completion). "
            f"Reduce the length of the messages or {param}.",
            param=param,
            code="context_length_exceeded",
        )


def start_generation(
    llm: "LLM", prompt_ids: list[int], params: SamplingParams
) -> tuple[Generator[Delta, None, None], Iterator[Delta]]:
    """Start generating and wait for the first delta, while errors can still be plain HTTP.

    Returns the engine's generator (close it to cancel) and an iterator over
    all its deltas, the first included. The engine's ValueError (a request it
    refuses) is a 400.
    """
    try:
        engine_stream = llm.stream(prompt_ids, params)
        first = next(engine_stream)
    except ValueError as exc:
        raise invalid_request(str(exc)) from None
    except QueueFull as exc:
        raise overloaded(str(exc)) from None
    except StopIteration:
        raise RuntimeError("the engine's stream ended without any delta") from None
    return engine_stream, itertools.chain([first], engine_stream)


def collect(deltas: Iterator[Delta]) -> tuple[str, int, str]:
    """The whole reply: (text, completion tokens, finish_reason)."""
    pieces: list[str] = []
    tokens = 0
    for delta in deltas:
        pieces.append(delta.text)
        tokens += len(delta.token_ids)
        if delta.finish_reason:
            return "".join(pieces), tokens, delta.finish_reason
    raise RuntimeError("the engine's stream ended without a finish_reason")


def stream_events(
    header: ReplyHeader,
    deltas: Iterator[Delta],
    engine_stream: Generator[Delta, None, None],
    prompt_tokens: int,
    include_usage: bool,
) -> Iterator[str]:
    """The SSE body: role chunk, content chunks, one finish chunk, [usage], [DONE]."""
    yield sse.event(header.chunk(ChunkDelta(role="assistant", content="")))
    try:
        completion_tokens = yield from _content_events(header, deltas)
        if include_usage:
            yield sse.event(header.chunk(None, usage=Usage.of(prompt_tokens, completion_tokens)))
    except Exception:
        log.exception("generation failed after the response started")
        yield sse.error(internal_error())
    finally:
        # Runs on client disconnect too (GeneratorExit): cancels the generation.
        engine_stream.close()
    yield sse.done()


def _content_events(header: ReplyHeader, deltas: Iterator[Delta]) -> Generator[str, None, int]:
    """Content chunks up to and including the one with finish_reason; returns the token count."""
    tokens = 0
    for delta in deltas:
        tokens += len(delta.token_ids)
        if delta.text or delta.finish_reason:
            content = ChunkDelta(content=delta.text or None)
            yield sse.event(header.chunk(content, finish_reason=delta.finish_reason))
        if delta.finish_reason:
            return tokens
    raise RuntimeError("the engine's stream ended without a finish_reason")
