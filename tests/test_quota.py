"""Keys, rate limits, budgets and the response cache, through the app over the fake
engine of tests/fake_model.py (whose token counts are known exactly), and the two state
stores side by side: in process (with SQLite) and a real Redis server process."""

import datetime as dt
import hashlib
import threading
import time

import pytest

from handler.keys import Client, Keyring
from handler.quota import duration, period_end, period_key
from handler.state.embedded import EmbeddedStore
from handler.state.redis import PREFIX, RedisStore
from tests.fake_model import CHAT, HELLO_PROMPT_TOKENS, MODEL, FakeLLM, chat_body, sse_events
from tests.redis_server import redis_server  # noqa: F401 (a fixture)

REPLY_TOKENS = 13  # the fake's "Hello, world!"
ONE_REQUEST = HELLO_PROMPT_TOKENS + REPLY_TOKENS  # 22


def keys_toml(**clients: dict) -> str:
    """A keys file: one [keys.<name>] table per keyword, each with key = "sk-<name>"."""
    out = []
    for name, fields in clients.items():
        out.append(f"[keys.{name}]")
        fields = {"key": f"sk-{name}", **fields}
        for field, value in fields.items():
            out.append(f"{field} = {value!r}".replace("'", '"'))
    return "\n".join(out) + "\n"


@pytest.fixture
def keyed(serve, tmp_path):
    """keyed(llm=…, settings=…, **clients) -> (test client, headers by client name)."""

    def build(llm=None, settings=None, **clients):
        path = tmp_path / "keys.toml"
        path.write_text(keys_toml(**clients))
        state = str(tmp_path / "state")
        client = serve(llm=llm, keys_file=str(path), state_dir=state, **(settings or {}))
        headers = {name: {"Authorization": f"Bearer sk-{name}"} for name in clients}
        return client, headers

    return build


# The keys file.


def test_keys_match_by_hash_or_plain_key_and_the_flat_list_still_works(tmp_path):
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[keys.hashed]\nkey_sha256 = "{digest}"\nrequests_per_minute = 5\n'
        '[keys.plain]\nkey = "sk-plain"\ntoken_budget = 100\nbudget_period = "day"\n'
    )
    keyring = Keyring.load(["flat"], str(path))
    assert keyring.authenticate("Bearer sk-hashed") == Client("hashed", requests_per_minute=5)
    assert keyring.authenticate("Bearer sk-plain") == Client(
        "plain", token_budget=100, budget_period="day"
    )
    assert keyring.authenticate("Bearer flat") == Client("api-key-1")
    with pytest.raises(Exception, match="Incorrect API key"):
        keyring.authenticate(f"Bearer {digest}")  # the hash is not the key


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[keys.a]\nrequests_per_minute = 5\n", "exactly one of key and key_sha256"),
        ('[keys.a]\nkey = "k"\nkey_sha256 = "' + "0" * 64 + '"\n', "exactly one"),
        ('[keys.a]\nkey_sha256 = "abc"\n', "key_sha256"),
        ('[keys.a]\nkey = "k"\nrequests_per_minute = 0\n', "requests_per_minute"),
        ('[keys.a]\nkey = "k"\nbudget_period = "week"\n', "budget_period"),
        ('[keys.a]\nkey = "k"\nbudget_period = "day"\n', "needs a token_budget"),
        ('[keys.a]\nkey = "k"\nrpm = 5\n', "rpm"),
        ('[keys.a]\nkey = "k"\n[keys.b]\nkey = "k"\n', "reuses another client's key"),
        ("[keys.a\n", "keys file"),
    ],
)
def test_a_bad_keys_file_stops_the_start_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        Keyring.load([], str(path))


def test_the_keys_file_is_read_from_cloud_storage(emulator, tmp_path):
    from model.weights import gcs

    client = gcs.make_client()
    client.create_bucket("keys-bucket")
    gcs.upload("gs://keys-bucket/conf", {"keys.toml": _write(tmp_path, keys_toml(a={}))})
    keyring = Keyring.load([], "gs://keys-bucket/conf/keys.toml")
    assert keyring.authenticate("Bearer sk-a") == Client("a")
    with pytest.raises(FileNotFoundError, match="no such object"):
        Keyring.load([], "gs://keys-bucket/conf/missing.toml")


def _write(tmp_path, text):
    path = tmp_path / "upload.toml"
    path.write_text(text)
    return path


def test_a_key_not_allowed_a_model_gets_404_for_it(serve, keyed):
    client, headers = keyed(settings={"model_aliases": ["fast"]}, narrow={"models": ["fast"]})
    reply = client.post(CHAT, json=chat_body(), headers=headers["narrow"])
    assert reply.status_code == 404 and reply.get_json()["error"]["code"] == "model_not_found"
    assert (
        client.post(CHAT, json=chat_body(model="fast"), headers=headers["narrow"]).status_code
        == 200
    )
    listed = client.get("/v1/models", headers=headers["narrow"]).get_json()["data"]
    assert [card["id"] for card in listed] == ["fast"]
    assert client.get(f"/v1/models/{MODEL}", headers=headers["narrow"]).status_code == 404


# Rate limits.


def test_requests_over_the_rate_get_429_with_retry_after_and_headers(keyed):
    client, headers = keyed(team={"requests_per_minute": 2})
    remaining = []
    for _ in range(2):
        reply = client.post(CHAT, json=chat_body(), headers=headers["team"])
        assert reply.status_code == 200
        assert reply.headers["x-ratelimit-limit-requests"] == "2"
        remaining.append(reply.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]
    refused = client.post(CHAT, json=chat_body(), headers=headers["team"])
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Limit 2" in error["message"] and "'team'" in error["message"]
    # Two per minute: the next request is about 30 s away (less what has passed).
    assert 25 <= int(refused.headers["Retry-After"]) <= 30
    assert 25_000 <= int(refused.headers["retry-after-ms"]) <= 30_000
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_tokens_are_reserved_up_front_and_the_unused_part_given_back(keyed):
    client, headers = keyed(team={"tokens_per_minute": 100})
    reply = client.post(CHAT, json=chat_body(max_tokens=20), headers=headers["team"])
    # Reserved: 9 prompt + 20 max_tokens; the reply used 9 + 13.
    assert reply.headers["x-ratelimit-remaining-tokens"] == str(100 - 29)
    assert reply.get_json()["usage"]["total_tokens"] == ONE_REQUEST
    # The 7 unused tokens came back before the next reservation of 29.
    reply = client.post(CHAT, json=chat_body(max_tokens=20), headers=headers["team"])
    assert int(reply.headers["x-ratelimit-remaining-tokens"]) == 100 - 22 - 29
    usage = client.get("/v1/usage", headers=headers["team"]).get_json()
    assert (usage["requests"], usage["tokens"]) == (2, 2 * ONE_REQUEST)


def test_a_request_larger_than_the_token_rate_is_refused_for_good(keyed):
    client, headers = keyed(team={"tokens_per_minute": 20})
    refused = client.post(CHAT, json=chat_body(max_tokens=30), headers=headers["team"])
    assert refused.status_code == 429
    assert "Request too large" in refused.get_json()["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"


# Budgets.


def test_a_budget_runs_out_with_insufficient_quota(keyed):
    client, headers = keyed(team={"token_budget": 50, "budget_period": "month"})
    assert (
        client.post(CHAT, json=chat_body(max_tokens=20), headers=headers["team"]).status_code == 200
    )
    # 22 used; another 29 reserved would make 51 > 50.
    refused = client.post(CHAT, json=chat_body(max_tokens=20), headers=headers["team"])
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "budget exceeded" in error["message"] and "28 of the 50-token budget" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    end = period_end("month", dt.datetime.now(dt.UTC))
    assert (
        abs(int(refused.headers["Retry-After"]) - (end - dt.datetime.now(dt.UTC)).total_seconds())
        < 5
    )
    # A smaller request still fits.
    assert (
        client.post(CHAT, json=chat_body(max_tokens=5), headers=headers["team"]).status_code == 200
    )
    usage = client.get("/v1/usage", headers=headers["team"]).get_json()
    assert usage["period"] == "month" and usage["period_key"] == dt.datetime.now(dt.UTC).strftime(
        "%Y-%m"
    )
    assert usage["tokens"] == ONE_REQUEST + HELLO_PROMPT_TOKENS + 5
    assert usage["remaining_tokens"] == 50 - usage["tokens"]
    assert usage["resets_at"] == int(end.timestamp())


def test_budgets_survive_a_restart(keyed, serve, tmp_path):
    client, headers = keyed(team={"token_budget": 1000})
    client.post(CHAT, json=chat_body(), headers=headers["team"])
    client, headers = keyed(team={"token_budget": 1000})  # a new app on the same state dir
    usage = client.get("/v1/usage", headers=headers["team"]).get_json()
    assert (usage["requests"], usage["tokens"], usage["remaining_tokens"]) == (
        1,
        ONE_REQUEST,
        1000 - ONE_REQUEST,
    )


def test_a_stream_cut_by_the_client_is_charged_for_the_tokens_it_produced(keyed):
    llm = FakeLLM()
    client, headers = keyed(llm=llm, team={"token_budget": 1000})
    reply = client.post(
        CHAT, json=chat_body(stream=True, max_tokens=50), headers=headers["team"], buffered=False
    )
    events = iter(reply.response)
    next(events)  # the role chunk
    next(events)  # "Hello": 5 tokens
    reply.close()
    assert llm.closed_streams == 1
    usage = client.get("/v1/usage", headers=headers["team"]).get_json()
    assert usage["tokens"] == HELLO_PROMPT_TOKENS + 5


def test_a_request_that_fails_is_not_charged(keyed):
    client, headers = keyed(team={"token_budget": 1000})
    refused = client.post(
        CHAT,
        json=chat_body(messages=[{"role": "user", "content": "BUSY"}]),
        headers=headers["team"],
    )
    assert refused.status_code == 503
    assert client.get("/v1/usage", headers=headers["team"]).get_json()["tokens"] == 0


# The response cache.


def test_identical_deterministic_requests_are_answered_from_the_cache(keyed):
    llm = FakeLLM()
    client, headers = keyed(
        llm=llm, settings={"response_cache_ttl": 60}, team={"token_budget": 1000}
    )
    body = chat_body(temperature=0)
    first = client.post(CHAT, json=body, headers=headers["team"])
    second = client.post(CHAT, json=body, headers=headers["team"])
    assert (first.headers["x-jaxchat-cache"], second.headers["x-jaxchat-cache"]) == ("miss", "hit")
    assert len(llm.calls) == 1
    a, b = first.get_json(), second.get_json()
    assert a["id"] != b["id"]
    assert {k: v for k, v in a.items() if k not in ("id", "created")} == {
        k: v for k, v in b.items() if k not in ("id", "created")
    }
    # A hit costs the same tokens.
    assert client.get("/v1/usage", headers=headers["team"]).get_json()["tokens"] == 2 * ONE_REQUEST
    # Streamed: a stream of its own, then its replay.
    streamed, events = [], []
    for _ in range(2):  # each read to its end before the next is sent
        streamed.append(client.post(CHAT, json={**body, "stream": True}, headers=headers["team"]))
        events.append(sse_events(streamed[-1]))
    assert [r.headers["x-jaxchat-cache"] for r in streamed] == ["miss", "hit"]
    first_events, replayed = events
    assert len({e["id"] for e in replayed[:-1]}) == 1 and replayed[0]["id"] != first_events[0]["id"]

    def strip(events):
        return [{k: v for k, v in e.items() if k not in ("id", "created")} for e in events[:-1]]

    assert strip(first_events) == strip(replayed) and replayed[-1] == "[DONE]"
    assert len(llm.calls) == 2


def test_only_deterministic_complete_replies_are_cached(keyed):
    llm = FakeLLM()
    client, headers = keyed(
        llm=llm, settings={"response_cache_ttl": 60, "cache_hits_free": True}, team={}
    )
    sampled = client.post(CHAT, json=chat_body(), headers=headers["team"])
    assert "x-jaxchat-cache" not in sampled.headers
    seeded = chat_body(seed=7)
    assert (
        client.post(CHAT, json=seeded, headers=headers["team"]).headers["x-jaxchat-cache"] == "miss"
    )
    hit = client.post(CHAT, json={**seeded, "user": "someone"}, headers=headers["team"])
    assert hit.headers["x-jaxchat-cache"] == "hit"
    assert (
        client.post(CHAT, json={**seeded, "seed": 8}, headers=headers["team"]).headers[
            "x-jaxchat-cache"
        ]
        == "miss"
    )
    # A stream cut short is not cached.
    cut = client.post(
        CHAT, json={**seeded, "stream": True}, headers=headers["team"], buffered=False
    )
    next(iter(cut.response))
    cut.close()
    again = client.post(CHAT, json={**seeded, "stream": True}, headers=headers["team"])
    assert again.headers["x-jaxchat-cache"] == "miss"
    # Hits are free here: 4 generated replies, one hit.
    assert client.get("/v1/usage", headers=headers["team"]).get_json()["requests"] == 5


def test_an_unreachable_redis_fails_budgets_closed_and_the_cache_open(keyed):
    from tests.server_process import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    client, headers = keyed(
        settings={"state_url": url, "response_cache_ttl": 60},
        budgeted={"token_budget": 1000},
        limited={"requests_per_minute": 10},
    )
    refused = client.post(CHAT, json=chat_body(temperature=0), headers=headers["budgeted"])
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"]["code"] == "state_unavailable"
    served = client.post(CHAT, json=chat_body(temperature=0), headers=headers["limited"])
    assert served.status_code == 200 and served.headers["x-jaxchat-cache"] == "miss"
    health = client.get("/health").get_json()
    assert health["state"]["store"] == "redis" and health["state"]["reachable"] is False


# The stores themselves: the same behaviour in process and in Redis.


@pytest.fixture(params=["embedded", "redis"])
def stores(request, tmp_path):
    """stores() -> a new store over the same state, as a second instance would see it."""
    limits = {"cache_ttl": 60, "cache_entries": 3, "cache_bytes": 100}
    if request.param == "embedded":
        return lambda: EmbeddedStore(tmp_path, **limits)
    server = request.getfixturevalue("redis_server")
    RedisStore(server.url, **limits)._redis.flushall()
    return lambda: RedisStore(server.url, **limits)


def test_concurrent_requests_at_the_edge_admit_exactly_the_limit(stores):
    client = Client("edge", requests_per_minute=7)
    store = stores()
    # Two instances sharing Redis; in process, the buckets are the process's own.
    instances = [store, stores() if isinstance(store, RedisStore) else store]
    admitted = []
    barrier = threading.Barrier(24)

    def ask(store):
        barrier.wait()
        admitted.append(store.admit(client, 1, "lifetime").admitted)

    threads = [threading.Thread(target=ask, args=(instances[i % 2],)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 7
    assert instances[0].usage(client, "lifetime").requests == 7


def test_buckets_refill_at_the_rate(stores):
    store = stores()
    client = Client("fast", requests_per_minute=2, tokens_per_minute=6000)
    assert store.admit(client, 6000, "lifetime").admitted
    assert store.admit(client, 0, "lifetime").admitted
    refused = store.admit(client, 0, "lifetime")  # 2 per minute: one every 30 s
    assert refused.refused == "requests" and 29 < refused.retry_after_s <= 30
    client = Client("fast", tokens_per_minute=6000)  # the same token bucket, no request limit
    refused = store.admit(client, 100, "lifetime")  # 100 tokens a second
    assert refused.refused == "tokens" and 0.5 < refused.retry_after_s <= 1
    assert refused.tokens.remaining < 50 and refused.tokens.limit == 6000
    time.sleep(1.1)
    assert store.admit(client, 100, "lifetime").admitted
    # A refund fills the bucket back, up to its capacity.
    store.refund(client, 10_000, "lifetime")
    assert store.admit(client, 6000, "lifetime").admitted
    assert not store.admit(client, 100, "lifetime").admitted


def test_budget_usage_is_per_period_and_refunds_never_go_below_zero(stores):
    store = stores()
    client = Client("b", token_budget=100, budget_period="day")
    assert store.admit(client, 60, "2026-12-01").admitted
    refused = store.admit(client, 60, "2026-12-01")
    assert refused.refused == "budget" and refused.used == 60
    assert store.admit(client, 60, "2026-12-02").admitted  # a new day
    store.refund(client, 500, "2026-12-01")
    assert store.usage(client, "2026-12-01").tokens == 0
    assert stores().usage(client, "2026-12-02").tokens == 60  # seen by another instance


def test_the_cache_is_bounded_by_count_and_bytes(stores):
    store, other = stores(), stores()
    for i in range(4):
        store.cache_put(f"k{i}", b"x" * 20)
    # At most 3 entries: the oldest went first.
    if isinstance(store, RedisStore):
        store = other  # another instance sees the same entries
    assert store.cache_get("k0") is None and store.cache_get("k3") == b"x" * 20
    store.cache_put("big", b"y" * 90)  # 100 bytes at most: only it fits beside nothing
    assert store.cache_get("big") == b"y" * 90 and store.cache_get("k3") is None
    store.cache_put("huge", b"z" * 101)  # larger than the bound: not kept
    assert store.cache_get("huge") is None


def test_entries_written_within_a_millisecond_still_leave_oldest_first(request):
    """Sixty puts in one pipeline (so Redis runs them within a millisecond or two), each
    name sorting before the older ones, as ties in a time-ordered index would put the
    newest first in line: the newest three stay."""
    server = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, cache_ttl=60, cache_entries=3, cache_bytes=100)
    store._redis.flushall()
    pipe = store._redis.pipeline(transaction=False)
    index = [PREFIX + "cache:index", PREFIX + "cache:sizes", PREFIX + "cache:bytes"]
    for i in range(60):
        store._cache_put(
            keys=index, args=[f"{PREFIX}cache:{99 - i:02d}", b"x", 60, 3, 100], client=pipe
        )
    pipe.execute()
    assert [store.cache_get(f"{99 - i:02d}") for i in range(56, 60)] == [None, b"x", b"x", b"x"]


# Formats.


@pytest.mark.parametrize(
    "seconds, text",
    [(0.017, "17ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s"), (59.9996, "1m0s")],
)
def test_reset_durations_read_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_budget_periods_are_utc_days_and_months():
    now = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)
    assert period_key("day", now) == "2026-12-31" and period_key("month", now) == "2026-12"
    assert period_key(None, now) == "lifetime" and period_end(None, now) is None
    assert period_end("day", now) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert period_end("month", now) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert period_end("month", dt.datetime(2026, 2, 3, tzinfo=dt.UTC)) == dt.datetime(
        2026, 3, 1, tzinfo=dt.UTC
    )
