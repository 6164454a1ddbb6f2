"""What rate limits and budgets add to a request: the handler's own calls, timed.

Each request of a key with limits runs `Meter.admit` before generating and
`Meter.settle` after (handler/quota.py); a cacheable one also looks up the
response cache. This times those calls, as the handler makes them, against the
embedded store (memory + SQLite with synchronous=FULL) and a real Redis server
(redis-server on 127.0.0.1, append-only with fsync every second), and prints
p50/p99 in milliseconds. `make bench` runs it.
"""

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.serve_and_load import free_port
from handler.keys import Client
from handler.quota import Quota, Store
from handler.state.embedded import EmbeddedStore
from handler.state.redis import RedisStore

CLIENT = Client("bench", requests_per_minute=10**9, tokens_per_minute=10**12, token_budget=10**15)
CACHE = {"cache_ttl": 600, "cache_entries": 10_000, "cache_bytes": 64 << 20}


def time_requests(store: Store, requests: int) -> tuple[list[float], list[float]]:
    """Milliseconds per request for admit + settle, and for a cache lookup."""
    quota = Quota(store)
    metered, lookups = [], []
    for i in range(requests):
        started = time.perf_counter()
        meter = quota.meter(CLIENT)
        meter.admit(40 + 256)  # a short prompt and max_tokens 256
        meter.settle(40 + 100)
        metered.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        store.cache_get(f"{i:064x}")
        lookups.append((time.perf_counter() - started) * 1000)
    return metered, lookups


def report(name: str, metered: list[float], lookups: list[float]) -> None:
    def p(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    print(
        f"{name:<9} admit+settle p50 {statistics.median(metered):6.2f} ms  "
        f"p99 {p(metered, 0.99):6.2f} ms | cache lookup p50 {statistics.median(lookups):6.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report("embedded", *time_requests(EmbeddedStore(Path(tmp), **CACHE), args.requests))
        binary = shutil.which("redis-server")
        if binary is None:
            print("redis      (redis-server not installed: `make services`)")
            return 0
        port = free_port()
        server = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", tmp, "--save", ""]
            + ["--appendonly", "yes", "--appendfsync", "everysec"],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 20
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            report("redis", *time_requests(RedisStore(url, **CACHE), args.requests))
        finally:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
