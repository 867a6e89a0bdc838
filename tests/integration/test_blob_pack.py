"""The embedded blob store's pack: small blobs in SQLite, large ones files, and blobs written as
files before the pack existed still read, collected and deleted through it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postroom.store.blobs import blob_hash
from postroom.store.errors import NotFound
from postroom.store.fs_blobs import PACK_MAX, FsBlobStore


def _pack_rows(store: FsBlobStore) -> dict[str, tuple[float, int, int]]:
    """digest -> (put time, quarantine mark, length), read with a connection of our own."""
    assert store.pack is not None
    with sqlite3.connect(store.pack.path) as conn:
        rows = conn.execute("SELECT digest, put_at, quarantined, length(data) FROM packed_blobs")
        return {bytes(r[0]).hex(): (r[1], r[2], r[3]) for r in rows}


def _file(store: FsBlobStore, digest: str) -> bytes | None:
    """The blob's file's bytes; None when it is not a file."""
    try:
        return Path(store.path_of(digest)).read_bytes()
    except FileNotFoundError:
        return None


def _age(store: FsBlobStore, digest: str, seconds: float) -> None:
    assert store.pack is not None
    with sqlite3.connect(store.pack.path) as conn:
        conn.execute("UPDATE packed_blobs SET put_at = ? WHERE digest = ?",
                     (time.time() - seconds, bytes.fromhex(digest)))


async def test_small_blobs_in_the_pack_large_ones_files(tmp_path: Path) -> None:
    store = FsBlobStore(str(tmp_path / "blobs"))
    await store.open()
    small, edge, large = os.urandom(1000), os.urandom(PACK_MAX), os.urandom(PACK_MAX + 1)
    digests = [await store.put(d) for d in (small, edge, large)]
    rows = _pack_rows(store)
    assert set(rows) == set(digests[:2])
    assert rows[digests[0]][1:] == (0, 1000) and rows[digests[1]][1:] == (0, PACK_MAX)
    assert _file(store, digests[0]) is None
    assert _file(store, digests[2]) == large
    await store.close()
    again = FsBlobStore(str(tmp_path / "blobs"))
    await again.open()
    for digest, data in zip(digests, (small, edge, large), strict=True):
        assert await again.get(digest) == data
    await again.close()


async def test_a_put_of_packed_bytes_refreshes_the_put_time(tmp_path: Path) -> None:
    store = FsBlobStore(str(tmp_path / "blobs"))
    await store.open()
    data = b"refreshed\r\n"
    digest = await store.put(data)
    _age(store, digest, 7200)
    assert await store.put(data) == digest
    assert time.time() - _pack_rows(store)[digest][0] < 60
    assert not await store.quarantine(digest, untouched_for=3600)
    _age(store, digest, 7200)
    assert [d async for d in store.scan(3600)] == [digest]
    assert await store.quarantine(digest, untouched_for=3600)
    assert _pack_rows(store)[digest][1] == 1
    assert [d async for d in store.scan(3600)] == []
    await store.purge(digest)
    assert _pack_rows(store) == {}
    await store.close()


async def test_blobs_filed_before_the_pack(tmp_path: Path) -> None:
    """A data dir from before the pack: its small blobs are files, read through the pack's
    store; a blob then put again lives in both places and goes from both."""
    root = str(tmp_path / "blobs")
    old = FsBlobStore(root, pack_max=0)
    await old.open()
    kept, collected, doubled = b"kept\r\n", b"collected\r\n", b"doubled\r\n"
    d_kept, d_collected, d_doubled = [await old.put(d) for d in (kept, collected, doubled)]
    await old.close()

    store = FsBlobStore(root)
    await store.open()
    assert await store.get(d_kept) == kept and await store.exists(d_kept)
    assert {d async for d in store.scan(-60)} == {d_kept, d_collected, d_doubled}

    assert await store.quarantine(d_collected, untouched_for=0)
    assert not await store.exists(d_collected)
    await store.purge(d_collected)
    with pytest.raises(NotFound):
        await store.get(d_collected)

    assert await store.put(doubled) == d_doubled  # now in the pack as well as a file
    assert d_doubled in _pack_rows(store) and _file(store, d_doubled) == doubled
    assert await store.quarantine(d_doubled, untouched_for=0)  # both copies
    await store.restore(d_doubled)
    assert await store.get(d_doubled) == doubled
    await store.delete(d_doubled)
    assert not await store.exists(d_doubled)
    assert d_doubled not in _pack_rows(store) and _file(store, d_doubled) is None
    await store.close()


_PUTTER = """
import asyncio, os, sys
from postroom.store.fs_blobs import FsBlobStore

async def main():
    store = FsBlobStore(sys.argv[1])
    await store.open()
    n = 0
    while True:  # concurrent puts, as SMTP sessions make them; each digest printed once durable
        async def one(i):
            data = f"message {os.getpid()} {i}\\r\\n".encode() * 200
            print(await store.put(data), flush=True)
        await asyncio.gather(*(one(n + i) for i in range(8)))
        n += 8

asyncio.run(main())
"""


def test_every_answered_put_survives_sigkill(tmp_path: Path) -> None:
    """Two processes putting into one pack at once, killed mid-stream: every put that returned
    is readable after, byte for byte (the puts share group commits across processes)."""
    root = str(tmp_path / "blobs")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _PUTTER, root], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    answered: list[str] = []
    deadline = time.monotonic() + 60
    try:
        for proc in procs:
            assert proc.stdout is not None
            while len(answered) < 400 * (procs.index(proc) + 1):
                line = proc.stdout.readline()
                assert line, "the putter died"
                answered.append(line.strip())
                assert time.monotonic() < deadline
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc in procs:
        assert proc.stdout is not None
        answered += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
        proc.stdout.close()

    async def check() -> None:
        store = FsBlobStore(root)
        await store.open()
        for digest in answered:
            assert blob_hash(await store.get(digest)) == digest
        await store.close()

    asyncio.run(check())
    assert len(set(answered)) >= 800


_APPENDER = """
import asyncio, sys
from postroom.core.models import Flags, HeaderSummary, NewMessage
from postroom.store.fs_blobs import FsBlobStore
from postroom.store.sqlite_metadata import SqliteMetadataStore

async def main():
    meta = SqliteMetadataStore(sys.argv[1] + "/metadata.db")
    shared = sys.argv[3] == "shared"  # the node's way: one connection for both
    blobs = FsBlobStore(sys.argv[1] + "/blobs", pack_path=meta.path,
                        pack_engine=meta if shared else None)
    await meta.open()
    await blobs.open()
    assert blobs.shares_log_with(meta)
    assert (blobs.pack._write_conn is None) == shared
    user = await meta.create_user(f"u{sys.argv[2]}@example.test", "x")
    folder = await meta.create_folder(user.user_id, "INBOX")
    n = 0
    while True:  # as APPEND files: the blob not waited for, the record after it waited for
        async def one(i):
            raw = f"Subject: {sys.argv[2]} {i}\\r\\n\\r\\nbody\\r\\n".encode() * 20
            digest = await blobs.put(raw, sync=False)
            await meta.insert_message(user.user_id, folder.folder_id, NewMessage(
                blob_hash=digest, size=len(raw), internal_date=0.0, headers=HeaderSummary(),
                snippet="", has_attachments=False, flags=Flags()))
            print(digest, flush=True)
        await asyncio.gather(*(one(n + i) for i in range(8)))
        n += 8

asyncio.run(main())
"""


@pytest.mark.parametrize("connection", ["shared", "own"])
def test_an_unsynced_put_is_durable_with_the_record_after_it(tmp_path: Path,
                                                             connection: str) -> None:
    """The embedded default's APPEND: the pack in the metadata's file, the blob's commit not
    waited for, the record's commit waited for. Killed mid-stream, every record that was
    answered finds its blob (one WAL, replayed in order), whether the pack writes on the
    metadata store's connection (as a node has it) or on one of its own."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), "1", connection],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while len(answered) < 600:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "the appender died"
            answered.append(line.strip())
            assert time.monotonic() < deadline
    finally:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    answered += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    proc.stdout.close()
    proc.stderr.close()

    async def check() -> None:
        from postroom.store.sqlite_metadata import SqliteMetadataStore

        meta = SqliteMetadataStore(str(tmp_path / "metadata.db"))
        store = FsBlobStore(str(tmp_path / "blobs"), pack_path=meta.path)
        await meta.open()
        await store.open()
        for digest in answered:
            assert blob_hash(await store.get(digest)) == digest
        assert await meta.blob_refcount(answered[0]) == 1
        await store.close()
        await meta.close()

    asyncio.run(check())
