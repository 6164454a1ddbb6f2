"""State for one instance: rate buckets and cached replies in memory, usage in SQLite.

The usage table survives restarts and crashes: every admission and refund is one
transaction (`BEGIN IMMEDIATE`, synchronous=FULL), so processes that share
JAXCHAT_STATE_DIR also share budgets. The rate buckets and the reply cache are this
process's own; for limits that hold across instances, use Redis.
"""

import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handler.keys import Client
from handler.quota import Admission, Refusal, Usage, Window

SECONDS_PER_WINDOW = 60.0  # limits are per minute

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    client TEXT NOT NULL,
    period TEXT NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (client, period)
)
"""


@dataclass
class Bucket:
    """A token bucket holding up to `capacity`, refilled at capacity per minute."""

    capacity: int
    level: float
    at: float

    def refill(self, now: float) -> None:
        elapsed = max(now - self.at, 0.0)
        self.level = min(self.capacity, self.level + elapsed * self.capacity / SECONDS_PER_WINDOW)
        self.at = now

    def wait_for(self, amount: int) -> float:
        """Seconds until `amount` is available."""
        return max(amount - self.level, 0.0) * SECONDS_PER_WINDOW / self.capacity

    def window(self) -> Window:
        return Window(self.capacity, math.floor(self.level), self.wait_for(self.capacity))


class EmbeddedStore:
    """The `Store` of handler/quota.py within one process (plus a SQLite file)."""

    kind = "embedded"

    def __init__(
        self,
        directory: Path,
        *,
        cache_ttl: int,
        cache_entries: int,
        cache_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "usage.sqlite3"
        self._connection: tuple[int, sqlite3.Connection] | None = None
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._clock = clock
        self._cache = ReplyCache(cache_ttl, cache_entries, cache_bytes, clock)

    @property
    def _db(self) -> sqlite3.Connection:
        """This process's connection: one opened before a fork is not used after it."""
        if self._connection is None or self._connection[0] != os.getpid():
            db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(SCHEMA)
            self._connection = (os.getpid(), db)
        return self._connection[1]

    def _bucket(self, client: Client, kind: str, capacity: int | None, now: float) -> Bucket | None:
        if capacity is None:
            return None
        bucket = self._buckets.get((client.name, kind))
        if bucket is None or bucket.capacity != capacity:
            bucket = self._buckets[(client.name, kind)] = Bucket(capacity, capacity, now)
        bucket.refill(now)
        return bucket

    def admit(self, client: Client, tokens: int, period: str) -> Admission:
        with self._lock:
            now = self._clock()
            requests = self._bucket(client, "requests", client.requests_per_minute, now)
            token_bucket = self._bucket(client, "tokens", client.tokens_per_minute, now)
            refused: Refusal | None = None
            wait, used = None, 0
            if requests is not None and requests.level < 1:
                refused, wait = "requests", requests.wait_for(1)
            elif token_bucket is not None and token_bucket.level < tokens:
                refused, wait = "tokens", token_bucket.wait_for(tokens)
            elif (charged := self._charge(client, tokens, period)) is None:
                refused, used = "budget", self._usage(client.name, period).tokens
            else:
                used = charged
                for bucket, taken in ((requests, 1), (token_bucket, tokens)):
                    if bucket is not None:
                        bucket.level -= taken
            return Admission(
                refused is None,
                requests.window() if requests else None,
                token_bucket.window() if token_bucket else None,
                refused,
                wait,
                used,
            )

    def _charge(self, client: Client, tokens: int, period: str) -> int | None:
        """Add one request and `tokens` to the period's usage, unless that would pass the
        client's budget (None); the tokens used after it."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            used = self._usage(client.name, period).tokens
            if client.token_budget is not None and used + tokens > client.token_budget:
                db.execute("ROLLBACK")
                return None
            db.execute(
                "INSERT INTO usage VALUES (?, ?, 1, ?) ON CONFLICT (client, period) DO UPDATE "
                "SET requests = requests + 1, tokens = tokens + excluded.tokens",
                (client.name, period, tokens),
            )
            db.execute("COMMIT")
            return used + tokens
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def refund(self, client: Client, tokens: int, period: str) -> None:
        with self._lock:
            bucket = self._buckets.get((client.name, "tokens"))
            if bucket is not None:
                bucket.refill(self._clock())
                bucket.level = min(bucket.capacity, bucket.level + tokens)
            self._db.execute(
                "UPDATE usage SET tokens = MAX(tokens - ?, 0) WHERE client = ? AND period = ?",
                (tokens, client.name, period),
            )

    def usage(self, client: Client, period: str) -> Usage:
        with self._lock:
            return self._usage(client.name, period)

    def _usage(self, name: str, period: str) -> Usage:
        row = self._db.execute(
            "SELECT requests, tokens FROM usage WHERE client = ? AND period = ?", (name, period)
        ).fetchone()
        return Usage(*row) if row else Usage(0, 0)

    def cache_get(self, key: str) -> bytes | None:
        return self._cache.get(key)

    def cache_put(self, key: str, value: bytes) -> None:
        self._cache.put(key, value)

    def ping(self) -> None:
        pass


class ReplyCache:
    """Cached replies by key: least recently used first out, bounded by count and bytes,
    each entry living `ttl` seconds."""

    def __init__(self, ttl: int, max_entries: int, max_bytes: int, clock: Callable[[], float]):
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: str, value: bytes) -> None:
        if self.ttl <= 0 or len(value) > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (self._clock() + self.ttl, value)
            self._bytes += len(value)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)
