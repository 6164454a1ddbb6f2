"""Hermes-style tool calls: the prompt that asks for them, and parsing them out of model text.

A model asks for a tool by writing one or more blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after optional prose (SmolLM2 may put a JSON list of such objects in one
block). `ToolCallStream` parses the text as it is generated, as OpenAI
streams calls: a call starts (id and name) once its header up to the opening
brace of its arguments has been read, and its arguments follow as fragments
of the model's own JSON text. `parse_tool_calls` runs the same parser over
finished text, so both give the same result for any split of the text.

What is a call:
- content is the text before the first block (None if blank); text between
  and after blocks is dropped;
- a block that is not a call before its first call starts (not JSON, no
  name, a name that is not one of the offered tools, arguments that are not
  an object) turns the whole text into content, when no call came before it;
- a call whose arguments never close as a JSON object (cut by max_tokens,
  or broken JSON) is incomplete: streamed as far as it went, but left out of
  a finished reply.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from model.text.call_block import (
    CALL_CLOSE,
    CALL_OPEN,
    Block,
    Call,
    ContentDelta,
    Event,
    ToolCallArguments,
    ToolCallStart,
)
from model.text.stream import longest_prefix_suffix

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "ContentDelta",
    "Event",
    "ParsedCall",
    "ToolCallArguments",
    "ToolCallStart",
    "ToolCallStream",
    "hermes_call_text",
    "hermes_system_prompt",
    "new_call_id",
    "parse_tool_calls",
]


@dataclass(frozen=True)
class ParsedCall:
    """One complete tool call: the function name and its arguments as JSON object text."""

    name: str
    arguments: str


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id: "call_" and 24 lowercase hex digits."""
    return "call_" + secrets.token_hex(12)


def hermes_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """System-prompt section offering `tools` (OpenAI tool dicts), worded as Qwen2.5's template.

    Each tool is one JSON line inside <tools></tools>, followed by the
    instruction to answer with <tool_call> blocks.
    """
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def hermes_call_text(name: str, arguments: str | dict[str, Any]) -> str:
    """One call as the model would write it: `<tool_call>\\n{json}\\n</tool_call>`.

    arguments: a dict or a JSON string (the OpenAI form); a string that is not
    JSON is kept as a JSON string value so the block stays valid JSON.
    """
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def parse_tool_calls(
    text: str, names: Collection[str] | None = None
) -> tuple[str | None, list[ParsedCall]]:
    """Split finished model output into (content, complete calls); see the module docstring.

    names: the functions that may be called (None: any name).
    """
    stream = ToolCallStream(names)
    events = stream.feed(text) + stream.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return (content if content.strip() else None), stream.complete_calls()


class ToolCallStream:
    """Incremental tool-call parsing of one choice's output (see the module docstring).

    Content is released as soon as it cannot be the start of <tool_call> (a
    possible partial tag is held back, and so is leading whitespace, since
    blank content is None). `feed` returns the events the new text completes;
    `finish` releases what was held back.
    """

    def __init__(
        self, names: Collection[str] | None = None, new_id: Callable[[], str] = new_call_id
    ) -> None:
        """names: callable functions (None: any); new_id makes call ids (tests pass their own)."""
        self._names = None if names is None else frozenset(names)
        self._new_id = new_id
        self._pending = ""  # content not yet released
        self._started = False  # non-blank content has been released
        self._plain = False  # the first block was not a call: everything is content
        self._block: Block | None = None  # the block being read
        self._calls: list[Call] = []  # every call started, in order

    def feed(self, text: str) -> list[Event]:
        """Add a piece of output; return the events it completes."""
        events: list[Event] = []
        while text:
            if self._plain:
                text, self._pending = self._pending + text, ""
                return events + self._release(text)
            if self._block is not None:
                text = self._feed_block(text, events)
            else:
                text = self._feed_outside(text, events)
        return events

    def finish(self) -> list[Event]:
        """End of output: the held-back content. A block still open is an incomplete
        tail (cut off): it is dropped, as is text after calls."""
        if self._block is not None or self._calls:
            return []
        rest, self._pending = self._pending, ""
        return self._release(rest) if self._started or rest.strip() else []

    def complete_calls(self, indices: Collection[int] | None = None) -> list[ParsedCall]:
        """The calls (among `indices`; default all) whose arguments closed as a JSON
        object, in order."""
        return [
            ParsedCall(call.name, call.arguments)
            for index, call in enumerate(self._calls)
            if call.complete and (indices is None or index in indices)
        ]

    def incomplete(self, indices: Collection[int] | None = None) -> bool:
        """Whether a started call (among `indices`; default all) did not complete."""
        return any(
            not call.complete
            for index, call in enumerate(self._calls)
            if indices is None or index in indices
        )

    def _feed_outside(self, text: str, events: list[Event]) -> str:
        """Text outside blocks: content (dropped once calls came) until a <tool_call>."""
        buffer = self._pending + text
        start = buffer.find(CALL_OPEN)
        if start < 0:
            ready = len(buffer) - longest_prefix_suffix(buffer, CALL_OPEN)
            if self._calls:
                self._pending = buffer[ready:]
            elif not self._started and not buffer[:ready].strip():
                self._pending = buffer  # blank so far: held until something follows
            else:
                self._pending = buffer[ready:]
                events += self._release(buffer[:ready])
            return ""
        before, self._pending = buffer[:start], ""
        if not self._calls:
            if self._started or before.strip():
                events += self._release(before)
            else:
                self._pending = before  # blank: content only if this block is not a call
        self._block = Block(self._names, self._new_id, self._calls)
        return buffer[start + len(CALL_OPEN) :]

    def _feed_block(self, text: str, events: list[Event]) -> str:
        """Text inside a block: its calls' events; returns the text after the block."""
        block = self._block
        assert block is not None  # inside a block
        block.feed(text, events)
        if block.state == "open":
            return ""
        self._block = None
        if block.state == "not_a_call":
            self._plain = True  # the first block is not a call: all of it is content
            content, self._pending = self._pending + CALL_OPEN + block.text, ""
            events += self._release(content)
            return ""
        self._pending = ""
        return block.rest

    def _release(self, text: str) -> list[Event]:
        self._started = True
        return [ContentDelta(text)] if text else []
