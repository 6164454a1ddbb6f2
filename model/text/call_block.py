"""The reader of one Hermes <tool_call> block's body, as the text arrives, and the
events it produces (model/text/tool_calls.py's `ToolCallStream` drives it)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3.1 writes "parameters"
WHITESPACE = " \t\r\n"
# What may stand outside strings inside JSON: structure, numbers, true/false/null.
JSON_BARE = frozenset("{}[],:-+.0123456789eEtrufalsn" + WHITESPACE)


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


@dataclass
class Call:
    """A started call: its name, the arguments text so far, whether they closed as an object."""

    name: str
    arguments: str = ""
    complete: bool = False


class NeedMore(Exception):
    """The text so far ends inside the current token: wait for more."""


class NotACall(Exception):
    """What follows is not (or no longer) a tool call."""


SCALAR = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")


class Block:
    """The body of one <tool_call> block, read as it arrives.

    A small JSON reader over a growing buffer, written as steps: each step
    returns the next one, and either completes or raises NeedMore before it
    changes anything but `pos`, so it can be retried from the same position
    when more text comes. Arguments are scanned character by character
    instead, and released as they arrive. state: "open"; "closed" (`rest` is
    the text after the block, or after where its calls stop making sense); or
    "not_a_call" (no call began, in this block or before it).
    """

    def __init__(
        self, names: frozenset[str] | None, new_id: Callable[[], str], calls: list[Call]
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
        self._scan: ContainerScan | None = None

    def feed(self, text: str, events: list[Event]) -> None:
        self.text += text
        while self.state == "open":
            mark = self.pos
            try:
                step = self._step(events)
            except NeedMore:
                self.pos = mark
                return
            except NotACall:
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
        while self.pos < len(self.text) and self.text[self.pos] in WHITESPACE:
            self.pos += 1
        if self.pos == len(self.text):
            raise NeedMore
        return self.text[self.pos]

    def _expect(self, chars: str) -> str:
        char = self._peek()
        if char not in chars:
            raise NotACall
        self.pos += 1
        return char

    def _string(self) -> str:
        if self._peek() != '"':
            raise NotACall
        end = self.pos
        while True:
            end = self.text.find('"', end + 1)
            if end < 0:
                raise NeedMore
            body = self.text[self.pos + 1 : end]
            if (len(body) - len(body.rstrip("\\"))) % 2 == 0:
                break  # not an escaped quote
        try:
            value = json.loads(self.text[self.pos : end + 1])
        except json.JSONDecodeError:
            raise NotACall from None
        self.pos = end + 1
        return value

    def _skip_value(self) -> None:
        """Skip one JSON value: a member this parser does not use."""
        first = self._peek()
        if first == '"':
            self._string()
            return
        if first in "{[":
            scan = ContainerScan(self.pos)
            scan.advance(self.text)
            if scan.broken:
                raise NotACall
            if not scan.closed:
                raise NeedMore
            self.pos = scan.pos
            return
        match = SCALAR.match(self.text, self.pos)
        if match is None:
            raise NotACall
        if match.end() == len(self.text):
            raise NeedMore  # a number may go on
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
            raise NotACall
        self._name = name
        if self._held is not None:
            self._whole_arguments(self._held, events)
        return self._after_member

    def _arguments_value(self, events: list[Event]):
        if self._peek() == '"':  # the arguments as a JSON string holding the object
            try:
                value = json.loads(self._string())
            except json.JSONDecodeError:
                raise NotACall from None
            if not isinstance(value, dict):
                raise NotACall
            text = json.dumps(value, ensure_ascii=False)
            if self._name is None:
                self._held = text
            else:
                self._whole_arguments(text, events)
            return self._after_member
        if self.text[self.pos] != "{":
            raise NotACall
        self._scan = ContainerScan(self.pos)
        if self._name is not None:
            self._begin(events)
        return self._scan_arguments

    def _scan_arguments(self, events: list[Event]):
        scan = self._scan
        assert scan is not None  # the step before began it
        start = scan.pos
        scan.advance(self.text)
        self.pos = scan.pos
        if self._begun:
            self._add_arguments(self.text[start : scan.pos], events)
        if scan.broken:
            raise NotACall
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
            raise NotACall
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
            raise NotACall  # something else follows the calls
        if len(available) < len(CALL_CLOSE):
            raise NeedMore
        self._close(self.pos + len(CALL_CLOSE))
        return None

    # ---- calls --------------------------------------------------------------------------

    def _begin(self, events: list[Event]) -> None:
        name = self._name
        assert name is not None  # a call begins once its name is read
        self.calls.append(Call(name))
        self._begun = True
        events.append(ToolCallStart(len(self.calls) - 1, self.new_id(), name))

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
            raise NotACall


class ContainerScan:
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
            elif char not in JSON_BARE:
                self.broken = True
                return
            self.pos += 1
