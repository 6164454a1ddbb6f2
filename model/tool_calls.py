"""Hermes-style tool calls: the prompt that asks for them, and parsing them out of model text.

A model asks for a tool by writing one or more blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after optional prose. `parse_tool_calls` splits finished text into that prose
(the OpenAI `content`) and the calls; `ToolCallStream` does the same for text
arriving in pieces, with the same result for any split. Parsing is all or
nothing, as `tool_choice: auto` needs: if any block is not a call, the whole
text is content.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ParsedCall:
    """One tool call: the function name and its arguments as a JSON object string."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    """Stream event: a piece of assistant content, in order."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Stream event: one complete tool call; index counts 0, 1, 2, … per stream."""

    index: int
    id: str
    name: str
    arguments: str


Event = ContentDelta | ToolCallDelta


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


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """Split finished model output into (content, calls).

    content is the text before the first <tool_call> (None if blank); text
    between or after blocks is dropped. A final block may lack its closing
    tag. If any block is not a call (not JSON, no name, arguments not an
    object), there are no calls and the whole text is content.
    """
    start = text.find(CALL_OPEN)
    if start < 0:
        return _content(text), []
    calls = _parse_blocks(text[start:])
    if calls is None:
        return _content(text), []
    return _content(text[:start]), calls


class ToolCallStream:
    """Incremental `parse_tool_calls` for streamed output.

    Content is released as soon as it cannot be the start of <tool_call> (a
    possible partial tag is held back, and so is leading whitespace, since
    blank content is None). Calls are released by `finish`: a later malformed
    block turns the whole text into content, so no call is final before the
    end. The concatenated content and the calls equal `parse_tool_calls` on
    the whole text, however it was split.
    """

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        """new_id: makes each call's id (tests pass a deterministic one)."""
        self._new_id = new_id
        self._pending = ""  # content not yet released
        self._started = False  # non-blank content has been released
        self._calls_text: str | None = None  # from the first <tool_call> on

    def feed(self, text: str) -> list[Event]:
        """Add a piece of output; return the content that is now safe to emit."""
        if self._calls_text is not None:
            self._calls_text += text
            return []
        self._pending += text
        start = self._pending.find(CALL_OPEN)
        if start >= 0:
            before, self._calls_text = self._pending[:start], self._pending[start:]
            if not self._started and not before.strip():
                self._pending = before  # blank content is None, unless the calls fail
                return []
            self._pending = ""
            return self._release(before)
        ready = len(self._pending) - _partial_tag_length(self._pending)
        if not self._started and not self._pending[:ready].strip():
            return []
        released, self._pending = self._pending[:ready], self._pending[ready:]
        return self._release(released)

    def finish(self) -> list[Event]:
        """End of output: return the held-back content, or the tool calls."""
        if self._calls_text is None:
            rest, self._pending = self._pending, ""
            return self._release(rest) if self._started or rest.strip() else []
        calls = _parse_blocks(self._calls_text)
        if calls is None:  # not calls after all: everything unreleased is content
            return self._release(self._pending + self._calls_text)
        return [
            ToolCallDelta(index=i, id=self._new_id(), name=c.name, arguments=c.arguments)
            for i, c in enumerate(calls)
        ]

    def _release(self, text: str) -> list[Event]:
        self._started = True
        return [ContentDelta(text)] if text else []


def _content(text: str) -> str | None:
    return text if text.strip() else None


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of <tool_call>."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0


def _parse_blocks(text: str) -> list[ParsedCall] | None:
    """Calls in `text`, which starts with <tool_call>; None if any block is not a call."""
    calls: list[ParsedCall] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        body_start = start + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        block = _parse_block(body)
        if block is None:
            return None
        calls.extend(block)
        if end < 0:
            break
        pos = end + len(CALL_CLOSE)
    return calls


def _parse_block(body: str) -> list[ParsedCall] | None:
    """The call(s) in one block body: an object, or a non-empty list of them (SmolLM2's form)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = []
    for item in data if isinstance(data, list) else [data]:
        call = _parse_call(item)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _parse_call(item: Any) -> ParsedCall | None:
    """A call object {"name": str, "arguments": object or JSON-object string}; missing = {}."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(
        item["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    )
