"""benchmarks.load: its statistics on hand-made timings, and a run against a fake server.

The fake is a tiny OpenAI-style SSE server on 127.0.0.1 whose chunk count,
tokens per chunk and delays are known, so the counted tokens, TTFT and
inter-token latency the load generator reports can be checked against them.
"""

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import load
from benchmarks.load import RequestRecord
from benchmarks.serve_and_load import niced

# ---------------------------------------------------------------- statistics


def test_percentile_interpolates_linearly():
    assert math.isnan(load.percentile([], 50))
    assert load.percentile([7.0], 99) == 7.0
    assert load.percentile([3, 1, 2, 4], 50) == 2.5
    assert load.percentile([3, 1, 2, 4], 0) == 1
    assert load.percentile([3, 1, 2, 4], 100) == 4
    assert load.percentile(list(range(101)), 99) == pytest.approx(99)
    assert load.percentile([1, 2], 99) == pytest.approx(1.99)


def test_inter_token_latency_is_per_token():
    record = RequestRecord(start=0.0, chunk_times=[1.0, 1.5, 2.5], end=3.0)
    assert load.inter_token_latencies(record) == pytest.approx([0.5, 1.0])
    record.usage_tokens = 6  # two tokens per chunk: each gap covers two tokens
    assert load.inter_token_latencies(record) == pytest.approx([0.25, 0.5])
    assert load.inter_token_latencies(RequestRecord(start=0.0, chunk_times=[1.0])) == []


def test_output_tokens_prefer_usage_over_chunk_count():
    record = RequestRecord(start=0.0, chunk_times=[1.0, 2.0, 3.0])
    assert record.output_tokens == 3
    record.usage_tokens = 12
    assert record.output_tokens == 12


def test_request_rate_counts_from_the_first_token():
    record = RequestRecord(start=0.0, chunk_times=[1.0, 2.0, 3.0], end=4.0, usage_tokens=6)
    assert load.request_rate(record) == pytest.approx(2.0)
    assert load.request_rate(RequestRecord(start=0.0, end=1.0)) is None


def test_summarize_aggregates_a_level():
    records = [
        RequestRecord(start=0.0, chunk_times=[0.5, 1.0, 1.5], end=2.0, usage_tokens=3),
        RequestRecord(start=0.0, chunk_times=[1.0, 2.0, 3.0, 4.0], end=5.0, usage_tokens=8),
        RequestRecord(start=0.0, chunk_times=[0.1], end=0.2, usage_tokens=1, error="Boom: x"),
    ]
    result = load.summarize(concurrency=2, records=records, wall_s=5.5)
    assert (result.concurrency, result.requests, result.errors) == (2, 3, 1)
    assert result.output_tokens == 11  # the failed request's tokens are not counted
    assert result.aggregate_tok_s == pytest.approx(11 / 5.5)
    assert result.tokens_per_request == pytest.approx(5.5)
    assert result.ttft_p50 == pytest.approx(0.75)  # TTFTs 0.5 and 1.0
    assert result.ttft_p99 == pytest.approx(0.5 + 0.5 * 0.99)
    # ITLs: 0.5, 0.5 (1 token/chunk) and 0.5, 0.5, 0.5 (2 tokens/chunk over 1.0 s gaps).
    assert result.itl_p50 == pytest.approx(0.5)
    # Rates after the first token: 3 / 1.5 = 2 and 8 / 4 = 2.
    assert result.request_tok_s_p50 == pytest.approx(2.0)
    assert result.error_samples == ["Boom: x"]


# ---------------------------------------------------------------- fake server


@dataclass
class FakeBehaviour:
    """What the fake streams per request; `fail_post` is the 1-based POST that gets a 500."""

    chunks: int = 5
    tokens_per_chunk: int = 4
    first_delay: float = 0.05
    gap: float = 0.02
    send_usage: bool = True
    fail_post: int | None = None
    bodies: list[dict] = field(default_factory=list)
    get_ports: list[int] = field(default_factory=list)  # client port of each GET
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


class FakeHandler(BaseHTTPRequestHandler):
    """HTTP/1.0: each response ends when the connection closes, so no framing is needed."""

    behaviour: FakeBehaviour  # set on a subclass per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.behaviour.get_ports.append(self.client_address[1])
        body = {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0}]}
        self.reply_json(200, body)

    def do_POST(self) -> None:
        b = self.behaviour
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with b.lock:
            b.bodies.append(body)
            post_number = len(b.bodies)
            b.in_flight += 1
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
        try:
            if post_number == b.fail_post:
                self.reply_json(500, {"error": {"message": "injected", "type": "server_error"}})
            else:
                self.stream(b)
        finally:
            with b.lock:
                b.in_flight -= 1

    def stream(self, b: FakeBehaviour) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        # A role-only first delta must count neither as the first token nor as a chunk.
        self.wfile.write(sse(chunk({"role": "assistant", "content": ""})))
        time.sleep(b.first_delay)
        for i in range(b.chunks):
            if i:
                time.sleep(b.gap)
            self.wfile.write(sse(chunk({"content": "tok " * b.tokens_per_chunk})))
        self.wfile.write(sse(chunk({}, finish="length")))
        if b.send_usage:
            tokens = b.chunks * b.tokens_per_chunk
            usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": tokens + 9}
            self.wfile.write(sse({**chunk({}), "choices": [], "usage": usage}))
        self.wfile.write(sse("[DONE]"))

    def reply_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    """Start fake servers on 127.0.0.1; yield a factory(behaviour) -> base URL."""
    servers = []

    def start(behaviour: FakeBehaviour, protocol: str = "HTTP/1.0") -> str:
        attributes = {"behaviour": behaviour, "protocol_version": protocol}
        handler = type("Handler", (FakeHandler,), attributes)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_load(base_url: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / "load.json"
    argv = ["--base-url", base_url, "--max-tokens", "20", "--json", str(out), *extra]
    assert load.main(argv) == 0
    return json.loads(out.read_text())


def test_load_against_fake_server(fake_server, tmp_path, capsys):
    # POST 1 is the warm-up; POST 3 is the second request of the concurrency-1 level.
    b = FakeBehaviour(fail_post=3)
    report = run_load(fake_server(b), tmp_path, "--concurrency", "1,3")
    one, three = report["levels"]
    assert report["model"] == "fake-model"  # asked /v1/models, as no --model was given

    # Default request count max(4, 2 x concurrency); no retry hides the injected 500.
    assert (one["requests"], one["errors"]) == (4, 1)
    assert (three["requests"], three["errors"]) == (6, 0)
    assert len(b.bodies) == 1 + 4 + 6
    assert b.max_in_flight == 3

    # Tokens come from usage (5 chunks x 4 tokens), not from the 5 chunks.
    assert one["output_tokens"] == 3 * 20 and three["output_tokens"] == 6 * 20
    assert three["tokens_per_request"] == 20
    assert three["aggregate_tok_s"] == pytest.approx(120 / three["wall_s"])
    # Two rounds of requests each at least 0.05 + 4 x 0.02 s long.
    assert three["wall_s"] >= 2 * (b.first_delay + 4 * b.gap)

    for level in (one, three):
        assert level["ttft_p50"] >= b.first_delay
        # Gaps of 0.02 s carry 4 tokens: 0.005 s per token (0.02 if undivided).
        assert 0.8 * b.gap / 4 <= level["itl_p50"] < 0.5 * b.gap
        # 20 tokens over >= 4 gaps after the first token: at most 250 tok/s.
        assert 0 < level["request_tok_s_p50"] <= 20 / (4 * b.gap)

    for body in b.bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["temperature"] == 0
        assert body["max_tokens"] == 20 and body["model"] == "fake-model"
        assert body["messages"][0]["content"] in load.PROMPTS
    # Deterministic prompts: the concurrency-1 level sends PROMPTS[0..3] in order.
    assert [body["messages"][0]["content"] for body in b.bodies[1:5]] == load.PROMPTS[:4]

    table = capsys.readouterr().out
    assert "agg tok/s" in table and "TTFT p50" in table
    assert "APIError" in table or "InternalServerError" in table  # the error sample


def test_load_counts_chunks_without_usage(fake_server, tmp_path):
    b = FakeBehaviour(chunks=6, tokens_per_chunk=1, gap=0.01, send_usage=False)
    base_url = fake_server(b)
    report = run_load(base_url, tmp_path, "--concurrency", "2", "--requests-per-level", "5")
    (level,) = report["levels"]
    assert (level["requests"], level["errors"]) == (5, 0)
    assert level["output_tokens"] == 5 * 6  # one token per content chunk; role chunk excluded
    assert b.max_in_flight == 2
    assert level["itl_p50"] >= 0.8 * b.gap


def test_client_opens_a_fresh_connection_per_request(fake_server):
    """An HTTP/1.1 server keeps connections open; the client must not reuse them."""
    b = FakeBehaviour()
    base_url = fake_server(b, protocol="HTTP/1.1")

    async def list_models_three_times() -> None:
        async with load.make_client(base_url, "key", timeout=10) as client:
            for _ in range(3):
                await client.models.list()

    asyncio.run(list_models_three_times())
    assert len(set(b.get_ports)) == 3


def test_the_benchmarked_server_runs_below_the_load_generators_priority():
    """serve_and_load starts the server through `niced`: the process it starts (the same
    pid, so --pid still finds the server) runs `nice` steps below the caller; nice 0
    leaves the command as it is."""
    command = [sys.executable, "-c", "import os; print(os.getpid(), os.nice(0))"]
    child = subprocess.Popen(niced(command, 5), stdout=subprocess.PIPE, text=True)
    pid, priority = child.communicate(timeout=60)[0].split()
    assert int(pid) == child.pid
    assert int(priority) == min(19, os.nice(0) + 5)
    assert niced(command, 0) == command
