"""Pydantic models of the OpenAI replies, and the JSON response a reply becomes.

A reply (chat completion, streamed chunk, legacy text completion) starts with
the fields of `Reply`: every object of one reply shares them.
"""

import json
from typing import Any, Literal

import flask
from pydantic import BaseModel, model_serializer


def json_response(
    payload: BaseModel | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> flask.Response:
    """A JSON response for a reply model or a plain dict."""
    text = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return flask.Response(text, status=status, mimetype="application/json", headers=headers)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class Reply(BaseModel):
    """The fields every object of one reply shares; `object` names the kind of reply."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class PresentFields(BaseModel):
    """A streamed object whose fields left None are omitted on the wire: the SDK
    concatenates repeated strings, so absent must mean absent, not null."""

    @model_serializer(mode="wrap")
    def _present_fields(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


# Chat completions.


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, serialised


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """A reply message; `function_call` (deprecated) replaces `tool_calls` when the
    request used `functions`. An absent call is omitted, not null."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_calls(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("tool_calls", "function_call"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(Reply):
    """A non-streamed reply."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class FunctionCallChunk(PresentFields):
    """Part of a streamed call: the name once, in its first chunk; arguments fragments."""

    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(PresentFields):
    """A streamed tool call's part: id, type and name in the first one for its index."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallChunk


class ChunkDelta(PresentFields):
    """What a chunk adds to a choice."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None
    function_call: FunctionCallChunk | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Reply):
    """One streamed event; `usage` is null except in the final usage-only chunk."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


# Legacy completions.


class CompletionLogprobs(BaseModel):
    """The legacy logprobs object: parallel lists over the choice's tokens."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(Reply):
    """A legacy completion, or (streamed) one chunk of it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# Models.


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
