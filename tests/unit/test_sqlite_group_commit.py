"""Group commit in the SQLite metadata store: writes run on the event loop and share the WAL's
fsyncs, yet each transaction still succeeds or fails on its own, is answered only once on
disk, and survives a reopen."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from postroom.core.models import User
from postroom.store import sqlite_file
from postroom.store.errors import Conflict, StoreError
from postroom.store.sqlite_file import _CHECKPOINT_EVERY, WRITE_LOCK_SUFFIX
from postroom.store.sqlite_metadata import SqliteMetadataStore


def test_concurrent_writes_fail_alone_and_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store, user = await _open(path, "a")
        names = [f"F{i}" for i in range(40)] + ["F7"]  # one duplicate among them
        results = await asyncio.gather(
            *(store.create_folder(user.user_id, n) for n in names), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], Conflict)
        await store.close()
        again = SqliteMetadataStore(path)
        await again.open()
        folders = {f.name for f in await again.list_folders(user.user_id)}
        assert folders == {f"F{i}" for i in range(40)}
        await again.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("count", [1, 3])
def test_sequential_semantics_inside_a_batch(tmp_path: Path, count: int) -> None:
    async def scenario() -> None:
        store, user = await _open(str(tmp_path / "meta.db"), "b")
        await asyncio.gather(*(store.create_folder(user.user_id, f"G{i}") for i in range(count)))
        assert len(await store.list_folders(user.user_id)) == count
        await store.close()

    asyncio.run(scenario())


def test_reopen_same_store_reads_on_the_loop_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, user = await _open(str(tmp_path / "meta.db"), "c")
        folder = await store.create_folder(user.user_id, "H")
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()
        await store.open()
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()

    asyncio.run(scenario())


# -- writes on the event loop, fsyncs on the syncer thread ------------------------------------


async def _open(path: str, who: str) -> tuple[SqliteMetadataStore, User]:
    store = SqliteMetadataStore(path)
    await store.open()
    return store, await store.create_user(f"{who}@example.test", "x")


class _LoopTicks:
    """Counts the event loop's 10 ms ticks from its creation: a blocked loop does not tick."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    def stop(self) -> None:
        self._task.cancel()


def test_an_answered_write_had_its_wal_fsynced(tmp_path: Path) -> None:
    """Every write is answered only after an fsync of the WAL that began after its commit:
    the WAL then held at least the bytes it held when the write was answered."""
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store = SqliteMetadataStore(path)
        await store.open()
        synced: list[int] = []
        real = store._fsync_wal

        def recording() -> None:
            size = os.stat(path + "-wal").st_size
            real()
            synced.append(size)

        store._fsync_wal = recording  # type: ignore[method-assign]
        user = await store.create_user("d@example.test", "x")
        for n in range(5):
            await store.create_folder(user.user_id, f"F{n}")
            assert synced and synced[-1] >= os.stat(path + "-wal").st_size
        # concurrent writes share fsyncs, and still each waits for one after its commit
        count = len(synced)
        await asyncio.gather(*(store.create_folder(user.user_id, f"G{n}") for n in range(30)))
        assert len(synced) - count < 30
        assert synced[-1] >= os.stat(path + "-wal").st_size
        await store.close()

    asyncio.run(scenario())


def test_a_failed_fsync_fails_the_write(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, user = await _open(str(tmp_path / "meta.db"), "e")

        def broken() -> None:
            raise OSError(5, "Input/output error")

        store._fsync_wal = broken  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="fsync"):
            await store.create_folder(user.user_id, "Lost")
        await store.close()

    asyncio.run(scenario())


def test_another_process_holding_the_lock_does_not_block_the_loop(tmp_path: Path) -> None:
    """A write that finds the file locked by another process waits for it on the writer
    thread; the event loop goes on serving meanwhile, and the write lands afterwards."""
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store, user = await _open(path, "f")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        loop_ticks = _LoopTicks()
        write = asyncio.create_task(store.create_folder(user.user_id, "Waited"))
        await asyncio.sleep(0.5)
        assert not write.done()
        assert loop_ticks.ticks >= 20  # the loop was free while the write waited for the lock
        other.execute("COMMIT")
        other.close()
        folder = await asyncio.wait_for(write, 10)
        loop_ticks.stop()
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()

    asyncio.run(scenario())


def _user_and_lock_holder(path: str, who: str, then: str) -> tuple[User, subprocess.Popen[bytes]]:
    """A store at `path` with one user (made before the lock is taken), and another process
    that holds the write-lock file's flock and then runs `then` (Python source)."""

    async def make_user() -> User:
        store, user = await _open(path, who)
        await store.close()
        return user

    user = asyncio.run(make_user())
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({(path + WRITE_LOCK_SUFFIX)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n" + then],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"held\n"
    return user, holder


def test_writers_of_other_processes_queue_on_the_write_lock_file(tmp_path: Path) -> None:
    """Every writer flocks the lock file beside the database for its transaction: while another
    process holds it, a write neither commits nor blocks the loop, and it lands once that
    process lets go."""
    path = str(tmp_path / "meta.db")
    user, holder = _user_and_lock_holder(path, "l", "sys.stdin.readline()\n")

    def queued_folders() -> int:
        with contextlib.closing(sqlite3.connect(path)) as other:
            return int(other.execute(
                "SELECT count(*) FROM folders WHERE name = 'Queued'").fetchone()[0])

    async def scenario() -> None:
        store = SqliteMetadataStore(path)
        await store.open()
        loop_ticks = _LoopTicks()
        write = asyncio.create_task(store.create_folder(user.user_id, "Queued"))
        await asyncio.sleep(0.5)
        assert not write.done()
        assert queued_folders() == 0
        assert loop_ticks.ticks >= 20
        assert holder.stdin is not None
        holder.stdin.write(b"go\n")
        holder.stdin.close()
        folder = await asyncio.wait_for(write, 10)
        loop_ticks.stop()
        assert queued_folders() == 1
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        holder.kill()
        holder.wait()


def test_a_write_gives_up_on_a_process_that_never_lets_go_of_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped in the middle of a write holds the lock file for good: the write fails
    as locked after the store's patience (BUSY_TIMEOUT_MS) instead of hanging every writer,
    and writes succeed again once that process is gone."""
    path = str(tmp_path / "meta.db")
    user, holder = _user_and_lock_holder(path, "h", "time.sleep(60)\n")
    monkeypatch.setattr(sqlite_file, "BUSY_TIMEOUT_MS", 400)

    async def scenario() -> None:
        store = SqliteMetadataStore(path)
        await store.open()
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            await asyncio.wait_for(store.create_folder(user.user_id, "Never"), 10)
        assert time.monotonic() - started < 5
        holder.kill()
        await asyncio.to_thread(holder.wait)  # the kernel lets go of a dead process's flock
        folder = await asyncio.wait_for(store.create_folder(user.user_id, "Later"), 10)
        assert [f.name for f in await store.list_folders(user.user_id)] == [folder.name]
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        holder.kill()
        holder.wait()


def test_a_big_write_runs_off_the_loop_and_small_ones_follow_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        store, user = await _open(str(tmp_path / "meta.db"), "g")
        order: list[str] = []

        def slow(conn: sqlite3.Connection) -> None:
            time.sleep(0.3)  # a long transaction, holding the write connection
            conn.execute("UPDATE users SET password_hash = password_hash WHERE user_id = ?",
                         (user.user_id,))
            order.append("big")

        loop_ticks = _LoopTicks()
        big = asyncio.create_task(store._write_big(slow))
        await asyncio.sleep(0.05)
        small = asyncio.create_task(store.create_folder(user.user_id, "After"))
        await asyncio.gather(big, small)
        order.append("small")
        loop_ticks.stop()
        assert order == ["big", "small"]
        assert loop_ticks.ticks >= 15  # the loop served on while the big write ran
        assert [f.name for f in await store.list_folders(user.user_id)] == ["After"]
        await store.close()

    asyncio.run(scenario())


def test_the_wal_is_checkpointed_into_the_database_file(tmp_path: Path) -> None:
    """Commits on the loop never checkpoint; the writer thread copies the WAL into the main
    file at most every _CHECKPOINT_EVERY seconds, so a copy of the main file alone holds them."""
    path = tmp_path / "meta.db"

    async def scenario() -> None:
        store = SqliteMetadataStore(str(path))
        await store.open()
        user = await store.create_user("h@example.test", "x")
        for n in range(20):
            await store.create_folder(user.user_id, f"C{n}")
        await asyncio.sleep(_CHECKPOINT_EVERY + 0.2)
        await store.create_folder(user.user_id, "Last")  # its sync starts the checkpoint
        for _ in range(100):
            await asyncio.sleep(0.05)
            shutil.copyfile(path, tmp_path / "copy.db")
            copy = sqlite3.connect(tmp_path / "copy.db")
            try:
                count = copy.execute("SELECT COUNT(*) FROM folders").fetchone()[0]
            finally:
                copy.close()
            if count >= 20:
                break
        assert count >= 20
        await store.close()

    asyncio.run(scenario())


def test_a_write_that_changes_nothing_waits_only_for_what_it_may_have_read(
        tmp_path: Path) -> None:
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store, user = await _open(path, "i")
        syncs = 0
        real = store._fsync_wal

        def slow() -> None:
            nonlocal syncs
            time.sleep(0.2)
            real()
            syncs += 1

        store._fsync_wal = slow  # type: ignore[method-assign]

        def look(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM folders").fetchone()[0])

        # everything on disk already: nothing to wait for, no fsync
        started = time.monotonic()
        assert await store._write(look) == 0
        assert syncs == 0 and time.monotonic() - started < 0.15
        # a commit not yet on disk that the write could have read: it waits for its fsync
        made = asyncio.create_task(store.create_folder(user.user_id, "New"))
        await asyncio.sleep(0.05)  # committed, its fsync under way
        assert not made.done()
        assert await store._write(look) == 1
        assert syncs >= 1
        await made
        await store.close()

    asyncio.run(scenario())


def test_a_write_that_meets_a_short_write_of_another_process_stays_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes on one machine take turns at the write lock many times a second: a small write
    that finds it taken looks again after a turn of the event loop, and only a lock held
    longer sends it to wait on the writer thread."""
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store, user = await _open(path, "t")
        to_thread: list[str] = []
        real = store._commit_big

        async def recording(fn: Any, *args: Any, **kwargs: Any) -> Any:
            to_thread.append(getattr(fn, "__qualname__", "?"))
            return await real(fn, *args, **kwargs)

        monkeypatch.setattr(store, "_commit_big", recording)
        other = os.open(path + WRITE_LOCK_SUFFIX, os.O_RDWR)  # another open file: another lock
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            asyncio.get_running_loop().call_soon(fcntl.flock, other, fcntl.LOCK_UN)
            await store.create_folder(user.user_id, "After a turn")
            assert to_thread == []  # done on the loop once the other let go
            fcntl.flock(other, fcntl.LOCK_EX)
            write = asyncio.create_task(store.create_folder(user.user_id, "Waited"))
            await asyncio.sleep(0.2)
            assert len(to_thread) == 1 and not write.done()  # held longer: the writer thread
            fcntl.flock(other, fcntl.LOCK_UN)
            await asyncio.wait_for(write, 10)
        finally:
            os.close(other)
        names = {f.name for f in await store.list_folders(user.user_id)}
        assert {"After a turn", "Waited"} <= names
        await store.close()

    asyncio.run(scenario())
