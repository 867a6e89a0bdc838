"""The cache of the processes of one machine that share a data dir (`siblings:///DIR` for
`[storage] cache`): each process keeps its own LRU, and memory they all map says which
entries a change has made stale.

The shared map is a file, DIR/.cache-stamps, of `SLOTS` eight-byte stamps, mapped by every
process (MAP_SHARED: one copy in the page cache; nothing is written to disk that matters). A
key's *bucket* (up to its second colon: `u:<user id>:` for MailService's keys) hashes to one
slot, and the key itself to another; slot 0 is the epoch, for everything. An entry remembers
the three stamps as they were when it was stored, and a read that finds any changed is a miss.

- `delete_prefix(prefix)` writes a fresh random stamp into the prefix's bucket slot (or into the
  epoch, for a prefix shorter than a bucket: the other processes then drop everything, this
  one exactly the prefix's entries); `delete(keys)` into each key's own slot.
- A write to shared memory is seen by every other process's next read of it, so a change that
  one process has answered (committed, then its invalidation, then its reply) is never followed
  by a stale read in another, however busy either is: no message has to arrive first. Random
  stamps, not counters: two processes stamping one slot at once cannot both write the same
  value and so lose a change.
- Buckets that share a slot invalidate each other: a miss too many, never a stale hit. With
  the default 65,536 slots, a change touches 1/65,536 of the other users' entries.

An entry stored by a reader that read the store before another process's change and stores
after that change's stamp looks fresh here, as it would in Redis after the invalidation; what
keeps it from being served is MailCache's generation (postroom.mailcache), read and stamped
before the store is read. This cache keeps the `Cache` contract exactly as Redis's does.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import struct
import zlib
from pathlib import Path

from postroom.store.errors import StoreError
from postroom.store.memory_cache import LruCache, bucket_of

log = logging.getLogger(__name__)

SLOTS = 65536
STAMPS_FILE = ".cache-stamps"
_STAMP = struct.Struct("=Q")


class SiblingCache(LruCache):
    """`Cache` in each process's memory, invalidated for every process of the machine."""

    def __init__(self, directory: str | os.PathLike[str], max_entries: int = 10000,
                 slots: int = SLOTS) -> None:
        super().__init__(max_entries)
        if slots < 2:
            raise ValueError("slots must be at least 2")
        self.directory = Path(directory)
        self.slots = slots
        self._map: mmap.mmap | None = None
        # key -> (epoch, bucket's stamp, key's stamp) when it was stored
        self._stamps: dict[str, tuple[int, int, int]] = {}

    async def open(self) -> None:
        if self._map is not None:
            return
        path = self.directory / STAMPS_FILE
        size = self.slots * _STAMP.size
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)  # zeros; every process asks for the same size
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            # The embedded default must not keep a node from starting: stamps of its own,
            # which other processes' changes do not reach (what memory:// is).
            log.warning("cache: cannot map %s (%s); other processes' changes will not drop "
                        "this process's entries before they expire", path, exc)
            self._map = mmap.mmap(-1, size)

    async def close(self) -> None:
        await super().close()
        self._stamps.clear()
        if self._map is not None:
            self._map.close()
            self._map = None

    def _slot(self, name: str) -> int:
        return 1 + zlib.crc32(name.encode()) % (self.slots - 1)

    def _shared(self) -> mmap.mmap:
        if self._map is None:
            raise StoreError("cache is not open")
        return self._map

    def _read(self, slot: int) -> int:
        return int(_STAMP.unpack_from(self._shared(), slot * _STAMP.size)[0])

    def _stamp(self, slot: int) -> None:
        _STAMP.pack_into(self._shared(), slot * _STAMP.size,
                         int.from_bytes(secrets.token_bytes(8)))

    def _now(self, key: str) -> tuple[int, int, int]:
        return (self._read(0), self._read(self._slot(bucket_of(key))),
                self._read(self._slot(key)))

    # The Cache protocol

    async def get(self, key: str) -> bytes | None:
        stamps = self._stamps.get(key)
        if stamps is None:
            return None
        if stamps != self._now(key):
            self._drop(key)
            return None
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await super().set(key, value, ttl)
        if key in self._entries:
            self._stamps[key] = self._now(key)

    async def delete(self, *keys: str) -> None:
        for slot in {self._slot(key) for key in keys}:
            self._stamp(slot)
        await super().delete(*keys)

    async def delete_prefix(self, prefix: str) -> None:
        # A new stamp for the prefix's bucket (or a new epoch, for a prefix shorter than a
        # bucket: nothing MailService does) makes every other process drop all of it; this
        # process drops exactly the prefix's entries and keeps the rest of the bucket.
        bucket = bucket_of(prefix)
        slot, part = (self._slot(bucket), 1) if bucket else (0, 0)
        before = self._read(slot)
        self._stamp(slot)
        await super().delete_prefix(prefix)
        after = self._read(slot)
        survivors = self._buckets.get(bucket, ()) if bucket else list(self._stamps)
        for key in survivors:
            epoch, in_bucket, own = self._stamps[key]
            if part == 0 and epoch == before:
                self._stamps[key] = (after, in_bucket, own)
            elif part == 1 and in_bucket == before:
                self._stamps[key] = (epoch, after, own)

    def clear(self) -> None:
        super().clear()
        self._stamps.clear()

    def _drop(self, key: str) -> None:
        super()._drop(key)
        self._stamps.pop(key, None)
