"""Small blobs packed in a SQLite file: the embedded blob store's fast path.

A put into the file store costs three fsyncs one after the other (the blob, its directory, the
rename's directory entry) on a worker thread: 8-9 ms of an APPEND's 17 under load. A put here
is one small write transaction run on the event loop and one fsync of the WAL shared with every
put and write made meanwhile (`postroom/store/sqlite_file.py`: group commit): 5 ms under the
same load, nearly all of it waiting for that shared fsync. Reads are point reads on the loop.

The pack is a table, `packed_blobs`, in the metadata store's own file when that is SQLite
(the embedded default; `postroom/app.py`), else in `blobs/pack/blobs.db`. In the metadata's
file, an IMAP APPEND's blob and its message record are two commits to one WAL, which SQLite
replays in order after a crash: the record's commit cannot survive without the blob's, so the
APPEND waits for one fsync, after the record (`put(..., sync=False)`), not two one after the
other (APPEND only: 714-878/s with the pack in a file of its own, 913-980/s in the
metadata's; docs/BENCHMARKS.md).

One row per blob: digest (the 32 raw bytes of the sha256), the put time, a quarantine mark and
the bytes, in that order, so the collector's scan reads each row's first bytes and never the
bytes' overflow pages. Quarantine is the mark (the collector's contract in
`postroom/store/blobs.py`): a put clears it and refreshes the put time, a get clears it.
Large blobs stay files (`FsBlobStore`'s `pack_max`), where the WAL would write them twice.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator

from postroom.store.blobs import blob_hash, check_digest
from postroom.store.errors import NotFound
from postroom.store.sqlite_file import SqliteFile

_SCAN_PAGE = 1000


def _key(digest: str) -> bytes:
    return bytes.fromhex(check_digest(digest))


class SqliteBlobPack(SqliteFile):
    """The `BlobStore` operations on one SQLite file (WAL), safe for several processes on the
    same file; `FsBlobStore` holds one and decides what goes in."""

    _name = "blob pack"
    _thread_prefix = "postroom-pack"

    def __init__(self, path: str, engine: SqliteFile | None = None) -> None:
        """`engine`: the open store of that same file (the metadata's) whose connections,
        threads and group commit the pack then shares instead of opening its own: one write
        connection per file, so neither empties the other's page cache with each commit (a
        second connection to the same file re-read its pages after every commit of the
        first), and one syncer for the one WAL."""
        super().__init__(path)
        self._db: SqliteFile = engine if engine is not None else self
        if engine is not None and os.path.abspath(engine.path) != os.path.abspath(path):
            raise ValueError("a blob pack shares only the store of its own file")

    async def open(self) -> None:
        if self._db is self:
            await super().open()
        else:  # the engine is open already (the node opens the metadata first)
            await self._db._write(_make_table)

    async def close(self) -> None:
        if self._db is self:
            await super().close()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # A table of its own in whatever file it is given (the metadata's has its own
        # migrations, in schema_migrations): made once, if missing.
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                              " AND name = 'packed_blobs'").fetchone()
        if exists:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            _make_table(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def put(self, data: bytes, *, sync: bool = True) -> str:
        """With sync=False the put is committed, not yet durable: only for a caller that
        waits for a later commit to this same file (the WAL) before it answers anyone."""
        digest = blob_hash(data)
        args = (bytes.fromhex(digest), bytes(data), time.time())
        await (self._db._write(_put, *args) if sync else self._db._commit(_put, *args))
        return digest

    async def get(self, digest: str) -> bytes:
        key = _key(digest)
        row = await self._db._read_now(_get, key)
        if row is None:
            raise NotFound(f"blob {digest}")
        quarantined, data = row
        if quarantined:  # the collector set it aside while someone came to refer to it
            await self._db._write(_restore, key)
        return bytes(data)

    async def exists(self, digest: str) -> bool:
        return await self._db._read_now(_get_mark, _key(digest)) == 0

    async def delete(self, digest: str) -> None:
        await self._db._write(_delete, _key(digest), 0)

    async def quarantine(self, digest: str, untouched_for: float) -> bool:
        return await self._db._write(_quarantine, _key(digest), time.time() - untouched_for)

    async def restore(self, digest: str) -> None:
        await self._db._write(_restore, _key(digest))

    async def purge(self, digest: str) -> None:
        await self._db._write(_delete, _key(digest), 1)

    async def scan(self, untouched_for: float) -> AsyncIterator[str]:
        before = time.time() - untouched_for
        after = b""
        while True:
            page = await self._db._read(_scan_page, after, before)
            for key in page:
                yield key.hex()
            if len(page) < _SCAN_PAGE:
                return
            after = page[-1]


# Transactions (each runs whole, on the loop or a thread of SqliteFile's).


def _make_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS packed_blobs ("
        " digest BLOB PRIMARY KEY, put_at REAL NOT NULL,"
        " quarantined INTEGER NOT NULL DEFAULT 0, data BLOB NOT NULL)")


def _put(conn: sqlite3.Connection, key: bytes, data: bytes, now: float) -> None:
    # bytes already stored are not written again: the put time is refreshed (the collector
    # leaves the blob alone while its new reference is filed) and any quarantine lifted
    conn.execute(
        "INSERT INTO packed_blobs (digest, put_at, quarantined, data) VALUES (?, ?, 0, ?)"
        " ON CONFLICT (digest) DO UPDATE SET put_at = excluded.put_at, quarantined = 0",
        (key, now, data))


def _get(conn: sqlite3.Connection, key: bytes) -> tuple[int, bytes] | None:
    row = conn.execute("SELECT quarantined, data FROM packed_blobs WHERE digest = ?",
                       (key,)).fetchone()
    return None if row is None else (int(row[0]), row[1])


def _get_mark(conn: sqlite3.Connection, key: bytes) -> int | None:
    row = conn.execute("SELECT quarantined FROM packed_blobs WHERE digest = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def _delete(conn: sqlite3.Connection, key: bytes, quarantined: int) -> None:
    conn.execute("DELETE FROM packed_blobs WHERE digest = ? AND quarantined = ?",
                 (key, quarantined))


def _quarantine(conn: sqlite3.Connection, key: bytes, put_before: float) -> bool:
    cursor = conn.execute(
        "UPDATE packed_blobs SET quarantined = 1"
        " WHERE digest = ? AND quarantined = 0 AND put_at <= ?",
        (key, put_before))
    return cursor.rowcount > 0


def _restore(conn: sqlite3.Connection, key: bytes) -> None:
    conn.execute("UPDATE packed_blobs SET quarantined = 0 WHERE digest = ? AND quarantined = 1",
                 (key,))


def _scan_page(conn: sqlite3.Connection, after: bytes, before: float) -> list[bytes]:
    rows = conn.execute(
        "SELECT digest FROM packed_blobs WHERE digest > ? AND quarantined = 0 AND put_at < ?"
        " ORDER BY digest LIMIT ?", (after, before, _SCAN_PAGE)).fetchall()
    return [bytes(row[0]) for row in rows]
