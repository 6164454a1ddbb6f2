"""Pydantic models of the OpenAI chat-completions API: requests and responses.

Request fields share bounded `Field`s (the llama-cpp-python `server/types.py`
habit), so a range is written once. Types are strict, as OpenAI's are: `"0.5"`
is not a number and `1` not a boolean (an integer is a number, though), and
every integer is bounded. Unknown fields are accepted and ignored, as OpenAI
and vLLM do; the handler logs their names. Validation errors become 400s
whose `param` names the offending field ("messages.0.role", "temperature").
Checks that need the model (vocabulary, batch, grammars) are in handler/chat.py.
The deprecated `functions` / `function_call` fields are read as tools.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from handler.errors import APIError, invalid_request
from model.types import SamplingParams

# The largest value of an integer field that has no natural bound (the engine's int32).
INT32_MAX = 2**31 - 1

# Shared, bounded fields. `None` means "not sent": the engine default applies.
max_tokens_field = Field(default=None, ge=1, le=INT32_MAX, description="Most tokens to generate.")
temperature_field = Field(default=None, ge=0.0, le=2.0, description="0 is greedy.")
top_p_field = Field(default=None, gt=0.0, le=1.0, description="Nucleus mass kept.")
top_k_field = Field(
    default=None, ge=-1, le=INT32_MAX, description="Top tokens kept; 0 or -1 disable."
)
min_p_field = Field(default=None, ge=0.0, le=1.0, description="Min probability vs. the top.")
penalty_field = Field(default=None, ge=-2.0, le=2.0, description="OpenAI-style penalty.")
repetition_penalty_field = Field(default=None, gt=0.0, description="1 disables.")
seed_field = Field(default=None, ge=-(2**63), le=2**63 - 1, description="Sampling seed.")
n_field = Field(default=None, ge=1, le=128, description="Choices per request.")
top_logprobs_field = Field(default=None, ge=0, le=20, description="Alternatives per token.")

MAX_STOP_STRINGS = 4
StopString = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^-?\d{1,10}$")]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]


class Strict(BaseModel):
    """A request model: strict types, finite numbers, unknown fields accepted."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class TextPart(Strict):
    """One `{"type": "text", "text": …}` part of an array-valued content."""

    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    """A tool call made by the assistant earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    """One conversation message; content is a string or a list of text parts.

    The deprecated `function` role (a function's result, named by `name`) and
    an assistant's `function_call` are read as a tool result and a tool call.
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    name: str | None = Field(default=None, validate_default=True)
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        # Only an assistant turn (which may carry tool_calls instead) can omit content.
        role = info.data.get("role")
        if value is None and role is not None and role != "assistant":
            raise ValueError(f"content is required for a '{role}' message")
        return value

    @field_validator("name")
    @classmethod
    def _function_result_is_named(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") == "function":
            raise ValueError("name is required for a 'function' message")
        return value

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as the chat template expects it: role and string content."""
        message = self.model_dump(exclude_none=True, include={"role", "name", "tool_call_id"})
        if self.role == "function":
            message["role"] = "tool"
        message["content"] = self.text()
        calls = self.tool_calls
        if not calls and self.function_call is not None:
            calls = [ToolCall(id="call_0", function=self.function_call)]
        if calls:
            message["tool_calls"] = [
                call.model_dump(include={"id", "type", "function"}) for call in calls
            ]
        return message


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JSONSchema(Strict):
    """`response_format.json_schema`: a named schema, optionally strict."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_for_json_schema(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("type") == "json_schema":
            raise ValueError("json_schema is required when type is 'json_schema'")
        return value


class StreamOptions(Strict):
    include_usage: bool | None = None


class ChatCompletionRequest(Strict):
    """The body of `POST /v1/chat/completions`."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = max_tokens_field
    max_completion_tokens: int | None = max_tokens_field
    temperature: float | None = temperature_field
    top_p: float | None = top_p_field
    top_k: int | None = top_k_field
    min_p: float | None = min_p_field
    frequency_penalty: float | None = penalty_field
    presence_penalty: float | None = penalty_field
    repetition_penalty: float | None = repetition_penalty_field
    logit_bias: dict[TokenIdKey, LogitBias] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = top_logprobs_field
    n: int | None = n_field
    seed: int | None = seed_field
    ignore_eos: bool = Field(default=False, description="vLLM extension: run to max_tokens.")
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, min_length=1)
    function_call: Literal["none", "auto"] | FunctionName | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        """A single stop string is the same as a list of one."""
        if value == "":
            raise ValueError("stop strings must not be empty")
        return [value] if isinstance(value, str) else value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == "none":
            return value
        tools = info.data.get("tools")
        name = value.function.name if isinstance(value, NamedToolChoice) else None
        _check_choice("tool_choice", name, "tools", tools and [t.function for t in tools])
        return value

    @field_validator("functions")
    @classmethod
    def _functions_or_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("tools") is not None:
            raise ValueError("give tools or the deprecated functions, not both")
        return value

    @field_validator("function_call")
    @classmethod
    def _function_call_needs_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        name = value.name if isinstance(value, FunctionName) else None
        _check_choice("function_call", name, "functions", info.data.get("functions"))
        return value

    @model_validator(mode="after")
    def _functions_as_tools(self) -> "ChatCompletionRequest":
        """The deprecated functions are tools; function_call is tool_choice; one call at most."""
        if self.functions is not None:
            self.tools = [Tool(type="function", function=f) for f in self.functions]
            choice = self.function_call
            if isinstance(choice, FunctionName):
                choice = NamedToolChoice(type="function", function=choice)
            self.tool_choice = choice
            self.parallel_tool_calls = False
        return self

    @property
    def uses_functions(self) -> bool:
        """Whether the request used the deprecated functions: the reply uses function_call."""
        return self.functions is not None

    @property
    def calls_tools(self) -> bool:
        """Whether tools are offered to the model (tool_choice is not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None | bool:
        """The function a named tool_choice forces, True for 'required', else False."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice == "required"

    def tool_dicts(self) -> list[dict] | None:
        """The tools for the chat template, or None when none are offered."""
        if not self.calls_tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def max_tokens_param(self) -> str:
        """The name of the field that set the completion budget, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def completion_budget(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens; None = to context end."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def template_messages(self) -> list[dict]:
        """The messages as plain dicts for `LLM.encode_chat`."""
        return [message.for_template() for message in self.messages]

    def sampling_params(self, grammar: str | None = None) -> SamplingParams:
        """The engine's view of this request; `grammar` constrains every choice."""
        return sampling_params(
            self, self.completion_budget, bool(self.logprobs), self.top_logprobs or 0, grammar
        )


def _check_choice(
    field: str, name: str | None, given: str, functions: list[FunctionDefinition] | None
) -> None:
    """ValueError unless functions are given and a named choice is one of them."""
    if not functions:
        raise ValueError(f"{field} is only allowed when {given} are given")
    names = [function.name for function in functions]
    if name is not None and name not in names:
        raise ValueError(
            f"{field} names function '{name}', which is not in {given} ({', '.join(names)})"
        )


def sampling_params(
    request: Any, max_tokens: int | None, logprobs: bool, top_logprobs: int, grammar: str | None
) -> SamplingParams:
    """SamplingParams from the sampling fields chat and legacy completions share."""

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        temperature=given(request.temperature, 1.0),
        top_p=given(request.top_p, 1.0),
        top_k=max(request.top_k or 0, 0),
        min_p=given(request.min_p, 0.0),
        max_tokens=max_tokens,
        seed=request.seed,
        stop=tuple(request.stop or ()),
        frequency_penalty=given(request.frequency_penalty, 0.0),
        presence_penalty=given(request.presence_penalty, 0.0),
        repetition_penalty=given(request.repetition_penalty, 1.0),
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()} or None,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=request.n or 1,
        grammar=grammar,
        ignore_eos=request.ignore_eos,
    )


class CompletionRequest(Strict):
    """The body of the legacy `POST /v1/completions`: raw prompts, no chat template."""

    model: str = Field(min_length=1)
    # One prompt as text or token ids, or a batch of either (each gets n choices); an
    # empty prompt starts from the model's BOS token. Ids are checked against the vocabulary.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(
        default=16, ge=1, le=INT32_MAX, description="OpenAI's default is 16."
    )
    temperature: float | None = temperature_field
    top_p: float | None = top_p_field
    top_k: int | None = top_k_field
    min_p: float | None = min_p_field
    frequency_penalty: float | None = penalty_field
    presence_penalty: float | None = penalty_field
    repetition_penalty: float | None = repetition_penalty_field
    logit_bias: dict[TokenIdKey, LogitBias] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Alternatives per token.")
    n: int | None = n_field
    best_of: int | None = Field(default=None, ge=1, le=128)
    seed: int | None = seed_field
    echo: bool = False
    suffix: str | None = None
    ignore_eos: bool = False
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    _stop_as_list = field_validator("stop", mode="before")(
        ChatCompletionRequest._stop_as_list.__func__
    )
    _stream_options_need_stream = field_validator("stream_options")(
        ChatCompletionRequest._stream_options_need_stream.__func__
    )

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("best_of other than n is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: Any) -> Any:
        if value:
            raise ValueError("suffix (insertion) is not supported by this model")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> SamplingParams:
        logprobs = self.logprobs is not None
        return sampling_params(self, self.max_tokens, logprobs, self.logprobs or 0, None)


# Segments of a pydantic error location that name a union member, not a field.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_type_tag(part: str) -> bool:
    return (
        part in _TYPE_TAGS
        or "[" in part  # "list[TextPart]", "literal['none','auto']", "[key]"
        or (part.isidentifier() and part[0].isupper())  # a model class, "NamedToolChoice"
    )


def error_param(loc: tuple[str | int, ...]) -> str | None:
    """The OpenAI `param` for a pydantic error location, e.g. "messages.0.role".

    Union validation adds the member type to the location ("str",
    "list[TextPart]", "NamedToolChoice"); those segments are dropped.
    """
    parts = [str(part) for part in loc if isinstance(part, int) or not _is_type_tag(part)]
    return ".".join(parts) or None


def validation_error(exc: ValidationError) -> APIError:
    """A 400 for a pydantic error, naming the most specific failing field."""
    errors = exc.errors(include_url=False)
    # Within a union, the deepest error explains the mismatch best.
    error = max(errors, key=lambda e: len(e["loc"]))
    param = error_param(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "missing":
        message += f" (got {_short_repr(error.get('input'))})"
    message = f"{param or 'Request body'}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more validation error(s))"
    return invalid_request(message, param=param)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Responses.


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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, serialised


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """A reply message; `function_call` (deprecated) replaces `tool_calls` when the
    request used `functions`."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_calls(self, handler: Any) -> dict:
        data = handler(self)
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


class ChatCompletion(BaseModel):
    """A non-streamed reply."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class PresentFields(BaseModel):
    """A streamed object whose fields left None are omitted on the wire: the SDK
    concatenates repeated strings, so absent must mean absent, not null."""

    @model_serializer(mode="wrap")
    def _present_fields(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


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
    """What a chunk adds to a choice; fields left None are omitted on the wire."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None
    function_call: FunctionCallChunk | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed event; `usage` is null except in the final usage-only chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxchat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


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


class TextCompletion(BaseModel):
    """A legacy completion, or (streamed) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
