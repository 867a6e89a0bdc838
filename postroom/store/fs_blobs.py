"""The embedded blob store: content-addressed files in a local directory.

A blob lives at `root/ab/cd/<sha256hex>` (two levels of fan-out keep directories small). A put is
crash-safe: the bytes go to a temporary file in the final directory, are fsynced, renamed into
place with `os.replace` (atomic on POSIX) and the directory is fsynced so the new name survives
a power cut too. A reader therefore sees either nothing or the complete blob, never a torn one,
and concurrent puts of the same bytes simply replace one complete file with an identical one.

The blob collector moves a blob it means to delete to `root/quarantine/<sha256hex>` first; a put
of the same bytes meanwhile stores it afresh, and a get brings the quarantined copy back. A put
of bytes already stored touches the file, so its mtime is the last put.

Blobs of at most `pack_max` bytes (128 KiB unless the URL says `?pack_max=N`; 0: none) go to a
SQLite table instead (`postroom/store/sqlite_blobs.py`), in the file `pack_path` (the metadata's,
in the embedded default) or `root/pack/blobs.db`: one fsync shared by every put made meanwhile
instead of three of its own. A get looks there first, then for the file, so a store written
before the pack existed (or with another `pack_max`) reads the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator

from postroom.store.blobs import DIGEST, blob_hash, check_digest
from postroom.store.errors import NotFound
from postroom.store.sqlite_blobs import SqliteBlobPack
from postroom.store.sqlite_file import SqliteFile

_TEMP_PREFIX = ".tmp-"
_QUARANTINE = "quarantine"  # blobs the collector moved aside (not a two-hex fan-out name)
_PACK = "pack"  # the SQLite file of small blobs (not a two-hex fan-out name either)
PACK_MAX = 128 * 1024


def _list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsBlobStore:
    """`BlobStore` on a local directory (`file:///var/lib/postroom/blobs`)."""

    def __init__(self, root: str, pack_max: int = PACK_MAX, pack_path: str | None = None,
                 pack_engine: SqliteFile | None = None) -> None:
        """`pack_engine`: the open store of the file `pack_path` names, for the pack to
        share (SqliteBlobPack)."""
        self.root = os.path.abspath(root)
        self.pack_max = pack_max
        self.pack = (SqliteBlobPack(pack_path or os.path.join(self.root, _PACK, "blobs.db"),
                                    engine=pack_engine)
                     if pack_max > 0 else None)
        # directories this store has seen exist: a put into one skips looking (the fan-out
        # never shrinks; if one vanishes anyway, the put makes it again)
        self._known_dirs: set[str] = set()
        self._temp_names = itertools.count()

    def path_of(self, digest: str) -> str:
        """Where the blob with this digest lives (whether or not it exists)."""
        check_digest(digest)
        return os.path.join(self.root, digest[0:2], digest[2:4], digest)

    async def open(self) -> None:
        await asyncio.to_thread(self._make_dirs, self.root)
        if self.pack is not None:
            await asyncio.to_thread(os.makedirs, os.path.dirname(self.pack.path), exist_ok=True)
            await self.pack.open()

    async def close(self) -> None:
        if self.pack is not None:
            await self.pack.close()

    def shares_log_with(self, metadata: object) -> bool:
        """True when the pack is a table of the metadata's own SQLite file (one WAL)."""
        return (self.pack is not None and isinstance(metadata, SqliteFile)
                and os.path.abspath(metadata.path) == os.path.abspath(self.pack.path))

    async def put(self, data: bytes, *, sync: bool = True) -> str:
        if self.pack is not None and len(data) <= self.pack_max:
            return await self.pack.put(data, sync=sync)
        digest = blob_hash(data)
        await asyncio.to_thread(self._write, digest, bytes(data))
        return digest

    def quarantine_path_of(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.root, _QUARANTINE, digest)

    async def get(self, digest: str) -> bytes:
        path = self.path_of(digest)
        if self.pack is not None:
            with contextlib.suppress(NotFound):
                return await self.pack.get(digest)
        try:
            return await asyncio.to_thread(self._read, path)
        except FileNotFoundError:
            pass
        try:  # the collector moved it aside while someone came to refer to it: bring it back
            return await asyncio.to_thread(self._read_quarantined, digest)
        except FileNotFoundError:
            raise NotFound(f"blob {digest}") from None

    async def exists(self, digest: str) -> bool:
        path = self.path_of(digest)
        if self.pack is not None and await self.pack.exists(digest):
            return True
        return await asyncio.to_thread(os.path.isfile, path)

    # A blob is in the pack or a file; both, if the pack came after the file (or `pack_max`
    # changed): then each copy is deleted, quarantined, restored and purged alike.

    async def delete(self, digest: str) -> None:
        path = self.path_of(digest)
        if self.pack is not None:
            await self.pack.delete(digest)
        await asyncio.to_thread(self._unlink, path)

    async def quarantine(self, digest: str, untouched_for: float) -> bool:
        check_digest(digest)
        packed = self.pack is not None and await self.pack.quarantine(digest, untouched_for)
        return await asyncio.to_thread(self._quarantine, digest, untouched_for) or packed

    async def restore(self, digest: str) -> None:
        check_digest(digest)
        if self.pack is not None:
            await self.pack.restore(digest)
        await asyncio.to_thread(self._restore, digest)

    async def purge(self, digest: str) -> None:
        path = self.quarantine_path_of(digest)
        if self.pack is not None:
            await self.pack.purge(digest)
        await asyncio.to_thread(self._unlink, path)

    async def scan(self, untouched_for: float) -> AsyncIterator[str]:
        if self.pack is not None:
            async for digest in self.pack.scan(untouched_for):
                yield digest
        for first in sorted(await asyncio.to_thread(_list_dir, self.root)):
            if len(first) != 2:
                continue  # the quarantine, anything not a fan-out directory
            top = os.path.join(self.root, first)
            for second in sorted(await asyncio.to_thread(_list_dir, top)):
                found = await asyncio.to_thread(self._old_blobs, os.path.join(top, second),
                                                time.time() - untouched_for)
                for digest in found:
                    yield digest

    # Blocking parts, run in a worker thread.

    @staticmethod
    def _old_blobs(directory: str, before: float) -> list[str]:
        found = []
        for name in _list_dir(directory):
            if DIGEST.fullmatch(name) is None:
                continue  # a temporary file of a put in progress
            try:
                if os.stat(os.path.join(directory, name)).st_mtime < before:
                    found.append(name)
            except FileNotFoundError:
                continue
        return found

    def _quarantine(self, digest: str, untouched_for: float) -> bool:
        path = self.path_of(digest)
        try:
            if time.time() - os.stat(path).st_mtime < untouched_for:
                return False  # put again lately: someone is about to refer to it
        except FileNotFoundError:
            return False
        self._make_dirs(os.path.join(self.root, _QUARANTINE))
        try:
            os.rename(path, self.quarantine_path_of(digest))
        except FileNotFoundError:
            return False  # another collector took it first
        _fsync_dir(os.path.dirname(path))
        _fsync_dir(os.path.join(self.root, _QUARANTINE))
        return True

    def _restore(self, digest: str) -> None:
        held = self.quarantine_path_of(digest)
        final = self.path_of(digest)
        if not os.path.isfile(held):
            return  # nothing held (or in the pack, not a file)
        if os.path.isfile(final):  # stored afresh meanwhile: the same bytes
            self._unlink(held)
            return
        self._make_dirs(os.path.dirname(final))
        try:
            os.rename(held, final)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(final))
        _fsync_dir(os.path.dirname(held))

    def _read_quarantined(self, digest: str) -> bytes:
        data = self._read(self.quarantine_path_of(digest))
        if blob_hash(data) == digest:
            self._restore(digest)
        return data

    def _make_dirs(self, path: str, defer: bool = False) -> list[str]:
        """Create `path` and any missing parents, fsyncing each parent that gained an entry;
        with `defer`, return those parents for the caller to fsync instead (a put does it
        after its own fsyncs, when the journal commit they forced has made the new directory
        entries durable too, so the parents' fsyncs cost nearly nothing: one commit the fewer
        on the way of a put into a new directory)."""
        missing: list[str] = []
        current = path
        while not os.path.isdir(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        parents: list[str] = []
        for directory in reversed(missing):
            # A top-level fan-out directory's 255 siblings are made with it, under one fsync of
            # the root: otherwise nearly every put into a young store pays an extra fsync for
            # its own new first-level directory. Not below that: all 65,536 leaf directories
            # would be 256 MB of directory blocks and cost ~3 ms of CPU per put for a young
            # store's first ~1,500 puts (measured with 6 writers: 223 puts/s against 2,078 when
            # each new leaf is made alone, its parent's fsync shared with concurrent puts').
            for sibling in self._fan_out_siblings(directory):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sibling)
            # Fsynced whether this put or a concurrent one made it: neither returns before
            # the new entry is durable.
            parents.append(os.path.dirname(directory))
        if not defer:
            for parent in parents:
                _fsync_dir(parent)
            return []
        return parents

    def _fan_out_siblings(self, directory: str) -> list[str]:
        """`directory` first, then (for the first fan-out level) every other two-hex-digit
        name beside it."""
        parent, name = os.path.split(directory)
        if len(name) != 2 or parent != self.root \
                or any(c not in "0123456789abcdef" for c in name):
            return [directory]
        return [directory, *(os.path.join(parent, f"{i:02x}") for i in range(256)
                             if f"{i:02x}" != name)]

    def _write(self, digest: str, data: bytes) -> None:
        """Runs in a worker thread, so it makes as few calls as it can: each system call lets
        go of the GIL, and getting it back can mean waiting for the event loop's thread."""
        final = self.path_of(digest)
        if os.path.isfile(final):
            # Content-addressed: the same name always holds the same bytes. The new put time
            # keeps the blob collector off it while the caller files its reference.
            with contextlib.suppress(FileNotFoundError):
                os.utime(final)
                return
        directory = os.path.dirname(final)
        parents: list[str] = []
        if directory not in self._known_dirs:
            parents = self._make_dirs(directory, defer=True)
        while True:
            temp = os.path.join(
                directory, f"{_TEMP_PREFIX}{os.getpid()}-{next(self._temp_names)}")
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # left by a crashed process that had the same pid
                continue
            except FileNotFoundError:  # the directory went away: make it again
                self._known_dirs.discard(directory)
                parents += self._make_dirs(directory, defer=True)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        _fsync_dir(directory)
        for parent in reversed(parents):  # deepest first: the leaf's entry, then its parent's
            _fsync_dir(parent)
        self._known_dirs.add(directory)  # now durable: later puts need not look

    @staticmethod
    def _read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(path))
