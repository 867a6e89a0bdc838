"""An in-process LRU (`memory://`) with an optional time-to-live per entry; the embedded default,
siblings://, adds invalidation by every process of the data dir (postroom.store.sibling_cache)."""

from __future__ import annotations

import time
from collections import OrderedDict


def bucket_of(key: str) -> str:
    """The key up to and including its second colon (`u:<user id>:` for MailService's keys),
    or "" for a key with fewer colons: the entries `delete_prefix` looks at together."""
    first = key.find(":")
    second = key.find(":", first + 1) if first >= 0 else -1
    return key[: second + 1] if second >= 0 else ""


class LruCache:
    """`Cache` in this process's memory; the least recently used entry goes first when full.

    Expired entries are dropped when next looked at (or evicted as the least recently used), so
    no timer runs in the background. Each key is also listed in its bucket (`bucket_of`), so
    dropping a user's entries after every change they make touches that user's entries only,
    not all of the cache's (as Redis's cache does with its bucket sets).
    """

    def __init__(self, max_entries: int = 10000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # key -> (value, expiry on the monotonic clock or None)
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._buckets: dict[str, set[str]] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self.clear()

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and time.monotonic() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        expires = None if ttl is None else time.monotonic() + ttl
        self._entries[key] = (bytes(value), expires)
        self._entries.move_to_end(key)
        self._buckets.setdefault(bucket_of(key), set()).add(key)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    async def delete(self, *keys: str) -> None:
        for key in keys:
            if key in self._entries:
                self._drop(key)

    async def delete_prefix(self, prefix: str) -> None:
        self.drop_prefix(prefix)

    def clear(self) -> None:
        self._entries.clear()
        self._buckets.clear()

    def drop_prefix(self, prefix: str) -> None:
        """What `delete_prefix` does, synchronously."""
        bucket = bucket_of(prefix)
        if bucket:  # the prefix names one bucket: only its keys can start with it
            candidates = list(self._buckets.get(bucket, ()))
        else:  # shorter than a bucket: the buckets it is a prefix of, and the "" bucket
            candidates = [key for name, keys in self._buckets.items()
                          if name.startswith(prefix) or not name for key in keys]
        for key in candidates:
            if key.startswith(prefix):
                self._drop(key)

    def _drop(self, key: str) -> None:
        del self._entries[key]
        bucket = bucket_of(key)
        keys = self._buckets.get(bucket)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._buckets[bucket]

    def __len__(self) -> int:
        return len(self._entries)
