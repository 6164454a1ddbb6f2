"""Hermes tool calls: the tools prompt, parsing finished text, and the streaming parser."""

from __future__ import annotations

import random
import re

import pytest

from model.text.tool_calls import (
    ContentDelta,
    ParsedCall,
    ToolCallArguments,
    ToolCallStart,
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
    # The arguments are the model's own JSON text.
    assert parse_tool_calls(text) == (
        "Let me check.\n",
        [ParsedCall("get_weather", '{"city": "Paris", "days": 2}')],
    )


def test_parse_two_calls_blank_content() -> None:
    text = (
        '\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>{"arguments": {"x": [1, 2]}, "name": "b"}</tool_call>\n'
    )
    assert parse_tool_calls(text) == (
        None,
        [ParsedCall("a", "{}"), ParsedCall("b", '{"x": [1, 2]}')],
    )


def test_parse_arguments_as_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"ß\\"}"}</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("f", '{"q": "ß"}')])


def test_parse_other_members_and_parameters_key() -> None:
    text = (
        '<tool_call>{"id": 7, "x": [1, {"y": "}"}], "name": "a", '
        '"parameters": {"s": "a\\"b}"}, "z": null}</tool_call>'
    )
    assert parse_tool_calls(text) == (None, [ParsedCall("a", '{"s": "a\\"b}"}')])


def test_parse_unterminated_final_block() -> None:
    text = 'Sure<tool_call>{"name": "a"}</tool_call><tool_call>\n{"name": "b", "arguments": {}}\n'
    assert parse_tool_calls(text) == ("Sure", [ParsedCall("a", "{}"), ParsedCall("b", "{}")])


def test_parse_list_in_one_block() -> None:
    # SmolLM2's own tool format puts a JSON list of calls in one block.
    text = '<tool_call>[{"name": "a", "arguments": {"n": 1}}, {"name": "b"}]</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("a", '{"n": 1}'), ParsedCall("b", "{}")])


def test_a_call_cut_off_is_dropped_and_the_complete_ones_stay() -> None:
    # What a forced call looks like when max_tokens cuts a repeated call short.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for cut in (
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"ci',
        "\n<tool_",
        "\n<tool_call>\n{",
    ):
        assert parse_tool_calls(call + cut) == (
            None,
            [ParsedCall("get_weather", '{"city": "Paris"}')],
        ), cut
    # Cut before any call completed: neither calls nor markup.
    assert parse_tool_calls('Sure. <tool_call>\n{"name": "get_weather", "argu') == ("Sure. ", [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',  # empty name
        '<tool_call>{"name": 3}</tool_call>',  # name not a string
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "a", "arguments": "not json"}</tool_call>',
        "<tool_call>[]</tool_call>",
        "<tool_call>{broken",
        "I would use <tool_call> here.",
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',  # not an offered tool
    ],
)
def test_a_first_block_that_is_not_a_call_makes_everything_content(text: str) -> None:
    assert parse_tool_calls(text, names=["a", "get_weather"]) == (text, [])


def test_broken_arguments_after_the_call_began_leave_it_incomplete() -> None:
    # The call began when '{' opened its arguments; '<' cannot follow in JSON.
    text = 'Hi <tool_call>{"name": "a", "arguments": {</tool_call>'
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    assert events[0] == ContentDelta("Hi ")
    assert [type(e) for e in events[1:]] == [ToolCallStart, ToolCallArguments]
    assert stream.complete_calls() == [] and stream.incomplete()
    assert parse_tool_calls(text) == ("Hi ", [])


def test_text_between_and_after_blocks_is_dropped() -> None:
    text = 'A<tool_call>{"name": "a"}</tool_call> and <tool_call>{"name": "b"}</tool_call> done'
    assert parse_tool_calls(text) == ("A", [ParsedCall("a", "{}"), ParsedCall("b", "{}")])
    # A later block that is not a call is dropped with the rest, the calls stay.
    text = '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": 3}</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("a", "{}")])
    # ... but a call after it still counts.
    text += ' and <tool_call>{"name": "b"}</tool_call>'
    assert parse_tool_calls(text) == (None, [ParsedCall("a", "{}"), ParsedCall("b", "{}")])


def counting_ids() -> ToolCallStream:
    counter = iter(range(1000))
    return ToolCallStream(new_id=lambda: f"id{next(counter)}")


def run_stream(pieces: list[str]) -> tuple[str | None, list[ParsedCall], list[ToolCallStart]]:
    """Content, calls as a client accumulates them (complete or not), and the starts."""
    stream = counting_ids()
    events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    arguments = {start.index: "" for start in starts}
    for event in events:
        if isinstance(event, ToolCallArguments):
            arguments[event.index] += event.text
    calls = [ParsedCall(s.name, arguments[s.index]) for s in starts]
    return (text if text.strip() else None), calls, starts


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
    '<tool_call>[{"arguments": {"n": [1, {"m": "x\\\\"}]}, "name": "a"}, '
    '{"name": "b"}]</tool_call>',
    '<tool_call>\n{"name": "a", "arguments": {"c": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "a", "ar',
    '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": 3}</tool_call> x '
    '<tool_call>{"name": "b", "arguments": {"k": "<"}} junk</tool_call><tool_call>{"name": "c"',
    'A <tool_call>{"name": "a", "arguments": {"x": 1, <}}</tool_call><tool_call>{"name": "b"}',
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_equals_parse_for_random_splits(text: str) -> None:
    rng = random.Random(1234)
    stream = counting_ids()
    whole = stream.feed(text) + stream.finish()
    expected_content, complete = parse_tool_calls(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        content, calls, starts = run_stream(pieces)
        assert content == expected_content, pieces
        # Accumulated deltas give every started call; the complete ones are the parse's.
        assert [c for c in calls if c in complete] == complete
        assert [s.index for s in starts] == list(range(len(starts)))
        assert [s.id for s in starts] == [f"id{i}" for i in range(len(starts))]
        assert starts == [e for e in whole if isinstance(e, ToolCallStart)]
    assert run_stream(list(text))[:2] == run_stream([text])[:2]


def test_partial_tag_is_held_back() -> None:
    stream = ToolCallStream()
    assert stream.feed("hello <tool") == [ContentDelta("hello ")]
    assert stream.feed("box") == [ContentDelta("<toolbox")]
    assert stream.feed(" <") == [ContentDelta(" ")]
    assert stream.finish() == [ContentDelta("<")]


def test_a_call_streams_its_name_first_then_its_arguments_as_generated() -> None:
    stream = ToolCallStream(names=["f"])
    assert stream.feed("hello <tool") == [ContentDelta("hello ")]
    assert stream.feed('_call>{"name": "f", "argu') == []
    start, first = stream.feed('ments": {"a"')
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "f")
    assert re.fullmatch(r"call_[0-9a-f]{24}", start.id)
    # The fragment that opened the arguments comes right after the start.
    assert first == ToolCallArguments(0, '{"a"')
    assert stream.feed(": 1") == [ToolCallArguments(0, ": 1")]
    assert stream.incomplete()
    assert stream.feed("}}</tool_") == [ToolCallArguments(0, "}")]
    assert not stream.incomplete()
    assert stream.feed("call>") == []
    assert stream.finish() == []
    assert stream.complete_calls() == [ParsedCall("f", '{"a": 1}')]


def test_blank_prefix_is_held_until_known() -> None:
    stream = ToolCallStream()
    assert stream.feed("\n ") == []
    assert stream.feed("Hi") == [ContentDelta("\n Hi")]

    stream = ToolCallStream()
    assert stream.feed("\n") == []
    assert stream.feed("<tool_call>{oops") == [ContentDelta("\n<tool_call>{oops")]
    assert stream.finish() == []  # a failed call is content
