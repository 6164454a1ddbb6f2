"""Pydantic models of the OpenAI request bodies, and `parse_request` (body → model or 400).

`GenerationRequest` holds what chat completions and legacy completions share:
the model, the sampling fields and streaming. Its bounded types (`Temperature`,
`Penalty`, …) are declared once, as llama-cpp-python's `server/types.py` does,
so a range is written once; every integer is bounded. The parts of a chat
request (messages, tools, response format) and the strict base model are in
handler/request_parts.py. Unknown fields are ignored and logged by name.
Validation errors become 400s whose `param` names the offending field
("messages.0.role", "temperature"). What only the loaded model can check
(vocabulary, context, decode slots) is in model/limits.py; the grammars are
compiled in handler/chat.py. The deprecated `functions` / `function_call`
fields are read as tools.
"""

import logging
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypeIs

from handler.errors import validation_error
from handler.request_parts import (
    ChatMessage,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    Strict,
    Tool,
)
from model.types import SamplingParams

log = logging.getLogger(__name__)

# The largest value of an integer field that has no natural bound (the engine's int32).
INT32_MAX = 2**31 - 1
MAX_STOP_STRINGS = 4

# Shared, bounded types. `None` means "not sent": the engine default applies.
MaxTokens = Annotated[int | None, Field(ge=1, le=INT32_MAX, description="Most tokens to generate.")]
Temperature = Annotated[float | None, Field(ge=0.0, le=2.0, description="0 is greedy.")]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0, description="Nucleus mass kept.")]
TopK = Annotated[
    int | None, Field(ge=-1, le=INT32_MAX, description="Top tokens kept; 0 or -1 disable.")
]
MinP = Annotated[float | None, Field(ge=0.0, le=1.0, description="Min probability vs. the top.")]
Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0, description="OpenAI-style penalty.")]
RepetitionPenalty = Annotated[float | None, Field(gt=0.0, description="1 disables.")]
Seed = Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1, description="Sampling seed.")]
ChoiceCount = Annotated[int | None, Field(ge=1, le=128, description="Choices per prompt.")]
TopLogprobs = Annotated[int | None, Field(ge=0, le=20, description="Alternatives per token.")]
StopString = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^-?\d{1,10}$")]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]

Request = TypeVar("Request", bound=BaseModel)


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


class GenerationRequest(Strict):
    """What both completion routes take: the model, sampling fields and streaming.

    Subclasses say how logprobs are asked for (`logprob_alternatives`) and may
    name the completion budget otherwise (`completion_budget`, `max_tokens_param`).
    """

    model: str = Field(min_length=1)
    max_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    min_p: MinP = None
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    repetition_penalty: RepetitionPenalty = None
    logit_bias: dict[TokenIdKey, LogitBias] | None = None
    n: ChoiceCount = None
    seed: Seed = None
    ignore_eos: bool = Field(default=False, description="vLLM extension: run to max_tokens.")
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        """A single stop string is the same as a list of one."""
        if value == "":
            raise ValueError("stop strings must not be empty")
        return [value] if isinstance(value, str) else value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def completion_budget(self) -> int | None:
        """Tokens each choice may generate; None = to the end of the context."""
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name of the field that set the completion budget, for error messages."""
        return "max_tokens"

    def logprob_alternatives(self) -> int | None:
        """Alternatives reported per token; None when logprobs were not asked for."""
        raise NotImplementedError

    def sampling_params(self, grammar: str | None = None) -> SamplingParams:
        """The engine's view of this request; `grammar` constrains every choice."""

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        alternatives = self.logprob_alternatives()
        return SamplingParams(
            temperature=given(self.temperature, 1.0),
            top_p=given(self.top_p, 1.0),
            top_k=max(self.top_k or 0, 0),
            min_p=given(self.min_p, 0.0),
            max_tokens=self.completion_budget,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            presence_penalty=given(self.presence_penalty, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()} or None,
            logprobs=alternatives is not None,
            top_logprobs=alternatives or 0,
            n=self.n or 1,
            grammar=grammar,
            ignore_eos=self.ignore_eos,
        )


# Chat completions.


class ChatCompletionRequest(GenerationRequest):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, min_length=1)
    function_call: Literal["none", "auto"] | FunctionName | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
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
            call = self.function_call
            if isinstance(call, FunctionName):
                self.tool_choice = NamedToolChoice(type="function", function=call)
            else:
                self.tool_choice = call
            self.parallel_tool_calls = False
        return self

    @property
    def uses_functions(self) -> bool:
        """Whether the request used the deprecated functions: the reply uses function_call."""
        return self.functions is not None

    @property
    def offered_tools(self) -> list[Tool]:
        """The tools offered to the model: none when tool_choice is 'none'."""
        if self.tool_choice == "none":
            return []
        return self.tools or []

    @property
    def forced_tool(self) -> str | bool:
        """The function a named tool_choice forces, True for 'required', else False."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice == "required"

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools for the chat template, or None when none are offered."""
        return [tool.model_dump(exclude_none=True) for tool in self.offered_tools] or None

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def completion_budget(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens; None = to context end."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for `LLM.encode_chat`."""
        return [message.for_template() for message in self.messages]


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


# Legacy completions.


class CompletionRequest(GenerationRequest):
    """The body of the legacy `POST /v1/completions`: raw prompts, no chat template."""

    # One prompt as text or token ids, or a batch of either (each gets n choices); an
    # empty prompt starts from the model's BOS token. Ids are checked against the vocabulary.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens = 16  # OpenAI's default
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Alternatives per token.")
    best_of: ChoiceCount = None
    echo: bool = False
    suffix: str | None = None

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
    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or id list, or a batch of them (`[]` is one empty prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or _is_token_ids(prompt):
            return [prompt]
        return [each for each in prompt]

    def logprob_alternatives(self) -> int | None:
        return self.logprobs


def _is_token_ids(prompt: list[Any]) -> TypeIs[list[int]]:
    """Whether a list-valued prompt is one prompt's token ids (an empty list is one)."""
    return not prompt or isinstance(prompt[0], int)
