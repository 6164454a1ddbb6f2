"""`POST /v1/chat/completions`: request → engine → JSON reply or SSE stream.

Generation starts before the response does: the first delta is awaited while
the request can still fail as an ordinary HTTP error. After the headers went
out, a failure becomes an SSE error event followed by `[DONE]`.

n choices stream interleaved, each with its index, its own role chunk first
and exactly one finish_reason. With tools offered, each choice's text goes
through a tool-call parser (model/text/tool_calls.py): text before a call is
content; a call's first delta carries its id, type and name, later ones its
arguments as they are generated; finish_reason becomes `tool_calls`. A reply
cut by max_tokens keeps its complete calls and drops the incomplete tail
(when streamed, the tail was already sent, and finish_reason says `length`).
`required` and named tool choices, json_object and json_schema are enforced
by a grammar (model/text/grammar.py), not by asking the model. A request with the
deprecated `functions` gets `function_call` instead of `tool_calls`.
"""

import itertools
import logging
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import flask
from pydantic import BaseModel, ValidationError

from handler import sse
from handler.errors import engine_failed, internal_error, invalid_request, overloaded
from handler.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionRequest,
    FunctionCallChunk,
    FunctionCallOut,
    NamedToolChoice,
    TokenLogprobOut,
    ToolCallChunk,
    ToolCallOut,
    TopLogprob,
    Usage,
    validation_error,
)
from model.engine.scheduler import EngineFailed, QueueFull, RequestFailed
from model.text.grammar import GrammarError
from model.text.tool_calls import (
    ContentDelta,
    Event,
    ToolCallArguments,
    ToolCallStart,
    ToolCallStream,
    new_call_id,
)
from model.types import Delta, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from model.llm import LLM

log = logging.getLogger(__name__)
Request = TypeVar("Request", bound=BaseModel)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises a 400 APIError naming the bad field."""
    return parse_request(ChatCompletionRequest, body)


def parse_request(schema: type[Request], body: Any) -> Request:
    """Validate a decoded JSON body as `schema`; raises a 400 APIError naming the bad field."""
    try:
        request = schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if request.model_extra:
        # Names only: values may hold anything, including secrets.
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(request.model_extra)))
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
        self,
        delta: ChunkDelta | None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        index: int = 0,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        """A chunk with one choice, or (delta None) the usage-only chunk with no choices."""
        choices = []
        if delta is not None:
            choices = [
                ChunkChoice(
                    index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason
                )
            ]
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
    check_choices(llm, request)
    params = request.sampling_params(grammar_for(llm, request))
    engine_stream, deltas = start_generation(llm, prompt_ids, params)
    header = ReplyHeader.new(request.model, fingerprint)
    shaper = ReplyShaper(llm.tokenizer, request)
    if request.stream:
        events = stream_events(header, shaper, deltas, engine_stream, len(prompt_ids))
        response = flask.Response(events, mimetype=sse.CONTENT_TYPE, headers=sse.HEADERS)
        # Also cancel the generation if the body is never iterated.
        response.call_on_close(engine_stream.close)
        return response
    try:
        results = collect(deltas, params.n)
    finally:
        engine_stream.close()
    reply = ChatCompletion(
        id=header.id,
        created=header.created,
        model=header.model,
        system_fingerprint=header.system_fingerprint,
        choices=[shaper.choice(i, result) for i, result in enumerate(results)],
        usage=Usage.of(len(prompt_ids), sum(r.tokens for r in results)),
    )
    return flask.Response(reply.model_dump_json(), mimetype="application/json")


def check_choices(llm: "LLM", request: ChatCompletionRequest | CompletionRequest) -> None:
    """400s for settings only the loaded model can check: n against the decode slots,
    logit_bias token ids against the vocabulary."""
    if (request.n or 1) > llm.batch:
        raise invalid_request(
            f"n={request.n} is more than this server's {llm.batch} decode slots.", param="n"
        )
    for key in request.logit_bias or {}:
        if not 0 <= int(key) < llm.vocab_size:
            raise invalid_request(
                f"logit_bias: token id {key} is not in the vocabulary (0 to {llm.vocab_size - 1}).",
                param="logit_bias",
            )


def grammar_for(llm: "LLM", request: ChatCompletionRequest) -> str | None:
    """The grammar every choice must follow: a forced tool call or a JSON response format."""
    forced = request.forced_tool if request.calls_tools else False
    try:
        if forced:
            return llm.grammars.tool_calls(
                request.tool_dicts(),
                name=forced if isinstance(forced, str) else None,
                parallel=request.parallel_tool_calls is not False,
            )
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return llm.grammars.json_object()
        schema = response_format.json_schema
        return llm.grammars.json_schema(schema.schema_ or {}, strict=bool(schema.strict))
    except GrammarError as exc:
        raise invalid_request(str(exc), param="tools" if forced else "response_format") from None


@dataclass
class ChoiceResult:
    """One choice, collected: its text, token count, finish_reason and logprob entries."""

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ReplyShaper:
    """Turns engine output into OpenAI choices: logprob entries, tool calls, finish reasons."""

    def __init__(self, tokenizer: Any, request: ChatCompletionRequest) -> None:
        self.tokenizer = tokenizer
        self.request = request
        named = isinstance(request.tool_choice, NamedToolChoice)
        # Which calls a reply keeps: all, or (not parallel) the first.
        self.kept_calls = None if request.parallel_tool_calls is not False and not named else {0}
        self.tool_names = [t.function.name for t in request.tools] if request.calls_tools else None
        self.calls_finish = "function_call" if request.uses_functions else "tool_calls"

    def tool_parser(self) -> ToolCallStream | None:
        """A parser for one choice's text, or None when no tools are offered."""
        return None if self.tool_names is None else ToolCallStream(self.tool_names)

    def logprobs(self, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs | None:
        """OpenAI's logprobs object for `entries` (None unless the request asked)."""
        if not self.request.logprobs:
            return None
        return ChoiceLogprobs(content=[self._entry(e) for e in entries])

    def _entry(self, entry: TokenLogprob) -> TokenLogprobOut:
        top = [self._alternative(i, lp) for i, lp in entry.top]
        raw = self.tokenizer.token_bytes(entry.token_id)
        return TokenLogprobOut(
            token=entry.text, logprob=entry.logprob, bytes=list(raw), top_logprobs=top
        )

    def _alternative(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.tokenizer.token_bytes(token_id)
        return TopLogprob(token=raw.decode("utf-8", "replace"), logprob=logprob, bytes=list(raw))

    def choice(self, index: int, result: ChoiceResult) -> Choice:
        """A non-streamed choice: complete tool calls are parsed out of the text."""
        content, reason, message = result.text, result.finish_reason, None
        parser = self.tool_parser()
        if parser is not None:
            events = parser.feed(result.text) + parser.finish()
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            content = content if content.strip() else None
            calls = parser.complete_calls(self.kept_calls)
            if calls:
                reason = self.calls_finish
                if self.request.uses_functions:
                    message = AssistantMessage(
                        content=content, function_call=FunctionCallOut(**vars(calls[0]))
                    )
                else:
                    out = [
                        ToolCallOut(id=new_call_id(), function=FunctionCallOut(**vars(c)))
                        for c in calls
                    ]
                    message = AssistantMessage(content=content, tool_calls=out)
        return Choice(
            index=index,
            message=message or AssistantMessage(content=content),
            logprobs=self.logprobs(result.logprobs),
            finish_reason=reason,
        )


def encode_prompt(llm: "LLM", request: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize; a template rejection is a 400."""
    try:
        return llm.encode_chat(request.template_messages(), tools=request.tool_dicts())
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
    refuses) is a 400; a request that failed in the engine a 500; a failed
    engine a 503.
    """
    try:
        engine_stream = llm.stream(prompt_ids, params)
        first = next(engine_stream)
    except ValueError as exc:
        raise invalid_request(str(exc)) from None
    except QueueFull as exc:
        raise overloaded(str(exc)) from None
    except EngineFailed:
        raise engine_failed() from None
    except RequestFailed:
        raise internal_error() from None  # the scheduler logged why
    except StopIteration:
        raise RuntimeError("the engine's stream ended without any delta") from None
    return engine_stream, itertools.chain([first], engine_stream)


def collect(deltas: Iterator[Delta], n: int) -> list[ChoiceResult]:
    """Every choice of the reply, in index order."""
    results = [ChoiceResult() for _ in range(n)]
    for delta in deltas:
        result = results[delta.index]
        result.text += delta.text
        result.tokens += len(delta.token_ids)
        result.logprobs.extend(delta.logprobs)
        result.finish_reason = delta.finish_reason or result.finish_reason
    if any(r.finish_reason is None for r in results):
        raise RuntimeError("the engine's stream ended before every choice finished")
    return results


def stream_events(
    header: ReplyHeader,
    shaper: ReplyShaper,
    deltas: Iterator[Delta],
    engine_stream: Generator[Delta, None, None],
    prompt_tokens: int,
) -> Iterator[str]:
    """The SSE body: a role chunk per choice, their content chunks, one finish chunk
    each, [usage], [DONE]."""
    request = shaper.request
    n = request.n or 1
    for index in range(n):
        yield sse.event(header.chunk(ChunkDelta(role="assistant", content=""), index=index))
    try:
        choices = [ChoiceStream(header, shaper, i) for i in range(n)]
        completion_tokens = 0
        for delta in deltas:
            completion_tokens += len(delta.token_ids)
            yield from choices[delta.index].events(delta)
        if not all(choice.finished for choice in choices):
            raise RuntimeError("the engine's stream ended before every choice finished")
        if request.include_usage:
            yield sse.event(header.chunk(None, usage=Usage.of(prompt_tokens, completion_tokens)))
    except Exception:
        log.exception("generation failed after the response started")
        yield sse.error(internal_error())
    finally:
        # Runs on client disconnect too (GeneratorExit): cancels the generation.
        engine_stream.close()
    yield sse.done()


class ChoiceStream:
    """One choice's deltas → SSE chunks (content, tool calls, logprobs, finish)."""

    def __init__(self, header: ReplyHeader, shaper: ReplyShaper, index: int) -> None:
        self.header = header
        self.shaper = shaper
        self.index = index
        self.tools = shaper.tool_parser()
        self.calls_started = False
        self.finished = False

    def events(self, delta: Delta) -> Iterator[str]:
        logprobs = self.shaper.logprobs(delta.logprobs) if delta.logprobs else None
        reason = delta.finish_reason
        self.finished = reason is not None
        if self.tools is None:
            if delta.text or reason or logprobs:
                yield self._chunk(ChunkDelta(content=delta.text or None), reason, logprobs)
            return
        parsed = self.tools.feed(delta.text) + (self.tools.finish() if reason else [])
        content = "".join(e.text for e in parsed if isinstance(e, ContentDelta))
        if content or logprobs:
            yield self._chunk(ChunkDelta(content=content or None), None, logprobs)
        calls = self._call_delta(parsed)
        if calls is not None:
            yield self._chunk(calls)
        if reason:
            kept = self.shaper.kept_calls
            if self.calls_started and not self.tools.incomplete(kept):
                reason = self.shaper.calls_finish
            yield self._chunk(ChunkDelta(), reason)

    def _call_delta(self, parsed: list[Event]) -> ChunkDelta | None:
        """The tool-call parts among `parsed`, one entry per call, as a delta (or None)."""
        parts: dict[int, ToolCallChunk] = {}
        for event in parsed:
            if not isinstance(event, ToolCallStart | ToolCallArguments):
                continue
            kept = self.shaper.kept_calls
            if kept is not None and event.index not in kept:
                continue
            part = parts.setdefault(
                event.index, ToolCallChunk(index=event.index, function=FunctionCallChunk())
            )
            if isinstance(event, ToolCallStart):
                self.calls_started = True
                part.id, part.type = event.id, "function"
                part.function.name, part.function.arguments = event.name, ""
            else:
                part.function.arguments = (part.function.arguments or "") + event.text
        if not parts:
            return None
        if self.shaper.request.uses_functions:
            return ChunkDelta(function_call=parts[0].function)
        return ChunkDelta(tool_calls=list(parts.values()))

    def _chunk(
        self, delta: ChunkDelta, reason: str | None = None, logprobs: ChoiceLogprobs | None = None
    ) -> str:
        return sse.event(self.header.chunk(delta, reason, index=self.index, logprobs=logprobs))
