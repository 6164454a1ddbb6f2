"""Replies to identical deterministic requests, answered from a cache.

A request is deterministic when it samples greedily (temperature 0) or names a
seed: the same request then gets the same reply. Its key hashes the route, the
serving configuration (the system fingerprint and jaxchat's version) and the
request's fields, `user` aside; `stream` and `stream_options` are fields, so a
streamed request is answered by a stream. An entry is the reply's JSON body, or
its SSE events, with the tokens it used (a hit is charged the same tokens). On a
hit, only `id` and `created` are new; the reply carries `x-jaxchat-cache: hit`
(a request that could be cached and was not: `miss`).

Only complete replies are written: a stream cut by the client or ended by an
error is not. The store keeps entries for JAXCHAT_RESPONSE_CACHE_TTL seconds,
bounded by count and bytes; a store that cannot be reached is no cache (fail open).
"""

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

from handler.quota import Store, StoreUnavailable
from handler.requests import GenerationRequest

log = logging.getLogger(__name__)

HEADER = "x-jaxchat-cache"
# Fields that do not change the reply.
IGNORED_FIELDS = {"user"}


@dataclass(frozen=True)
class CachedReply:
    """A finished reply: its JSON body, or its SSE events (without [DONE])."""

    prompt_tokens: int
    completion_tokens: int
    body: str | None = None
    events: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        """What the reply cost, and what a hit costs."""
        return self.prompt_tokens + self.completion_tokens

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def loads(cls, raw: bytes) -> "CachedReply":
        data = json.loads(raw)
        return cls(**{**data, "events": tuple(data["events"])})

    def renewed_body(self) -> str:
        """The JSON body with a new id and created."""
        assert self.body is not None
        return json.dumps(renew(json.loads(self.body), fresh_id(self.body)))

    def renewed_events(self) -> Iterator[str]:
        """The SSE events, each with the same new id and created."""
        new_id = fresh_id(self.events[0]) if self.events else ""
        for event in self.events:
            payload = json.loads(event.removeprefix("data: "))
            yield f"data: {json.dumps(renew(payload, new_id), separators=(',', ':'))}\n\n"


def fresh_id(text: str) -> str:
    """A new id with the prefix of the cached one ("chatcmpl-", "cmpl-")."""
    prefix = json.loads(text.removeprefix("data: ")).get("id", "").split("-")[0] or "chatcmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def renew(payload: dict, new_id: str) -> dict:
    if "id" in payload:
        payload["id"], payload["created"] = new_id, int(time.time())
    return payload


class ResponseCache:
    """The reply cache over the state store (None or a TTL of 0: disabled)."""

    def __init__(self, store: Store | None, ttl: int, fingerprint: str) -> None:
        self.store = store if ttl > 0 else None
        self.fingerprint = fingerprint
        try:
            self.version = metadata.version("jaxchat")
        except metadata.PackageNotFoundError:
            self.version = "source"

    def key(self, route: str, request: GenerationRequest) -> str | None:
        """The request's key, or None when its reply may not be cached."""
        if self.store is None or not (request.temperature == 0 or request.seed is not None):
            return None
        # Unknown fields are ignored by generation, so by the key too.
        ignored = IGNORED_FIELDS | set(request.model_extra or ())
        fields = request.model_dump(mode="json", exclude=ignored, exclude_none=True)
        text = json.dumps([self.version, self.fingerprint, route, fields], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> CachedReply | None:
        assert self.store is not None
        try:
            raw = self.store.cache_get(key)
        except StoreUnavailable as exc:
            log.warning("response cache unreachable, answering without it: %s", exc)
            return None
        return None if raw is None else CachedReply.loads(raw)

    def put(self, key: str, reply: CachedReply) -> None:
        assert self.store is not None
        try:
            self.store.cache_put(key, reply.dumps())
        except StoreUnavailable as exc:
            log.warning("response cache unreachable, reply not cached: %s", exc)


def recording(events: Iterator[str], done: Callable[[tuple[str, ...]], None]) -> Iterator[str]:
    """`events`, passed through; `done(all of them)` once they ran to their end."""
    seen = []
    for event in events:
        seen.append(event)
        yield event
    done(tuple(seen))
