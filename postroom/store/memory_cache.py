"""The embedded cache: an in-process LRU with an optional time-to-live per entry."""

from __future__ import annotations

import time
from collections import OrderedDict


class LruCache:
    """`Cache` in this process's memory; the least recently used entry goes first when full.

    Expired entries are dropped when next looked at (or evicted as the least recently used), so
    no timer runs in the background.
    """

    def __init__(self, max_entries: int = 10000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # key -> (value, expiry on the monotonic clock or None)
        self._entries: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._entries.clear()

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and time.monotonic() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        expires = None if ttl is None else time.monotonic() + ttl
        self._entries[key] = (bytes(value), expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._entries.pop(key, None)

    async def delete_prefix(self, prefix: str) -> None:
        for key in [k for k in self._entries if k.startswith(prefix)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
