"""`POST /v1/chat/completions`: request → engine → JSON reply or SSE stream.

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

import dataclasses
from collections.abc import Iterator, Sequence

from handler import sse
from handler.errors import invalid_request
from handler.generation import (
    Generation,
    Reply,
    ReplyHeader,
    check_request,
    collect,
    start_generation,
)
from handler.model_host import ServedModel
from handler.quota import Meter
from handler.request_parts import NamedToolChoice
from handler.requests import ChatCompletionRequest
from handler.responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    FunctionCallChunk,
    FunctionCallOut,
    TokenLogprobOut,
    ToolCallChunk,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from model.limits import Names
from model.text.grammar import GrammarError
from model.text.tokenizer import Tokenizer
from model.text.tool_calls import (
    ContentDelta,
    Event,
    ToolCallArguments,
    ToolCallStart,
    ToolCallStream,
    new_call_id,
)
from model.types import ChoiceResult, Choices, Delta, TokenLogprob


def chat_completion(
    llm: ServedModel, request: ChatCompletionRequest, fingerprint: str, meter: Meter
) -> Reply:
    """Generate the reply to a validated request, streamed or as one JSON object; the
    request's tokens are reserved with `meter` before it starts."""
    prompt_ids = encode_prompt(llm, request)
    params = request.sampling_params()
    names = Names(prompt="messages", max_tokens=request.max_tokens_param)
    budget = check_request(llm, prompt_ids, params, names)
    params = dataclasses.replace(params, grammar=grammar_for(llm, request))
    meter.admit(len(prompt_ids) + params.n * budget)
    generation = start_generation(llm, prompt_ids, params)
    header = ReplyHeader.new("chatcmpl", request.model, fingerprint)
    shaper = ReplyShaper(llm.tokenizer, request)
    if request.stream:
        events = chat_events(header, shaper, generation)
        return Reply([generation], events=events, close=generation.close)
    [results] = collect([generation], params.n)
    reply = ChatCompletion(
        **header.fields(),
        choices=[shaper.choice(i, result) for i, result in enumerate(results)],
        usage=Usage.of(len(prompt_ids), sum(r.tokens for r in results)),
    )
    return Reply([generation], body=reply)


def encode_prompt(llm: ServedModel, request: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize; a template rejection is a 400."""
    try:
        return llm.encode_chat(request.template_messages(), tools=request.tool_dicts())
    except ValueError as exc:
        raise invalid_request(str(exc), param="messages") from None


def grammar_for(llm: ServedModel, request: ChatCompletionRequest) -> str | None:
    """The grammar every choice must follow: a forced tool call or a JSON response format."""
    tools = request.tool_dicts()
    forced = request.forced_tool if tools else False
    try:
        if tools and forced:
            return llm.grammars.tool_calls(
                tools,
                name=forced if isinstance(forced, str) else None,
                parallel=request.parallel_tool_calls is not False,
            )
        response_format = request.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return llm.grammars.json_object()
        schema = response_format.json_schema
        assert schema is not None, "validated: json_schema comes with its schema object"
        return llm.grammars.json_schema(schema.schema_ or {}, strict=bool(schema.strict))
    except GrammarError as exc:
        raise invalid_request(str(exc), param="tools" if forced else "response_format") from None


class ReplyShaper:
    """Turns engine output into OpenAI choices: logprob entries, tool calls, finish reasons."""

    def __init__(self, tokenizer: Tokenizer, request: ChatCompletionRequest) -> None:
        self.tokenizer = tokenizer
        self.request = request
        named = isinstance(request.tool_choice, NamedToolChoice)
        # Which calls a reply keeps: all, or (not parallel) the first.
        self.kept_calls = None if request.parallel_tool_calls is not False and not named else {0}
        tools = request.offered_tools
        self.tool_names = [tool.function.name for tool in tools] if tools else None
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
        content: str | None = result.text
        reason: str = result.reason
        message = None
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


def chat_events(header: ReplyHeader, shaper: ReplyShaper, generation: Generation) -> Iterator[str]:
    """The SSE events: a role chunk per choice, their content chunks, one finish chunk
    each, and the usage chunk when asked for (handler/sse.py adds [DONE])."""
    request = shaper.request
    n = request.n or 1
    for index in range(n):
        yield sse.event(chunk(header, ChunkDelta(role="assistant", content=""), index))
    streams = [ChoiceStream(header, shaper, i) for i in range(n)]
    choices = Choices(n)
    for delta in generation.deltas:
        choices.add(delta)
        yield from streams[delta.index].events(delta)
    choices.check_finished()
    if request.include_usage:
        usage = Usage.of(generation.prompt_tokens, choices.completion_tokens)
        yield sse.event(ChatCompletionChunk(**header.fields(), choices=[], usage=usage))


def chunk(
    header: ReplyHeader,
    delta: ChunkDelta,
    index: int,
    finish_reason: str | None = None,
    logprobs: ChoiceLogprobs | None = None,
) -> ChatCompletionChunk:
    """A chunk of one choice."""
    choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    return ChatCompletionChunk(**header.fields(), choices=[choice])


class ChoiceStream:
    """One choice's deltas → SSE chunks (content, tool calls, logprobs, finish)."""

    def __init__(self, header: ReplyHeader, shaper: ReplyShaper, index: int) -> None:
        self.header = header
        self.shaper = shaper
        self.index = index
        self.tools = shaper.tool_parser()
        self.calls_started = False

    def events(self, delta: Delta) -> Iterator[str]:
        logprobs = self.shaper.logprobs(delta.logprobs) if delta.logprobs else None
        reason: str | None = delta.finish_reason
        if self.tools is None:
            if delta.text or reason or logprobs:
                yield self._event(ChunkDelta(content=delta.text or None), reason, logprobs)
            return
        parsed = self.tools.feed(delta.text) + (self.tools.finish() if reason else [])
        content = "".join(e.text for e in parsed if isinstance(e, ContentDelta))
        if content or logprobs:
            yield self._event(ChunkDelta(content=content or None), None, logprobs)
        calls = self._call_delta(parsed)
        if calls is not None:
            yield self._event(calls)
        if reason:
            kept = self.shaper.kept_calls
            if self.calls_started and not self.tools.incomplete(kept):
                reason = self.shaper.calls_finish
            yield self._event(ChunkDelta(), reason)

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

    def _event(
        self, delta: ChunkDelta, reason: str | None = None, logprobs: ChoiceLogprobs | None = None
    ) -> str:
        return sse.event(chunk(self.header, delta, self.index, reason, logprobs))
