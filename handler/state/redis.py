"""State shared by every instance through Redis (Cloud Memorystore in production).

Each decision is one Lua script, run atomically by the server, with the server's
clock (`TIME`), so that instances never disagree about time and two of them never
both admit the last allowed request. Keys, under `jaxchat:`:

- `rate:{client}:requests`, `rate:{client}:tokens`: token buckets, hashes of
  `level` and `at`; a full bucket is the same as none, so they expire when idle.
- `usage:{client}:{period}`: a hash of `requests` and `tokens` (the budget).
  Durability is Redis's: run it with persistence (AOF with fsync every second, as
  Memorystore's "AOF" mode does) so that budgets survive its restarts.
- `cache:{key}`: a cached reply with its TTL; `cache:index` (a sorted set by time of
  writing) and `cache:sizes` bound the entries by count and bytes, oldest out first.

Connection failures become StoreUnavailable (handler/quota.py decides what that means).
"""

import redis
import redis.exceptions

from handler.keys import Client
from handler.quota import Admission, Refusal, StoreUnavailable, Usage, Window

PREFIX = "jaxchat:"
TIMEOUT_S = 1.0

# KEYS: requests bucket, tokens bucket, usage hash.
# ARGV: requests per minute (0: none), tokens per minute (0: none), tokens to take,
#       token budget (-1: none).
# Returns {admitted, refusal, retry after s, req remaining, req reset s, tok remaining,
#          tok reset s, tokens used}; numbers as strings (Lua would truncate floats).
ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, budget = tonumber(ARGV[3]), tonumber(ARGV[4])

local function level(key, capacity)
  if capacity == 0 then return 0 end
  local state = redis.call('HMGET', key, 'level', 'at')
  local l, at = tonumber(state[1]), tonumber(state[2])
  if l == nil then return capacity end
  return math.min(capacity, l + math.max(now - at, 0) * capacity / 60)
end
local function wait(l, capacity, amount)
  return tostring(math.max(amount - l, 0) * 60 / capacity)
end
local function store(key, capacity, l)
  if capacity == 0 then return end
  redis.call('HSET', key, 'level', tostring(l), 'at', tostring(now))
  redis.call('EXPIRE', key, 120)
end

local requests, tokens = level(KEYS[1], rpm), level(KEYS[2], tpm)
local used = tonumber(redis.call('HGET', KEYS[3], 'tokens') or '0')
local admitted, refusal, retry = 0, '', ''
if rpm > 0 and requests < 1 then
  refusal, retry = 'requests', wait(requests, rpm, 1)
elseif tpm > 0 and tokens < cost then
  refusal, retry = 'tokens', wait(tokens, tpm, cost)
elseif budget >= 0 and used + cost > budget then
  refusal = 'budget'
else
  admitted = 1
  requests, tokens = requests - 1, tokens - cost
  store(KEYS[1], rpm, requests)
  store(KEYS[2], tpm, tokens)
  redis.call('HINCRBY', KEYS[3], 'requests', 1)
  used = redis.call('HINCRBY', KEYS[3], 'tokens', cost)
end
local function reset(l, capacity)
  if capacity == 0 then return '0' end
  return wait(l, capacity, capacity)
end
return {admitted, refusal, retry, tostring(math.floor(requests)), reset(requests, rpm),
        tostring(math.floor(tokens)), reset(tokens, tpm), tostring(used)}
"""

# KEYS: tokens bucket, usage hash. ARGV: tokens per minute (0: none), tokens to give back.
REFUND = """
local cost = tonumber(ARGV[2])
local tpm = tonumber(ARGV[1])
if tpm > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
  local state = redis.call('HMGET', KEYS[1], 'level', 'at')
  local l = tonumber(state[1]) + math.max(now - tonumber(state[2]), 0) * tpm / 60
  redis.call('HSET', KEYS[1], 'level', tostring(math.min(tpm, l + cost)), 'at', tostring(now))
end
local used = tonumber(redis.call('HGET', KEYS[2], 'tokens') or '0')
redis.call('HSET', KEYS[2], 'tokens', math.max(used - cost, 0))
"""

# KEYS: index, sizes, total bytes. ARGV: key, value, ttl s, max entries, max bytes.
CACHE_PUT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local index, sizes, total = KEYS[1], KEYS[2], KEYS[3]
local key, value, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local function drop(k)
  local size = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('HDEL', sizes, k)
  redis.call('ZREM', index, k)
  redis.call('DEL', k)
  redis.call('DECRBY', total, size)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl * 1000)) do drop(k) end
drop(key)
-- Strictly after the newest entry, so entries written within one millisecond still leave
-- oldest first (equal scores would order by name).
local newest = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')[2]
local score = now
if newest and tonumber(newest) >= score then score = tonumber(newest) + 1 end
redis.call('SET', key, value, 'EX', ttl)
redis.call('ZADD', index, score, key)
redis.call('HSET', sizes, key, #value)
redis.call('INCRBY', total, #value)
while redis.call('ZCARD', index) > max_entries or
      tonumber(redis.call('GET', total) or '0') > max_bytes do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if oldest == nil then redis.call('SET', total, 0) break end
  drop(oldest)
end
"""


class RedisStore:
    """The `Store` of handler/quota.py in Redis, shared by every instance."""

    kind = "redis"

    def __init__(self, url: str, *, cache_ttl: int, cache_entries: int, cache_bytes: int) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        self._admit = self._redis.register_script(ADMIT)
        self._refund = self._redis.register_script(REFUND)
        self._cache_put = self._redis.register_script(CACHE_PUT)
        self.cache_ttl, self.cache_entries, self.cache_bytes = cache_ttl, cache_entries, cache_bytes

    def admit(self, client: Client, tokens: int, period: str) -> Admission:
        keys = [rate_key(client, "requests"), rate_key(client, "tokens"), usage_key(client, period)]
        rpm, tpm = client.requests_per_minute or 0, client.tokens_per_minute or 0
        budget = -1 if client.token_budget is None else client.token_budget
        with unavailable_as_error():
            reply = self._admit(keys=keys, args=[rpm, tpm, tokens, budget])
        admitted, refusal, retry, req_left, req_reset, tok_left, tok_reset, used = (
            item.decode() if isinstance(item, bytes) else item for item in reply
        )
        refused: Refusal | None = refusal or None  # type: ignore[assignment]
        return Admission(
            admitted=bool(admitted),
            requests=Window(rpm, int(req_left), float(req_reset)) if rpm else None,
            tokens=Window(tpm, int(tok_left), float(tok_reset)) if tpm else None,
            refused=refused,
            retry_after_s=float(retry) if retry else None,
            used=int(used),
        )

    def refund(self, client: Client, tokens: int, period: str) -> None:
        keys = [rate_key(client, "tokens"), usage_key(client, period)]
        with unavailable_as_error():
            self._refund(keys=keys, args=[client.tokens_per_minute or 0, tokens])

    def usage(self, client: Client, period: str) -> Usage:
        with unavailable_as_error():
            requests, tokens = self._redis.hmget(usage_key(client, period), "requests", "tokens")
        return Usage(int(requests or 0), int(tokens or 0))

    def cache_get(self, key: str) -> bytes | None:
        with unavailable_as_error():
            value = self._redis.get(PREFIX + "cache:" + key)
        return value if isinstance(value, bytes) else None

    def cache_put(self, key: str, value: bytes) -> None:
        if self.cache_ttl <= 0 or len(value) > self.cache_bytes:
            return
        keys = [PREFIX + "cache:index", PREFIX + "cache:sizes", PREFIX + "cache:bytes"]
        limits = [self.cache_ttl, self.cache_entries, self.cache_bytes]
        with unavailable_as_error():
            self._cache_put(keys=keys, args=[PREFIX + "cache:" + key, value, *limits])

    def ping(self) -> None:
        with unavailable_as_error():
            self._redis.ping()


def rate_key(client: Client, kind: str) -> str:
    return f"{PREFIX}rate:{{{client.name}}}:{kind}"


def usage_key(client: Client, period: str) -> str:
    return f"{PREFIX}usage:{{{client.name}}}:{period}"


class unavailable_as_error:
    """Turn Redis connection failures into StoreUnavailable."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            raise StoreUnavailable(str(exc)) from exc
