"""Rate limits and token budgets per client, and each request's charge against them.

A client from the keys file (handler/keys.py) may have:
- `requests_per_minute` and `tokens_per_minute`: token buckets that hold a minute's
  allowance and refill continuously, so a client may burst up to its limit and then
  runs at its rate. Over a limit the answer is a 429 `rate_limit_exceeded` with
  Retry-After (seconds, and `retry-after-ms`, which the openai SDK prefers).
- `token_budget`: total tokens per `budget_period` (a UTC day or month) or for the
  key's lifetime. A request that could take the usage past it is a 429
  `insufficient_quota` whose message says "budget exceeded".

A request first reserves what it may use: its prompt tokens plus, for each choice,
its completion budget (max_tokens, or what is left of the context). When its reply
ends, however it ends (finished, cut by the client, failed), the unused part is given
back: it is charged for the tokens it really used. The reservation is written to the
store before the request runs, so a server that dies mid-request leaves it charged in
full: a budget is never overrun, and a charge is never lost or counted twice.

Replies to a client with rate limits carry OpenAI's `x-ratelimit-*` headers.

The store (handler/state/) keeps the buckets and the usage: in this process and a
SQLite file, or in Redis, shared by every instance. When it cannot be reached,
requests of clients with a budget get a 503 with Retry-After (fail closed); other
clients are served unmetered (fail open).
"""

import datetime as dt
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from handler.errors import APIError, unavailable
from handler.keys import Client, Period

log = logging.getLogger(__name__)

# How soon a client refused because the store is down should try again.
STORE_RETRY_AFTER_SECONDS = 5

Refusal = Literal["requests", "tokens", "budget"]


class StoreUnavailable(Exception):
    """The shared state cannot be reached (Redis down or timing out)."""


@dataclass(frozen=True)
class Window:
    """One rate limit as the client sees it: `x-ratelimit-{limit,remaining,reset}-*`."""

    limit: int
    remaining: int
    reset_s: float  # until the bucket is full again


@dataclass(frozen=True)
class Admission:
    """A store's answer to "may this client spend `tokens` now?" (charged when admitted)."""

    admitted: bool
    requests: Window | None = None
    tokens: Window | None = None
    refused: Refusal | None = None
    retry_after_s: float | None = None  # for a rate refusal
    used: int = 0  # tokens charged to the budget period, after this admission


@dataclass(frozen=True)
class Usage:
    """A client's usage in one budget period."""

    requests: int
    tokens: int


class Store(Protocol):
    """Where buckets, usage and cached replies live (handler/state/)."""

    kind: str

    def admit(self, client: Client, tokens: int, period: str) -> Admission:
        """Atomically: refill the client's buckets, and unless a limit or the budget
        refuses, take one request and `tokens` from them and add both to the usage
        of `period`."""

    def refund(self, client: Client, tokens: int, period: str) -> None:
        """Give back `tokens` reserved but not used, to the bucket and the period's usage."""

    def usage(self, client: Client, period: str) -> Usage: ...

    def cache_get(self, key: str) -> bytes | None: ...

    def cache_put(self, key: str, value: bytes) -> None: ...

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""


# Budget periods, in UTC.


def period_key(period: Period | None, now: dt.datetime) -> str:
    """The name of the budget period holding `now`: "2026-12-02", "2026-12" or "lifetime"."""
    if period == "day":
        return now.strftime("%Y-%m-%d")
    if period == "month":
        return now.strftime("%Y-%m")
    return "lifetime"


def period_end(period: Period | None, now: dt.datetime) -> dt.datetime | None:
    """When the period holding `now` ends (None for a lifetime budget)."""
    if period == "day":
        return dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    if period == "month":
        year, month = divmod(now.year * 12 + now.month, 12)  # the next month, 0-based
        return dt.datetime(year, month + 1, 1, tzinfo=dt.UTC)
    return None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# Headers.


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    seconds = round(seconds, 3)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes or hours:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


def window_headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    headers = {}
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(window.remaining, 0))
            headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_s)
    return headers


def retry_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (HTTP's form), and in ms (the openai SDK reads it)."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


# The charge of one request.


class Quota:
    """The server's rate limits and budgets over a store (None: nothing is metered)."""

    def __init__(self, store: Store | None, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.store = store
        self.clock = clock

    def meter(self, client: Client | None) -> "Meter":
        return Meter(self, client)

    def report(self, client: Client) -> dict[str, object]:
        """`GET /v1/usage`: the client's usage, limits and remaining budget."""
        assert self.store is not None, "usage needs a store"
        now = self.clock()
        period = period_key(client.budget_period, now)
        try:
            used = self.store.usage(client, period)
        except StoreUnavailable as exc:
            raise store_down(exc) from None
        end = period_end(client.budget_period, now)
        budget = client.token_budget
        return {
            "object": "usage",
            "client": client.name,
            "period": client.budget_period or "lifetime",
            "period_key": period,
            "resets_at": None if end is None else int(end.timestamp()),
            "requests": used.requests,
            "tokens": used.tokens,
            "token_budget": budget,
            "remaining_tokens": None if budget is None else max(budget - used.tokens, 0),
            "requests_per_minute": client.requests_per_minute,
            "tokens_per_minute": client.tokens_per_minute,
        }


class Meter:
    """One request's charge: `admit` reserves before it runs (or charges a cached reply
    exactly), `settle` charges what it used once its reply ended (only the first call
    counts)."""

    def __init__(self, quota: Quota, client: Client | None) -> None:
        self.quota = quota
        self.client = client
        self.headers: dict[str, str] = {}
        self._reserved = 0
        self._period = ""
        self._lock = threading.Lock()

    def admit(self, tokens: int, *, final: bool = False) -> None:
        """Reserve `tokens` (charge them, when `final`), or raise the 429 (or 503) that
        refuses the request."""
        store, client = self.quota.store, self.client
        if store is None or client is None:
            return
        now = self.quota.clock()
        period = period_key(client.budget_period, now)
        try:
            admission = store.admit(client, tokens, period)
        except StoreUnavailable as exc:
            if client.token_budget is not None:
                raise store_down(exc) from None
            log.warning("state store unreachable, client %s unmetered: %s", client.name, exc)
            return
        self.headers = window_headers(admission.requests, admission.tokens)
        if not admission.admitted:
            raise refusal(client, admission, tokens, now, self.headers)
        if not final:
            self._reserved, self._period = tokens, period

    def settle(self, used: int) -> None:
        """Charge `used` tokens of the reservation: give back the rest."""
        with self._lock:
            unused, self._reserved = self._reserved - used, 0
        store, client = self.quota.store, self.client
        if unused <= 0 or store is None or client is None:
            return
        try:
            store.refund(client, unused, self._period)
        except StoreUnavailable as exc:
            # The reservation stays charged in full: never more than reserved.
            log.warning("could not refund %d tokens to client %s: %s", unused, client.name, exc)


def refusal(
    client: Client, admission: Admission, tokens: int, now: dt.datetime, headers: dict[str, str]
) -> APIError:
    """The 429 for a request the store refused."""
    name = client.name
    if admission.refused == "budget":
        budget = client.token_budget or 0
        left = max(budget - admission.used, 0)
        message = (
            f"Token budget exceeded for key '{name}': this request may use up to {tokens} "
            f"tokens (its prompt plus max_tokens for each choice), and {left} of the "
            f"{budget}-token budget"
        )
        end = period_end(client.budget_period, now)
        headers = {**headers, "x-should-retry": "false"}
        if end is None:
            message += " are left. Lower max_tokens, or ask for a larger budget."
        else:
            message += f" are left until {end:%Y-%m-%d %H:%M} UTC. Lower max_tokens, or wait."
            headers.update(retry_headers((end - now).total_seconds()))
        return APIError(
            429, message, "insufficient_quota", code="insufficient_quota", headers=headers
        )
    if admission.refused == "tokens" and tokens > (client.tokens_per_minute or 0):
        message = (
            f"Request too large for key '{name}' on tokens per min (TPM): Limit "
            f"{client.tokens_per_minute}, Requested {tokens} (its prompt plus max_tokens for "
            "each choice). Lower max_tokens or shorten the prompt."
        )
        headers = {**headers, "x-should-retry": "false"}
        return APIError(429, message, "tokens", code="rate_limit_exceeded", headers=headers)
    kind = admission.refused or "requests"
    wait = admission.retry_after_s or 1.0
    unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    limit = client.requests_per_minute if kind == "requests" else client.tokens_per_minute
    requested = 1 if kind == "requests" else tokens
    message = (
        f"Rate limit reached for key '{name}' on {unit}: Limit {limit}, Requested "
        f"{requested}. Please try again in {duration(wait)}."
    )
    headers = {**headers, **retry_headers(wait)}
    return APIError(429, message, kind, code="rate_limit_exceeded", headers=headers)


def store_down(exc: Exception) -> APIError:
    """503 while the shared state is unreachable: budgets fail closed."""
    log.error("state store unreachable: %s", exc)
    return unavailable(
        "Usage limits cannot be checked right now; retry shortly.",
        "state_unavailable",
        STORE_RETRY_AFTER_SECONDS,
    )
