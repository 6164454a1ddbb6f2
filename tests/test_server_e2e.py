"""A real server process with the real default model, driven by the official SDK.

One functions-framework process (gunicorn, forked worker, model loaded in the
background; tests/server_process.py) serves the session, with API keys on. Expected token counts
and greedy replies come from the Hugging Face reference
(tests/fixtures/smollm2_golden.json), not from jaxchat.
"""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.server_process import KEY, MAX_BATCH, MAX_SEQ_LEN, MODEL, REPO

GOLDEN = json.loads((REPO / "tests" / "fixtures" / "smollm2_golden.json").read_text())
# The reference's greedy continuations of GOLDEN["prompts"][0] and [1], up to EOS.
CAPITAL = GOLDEN["prompts"][0]
CAPITAL_REPLY = "The capital of France is Paris."
HAIKU = GOLDEN["prompts"][1]
HAIKU_REPLY = "The ocean's a mirror, reflecting the world's beauty."
PRIMES = GOLDEN["prompts"][2]


def complete(client, conversation: dict, **kwargs):
    """A non-streamed completion of a golden conversation."""
    return client.chat.completions.create(model=MODEL, messages=conversation["messages"], **kwargs)


def stream(client, conversation: dict, **kwargs) -> tuple[str, list[str | None], object]:
    """A streamed completion: (text, finish_reason per choice chunk, usage)."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=conversation["messages"],
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    choice_chunks = [c for c in chunks if c.choices]
    roles = [c.choices[0].delta.role for c in choice_chunks if c.choices[0].delta.role]
    assert roles == ["assistant"]
    assert not chunks[-1].choices and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    finishes = [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason]
    return text, finishes, chunks[-1].usage


def test_greedy_reply_matches_the_reference(client):
    reply = complete(client, CAPITAL, temperature=0)
    assert reply.choices[0].message.content == CAPITAL_REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


@pytest.mark.parametrize("conversation", GOLDEN["prompts"], ids=["capital", "haiku", "primes"])
def test_prompt_tokens_match_the_reference_tokenizer(client, conversation):
    reply = complete(client, conversation, temperature=0, max_tokens=1)
    assert reply.usage.prompt_tokens == len(conversation["ids"])
    assert reply.usage.completion_tokens == 1
    assert reply.usage.total_tokens == len(conversation["ids"]) + 1


def test_streamed_and_non_streamed_greedy_replies_agree(client):
    reply = complete(client, HAIKU, temperature=0, max_tokens=40)
    text, finishes, usage = stream(client, HAIKU, temperature=0, max_tokens=40)
    assert text == reply.choices[0].message.content == HAIKU_REPLY
    assert finishes == [reply.choices[0].finish_reason] == ["stop"]
    assert usage.model_dump() == reply.usage.model_dump()
    assert usage.prompt_tokens == len(HAIKU["ids"])


def test_max_tokens_ends_with_length(client):
    reply = complete(client, PRIMES, temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    text, finishes, usage = stream(client, PRIMES, temperature=0, max_completion_tokens=5)
    assert (text, finishes, usage.completion_tokens) == (
        reply.choices[0].message.content,
        ["length"],
        5,
    )


def test_stop_string_is_honoured_and_removed(client):
    reply = complete(client, CAPITAL, temperature=0, stop=[" Paris", "zzz"])
    assert reply.choices[0].message.content == "The capital of France is"
    assert reply.choices[0].finish_reason == "stop"
    text, finishes, _ = stream(client, CAPITAL, temperature=0, stop=" Paris")
    assert (text, finishes) == ("The capital of France is", ["stop"])


def test_a_fixed_seed_reproduces_a_sampled_reply(client):
    first = complete(client, PRIMES, temperature=1.0, seed=1234, max_tokens=24)
    again = complete(client, PRIMES, temperature=1.0, seed=1234, max_tokens=24)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_sixty_four_concurrent_streams_all_complete_correctly(client):
    """64 streams over 8 slots: every stream well-formed, greedy ones exactly right."""
    solo = complete(client, PRIMES, temperature=0, max_tokens=8).choices[0].message.content

    def one(index: int):
        if index % 4 == 3:  # sampled: may meet EOS within the budget
            return stream(client, PRIMES, temperature=0.8, seed=index, max_tokens=8)
        if index % 2:
            return stream(client, PRIMES, temperature=0, max_tokens=8)
        return stream(client, CAPITAL, temperature=0, max_tokens=32)

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(64)))
    for index, (text, finishes, usage) in enumerate(results):
        assert len(finishes) == 1
        if index % 4 == 3:
            assert 1 <= usage.completion_tokens <= 8
            assert finishes == ["stop"] or (finishes, usage.completion_tokens) == (["length"], 8)
        elif index % 2:
            assert (text, finishes, usage.completion_tokens) == (solo, ["length"], 8)
        else:
            assert (text, finishes) == (CAPITAL_REPLY, ["stop"])


def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == [MODEL, "default", "fast"]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("fast").id == "fast"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_an_alias_serves_the_model_and_is_echoed(client):
    reply = client.chat.completions.create(
        model="fast", messages=CAPITAL["messages"], temperature=0, max_tokens=8
    )
    assert reply.model == "fast"
    content = reply.choices[0].message.content
    assert content and CAPITAL_REPLY.startswith(content)
    stream = client.chat.completions.create(
        model="default", messages=CAPITAL["messages"], max_tokens=4, stream=True
    )
    assert {chunk.model for chunk in stream} == {"default"}


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": MAX_BATCH + 1}, "n"),
        ({"max_tokens": MAX_SEQ_LEN}, "max_tokens"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_bad_requests_raise_bad_request_error(client, kwargs, param):
    kwargs = {"messages": CAPITAL["messages"], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert info.value.param == param


def test_context_overflow_message_has_the_counts(client):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, CAPITAL, max_tokens=MAX_SEQ_LEN)
    prompt = len(CAPITAL["ids"])
    assert f"({prompt} in the messages, {MAX_SEQ_LEN} in the completion)" in info.value.message


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CAPITAL["messages"])
    assert info.value.code == "model_not_found"


def test_wrong_key_raises_authentication_error(base_url):
    intruder = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        intruder.chat.completions.create(model=MODEL, messages=CAPITAL["messages"])
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()
    assert requests.get(f"{base_url}/health", timeout=5).json() == {"status": "ok"}


# Requests that used to break the server: each is answered, and a normal streamed
# request right after it gets the reference reply.
HI = [{"role": "user", "content": "hi"}]
BREAKERS = {
    "empty completions prompt": ("/v1/completions", {"prompt": "", "max_tokens": 4}, 200, None),
    "empty token prompt": ("/v1/completions", {"prompt": [], "max_tokens": 4}, 200, None),
    "empty prompt in a batch": ("/v1/completions", {"prompt": [[]], "max_tokens": 2}, 200, None),
    "token id outside the vocabulary": (
        "/v1/completions",
        {"prompt": [1, 49152], "max_tokens": 2},
        400,
        "prompt",
    ),
    "lone surrogate in a message": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi \ud800"}]},
        400,
        "messages.0.content",
    ),
    "lone surrogate in a prompt": (
        "/v1/completions",
        {"prompt": "hi \udfff"},
        400,
        "prompt",
    ),
    "lone surrogate in a tool description": (
        "/v1/chat/completions",
        {
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}],
        },
        400,
        "tools.0.function.description",
    ),
    "top_k beyond int32": ("/v1/chat/completions", {"messages": HI, "top_k": 2**31}, 400, "top_k"),
    "top_k beyond int64": ("/v1/chat/completions", {"messages": HI, "top_k": 2**70}, 400, "top_k"),
    "temperature as a string": (
        "/v1/chat/completions",
        {"messages": HI, "temperature": "0.5"},
        400,
        "temperature",
    ),
    "stream as a string": (
        "/v1/chat/completions",
        {"messages": HI, "stream": "yes"},
        400,
        "stream",
    ),
    "seed of -2**63": (
        "/v1/chat/completions",
        {"messages": HI, "seed": -(2**63), "max_tokens": 2},
        200,
        None,
    ),
}


@pytest.mark.parametrize("path, body, status, param", BREAKERS.values(), ids=list(BREAKERS))
def test_the_server_survives_requests_that_used_to_break_it(
    client, base_url, path, body, status, param
):
    response = requests.post(
        base_url + path,
        json={"model": MODEL, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert response.status_code == status, response.text
    if status == 200:
        choices = response.json()["choices"]
        texts = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
        assert all(texts) and all(c["finish_reason"] for c in choices), choices
    else:
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    text, finishes, _ = stream(client, CAPITAL, temperature=0)
    assert (text, finishes) == (CAPITAL_REPLY, ["stop"])


def test_a_body_sent_as_text_plain_is_400(client, base_url):
    body = json.dumps({"model": MODEL, "messages": HI})
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = requests.post(
            f"{base_url}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type},
            timeout=30,
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_content_type"
    text, finishes, _ = stream(client, CAPITAL, temperature=0)
    assert (text, finishes) == (CAPITAL_REPLY, ["stop"])


def test_an_idle_connection_stays_open_longer_than_client_pools_keep_it(base_url):
    # httpx (the openai SDK's client) reuses a pooled connection idle up to 5 s. Were
    # the server to close idle connections sooner (gunicorn's default: 2 s), a request
    # could go out on one it is closing: "Server disconnected without sending a response".
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        statuses = []
        for pause in (6, 0):  # 6 s: longer than httpx's pool keeps a connection
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            statuses.append((response.status, connection.sock.getsockname()))
            time.sleep(pause)
        # Both answered, on the one socket: the server kept it open while it idled.
        [(first, socket), (second, same)] = statuses
        assert (first, second, same) == (200, 200, socket)
    finally:
        connection.close()
