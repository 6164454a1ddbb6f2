"""The HTTP handler against a fake engine whose every output is computable by hand.

The app under test is the one functions-framework builds (tests/function_app.py),
with each test's own fake model host.
"""

import json
import os
import signal
import threading
import time

import pytest

from handler.model_host import ModelHost
from handler.settings import Settings
from model.types import SamplingParams
from tests.fake_model import (
    CHAT,
    HELLO,
    HELLO_PROMPT_TOKENS,
    MODEL,
    REPLY,
    FakeLLM,
    assert_error,
    chat_body,
    sse_events,
)
from tests.server_process import run_python_report

# Replies.


def test_non_streamed_reply_shape(serve):
    response = serve().post(CHAT, json=chat_body())
    assert response.status_code == 200
    reply = response.get_json()
    assert reply["id"].startswith("chatcmpl-") and len(reply["id"]) == len("chatcmpl-") + 32
    assert isinstance(reply["created"], int)
    assert reply["system_fingerprint"].startswith("fp_")
    del reply["id"], reply["created"], reply["system_fingerprint"]
    assert reply == {
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": HELLO_PROMPT_TOKENS,
            "completion_tokens": len(REPLY),
            "total_tokens": HELLO_PROMPT_TOKENS + len(REPLY),
        },
    }


def test_ids_are_unique_per_reply(serve):
    client = serve()
    ids = {client.post(CHAT, json=chat_body()).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_streamed_reply_framing(serve):
    response = serve().post(CHAT, json=chat_body(stream=True))
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello"}, None),
        ({"content": ","}, None),
        ({"content": " world"}, None),
        ({"content": "!"}, "stop"),
    ]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == MODEL
        assert chunk["usage"] is None
        assert chunk["choices"][0]["index"] == 0 and chunk["choices"][0]["logprobs"] is None


def test_stream_usage_chunk_only_with_include_usage(serve):
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    events = sse_events(serve().post(CHAT, json=body))
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": HELLO_PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": HELLO_PROMPT_TOKENS + 3,
    }
    assert usage_chunk["id"] == chunks[0]["id"]
    assert all(chunk["usage"] is None for chunk in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes == [None, "length"]
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hel"}


def test_include_usage_false_sends_no_usage_chunk(serve):
    body = chat_body(stream=True, stream_options={"include_usage": False})
    events = sse_events(serve().post(CHAT, json=body))
    assert all(event == "[DONE]" or event["choices"] for event in events)


def test_max_tokens_gives_length_and_counts(serve):
    reply = serve().post(CHAT, json=chat_body(max_tokens=3)).get_json()
    assert reply["choices"][0]["message"]["content"] == "Hel"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


def test_request_becomes_sampling_params(serve):
    fake = FakeLLM()
    client = serve(llm=fake)
    body = chat_body(
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        seed=7,
        stop="wor",
        max_tokens=10,
        max_completion_tokens=6,
    )
    reply = client.post(CHAT, json=body).get_json()
    assert fake.calls[-1] == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=0, max_tokens=6, seed=7, stop=("wor",)
    )
    assert reply["choices"][0]["message"]["content"] == "Hello,"
    client.post(CHAT, json=chat_body())
    assert fake.calls[-1] == SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=None)


def test_stop_list_is_passed_whole(serve):
    fake = FakeLLM()
    reply = serve(llm=fake).post(CHAT, json=chat_body(stop=["xyz", " wo"])).get_json()
    assert fake.calls[-1].stop == ("xyz", " wo")
    assert reply["choices"][0]["message"]["content"] == "Hello,"
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_text_parts_are_joined_for_the_template(serve):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = chat_body(messages=[{"role": "user", "content": parts}])
    reply = serve().post(CHAT, json=body).get_json()
    assert reply["usage"]["prompt_tokens"] == len("user: a\nb\n")


@pytest.mark.parametrize("path", [CHAT, "/chat/completions", "/api/v1/chat/completions"])
def test_chat_path_aliases(serve, path):
    response = serve().post(path, json=chat_body())
    assert response.get_json()["choices"][0]["message"]["content"] == REPLY


def test_closing_the_stream_cancels_generation(serve):
    fake = FakeLLM()
    response = serve(llm=fake).post(CHAT, json=chat_body(stream=True), buffered=False)
    body = response.iter_encoded()
    assert next(body).startswith(b'data: {"id":"chatcmpl-')
    assert fake.closed_streams == 0
    response.close()
    assert fake.closed_streams == 1


# Tool calls, as a model writes them and as OpenAI streams them.

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
# Prose, a call to get_weather for Paris, then one for Rome.
CALL_PIECES = (
    "Sure.",
    "\n<tool_call>\n",
    '{"name": "get_weather", ',
    '"arguments": {"city": ',
    '"Paris"}}',
    "\n</tool_call>",
    "\n<tool_call>\n",
    '{"name": "get_weather", "arguments": {"ci',
    'ty": "Rome"}}\n</tool_call>',
)
CALLS_TEXT = "".join(CALL_PIECES)
CUT_IN_SECOND_CALL = CALLS_TEXT.index("Rome")


def tool_chat(serve, **fields):
    llm = FakeLLM(max_seq_len=512, pieces=CALL_PIECES)
    return serve(llm=llm).post(CHAT, json=chat_body(tools=[WEATHER_TOOL], **fields))


def streamed_calls(events: list) -> tuple[str, dict[int, list[dict]], list[str]]:
    """(content, tool-call parts per index in order, finish reasons) of an SSE reply."""
    content, parts, finishes = "", {}, []
    for event in events[:-1]:
        choice = event["choices"][0]
        content += choice["delta"].get("content") or ""
        for part in choice["delta"].get("tool_calls", []):
            parts.setdefault(part["index"], []).append(part)
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return content, parts, finishes


def test_tool_calls_non_streamed(serve):
    choice = tool_chat(serve).get_json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure.\n"
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"]) for c in calls] == [("function", "get_weather")] * 2
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert len({c["id"] for c in calls}) == 2


def test_streamed_tool_calls_carry_id_and_name_once_then_argument_fragments(serve):
    content, parts, finishes = streamed_calls(sse_events(tool_chat(serve, stream=True)))
    assert content == "Sure.\n" and finishes == ["tool_calls"]
    assert sorted(parts) == [0, 1]
    for index, city in ((0, "Paris"), (1, "Rome")):
        first, *rest = parts[index]
        assert first["id"].startswith("call_") and first["type"] == "function"
        assert first["function"]["name"] == "get_weather"
        # Later parts carry only the index and argument fragments, as generated.
        assert rest and all(set(p) == {"index", "function"} for p in rest)
        assert all(set(p["function"]) == {"arguments"} for p in rest)
        arguments = "".join(p["function"].get("arguments", "") for p in parts[index])
        assert json.loads(arguments) == {"city": city}
    # The start comes with the first fragment ('{"city": '), then '"Paris"}' follows.
    assert len(parts[0]) == 2


def test_a_reply_cut_by_max_tokens_keeps_its_complete_calls(serve):
    choice = tool_chat(serve, max_tokens=CUT_IN_SECOND_CALL).get_json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure.\n"
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # Streamed, the cut call was already under way: finish_reason says so.
    events = sse_events(tool_chat(serve, max_tokens=CUT_IN_SECOND_CALL, stream=True))
    _, parts, finishes = streamed_calls(events)
    assert sorted(parts) == [0, 1] and finishes == ["length"]


@pytest.mark.parametrize(
    "fields",
    [
        {"parallel_tool_calls": False},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ],
    ids=["parallel_tool_calls false", "named tool_choice"],
)
def test_one_call_when_parallel_calls_are_off(serve, fields):
    response = tool_chat(serve, **fields)
    [call] = response.get_json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    _, parts, finishes = streamed_calls(sse_events(tool_chat(serve, stream=True, **fields)))
    assert sorted(parts) == [0] and finishes == ["tool_calls"]


def test_with_parallel_calls_off_only_the_first_call_counts_even_when_broken(serve):
    broken_first = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": <}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
    )
    llm = FakeLLM(max_seq_len=512, pieces=broken_first)
    client = serve(llm=llm)
    body = chat_body(tools=[WEATHER_TOOL])
    choice = client.post(CHAT, json=body).get_json()["choices"][0]
    assert [c["function"]["arguments"] for c in choice["message"]["tool_calls"]] == ["{}"]
    one = client.post(CHAT, json={**body, "parallel_tool_calls": False}).get_json()["choices"][0]
    assert (one["message"], one["finish_reason"]) == (
        {"role": "assistant", "content": None},
        "stop",
    )


def test_deprecated_functions_get_a_function_call(serve):
    llm = FakeLLM(max_seq_len=512, pieces=CALL_PIECES)
    client = serve(llm=llm)
    body = chat_body(
        functions=[{"name": "get_weather", "parameters": {"type": "object"}}],
        messages=[
            *HELLO,
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "18 C"},
        ],
    )
    choice = client.post(CHAT, json=body).get_json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert llm.calls[-1].grammar is None  # function_call auto: nothing forced
    events = sse_events(client.post(CHAT, json={**body, "stream": True}))
    parts = [
        e["choices"][0]["delta"]["function_call"]
        for e in events[:-1]
        if "function_call" in e["choices"][0]["delta"]
    ]
    assert parts[0]["name"] == "get_weather" and all("name" not in p for p in parts[1:])
    assert json.loads("".join(p["arguments"] for p in parts)) == {"city": "Paris"}
    assert events[-2]["choices"][0]["finish_reason"] == "function_call"


def test_function_messages_reach_the_template_as_tool_turns(serve):
    llm = FakeLLM(max_seq_len=512)
    seen = []
    llm.encode_chat = lambda messages, tools=None: seen.append((messages, tools)) or [65]
    body = chat_body(
        functions=[{"name": "f"}],
        function_call={"name": "f"},
        messages=[
            *HELLO,
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "f", "arguments": "{}"},
            },
            {"role": "function", "name": "f", "content": "done"},
        ],
    )
    serve(llm=llm).post(CHAT, json=body)
    messages, tools = seen[0]
    assert messages[1]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    assert messages[2] == {"role": "tool", "name": "f", "content": "done"}
    assert tools == [{"type": "function", "function": {"name": "f"}}]


# Legacy completions: empty prompts.


@pytest.mark.parametrize("prompt", ["", [], [[]], [""]])
def test_an_empty_prompt_starts_from_bos(serve, prompt):
    llm = FakeLLM(bos_id=2)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "echo": True}
    reply = serve(llm=llm).post("/v1/completions", json=body).get_json()
    assert reply["choices"][0]["text"] == "Hell"  # the echo of an empty prompt is empty
    assert reply["usage"]["prompt_tokens"] == 1


def test_an_empty_prompt_without_bos_is_400(serve):
    llm = FakeLLM()
    response = serve(llm=llm).post("/v1/completions", json={"model": MODEL, "prompt": ""})
    error = assert_error(response, 400, "invalid_request_error", "prompt")
    assert "BOS" in error["message"] and llm.calls == []


# Validation.

BAD_REQUESTS = {
    "missing messages": (chat_body(messages=...), "messages"),
    "empty messages": (chat_body(messages=[]), "messages"),
    "messages not a list": (chat_body(messages="hi"), "messages"),
    "bad role": (chat_body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    "missing content": (chat_body(messages=[{"role": "user"}]), "messages.0.content"),
    "second message bad": (
        chat_body(messages=[*HELLO, {"role": "user", "content": 5}]),
        "messages.1.content",
    ),
    "image part": (
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages.0.content.0.type",
    ),
    "missing model": (chat_body(model=...), "model"),
    "temperature 3": (chat_body(temperature=3), "temperature"),
    "temperature -0.1": (chat_body(temperature=-0.1), "temperature"),
    "top_p 0": (chat_body(top_p=0), "top_p"),
    "top_p 1.5": (chat_body(top_p=1.5), "top_p"),
    "top_k -2": (chat_body(top_k=-2), "top_k"),
    "min_p 2": (chat_body(min_p=2), "min_p"),
    "stop list of 5": (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    "empty stop string": (chat_body(stop=""), "stop"),
    "empty string in stop list": (chat_body(stop=["a", ""]), "stop.1"),
    "stream_options without stream": (
        chat_body(stream_options={"include_usage": True}),
        "stream_options",
    ),
    "max_tokens 0": (chat_body(max_tokens=0), "max_tokens"),
    "max_tokens 1.5": (chat_body(max_tokens=1.5), "max_tokens"),
    "max_completion_tokens -1": (chat_body(max_completion_tokens=-1), "max_completion_tokens"),
    "presence_penalty 3": (chat_body(presence_penalty=3), "presence_penalty"),
    "frequency_penalty -2.5": (chat_body(frequency_penalty=-2.5), "frequency_penalty"),
    "repetition_penalty 0": (chat_body(repetition_penalty=0), "repetition_penalty"),
    "n 0": (chat_body(n=0), "n"),
    "n 129": (chat_body(n=129), "n"),
    "top_logprobs without logprobs": (chat_body(top_logprobs=2), "top_logprobs"),
    "top_logprobs 21": (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    "seed beyond int64": (chat_body(seed=2**63), "seed"),
    "seed not a number": (chat_body(seed="abc"), "seed"),
    "logit_bias beyond 100": (chat_body(logit_bias={"5": 101}), "logit_bias.5"),
    "logit_bias key not a token id": (chat_body(logit_bias={"abc": 1}), "logit_bias.abc"),
    "unknown tool_choice": (chat_body(tool_choice="sometimes"), "tool_choice"),
    "unknown response_format": (chat_body(response_format={"type": "xml"}), "response_format.type"),
    # Types are strict, as OpenAI's are.
    "temperature as a string": (chat_body(temperature="0.5"), "temperature"),
    "stream as a string": (chat_body(stream="yes"), "stream"),
    "stream as a number": (chat_body(stream=1), "stream"),
    "logprobs as a number": (chat_body(logprobs=1), "logprobs"),
    "n as a float": (chat_body(n=2.0), "n"),
    "content part text as a number": (
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages.0.content.0.text",
    ),
    # Every integer is bounded.
    "top_k beyond int32": (chat_body(top_k=2**31), "top_k"),
    "max_tokens beyond int32": (chat_body(max_tokens=2**31), "max_tokens"),
    "logit_bias key of many digits": (
        chat_body(logit_bias={"1" * 5000: 1}),
        "logit_bias." + "1" * 5000,
    ),
    # Text must be valid Unicode.
    "lone surrogate in content": (
        chat_body(messages=[{"role": "user", "content": "hi \ud800"}]),
        "messages.0.content",
    ),
    "lone surrogate in a text part": (
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
        "messages.0.content.0.text",
    ),
    "lone surrogate in a tool description": (
        chat_body(
            tools=[{"type": "function", "function": {"name": "f", "description": "a\udc00"}}]
        ),
        "tools.0.function.description",
    ),
    "lone surrogate in a key": (chat_body(metadata={"k\ud800": 1}), "metadata"),
    "nesting beyond 64 levels": (
        chat_body(response_format={"type": "json_object", "x": json.loads("[" * 70 + "]" * 70)}),
        "response_format",
    ),
    # The deprecated functions.
    "function message without a name": (
        chat_body(messages=[{"role": "function", "content": "18 C"}]),
        "messages.0.name",
    ),
    "functions and tools": (
        chat_body(
            tools=[{"type": "function", "function": {"name": "f"}}], functions=[{"name": "g"}]
        ),
        "functions",
    ),
    "function_call without functions": (chat_body(function_call="auto"), "function_call"),
    "function_call not in functions": (
        chat_body(functions=[{"name": "f"}], function_call={"name": "g"}),
        "function_call",
    ),
}


@pytest.mark.parametrize("body, param", BAD_REQUESTS.values(), ids=list(BAD_REQUESTS))
def test_invalid_request_names_the_param(serve, body, param):
    llm = FakeLLM()
    response = serve(llm=llm).post(CHAT, json=body)
    error = assert_error(response, 400, "invalid_request_error", param)
    assert error["message"].startswith(param[:200])
    assert llm.calls == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_declared_as_json_is_400(serve, content_type):
    client = serve()
    data = json.dumps(chat_body())
    error = assert_error(
        client.post(CHAT, data=data, content_type=content_type), 400, "invalid_request_error"
    )
    assert "application/json" in error["message"] and error["code"] == "invalid_content_type"
    # A body with no Content-Type at all, or a +json one, is read as JSON.
    for content_type in (None, "application/vnd.api+json", "application/json; charset=utf-8"):
        reply = client.post(CHAT, data=data, content_type=content_type).get_json()
        assert reply["choices"][0]["message"]["content"] == REPLY, content_type


TOOL = {"type": "function", "function": {"name": "f"}}
MODEL_CHECKS = {
    "tool_choice required without tools": (chat_body(tool_choice="required"), "tool_choice"),
    "tool_choice auto without tools": (chat_body(tool_choice="auto"), "tool_choice"),
    "named tool_choice not in tools": (
        chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        "tool_choice",
    ),
    "tool name with spaces": (
        chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]),
        "tools.0.function.name",
    ),
    "json_schema without its schema object": (
        chat_body(response_format={"type": "json_schema"}),
        "response_format.json_schema",
    ),
    "json_schema without a name": (
        chat_body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema.name",
    ),
    "n beyond the decode slots": (chat_body(n=5), "n"),
    "logit_bias token beyond the vocabulary": (chat_body(logit_bias={"1114112": 5}), "logit_bias"),
}


@pytest.mark.parametrize("body, param", MODEL_CHECKS.values(), ids=MODEL_CHECKS.keys())
def test_requests_the_model_cannot_serve_are_400_naming_the_param(serve, body, param):
    llm = FakeLLM()
    error = assert_error(serve(llm=llm).post(CHAT, json=body), 400, "invalid_request_error", param)
    assert llm.calls == []  # nothing reached the engine
    assert error["message"]


def test_every_sampling_field_reaches_the_engine(serve):
    llm = FakeLLM()
    body = chat_body(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        frequency_penalty=0.5,
        presence_penalty=-1,
        repetition_penalty=1.1,
        logit_bias={"65": -100, "66": 2.5},
        logprobs=True,
        top_logprobs=3,
        seed=-7,
        stop=["zz"],
        max_completion_tokens=9,
    )
    assert serve(llm=llm).post(CHAT, json=body).status_code == 200
    assert llm.calls == [
        SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            max_tokens=9,
            seed=-7,
            stop=("zz",),
            frequency_penalty=0.5,
            presence_penalty=-1.0,
            repetition_penalty=1.1,
            logit_bias={65: -100.0, 66: 2.5},
            logprobs=True,
            top_logprobs=3,
        )
    ]


def test_neutral_values_are_accepted(serve):
    body = chat_body(
        n=1,
        logprobs=False,
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="none",
        response_format={"type": "text"},
        frequency_penalty=0,
        presence_penalty=0.0,
        repetition_penalty=1,
        logit_bias={},
        min_p=0,
        parallel_tool_calls=True,
        user="u-1",
    )
    assert serve().post(CHAT, json=body).get_json()["choices"][0]["message"]["content"] == REPLY


def test_unknown_fields_are_accepted_and_logged(serve, caplog):
    body = chat_body(frobnicate={"secret": "s3cr3t"}, messages=[{**HELLO[0], "extra": 1}])
    with caplog.at_level("INFO"):
        response = serve().post(CHAT, json=body)
    assert response.get_json()["choices"][0]["message"]["content"] == REPLY
    assert "frobnicate" in caplog.text
    assert "s3cr3t" not in caplog.text


GARBAGE_BODIES = {
    "not json": b"hello",
    "empty": b"",
    "truncated": b'{"model": ',
    "not utf-8": b'{"model": "\xff"}',
    "array": b"[1, 2]",
    "null": b"null",
    "deep nesting": b"[" * 100_000,
    "NaN temperature": json.dumps(chat_body(temperature=float("nan"))).encode(),
    "Infinity in an unknown field": json.dumps(chat_body(x=float("inf"))).encode(),
}


@pytest.mark.parametrize("data", GARBAGE_BODIES.values(), ids=GARBAGE_BODIES.keys())
def test_garbage_bodies_are_400(serve, data):
    response = serve().post(CHAT, data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "invalid_request_error"


def test_body_too_large_is_413(serve):
    client = serve(max_request_bytes=1024)
    big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
    assert_error(client.post(CHAT, json=big), 413, "invalid_request_error")
    assert client.post(CHAT, json=chat_body()).status_code == 200


# Routing.


def test_unknown_model_is_404(serve):
    response = serve().post(CHAT, json=chat_body(model="gpt-4o"))
    error = assert_error(response, 404, "not_found_error", "model", "model_not_found")
    assert "gpt-4o" in error["message"]


@pytest.mark.parametrize("path", ["/v2/chat/completions", "/v1/audio/speech", "/index.html", "/v1"])
def test_unknown_path_is_404(serve, path):
    assert_error(serve().post(path, json=chat_body()), 404, "not_found_error")


def test_wrong_method_is_405(serve):
    client = serve()
    response = client.get(CHAT)
    assert_error(response, 405, "invalid_request_error")
    assert response.headers["Allow"] == "POST"
    response = client.post("/v1/models", json={})
    assert_error(response, 405, "invalid_request_error")
    assert response.headers["Allow"] == "GET"


def test_models_list_and_retrieve(serve):
    client = serve()
    listing = client.get("/v1/models").get_json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "jaxchat"
    assert isinstance(card["created"], int)
    assert client.get(f"/v1/models/{MODEL}").get_json() == card
    assert client.get("/api/v1/models").get_json() == listing
    error = assert_error(client.get("/v1/models/other"), 404, "not_found_error")
    assert error["code"] == "model_not_found"


def test_served_model_name_comes_from_settings(serve):
    client = serve(model_name="tiny")
    assert client.get("/v1/models").get_json()["data"][0]["id"] == "tiny"
    assert client.post(CHAT, json=chat_body(model="tiny")).get_json()["model"] == "tiny"
    assert client.post(CHAT, json=chat_body()).status_code == 404


def test_model_aliases_are_listed_served_and_echoed(serve, monkeypatch):
    monkeypatch.setenv("JAXCHAT_MODEL_ALIASES", "default, fast,pro")
    client = serve()
    ids = [card["id"] for card in client.get("/v1/models").get_json()["data"]]
    assert ids == [MODEL, "default", "fast", "pro"]
    for name in ("fast", MODEL):
        assert client.post(CHAT, json=chat_body(model=name)).get_json()["model"] == name
        assert client.get(f"/v1/models/{name}").get_json()["id"] == name
    stream = client.post(CHAT, json=chat_body(model="pro", stream=True)).get_data(as_text=True)
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line[6:].startswith("{")]
    assert chunks and all(chunk["model"] == "pro" for chunk in chunks)
    response = client.post(CHAT, json=chat_body(model="slow"))
    assert_error(response, 404, "not_found_error", param="model", code="model_not_found")
    assert client.get("/v1/models/slow").status_code == 404


# Auth.


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", "Basic k1", "k1", "Bearer k1x", "Bearer ké"],
)
def test_bad_or_missing_key_is_401(serve, authorization):
    client = serve(api_keys=["k1", "k2"])
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post(CHAT, json=chat_body(), headers=headers)
    assert_error(response, 401, "authentication_error", code="invalid_api_key")
    assert_error(client.get("/v1/models", headers=headers), 401, "authentication_error")


@pytest.mark.parametrize("key", ["k1", "k2"])
def test_any_configured_key_is_accepted(serve, key):
    client = serve(api_keys=["k1", "k2"])
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post(CHAT, json=chat_body(), headers=headers).status_code == 200
    assert client.get("/v1/models", headers=headers).status_code == 200


def test_health_needs_no_key_and_no_keys_means_open(serve):
    assert serve(api_keys=["k1"]).get("/health").get_json() == {"status": "ok"}
    assert serve().post(CHAT, json=chat_body()).status_code == 200


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("JAXCHAT_API_KEYS", " a, b ,,")
    monkeypatch.setenv("JAXCHAT_MAX_SEQ_LEN", "512")
    monkeypatch.setenv("JAXCHAT_DTYPE", "bfloat16")
    monkeypatch.setenv("JAXCHAT_MODEL", "/models/x.gguf")
    monkeypatch.setenv("PORT", "9090")
    settings = Settings()
    assert settings.api_keys == ["a", "b"]
    assert (settings.max_seq_len, settings.dtype, settings.llm_dtype) == (
        512,
        "bfloat16",
        "bfloat16",
    )
    assert (settings.model, settings.port) == ("/models/x.gguf", 9090)
    monkeypatch.delenv("JAXCHAT_API_KEYS")
    monkeypatch.setenv("JAXCHAT_DTYPE", "auto")
    assert Settings().api_keys == [] and Settings().llm_dtype is None
    assert Settings().llm_unrolled_decode is None
    for value, unrolled in (("on", True), ("off", False)):
        monkeypatch.setenv("JAXCHAT_UNROLLED_DECODE", value)
        assert Settings().llm_unrolled_decode is unrolled
    monkeypatch.setenv("JAXCHAT_UNROLLED_DECODE", "yes")
    with pytest.raises(ValueError):
        Settings()


# Model lifecycle and engine failures.


def test_loading_is_503_then_ready(serve):
    gate = threading.Event()
    fake = FakeLLM()

    def slow_factory():
        gate.wait(10)
        return fake

    host = ModelHost(slow_factory)
    client = serve(host=host)
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json() == {"status": "loading"}
    assert int(health.headers["Retry-After"]) > 0
    response = client.post(CHAT, json=chat_body())
    assert_error(response, 503, "server_error", code="model_loading")
    assert int(response.headers["Retry-After"]) > 0
    gate.set()
    assert host.wait(5) == "ready"
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.post(CHAT, json=chat_body()).get_json()["choices"][0]["finish_reason"] == "stop"


def test_the_interpreter_waits_for_a_load_in_progress_at_exit():
    """The model loads in a thread that is not a daemon: a server stopped while it loads
    finishes the load and exits. A daemon thread inside XLA when the interpreter
    finalises aborts the process ("terminate called ... FATAL: exception not rethrown",
    seen with model/llm.py's background loader)."""
    gate = threading.Event()
    host = ModelHost(lambda: gate.wait(10) and FakeLLM())
    before = set(threading.enumerate())
    host.start()
    [loader] = [t for t in set(threading.enumerate()) - before if t.name == "model-load"]
    gate.set()
    assert not loader.daemon
    assert host.wait(5) == "ready"


def test_model_loads_on_first_request_not_at_import(serve):
    loads = []

    def factory():
        loads.append(1)
        return FakeLLM()

    host = ModelHost(factory)
    client = serve(host=host)
    assert loads == [] and host.status == "loading"
    client.get("/health")
    assert host.wait(5) == "ready" and loads == [1]


# Run in a fresh process: what main.py does to Python's cyclic collector on import.
COLLECTOR = """
import gc, json, os, threading
import main
from handler.model_host import ModelHost
from tests.fake_model import FakeLLM

report = {"after_import": gc.isenabled(), "frozen": gc.get_freeze_count()}
read, write = os.pipe()
if os.fork() == 0:  # as gunicorn forks a worker (which starts loading, then exits here)
    os.write(write, json.dumps(gc.isenabled()).encode())
    os._exit(0)
report["worker"] = json.loads(os.read(read, 16))
report["master"] = gc.isenabled()
gc.disable()  # a worker's state, for its load
gate, during = threading.Event(), []
host = ModelHost(lambda: gate.wait(10) and (during.append(gc.isenabled()) or FakeLLM()))
host.start()
gate.set()
report |= {"ready": host.wait(10), "during": during, "after": gc.isenabled()}
report["frozen_after"] = gc.get_freeze_count()
print(json.dumps(report))
"""


def test_the_collector_pauses_from_main_until_the_model_has_loaded():
    """main.py pauses Python's cyclic collector for the start-up (its passes over the
    modules and the model took 0.3 s of a warm start) and freezes what the gunicorn
    master made before it forks: the master resumes after the fork, a worker once its
    model has loaded, with what the load made frozen too."""
    report = run_python_report(["-c", COLLECTOR], timeout=120)
    assert report["after_import"] is False and report["frozen"] > 10_000
    assert report["worker"] is False and report["master"] is True
    assert report["ready"] == "ready" and report["during"] == [False]
    assert report["after"] is True and report["frozen_after"] > report["frozen"]


def test_failed_load_is_503(serve):
    def broken_factory():
        raise FileNotFoundError("no such weights")

    host = ModelHost(broken_factory)
    client = serve(host=host)
    assert host.wait(5) == "failed"
    health = client.get("/health")
    assert health.status_code == 503
    assert health.get_json() == {"status": "failed", "error": "FileNotFoundError: no such weights"}
    assert_error(client.post(CHAT, json=chat_body()), 503, "server_error", code="model_load_failed")


def test_full_queue_is_503_with_retry_after(serve):
    body = chat_body(messages=[{"role": "user", "content": "BUSY"}])
    response = serve().post(CHAT, json=body)
    error = assert_error(response, 503, "server_error", code="overloaded")
    assert "256 requests are already waiting" in error["message"]
    assert int(response.headers["Retry-After"]) >= 1


def test_engine_failure_turns_health_503_and_requests_503(serve):
    fake = FakeLLM()
    client = serve(llm=fake)
    assert client.get("/health").status_code == 200
    fake.failed = True
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "failed"
    assert_error(client.post(CHAT, json=chat_body()), 503, "server_error", code="engine_failed")


def wait_for_child(pid: int, timeout: float = 30) -> int:
    """The exit code of child `pid`; kills it (and fails) if it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish within {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# JAX warns on any fork once other tests started its threads; this child runs no JAX.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_forked_child_loads_its_own_model():
    loads = []
    host = ModelHost(lambda: loads.append(1) or FakeLLM())
    host.start_in_forked_children()
    assert host.wait(5) == "ready" and loads == [1]
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        ok = False
        try:
            ok = host.wait(5) == "ready" and loads == [1, 1]
        finally:
            os._exit(0 if ok else 1)
    assert wait_for_child(pid) == 0
    assert loads == [1]


def test_engine_exception_is_500_for_that_request_only(serve):
    client = serve()
    boom = chat_body(messages=[{"role": "user", "content": "BOOM"}])
    assert_error(client.post(CHAT, json=boom), 500, "server_error")
    # Before the first delta, a streamed request still gets an ordinary error response.
    assert_error(client.post(CHAT, json={**boom, "stream": True}), 500, "server_error")
    assert (
        client.post(CHAT, json=chat_body()).get_json()["choices"][0]["message"]["content"] == REPLY
    )


def test_engine_exception_mid_stream_is_an_error_event(serve):
    fake = FakeLLM()
    client = serve(llm=fake)
    body = chat_body(messages=[{"role": "user", "content": "LATE BOOM"}], stream=True)
    events = sse_events(client.post(CHAT, json=body))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
    ]
    assert events[2]["error"]["type"] == "server_error"
    assert events[3:] == ["[DONE]"]
    assert fake.closed_streams == 1
    last_chunk = sse_events(client.post(CHAT, json=chat_body(stream=True)))[-2]
    assert last_chunk["choices"][0]["finish_reason"] == "stop"


def test_template_rejection_is_400(serve):
    body = chat_body(messages=[{"role": "user", "content": "REJECT"}])
    error = assert_error(serve().post(CHAT, json=body), 400, "invalid_request_error", "messages")
    assert error["message"] == "the chat template rejects this conversation"


def test_prompt_filling_the_context_is_400_with_counts(serve):
    client = serve(llm=FakeLLM(max_seq_len=32))
    body = chat_body(messages=[{"role": "user", "content": "x" * 30}])  # 37 tokens
    error = assert_error(client.post(CHAT, json=body), 400, "invalid_request_error", "messages")
    assert "32" in error["message"] and "37" in error["message"]
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_completion_beyond_the_context_is_400_with_counts(serve, field):
    client = serve(llm=FakeLLM(max_seq_len=32))
    body = chat_body(**{field: 24})  # 9 + 24 = 33 > 32
    error = assert_error(client.post(CHAT, json=body), 400, "invalid_request_error", field)
    assert "33 tokens (9 in the messages, 24 in the completion)" in error["message"]
    reply = client.post(CHAT, json=chat_body(**{field: 23})).get_json()  # exactly 32 fits
    assert reply["usage"]["completion_tokens"] == 13


def test_legacy_completions_route_answers_with_a_text_completion(serve):
    llm = FakeLLM()
    for path in ("/v1/completions", "/completions", "/api/v1/completions"):
        response = serve(llm=llm).post(path, json={"model": MODEL, "prompt": "hi", "stop": ","})
        body = response.get_json()
        assert (response.status_code, body["object"]) == (200, "text_completion")
        assert body["id"].startswith("cmpl-")
        assert body["choices"] == [
            {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}
        ]
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    # The legacy default budget is 16 tokens.
    assert llm.calls[-1].max_tokens == 16 and llm.calls[-1].stop == (",",)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": [70000000]}, "prompt"),
        ({"prompt": "hi", "max_tokens": 100}, "max_tokens"),
        ({}, "prompt"),
    ],
)
def test_legacy_completions_validation(serve, body, param):
    response = serve().post("/v1/completions", json={"model": MODEL, **body})
    assert_error(response, 400, "invalid_request_error", param)
