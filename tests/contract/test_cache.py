"""Contract for the cache seam: every `Cache` implementation must pass this suite.

To add an implementation, add its name to `IMPLEMENTATIONS` and a branch to `_factory`
(skipping when its server is not configured). Capacity is not part of the contract (Redis's is
its server's maxmemory policy): the LRU's eviction is tested on an `LruCache` of `CAPACITY`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.store.cache import Cache
from postroom.store.memory_cache import LruCache
from tests.engines import require_redis, unique_name

IMPLEMENTATIONS = ["memory", "siblings", "redis"]

CAPACITY = 3


def _factory(name: str) -> Cache:
    if name == "memory":
        return LruCache(max_entries=1000)
    if name == "siblings":
        from postroom.store.sibling_cache import SiblingCache

        return SiblingCache(tempfile.mkdtemp(prefix="ps-", dir="/tmp"), 1000)
    if name == "redis":
        from postroom.store.redis_cache import RedisCache

        return RedisCache(require_redis(), prefix=unique_name("c") + ":")
    raise AssertionError(f"unknown cache {name}")


async def _clean(cache: Cache) -> None:
    """Remove every key a Redis-backed test wrote (its prefix is unique to the test)."""
    from postroom.store.redis_cache import RedisCache

    if isinstance(cache, RedisCache):
        from redis.asyncio import Redis

        client = Redis.from_url(cache.url)
        try:
            keys = [k async for k in client.scan_iter(match=cache.prefix + "*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


@pytest_asyncio.fixture(params=IMPLEMENTATIONS)
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    cache = _factory(request.param)
    await cache.open()
    yield cache
    await cache.close()
    await _clean(cache)
    from postroom.store.sibling_cache import SiblingCache

    if isinstance(cache, SiblingCache):
        shutil.rmtree(cache.directory, ignore_errors=True)


async def test_get_set(cache: Cache) -> None:
    assert await cache.get("u1:list:INBOX") is None
    await cache.set("u1:list:INBOX", b"\x00listing\xff")
    assert await cache.get("u1:list:INBOX") == b"\x00listing\xff"
    await cache.set("u1:list:INBOX", b"newer")
    assert await cache.get("u1:list:INBOX") == b"newer"
    await cache.set("empty", b"")
    assert await cache.get("empty") == b""  # an empty value is a hit, not a miss


async def test_delete(cache: Cache) -> None:
    await cache.set("a", b"1")
    await cache.set("b", b"2")
    await cache.set("c", b"3")
    await cache.delete("a", "c", "absent")
    assert await cache.get("a") is None
    assert await cache.get("b") == b"2"
    assert await cache.get("c") is None
    await cache.delete()  # no keys: nothing happens


async def test_delete_prefix(cache: Cache) -> None:
    await cache.set("u1:INBOX", b"1")
    await cache.set("u1:Sent", b"2")
    await cache.set("u10:INBOX", b"3")
    await cache.delete_prefix("u1:")
    assert await cache.get("u1:INBOX") is None
    assert await cache.get("u1:Sent") is None
    assert await cache.get("u10:INBOX") == b"3"  # the prefix is literal, not a pattern
    await cache.delete_prefix("nothing-here:")
    assert await cache.get("u10:INBOX") == b"3"


async def test_delete_prefix_is_literal(cache: Cache) -> None:
    await cache.set("u*:x", b"1")
    await cache.set("u1:x", b"2")
    await cache.delete_prefix("u*")
    assert await cache.get("u*:x") is None
    assert await cache.get("u1:x") == b"2"


async def test_ttl_expiry(cache: Cache) -> None:
    await cache.set("short", b"1", ttl=0.2)
    await cache.set("forever", b"2")
    await cache.set("long", b"3", ttl=60)
    assert await cache.get("short") == b"1"
    await asyncio.sleep(0.3)
    assert await cache.get("short") is None
    assert await cache.get("forever") == b"2"
    assert await cache.get("long") == b"3"


async def test_set_again_replaces_ttl(cache: Cache) -> None:
    await cache.set("k", b"1", ttl=0.2)
    await cache.set("k", b"2")
    await asyncio.sleep(0.3)
    assert await cache.get("k") == b"2"


async def test_lru_eviction() -> None:
    # Capacity is the embedded cache's own bound; a shared engine's is its server's (Redis's
    # maxmemory policy), so this is not part of the seam's contract.
    cache = LruCache(max_entries=CAPACITY)
    for n in range(CAPACITY):
        await cache.set(f"k{n}", b"v")
    assert await cache.get("k0") == b"v"  # k0 is now the most recently used; k1 the least
    await cache.set("new", b"v")
    assert await cache.get("k1") is None
    assert await cache.get("k0") == b"v"
    assert await cache.get("k2") == b"v"
    assert await cache.get("new") == b"v"


async def test_memory_cache_is_bounded() -> None:
    cache = LruCache(max_entries=10)
    for n in range(100):
        await cache.set(f"k{n}", b"v")
    assert len(cache) == 10
    assert await cache.get("k99") == b"v"
    assert await cache.get("k89") is None
    with pytest.raises(ValueError):
        LruCache(max_entries=0)


async def test_delete_prefix_across_buckets(cache: Cache) -> None:
    # Keys with two colons or more are grouped per `a:b:` bucket in Redis; a prefix shorter or
    # longer than a bucket name must still find exactly the keys it names.
    keys = ["u:1:list:INBOX", "u:1:list:Sent", "u:1:sum", "u:12:list", "u:2:list", "v:1:x", "u:1"]
    for key in keys:
        await cache.set(key, key.encode())
    await cache.delete_prefix("u:1:list:")
    assert [k for k in keys if await cache.get(k) is not None] == [
        "u:1:sum", "u:12:list", "u:2:list", "v:1:x", "u:1"]
    await cache.delete_prefix("u:1")
    assert [k for k in keys if await cache.get(k) is not None] == ["u:2:list", "v:1:x"]
    await cache.delete_prefix("")
    assert [k for k in keys if await cache.get(k) is not None] == []


async def test_unicode_keys_and_prefixes(cache: Cache) -> None:
    await cache.set("u:ü:Entwürfe", b"1")
    await cache.set("u:ü:Entwürfe2", b"2")
    await cache.set("u:ü:Eingang", b"3")
    await cache.delete_prefix("u:ü:Entw")
    assert await cache.get("u:ü:Entwürfe") is None
    assert await cache.get("u:ü:Entwürfe2") is None
    assert await cache.get("u:ü:Eingang") == b"3"


_KEY = st.text(alphabet="u1:ab", max_size=8)


@given(keys=st.lists(_KEY, max_size=12), prefixes=st.lists(_KEY, max_size=4),
       evictions=st.integers(min_value=1, max_value=12))
@settings(max_examples=300, deadline=None)
def test_memory_buckets_drop_exactly_what_a_scan_would(
    keys: list[str], prefixes: list[str], evictions: int
) -> None:
    """The LRU finds a prefix's keys through its buckets; what it drops is exactly what a scan
    of every key would, through evictions and deletes too."""

    async def scenario() -> None:
        cache = LruCache(max_entries=evictions)
        model: dict[str, None] = {}  # insertion order = least recently used first
        for n, key in enumerate(keys):
            await cache.set(key, b"%d" % n)
            model.pop(key, None)
            model[key] = None
            while len(model) > evictions:
                del model[next(iter(model))]
        for prefix in prefixes:
            await cache.delete_prefix(prefix)
            for key in [k for k in model if k.startswith(prefix)]:
                del model[key]
        kept = [k for k in set(keys) if await cache.get(k) is not None]
        assert sorted(kept) == sorted(model)
        assert len(cache) == len(model)
        await cache.delete(*keys)
        assert len(cache) == 0 and cache._buckets == {}

    asyncio.run(scenario())
