"""The cache on Redis (`redis://HOST:PORT/DB?prefix=postroom:&max_ttl=86400`), shared by every node.

Keys. An entry `KEY` lives at `PREFIX c:KEY`. `delete_prefix` must not walk the whole keyspace
(MailService calls it on every change a user makes), so each entry is also listed in a sorted
set, its *bucket*: `PREFIX i:BUCKET`, where BUCKET is the key up to and including its second
colon (`u:<user id>:` for MailService's keys; `""` for keys with fewer colons). Members all score
0, so a prefix is one lexicographic range (ZRANGEBYLEX): dropping a user's entries touches
only that user's bucket. A prefix shorter than a bucket (fewer than two colons) also looks at
the buckets whose names start with it, found with SCAN over the bucket keys only.

Both steps of a write or an invalidation run as one Lua script, so an invalidation never misses
an entry written before it. The scripts name keys they compute, which is fine on a single
Redis or a Sentinel pair; on Redis Cluster the bucket would have to become a hash tag.

Expiry. Every entry has a time to live: its own, or `max_ttl` (default one day) when set without
one, so nothing stale outlives that even if an operator's eviction policy drops a bucket set
before its entries. A bucket set lives at least as long as its longest-lived entry; entries that
expire on their own leave their name in the bucket until the next invalidation of that prefix
clears it.

Capacity is Redis's (`maxmemory` with `volatile-lru` or `allkeys-lru`), not a count per cache.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from postroom.store.errors import StoreError

DEFAULT_PREFIX = "postroom:"
DEFAULT_MAX_TTL = 24 * 3600.0

_SET = """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], 0, ARGV[3])
if redis.call('PTTL', KEYS[2]) < ttl then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
"""

# KEYS[1] bucket set; ARGV[1] entry key prefix, ARGV[2]/ARGV[3] the ZRANGEBYLEX bounds.
_DROP_RANGE = """
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[2], ARGV[3])
for i = 1, #members, 500 do
  local keys = {}
  for j = i, math.min(i + 499, #members) do
    keys[#keys + 1] = ARGV[1] .. members[j]
  end
  redis.call('DEL', unpack(keys))
end
if #members > 0 then
  redis.call('ZREMRANGEBYLEX', KEYS[1], ARGV[2], ARGV[3])
end
return #members
"""


def split_redis_url(url: str, *ours: str) -> tuple[str, dict[str, str]]:
    """The URL without our own query parameters (redis-py rejects unknown ones), and those."""
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in ours:
            found[key] = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), found


def bucket_of(key: str) -> str:
    """The key up to and including its second colon, or "" when it has fewer."""
    first = key.find(":")
    if first < 0:
        return ""
    second = key.find(":", first + 1)
    return "" if second < 0 else key[: second + 1]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class RedisCache:
    """`Cache` on Redis: one cache for every node, invalidated by prefix."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        if max_ttl <= 0:
            raise ValueError("max_ttl must be positive")
        self.url = url
        self.prefix = prefix
        self.max_ttl = max_ttl
        self._redis: Redis | None = None
        self._set_script: Any = None
        self._drop_script: Any = None

    @classmethod
    def from_url(cls, url: str) -> RedisCache:
        """`redis://[:PASSWORD@]HOST:PORT/DB?prefix=postroom:&max_ttl=SECONDS` (or rediss://)."""
        plain, ours = split_redis_url(url, "prefix", "max_ttl")
        return cls(
            plain,
            prefix=ours.get("prefix", DEFAULT_PREFIX),
            max_ttl=float(ours.get("max_ttl", DEFAULT_MAX_TTL)),
        )

    def _entry(self, key: str) -> str:
        return f"{self.prefix}c:{key}"

    def _bucket(self, bucket: str) -> str:
        return f"{self.prefix}i:{bucket}"

    # Lifecycle

    async def open(self) -> None:
        if self._redis is not None:
            return
        client: Redis = Redis.from_url(self.url, socket_connect_timeout=10)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise StoreError(f"cache: cannot reach Redis: {exc}") from exc
        self._redis = client
        self._set_script = client.register_script(_SET)
        self._drop_script = client.register_script(_DROP_RANGE)

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    # The Cache protocol

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._client().get(self._entry(key))
        except RedisError as exc:
            raise StoreError(f"cache get: {exc}") from exc
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        seconds = self.max_ttl if ttl is None else min(ttl, self.max_ttl)
        if seconds <= 0:
            await self.delete(key)
            return
        millis = max(1, math.ceil(seconds * 1000))
        self._client()
        try:
            await self._set_script(
                keys=[self._entry(key), self._bucket(bucket_of(key))],
                args=[bytes(value), millis, key],
            )
        except RedisError as exc:
            raise StoreError(f"cache set: {exc}") from exc

    async def delete(self, *keys: str) -> None:
        if not keys:
            return
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.delete(*(self._entry(key) for key in keys))
                for key in keys:
                    pipe.zrem(self._bucket(bucket_of(key)), key)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cache delete: {exc}") from exc

    async def delete_prefix(self, prefix: str) -> None:
        client = self._client()
        # Members are UTF-8; 0xff never occurs in UTF-8, so it bounds every extension of prefix.
        low = b"[" + prefix.encode() if prefix else b"-"
        high = b"(" + prefix.encode() + b"\xff" if prefix else b"+"
        try:
            buckets = {bucket_of(prefix)} if prefix.count(":") >= 2 else {""}
            if prefix.count(":") < 2:
                pattern = _glob_escape(self._bucket(prefix)) + "*"
                start = len(self._bucket(""))
                async for name in client.scan_iter(match=pattern, count=1000, _type="zset"):
                    buckets.add(bytes(name).decode()[start:])
            for bucket in buckets:
                await self._drop_script(
                    keys=[self._bucket(bucket)], args=[self._entry(""), low, high]
                )
        except RedisError as exc:
            raise StoreError(f"cache delete_prefix: {exc}") from exc

    def _client(self) -> Redis:
        if self._redis is None:
            raise StoreError("cache is not open")
        return self._redis
