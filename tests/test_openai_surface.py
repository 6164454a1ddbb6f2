"""The OpenAI surface beyond plain chat, through the official SDK against the real server:
n, logprobs, seeds in a full batch, sampling transforms, JSON modes, tool calls and
the legacy completions API.

Greedy expectations come from the Hugging Face reference
(tests/fixtures/smollm2_golden.json); JSON replies are checked with `jsonschema`,
independently of the grammar engine that constrained them.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.server_process import MAX_BATCH, MODEL, REPO

GOLDEN = json.loads((REPO / "tests" / "fixtures" / "smollm2_golden.json").read_text())
CAPITAL = GOLDEN["prompts"][0]
CAPITAL_REPLY = "The capital of France is Paris."
CAPITAL_GREEDY_FIRST_TOKEN = CAPITAL["greedy"][0]  # "The", per the reference


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def collect_stream(stream) -> dict[int, dict]:
    """Per choice index: role count, content, finish reasons, logprob entries, tool calls."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            slot = choices.setdefault(
                c.index, {"roles": 0, "text": "", "finishes": [], "logprobs": [], "calls": []}
            )
            slot["roles"] += c.delta.role == "assistant"
            slot["text"] += c.delta.content or ""
            if c.finish_reason:
                slot["finishes"].append(c.finish_reason)
            if c.logprobs and c.logprobs.content:
                slot["logprobs"].extend(c.logprobs.content)
            slot["calls"].extend(c.delta.tool_calls or [])
    return choices


# ---- n -------------------------------------------------------------------------------


def test_n_choices_non_streamed_are_sampled_independently(client):
    reply = chat(client, "Name a colour.", n=4, temperature=1.0, seed=3, max_tokens=12)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in reply.choices}) > 1
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    # Usage sums the completion tokens of every choice (each at most 12).
    assert 4 <= reply.usage.completion_tokens <= 48
    greedy = chat(client, "Name a colour.", n=3, temperature=0, max_tokens=12)
    assert len({c.message.content for c in greedy.choices}) == 1


def test_n_three_streamed(client):
    kwargs = {"n": 3, "temperature": 0.9, "seed": 11, "max_tokens": 20}
    choices = collect_stream(chat(client, "Write a short greeting.", stream=True, **kwargs))
    assert sorted(choices) == [0, 1, 2]
    for slot in choices.values():
        assert slot["roles"] == 1 and len(slot["finishes"]) == 1
    # The same seed without streaming gives the same three replies.
    reply = chat(client, "Write a short greeting.", **kwargs)
    assert [c.message.content for c in reply.choices] == [choices[i]["text"] for i in range(3)]


# ---- logprobs ------------------------------------------------------------------------


def test_logprob_tokens_join_to_the_content(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CAPITAL["messages"],
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stop=["Paris"],
    )
    choice = reply.choices[0]
    assert choice.message.content == "The capital of France is "
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # bytes are each token's own; only the token the stop string cut into (" Paris") differs.
    assert [bytes(e.bytes).decode() for e in entries[:-1]] == [e.token for e in entries[:-1]]
    assert (entries[-1].token, bytes(entries[-1].bytes).decode()) == (" ", " Paris")


def test_streamed_logprobs_join_to_the_streamed_content(client):
    stream = chat(
        client,
        "Say hello in French.",
        temperature=0.7,
        seed=5,
        max_tokens=24,
        logprobs=True,
        stream=True,
    )
    slot = collect_stream(stream)[0]
    assert slot["text"] and "".join(e.token for e in slot["logprobs"]) == slot["text"]
    assert all(e.top_logprobs == [] for e in slot["logprobs"])


def test_without_logprobs_the_field_is_null(client):
    assert chat(client, "Hi", max_tokens=3).choices[0].logprobs is None


# ---- seeds -----------------------------------------------------------------------------


def test_a_seeded_reply_is_the_same_whatever_fills_the_batch(client):
    def seeded():
        return (
            chat(client, "Tell me about cats.", temperature=1.0, top_p=0.9, seed=77, max_tokens=32)
            .choices[0]
            .message.content
        )

    alone = seeded()
    noise = [
        {"temperature": 1.2, "max_tokens": 40},
        {"temperature": 0.5, "extra_body": {"top_k": 5}, "max_tokens": 40},
        {"temperature": 1.0, "presence_penalty": 1.5, "max_tokens": 40},
        {"temperature": 0, "logit_bias": {"330": 5}, "max_tokens": 40},
        {
            "temperature": 1.0,
            "extra_body": {"min_p": 0.1},
            "logprobs": True,
            "top_logprobs": 5,
            "max_tokens": 40,
        },
        {"temperature": 0.8, "response_format": {"type": "json_object"}, "max_tokens": 40},
    ]

    def other(i: int):
        return chat(client, f"Count to {i + 3}.", **noise[i % len(noise)])

    with ThreadPoolExecutor(max_workers=MAX_BATCH) as pool:
        fillers = [pool.submit(other, i) for i in range(MAX_BATCH - 1)]
        crowded = pool.submit(seeded)
        assert crowded.result() == alone
        assert all(f.result().choices for f in fillers)


# ---- sampling transforms ---------------------------------------------------------------


def test_min_p_one_keeps_only_the_most_likely_token(client):
    greedy = chat(client, "Describe the sea.", temperature=0, max_tokens=16)
    sampled = chat(
        client,
        "Describe the sea.",
        temperature=1.5,
        seed=1,
        extra_body={"min_p": 1.0},
        max_tokens=16,
    )
    assert sampled.choices[0].message.content == greedy.choices[0].message.content


def test_logit_bias_bans_the_greedy_first_token(client):
    greedy = client.chat.completions.create(
        model=MODEL, messages=CAPITAL["messages"], temperature=0, max_tokens=4
    )
    assert greedy.choices[0].message.content.startswith("The")
    first_token = str(CAPITAL_GREEDY_FIRST_TOKEN)
    banned = client.chat.completions.create(
        model=MODEL,
        messages=CAPITAL["messages"],
        temperature=0,
        max_tokens=4,
        logit_bias={first_token: -100},
    )
    assert not banned.choices[0].message.content.startswith("The ")


def test_penalties_change_a_repetitive_greedy_reply(client):
    prompt = "Repeat the word 'cat' ten times."
    plain = chat(client, prompt, temperature=0, max_tokens=24).choices[0].message.content
    for kwargs in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 1.8}},
    ):
        penalised = chat(client, prompt, temperature=0, max_tokens=24, **kwargs)
        assert penalised.choices[0].message.content != plain, kwargs


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"logit_bias": {"49152": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": [""]}, "stop.0"),
        ({"n": 0}, "n"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_invalid_values_are_bad_requests_naming_the_param(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "Hi", max_tokens=4, **kwargs)
    assert info.value.param == param


def test_unknown_fields_are_ignored(client):
    reply = chat(client, "Hi", max_tokens=3, extra_body={"frobnicate": {"x": 1}})
    assert reply.choices[0].message.content


# ---- JSON modes ----------------------------------------------------------------------

SUBJECTS = [
    "a cat",
    "a city",
    "a book",
    "a car",
    "a planet",
    "a song",
    "a tree",
    "a river",
    "a movie",
    "a fruit",
    "a teacher",
    "a mountain",
    "a computer",
    "a painting",
    "a dog",
    "a country",
    "a restaurant",
    "a bird",
    "a sport",
    "a holiday",
]
THING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"type": "string", "enum": ["animal", "place", "object", "work", "other"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "kind", "rating", "tags"],
    "additionalProperties": False,
}


def test_json_object_replies_always_parse(client):
    def one(subject: str):
        return chat(
            client,
            f"Give {subject} a name and an age, as JSON.",
            temperature=0,
            max_tokens=256,
            response_format={"type": "json_object"},
        )

    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(one, SUBJECTS[:MAX_BATCH]))  # one full batch
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_replies_parse_and_validate(client):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": THING, "strict": True},
    }

    def one(subject: str):
        return chat(
            client,
            f"Describe {subject}.",
            temperature=0.8,
            seed=2,
            max_tokens=200,
            response_format=response_format,
        )

    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(one, SUBJECTS[:MAX_BATCH]))  # one full batch
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), THING)


def test_streamed_json_schema_reply_validates(client):
    stream = chat(
        client,
        "Describe a lighthouse.",
        temperature=0,
        max_tokens=200,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": THING}},
    )
    slot = collect_stream(stream)[0]
    assert slot["finishes"] == ["stop"]
    jsonschema.validate(json.loads(slot["text"]), THING)


# ---- tools ---------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
        },
    },
}
ASK = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


def test_required_tool_call_non_streamed(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    schema = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(arguments, schema["function"]["parameters"])


def test_named_tool_call_streams_id_and_name_then_argument_fragments(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    slot = collect_stream(stream)[0]
    assert slot["finishes"] == ["tool_calls"] and slot["roles"] == 1
    first, *rest = slot["calls"]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_time"
    # Then only fragments of the arguments, as they are generated, for the same call.
    assert len(rest) >= 3
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    arguments = "".join(c.function.arguments or "" for c in slot["calls"])
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])


def test_named_tool_choice_yields_exactly_one_call(client):
    # Parallel calls are allowed by default; a named function is still called once.
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert reply.usage.completion_tokens < 80  # the grammar ended the reply after one call


def test_required_calls_cut_by_max_tokens_keep_the_complete_ones(client):
    # The model repeats the call until max_tokens cuts the repetition short.
    kwargs = {"tools": [WEATHER], "tool_choice": "required", "temperature": 0, "max_tokens": 48}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, **kwargs)
    choice = reply.choices[0]
    assert reply.usage.completion_tokens == 48  # it was cut
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_a_tool_without_parameters_is_called_with_no_arguments(client):
    clock = {"type": "function", "function": {"name": "get_clock", "description": "The time."}}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[clock],
        tool_choice="required",
        temperature=0,
        max_tokens=100,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and reply.usage.completion_tokens < 100
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_clock", "{}")
    ] * len(choice.message.tool_calls)


def test_deprecated_functions_get_a_function_call(client):
    kwargs = {
        "model": MODEL,
        "messages": ASK,
        "functions": [WEATHER["function"]],
        "function_call": {"name": "get_weather"},
        "temperature": 0,
        "max_tokens": 80,
    }
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    arguments = json.loads(choice.message.function_call.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    parts = [
        c.choices[0].delta.function_call
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].delta.function_call
    ]
    assert parts[0].name == "get_weather" and all(p.name is None for p in parts[1:])
    assert json.loads("".join(p.arguments or "" for p in parts)) == arguments
    # The function's result goes back as a `function` message.
    follow_up = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": choice.message.function_call},
        {"role": "function", "name": "get_weather", "content": "18 C and sunny"},
    ]
    reply = client.chat.completions.create(
        **{**kwargs, "messages": follow_up, "function_call": "none"}
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


def test_sdk_stream_accumulates_the_tool_calls(client):
    """The SDK's stream helper concatenates deltas: id and name must arrive once per call,
    and the accumulated calls must be what the same request returns unstreamed."""
    kwargs = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 48,
    }
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls)
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    unstreamed = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    # Streamed, a call cut short by max_tokens was already sent; the complete ones agree.
    complete = [c for c in calls if is_json_object(c.function.arguments)]
    assert [(c.function.name, c.function.arguments) for c in complete] == [
        (c.function.name, c.function.arguments) for c in unstreamed
    ]


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def test_follow_up_turn_with_a_tool_result(client):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 C and sunny"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_tool_choice_none_never_returns_calls(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=30,
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content


# ---- the legacy completions API ----------------------------------------------------------


def test_completions_greedy_matches_the_reference(client):
    reply = client.completions.create(
        model=MODEL, prompt=CAPITAL["text"], temperature=0, max_tokens=16
    )
    choice = reply.choices[0]
    assert reply.object == "text_completion"
    assert (choice.text, choice.finish_reason) == (CAPITAL_REPLY, "stop")
    assert reply.usage.prompt_tokens == len(CAPITAL["ids"])
    # Token ids as the prompt give the same reply.
    by_ids = client.completions.create(
        model=MODEL, prompt=CAPITAL["ids"], temperature=0, max_tokens=16
    )
    assert by_ids.choices[0].text == CAPITAL_REPLY


def test_completions_stream_echo_logprobs_and_n(client):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["Once upon a time", "The sky is"],
            n=2,
            max_tokens=6,
            temperature=0.8,
            seed=4,
            echo=True,
            logprobs=2,
            stream=True,
        )
    )
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes.setdefault(c.index, []).append(c.finish_reason)
            if c.logprobs and c.logprobs.tokens:
                assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(len(finishes[i]) == 1 for i in range(4))
    assert texts[0].startswith("Once upon a time") and texts[3].startswith("The sky is")
    reply = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, logprobs=1
    )
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset[0] == 0 and len(logprobs.token_logprobs) == len(logprobs.tokens)
