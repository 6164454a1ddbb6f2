"""Hermes tool calls: the tools prompt, parsing finished text, and the streaming parser."""

from __future__ import annotations

import random
import re

import pytest

from model.tool_calls import (
    ContentDelta,
    ParsedCall,
    ToolCallDelta,
    ToolCallStream,
    hermes_call_text,
    hermes_system_prompt,
    new_call_id,
    parse_tool_calls,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_call_id_format() -> None:
    ids = {new_call_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_hermes_system_prompt_matches_qwen25_wording() -> None:
    second = {"type": "function", "function": {"name": "now", "parameters": {}}}
    assert hermes_system_prompt([WEATHER, second]) == (
        "# Tools\n"
        "\n"
        "You may call one or more functions to assist with the user query.\n"
        "\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": '
        '"Current weather.", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}}}}\n'
        '{"type": "function", "function": {"name": "now", "parameters": {}}}\n'
        "</tools>\n"
        "\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n"
        "<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def test_hermes_call_text() -> None:
    expected = '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "é"}}\n</tool_call>'
    assert hermes_call_text("f", '{"a":1,"b":"\\u00e9"}') == expected
    assert hermes_call_text("f", {"a": 1, "b": "é"}) == expected
    # Not JSON: kept as a string value, so the block still parses.
    assert hermes_call_text("f", "{oops") == (
        '<tool_call>\n{"name": "f", "arguments": "{oops"}\n</tool_call>'
    )


def test_parse_plain_text() -> None:
    assert parse_tool_calls("Hello there.") == ("Hello there.", [])
    assert parse_tool_calls(" \n ") == (None, [])
    assert parse_tool_calls("") == (None, [])


def test_parse_text_and_one_call() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    )
    assert parse_tool_calls(text) == (
        "Let me check.\n",
        [ParsedCall("get_weather", '{"city":"Paris","days":2}')],
    )


def test_parse_two_calls_blank_content() -> None:
    text = (
        '\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>{"arguments": {"x": [1, 2]}, "name": "b"}</tool_call>\n'
    )
    assert parse_tool_calls(text) == (None, [ParsedCall("a", "{}"), ParsedCall("b", '{"x":[1,2]}')])


def test_parse_arguments_as_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"ß\\"}"}</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("f", '{"q":"ß"}')])


def test_parse_unterminated_final_block() -> None:
    text = 'Sure<tool_call>{"name": "a"}</tool_call><tool_call>\n{"name": "b", "arguments": {}}\n'
    assert parse_tool_calls(text) == ("Sure", [ParsedCall("a", "{}"), ParsedCall("b", "{}")])


def test_parse_list_in_one_block() -> None:
    # SmolLM2's own tool format puts a JSON list of calls in one block.
    text = '<tool_call>[{"name": "a", "arguments": {"n": 1}}, {"name": "b"}]</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("a", '{"n":1}'), ParsedCall("b", "{}")])


@pytest.mark.parametrize(
    "text",
    [
        'Hi <tool_call>{"name": "a", "arguments": {</tool_call>',  # malformed JSON
        '<tool_call>{"name": "a"}</tool_call><tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',  # empty name
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "a", "arguments": "not json"}</tool_call>',
        "<tool_call>[]</tool_call>",
        '<tool_call>{"name": "a"}<tool_call>{"name": "b"}</tool_call>',  # nested open tag
        "I would use <tool_call> here.",
    ],
)
def test_parse_invalid_block_makes_everything_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def test_text_between_and_after_blocks_is_dropped() -> None:
    text = 'A<tool_call>{"name": "a"}</tool_call> and <tool_call>{"name": "b"}</tool_call> done'
    assert parse_tool_calls(text) == ("A", [ParsedCall("a", "{}"), ParsedCall("b", "{}")])


def counting_ids() -> ToolCallStream:
    counter = iter(range(1000))
    return ToolCallStream(new_id=lambda: f"id{next(counter)}")


def run_stream(pieces: list[str]) -> tuple[str | None, list[ParsedCall], list[ToolCallDelta]]:
    stream = counting_ids()
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    parsed = [ParsedCall(c.name, c.arguments) for c in calls]
    return text or None, parsed, calls


STREAM_TEXTS = [
    "Hello there, no tools <tool here <tool_cal and <tool_call",
    "  \n\t",
    " leading space then text",
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>',
    '\n\n<tool_call>{"name": "a", "arguments": {"s": "</tool_call"}}',
    ' <tool_call>{"name": "a"}</tool_call><tool_call>{"name": 3}</tool_call>',
    '<<tool_call>{"name": "a"}</tool_call>',
    "ok <tool_call>{broken",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_equals_parse_for_random_splits(text: str) -> None:
    rng = random.Random(1234)
    expected = parse_tool_calls(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        content, parsed, calls = run_stream(pieces)
        assert (content, parsed) == expected, pieces
        assert [c.index for c in calls] == list(range(len(calls)))
        assert [c.id for c in calls] == [f"id{i}" for i in range(len(calls))]
    one_char = run_stream(list(text))
    assert one_char[:2] == expected


def test_partial_tag_is_held_back() -> None:
    stream = ToolCallStream()
    assert stream.feed("hello <tool") == [ContentDelta("hello ")]
    assert stream.feed("box") == [ContentDelta("<toolbox")]
    assert stream.feed(" <") == [ContentDelta(" ")]
    assert stream.finish() == [ContentDelta("<")]


def test_calls_come_at_finish_with_ids() -> None:
    stream = ToolCallStream()
    assert stream.feed("hello <tool") == [ContentDelta("hello ")]
    assert stream.feed('_call>{"name": "f", "arguments": {"a": 1}}</tool_call>') == []
    [call] = stream.finish()
    assert isinstance(call, ToolCallDelta)
    assert (call.index, call.name, call.arguments) == (0, "f", '{"a":1}')
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)


def test_blank_prefix_is_held_until_known() -> None:
    stream = ToolCallStream()
    assert stream.feed("\n ") == []
    assert stream.feed("Hi") == [ContentDelta("\n Hi")]

    stream = ToolCallStream()
    assert stream.feed("\n") == []
    assert stream.feed("<tool_call>{oops") == []
    assert stream.finish() == [ContentDelta("\n<tool_call>{oops")]  # a failed call is content
