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
import re
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from model.text.stream import longest_prefix_suffix

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.1 writes "parameters"
_WHITESPACE = " \t\r\n"
# What may stand outside strings inside JSON: structure, numbers, true/false/null.
_JSON_BARE = frozenset("{}[],:-+.0123456789eEtrufalsn" + _WHITESPACE)


@dataclass(frozen=True)
class ParsedCall:
    """One complete tool call: the function name and its arguments as JSON object text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    """Stream event: a piece of assistant content, in order."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """Stream event: call `index` (0, 1, 2, … per stream) begins; its arguments follow."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """Stream event: the next fragment of call `index`'s arguments text."""

    index: int
    text: str


Event = ContentDelta | ToolCallStart | ToolCallArguments


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
        self._block: _Block | None = None  # the block being read
        self._calls: list[_Call] = []  # every call started, in order

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
        self._block = _Block(self._names, self._new_id, self._calls)
        return buffer[start + len(CALL_OPEN) :]

    def _feed_block(self, text: str, events: list[Event]) -> str:
        """Text inside a block: its calls' events; returns the text after the block."""
        block = self._block
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


@dataclass
class _Call:
    """A started call: its name, the arguments text so far, whether they closed as an object."""

    name: str
    arguments: str = ""
    complete: bool = False


class _NeedMore(Exception):
    """The text so far ends inside the current token: wait for more."""


class _NotACall(Exception):
    """What follows is not (or no longer) a tool call."""


_SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")


class _Block:
    """The body of one <tool_call> block, read as it arrives.

    A small JSON reader over a growing buffer, written as steps: each step
    returns the next one, and either completes or raises _NeedMore before it
    changes anything but `pos`, so it can be retried from the same position
    when more text comes. Arguments are scanned character by character
    instead, and released as they arrive. state: "open"; "closed" (`rest` is
    the text after the block, or after where its calls stop making sense); or
    "not_a_call" (no call began, in this block or before it).
    """

    def __init__(
        self, names: frozenset[str] | None, new_id: Callable[[], str], calls: list[_Call]
    ) -> None:
        self.names = names
        self.new_id = new_id
        self.calls = calls  # shared with the stream: this block appends its calls
        self.first = len(calls)
        self.text = ""
        self.pos = 0
        self.state = "open"
        self.rest = ""
        self._step = self._start
        self._in_list = False
        self._name: str | None = None  # of the object being read
        self._held: str | None = None  # its arguments, when they came before the name
        self._begun = False  # its call has started
        self._scan: _ContainerScan | None = None

    def feed(self, text: str, events: list[Event]) -> None:
        self.text += text
        while self.state == "open":
            mark = self.pos
            try:
                step = self._step(events)
            except _NeedMore:
                self.pos = mark
                return
            except _NotACall:
                if self.calls:  # after calls: the block ends where the calls do
                    self._close(self.pos)
                else:
                    self.state = "not_a_call"
                return
            if step is None:
                return
            self._step = step

    def _close(self, end: int) -> None:
        self.text, self.rest = self.text[:end], self.text[end:]
        self.state = "closed"

    # ---- reading ------------------------------------------------------------------------

    def _peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
            self.pos += 1
        if self.pos == len(self.text):
            raise _NeedMore
        return self.text[self.pos]

    def _expect(self, chars: str) -> str:
        char = self._peek()
        if char not in chars:
            raise _NotACall
        self.pos += 1
        return char

    def _string(self) -> str:
        if self._peek() != '"':
            raise _NotACall
        end = self.pos
        while True:
            end = self.text.find('"', end + 1)
            if end < 0:
                raise _NeedMore
            body = self.text[self.pos + 1 : end]
            if (len(body) - len(body.rstrip("\\"))) % 2 == 0:
                break  # not an escaped quote
        try:
            value = json.loads(self.text[self.pos : end + 1])
        except json.JSONDecodeError:
            raise _NotACall from None
        self.pos = end + 1
        return value

    def _skip_value(self) -> None:
        """Skip one JSON value: a member this parser does not use."""
        first = self._peek()
        if first == '"':
            self._string()
            return
        if first in "{[":
            scan = _ContainerScan(self.pos)
            scan.advance(self.text)
            if scan.broken:
                raise _NotACall
            if not scan.closed:
                raise _NeedMore
            self.pos = scan.pos
            return
        match = _SCALAR.match(self.text, self.pos)
        if match is None:
            raise _NotACall
        if match.end() == len(self.text):
            raise _NeedMore  # a number may go on
        self.pos = match.end()

    # ---- the steps ----------------------------------------------------------------------

    def _start(self, events: list[Event]):
        if self._expect("{[") == "[":
            self._in_list = True
            return self._object
        return self._key

    def _object(self, events: list[Event]):
        self._expect("{")
        return self._key

    def _key(self, events: list[Event]):
        if self._peek() == "}":
            self.pos += 1
            return self._end_object(events)
        key = self._string()
        self._expect(":")
        if key == "name":
            return self._name_value
        if key in ARGUMENT_KEYS:
            return self._arguments_value
        self._skip_value()
        return self._after_member

    def _name_value(self, events: list[Event]):
        name = self._string()
        if not isinstance(name, str) or not name or (self.names and name not in self.names):
            raise _NotACall
        self._name = name
        if self._held is not None:
            self._whole_arguments(self._held, events)
        return self._after_member

    def _arguments_value(self, events: list[Event]):
        if self._peek() == '"':  # the arguments as a JSON string holding the object
            try:
                value = json.loads(self._string())
            except json.JSONDecodeError:
                raise _NotACall from None
            if not isinstance(value, dict):
                raise _NotACall
            text = json.dumps(value, ensure_ascii=False)
            if self._name is None:
                self._held = text
            else:
                self._whole_arguments(text, events)
            return self._after_member
        if self.text[self.pos] != "{":
            raise _NotACall
        self._scan = _ContainerScan(self.pos)
        if self._name is not None:
            self._begin(events)
        return self._scan_arguments

    def _scan_arguments(self, events: list[Event]):
        scan = self._scan
        start = scan.pos
        scan.advance(self.text)
        self.pos = scan.pos
        if self._begun:
            self._add_arguments(self.text[start : scan.pos], events)
        if scan.broken:
            raise _NotACall
        if not scan.closed:
            return None  # wait for more, keeping what was scanned
        self._scan = None
        if self._begun:
            self._end_arguments()
        else:
            self._held = self.text[scan.start : scan.pos]
        return self._after_member

    def _after_member(self, events: list[Event]):
        if self._expect(",}") == ",":
            return self._key
        return self._end_object(events)

    def _end_object(self, events: list[Event]):
        if self._name is None:
            raise _NotACall
        if not self._begun:  # no arguments member: a call without arguments
            self._whole_arguments("{}", events)
        self._name, self._held, self._begun = None, None, False
        return self._after_object

    def _after_object(self, events: list[Event]):
        if self._in_list and self._expect(",]") == ",":
            return self._object
        return self._end_block

    def _end_block(self, events: list[Event]):
        self._peek()
        available = self.text[self.pos : self.pos + len(CALL_CLOSE)]
        if not CALL_CLOSE.startswith(available):
            raise _NotACall  # something else follows the calls
        if len(available) < len(CALL_CLOSE):
            raise _NeedMore
        self._close(self.pos + len(CALL_CLOSE))
        return None

    # ---- calls --------------------------------------------------------------------------

    def _begin(self, events: list[Event]) -> None:
        self.calls.append(_Call(self._name))
        self._begun = True
        events.append(ToolCallStart(len(self.calls) - 1, self.new_id(), self._name))

    def _add_arguments(self, text: str, events: list[Event]) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(ToolCallArguments(len(self.calls) - 1, text))

    def _whole_arguments(self, text: str, events: list[Event]) -> None:
        self._begin(events)
        self._add_arguments(text, events)
        self._end_arguments()

    def _end_arguments(self) -> None:
        """Mark the current call complete if its arguments parse as an object."""
        call = self.calls[-1]
        try:
            call.complete = isinstance(json.loads(call.arguments), dict)
        except json.JSONDecodeError:
            call.complete = False
        if not call.complete:
            raise _NotACall


class _ContainerScan:
    """Finds where the JSON object or array starting at `start` ends, char by char.

    Tracks nesting and strings only; a character that cannot stand outside a
    string in JSON (such as the '<' of a closing tag) breaks the value.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.closers: list[str] = []
        self.in_string = False
        self.escaped = False
        self.closed = False
        self.broken = False

    def advance(self, text: str) -> None:
        """Consume `text` from `pos` until the value closes or breaks, or the text ends."""
        while self.pos < len(text) and not (self.closed or self.broken):
            char = text[self.pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.closers.append("}" if char == "{" else "]")
            elif char in "}]":
                if not self.closers or self.closers.pop() != char:
                    self.broken = True
                    return
                self.closed = not self.closers
            elif char not in _JSON_BARE:
                self.broken = True
                return
            self.pos += 1
