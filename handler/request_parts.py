"""The parts of request bodies: the strict base model, chat messages, tools and the
response format.

Types are strict, as OpenAI's are: `"0.5"` is not a number and `1` not a
boolean (an integer is a number, though). Unknown fields are accepted and
ignored, as OpenAI and vLLM do. The deprecated `function` role and an
assistant's `function_call` are read as a tool result and a tool call.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from model.text.chat_template import flatten_content

FunctionNameText = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class Strict(BaseModel):
    """A request model: strict types, finite numbers, unknown fields accepted."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class StreamOptions(Strict):
    include_usage: bool | None = None


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

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template expects it: role and string content
        (text parts joined by the template's own `flatten_content`)."""
        message = self.model_dump(
            exclude_none=True, include={"role", "content", "name", "tool_call_id"}
        )
        message.setdefault("content", "")
        if self.role == "function":
            message["role"] = "tool"
        calls = self.tool_calls
        if not calls and self.function_call is not None:
            calls = [ToolCall(id="call_0", function=self.function_call)]
        if calls:
            message["tool_calls"] = [
                call.model_dump(include={"id", "type", "function"}) for call in calls
            ]
        return flatten_content(message)


class FunctionDefinition(Strict):
    name: FunctionNameText
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
    name: FunctionNameText
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
