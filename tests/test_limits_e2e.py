"""Keys with limits and budgets, and the response cache, across real server processes.

Two deployments, each serving the real default model from a keys file:
- `redis`: two functions-framework processes sharing a real Redis server process
  (tests/redis_server.py), as two Cloud Run instances share Memorystore;
- `embedded`: one process with the in-process store and its SQLite file.
Requests go through the official openai SDK, as a client's would. The servers log
JSON lines, as on Cloud Run; the last test reads them.
"""

import contextlib
import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.redis_server import RedisProcess
from tests.server_process import MAX_BATCH, MAX_SEQ_LEN, MODEL, running_server

HELLO = [{"role": "user", "content": "Say hello."}]
CLIENTS = {
    "spread": {"requests_per_minute": 3},
    "edge": {"requests_per_minute": 5},
    "budget": {"token_budget": 200, "budget_period": "month"},
    "paced": {"requests_per_minute": 10},
    "meter": {"token_budget": 100_000},
    "cached": {"token_budget": 100_000},
}


def keys_file(path):
    lines = []
    for name, limits in CLIENTS.items():
        lines += [f"[keys.{name}]", f'key = "sk-{name}"']
        lines += [f"{field} = {value!r}".replace("'", '"') for field, value in limits.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Deployment:
    """The servers of one deployment (two sharing Redis, or one embedded): `urls[i]`,
    `sdk(name, i)` a client of instance i with that client's key; `restart()` stops
    everything (Redis too) and starts it again on the same state."""

    def __init__(self, kind: str, workdir) -> None:
        self.kind = kind
        self.workdir = workdir
        self.redis = RedisProcess(workdir) if kind == "redis" else None
        self.env = {
            "JAXCHAT_KEYS_FILE": str(keys_file(workdir / "keys.toml")),
            "JAXCHAT_STATE_DIR": str(workdir / "state"),
            "JAXCHAT_RESPONSE_CACHE_TTL": "600",
            "JAXCHAT_LOG_FORMAT": "json",
            # As tests/server_process.py's server: the same executables.
            "JAXCHAT_MAX_SEQ_LEN": str(MAX_SEQ_LEN),
            "JAXCHAT_MAX_BATCH": str(MAX_BATCH),
            "JAXCHAT_UNROLLED_DECODE": "off",
        }
        if self.redis is not None:
            self.env["JAXCHAT_STATE_URL"] = self.redis.url
        self.urls: list[str] = []
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        for i in range(2 if self.redis is not None else 1):
            directory = self.workdir / f"server{i}"
            directory.mkdir(exist_ok=True)
            self.urls.append(self._stack.enter_context(running_server(directory, self.env)))

    def stop(self) -> None:
        self._stack.close()
        self.urls = []
        if self.redis is not None:
            self.redis.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def sdk(self, name: str, instance: int = 0, **options) -> openai.OpenAI:
        url = self.urls[instance % len(self.urls)]
        options = {"max_retries": 0, "timeout": 120, **options}
        return openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{name}", **options)

    def usage(self, name: str, instance: int = 0) -> dict:
        url = self.urls[instance % len(self.urls)]
        reply = requests.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer sk-{name}"})
        assert reply.status_code == 200, reply.text
        return reply.json()


@pytest.fixture(scope="module", params=["redis", "embedded"])
def deployment(request, tmp_path_factory):
    deployment = Deployment(request.param, tmp_path_factory.mktemp(request.param))
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


def ask(client: openai.OpenAI, max_tokens: int = 2, **fields):
    """A chat request; the raw response (headers, then `.parse()`)."""
    return client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=max_tokens, **fields
    )


def test_the_rate_limit_holds_across_instances(deployment):
    remaining = []
    started = time.monotonic()
    for i in range(3):  # alternating instances when there are two
        raw = ask(deployment.sdk("spread", i))
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as refused:
        ask(deployment.sdk("spread", 3))
    elapsed = time.monotonic() - started
    assert refused.value.code == "rate_limit_exceeded"
    # One request per 20 s comes back 20 s after the first was taken (a fresh server's
    # first requests may take seconds of those on a slow machine); whole seconds, up.
    retry = int(refused.value.response.headers["Retry-After"])
    assert max(1, math.floor(20 - elapsed)) <= retry <= 20


def test_concurrent_requests_at_the_edge_admit_exactly_the_limit(deployment):
    barrier = threading.Barrier(12)

    def one(i: int) -> str:
        client = deployment.sdk("edge", i)
        barrier.wait()
        try:
            ask(client)
            return "ok"
        except openai.RateLimitError:
            return "429"

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert outcomes.count("ok") == 5 and outcomes.count("429") == 7
    assert deployment.usage("edge")["requests"] == 5


def test_a_budget_runs_out_and_stays_spent_across_a_restart(deployment):
    client = deployment.sdk("budget")
    used = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):
            used += ask(client, max_tokens=8).parse().usage.total_tokens
    error = refused.value
    assert error.code == "insufficient_quota" and "budget exceeded" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    usage = deployment.usage("budget", 1)
    assert usage["tokens"] == used and usage["remaining_tokens"] == 200 - used
    deployment.restart()  # both servers, and Redis
    assert deployment.usage("budget", 1) == usage
    with pytest.raises(openai.RateLimitError, match="budget exceeded"):
        ask(deployment.sdk("budget"), max_tokens=8)


def test_a_reply_cached_on_one_instance_answers_the_other(deployment):
    first = ask(deployment.sdk("cached", 0), max_tokens=12, temperature=0)
    second = ask(deployment.sdk("cached", 1), max_tokens=12, temperature=0)
    assert (first.headers["x-jaxchat-cache"], second.headers["x-jaxchat-cache"]) == ("miss", "hit")
    a, b = first.parse(), second.parse()
    assert a.id != b.id and a.choices == b.choices and a.usage == b.usage
    # The hit was charged the same tokens.
    assert deployment.usage("cached")["tokens"] == 2 * a.usage.total_tokens


def test_a_stream_cut_by_the_client_is_charged_for_what_it_produced(deployment):
    client = deployment.sdk("meter")
    prompt_tokens = ask(client, max_tokens=1).parse().usage.prompt_tokens
    before = deployment.usage("meter")["tokens"]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=200,
        stream=True,
        temperature=1.0,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    stream.close()
    # The charge settles when the server sees the connection closed.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        charged = deployment.usage("meter")["tokens"] - before
        if charged < prompt_tokens + 200:
            break
        time.sleep(0.2)
    assert prompt_tokens + 5 <= charged < prompt_tokens + 200


def test_the_sdk_waits_out_retry_after_and_then_succeeds(deployment):
    client = deployment.sdk("paced")
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(30):
            ask(client, max_tokens=1)
    wait_ms = int(refused.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 6000  # 10 per minute: one every 6 s
    started = time.monotonic()
    retrying = deployment.sdk("paced", max_retries=2)
    assert ask(retrying, max_tokens=1).parse().choices[0].finish_reason == "length"
    assert time.monotonic() - started >= wait_ms / 1000 - 0.2


def test_the_server_logs_json_lines_with_an_access_line_per_request_and_no_key(deployment):
    headers = {"X-Request-Id": "e2e-42"}
    ask(
        deployment.sdk("meter", 0),
        max_tokens=3,
        extra_headers=headers,
        extra_body={"ignore_eos": True},
    )
    time.sleep(0.5)  # the line is written as the response closes
    text = (deployment.workdir / "server0" / "server.log").read_text()
    assert "sk-" not in text  # no key, in any line
    lines = text.splitlines()
    # gunicorn's own start-up lines are plain text on stderr; every other line is JSON.
    ours = [line for line in lines if not re.match(r"^\[\d{4}-\d\d-\d\d ", line)]
    entries = [json.loads(line) for line in ours]
    assert all({"severity", "message", "time", "logger"} <= set(e) for e in entries)
    [ready] = [e for e in entries if e["message"].startswith("model ready")]
    assert ready["context"] == MAX_SEQ_LEN and ready["slots"] == MAX_BATCH
    assert ready["devices"].startswith("1 x ") and ready["load_s"] > 0
    [access] = [e for e in entries if e.get("requestId") == "e2e-42"]
    assert access["logger"] == "jaxchat.access" and access["client"] == "meter"
    assert access["httpRequest"]["status"] == 200 and access["completion_tokens"] == 3
    assert access["prompt_tokens"] > 0 and access["finish_reason"] == "length"


def test_the_real_engine_reports_its_state_on_metrics(deployment):
    url = deployment.urls[0]
    before = metric_values(requests.get(f"{url}/metrics").text)
    ask(deployment.sdk("meter", 0), max_tokens=4, extra_body={"ignore_eos": True})
    after = metric_values(requests.get(f"{url}/metrics").text)
    assert after["jaxchat:generation_tokens_total"] - before["jaxchat:generation_tokens_total"] == 4
    assert after["jaxchat:engine_step_seconds_count"] > before["jaxchat:engine_step_seconds_count"]
    assert after["jaxchat:num_requests_running"] == 0 and after["jaxchat:num_requests_waiting"] == 0
    assert 0 <= after["jaxchat:kv_cache_usage_perc"] < 1


def metric_values(text: str) -> dict[str, float]:
    """Unlabelled samples by name."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
