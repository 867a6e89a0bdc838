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
import random
import zlib
from pathlib import Path

from postroom.store.errors import StoreError
from postroom.store.memory_cache import LruCache, bucket_of

log = logging.getLogger(__name__)

SLOTS = 65536
STAMPS_FILE = ".cache-stamps"
_STAMP_SIZE = 8


def _fresh() -> int:
    """A new stamp: random, so that two processes stamping one slot at once cannot write the
    same value (a change lost). Not secret: the process's Mersenne Twister, seeded from the
    system's randomness, is enough and costs no system call."""
    return random.getrandbits(64)


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
        self._words: memoryview | None = None  # the map as 64-bit words
        # key -> (its bucket's slot, its own slot, and the epoch's, the bucket's and its own
        # stamp when it was stored)
        self._stamps: dict[str, tuple[int, int, int, int, int]] = {}

    async def open(self) -> None:
        if self._map is not None:
            return
        path = self.directory / STAMPS_FILE
        size = self.slots * _STAMP_SIZE
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
        self._words = memoryview(self._map).cast("Q")

    async def close(self) -> None:
        await super().close()  # clear(): the entries and their stamps
        words, self._words = self._words, None
        if words is not None:
            words.release()
        if self._map is not None:
            self._map.close()
            self._map = None

    def _slot(self, name: str) -> int:
        return 1 + zlib.crc32(name.encode()) % (self.slots - 1)

    def _shared(self) -> memoryview:
        if self._words is None:
            raise StoreError("cache is not open")
        return self._words

    # The Cache protocol

    async def get(self, key: str) -> bytes | None:
        stamps = self._stamps.get(key)
        if stamps is None:
            return None
        words = self._shared()
        in_bucket, own, epoch, bucket_stamp, key_stamp = stamps
        if words[0] != epoch or words[in_bucket] != bucket_stamp or words[own] != key_stamp:
            self._drop(key)
            return None
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        words = self._shared()
        await super().set(key, value, ttl)
        if key in self._entries:
            in_bucket, own = self._slot(bucket_of(key)), self._slot(key)
            self._stamps[key] = (in_bucket, own, words[0], words[in_bucket], words[own])

    async def delete(self, *keys: str) -> None:
        words = self._shared()
        for slot in {self._slot(key) for key in keys}:
            words[slot] = _fresh()
        await super().delete(*keys)

    async def delete_prefix(self, prefix: str) -> None:
        # A new stamp for the prefix's bucket (or a new epoch, for a prefix shorter than a
        # bucket: nothing MailService does) makes every other process drop all of it; this
        # process drops exactly the prefix's entries and keeps the rest of the bucket.
        words = self._shared()
        bucket = bucket_of(prefix)
        slot = self._slot(bucket) if bucket else 0
        before = words[slot]
        words[slot] = after = _fresh()
        await super().delete_prefix(prefix)
        survivors = self._buckets.get(bucket, ()) if bucket else list(self._stamps)
        for key in survivors:
            in_bucket, own, epoch, bucket_stamp, key_stamp = self._stamps[key]
            if slot == 0 and epoch == before:
                self._stamps[key] = (in_bucket, own, after, bucket_stamp, key_stamp)
            elif slot == in_bucket and bucket_stamp == before:
                self._stamps[key] = (in_bucket, own, epoch, after, key_stamp)

    def clear(self) -> None:
        super().clear()
        self._stamps.clear()

    def _drop(self, key: str) -> None:
        super()._drop(key)
        self._stamps.pop(key, None)
