"""One SQLite file in WAL mode, shared by the embedded stores built on SQLite (metadata, blobs).

Concurrency model. SQLite allows one writer at a time per file, so a store keeps exactly one
write connection and a small pool of reader threads with a connection each. Every public
coroutine of a store runs ONE synchronous function -- the whole transaction -- so statements of
two coroutines never interleave inside a transaction. A small write transaction runs on the
event loop itself (`_write`); big ones, and writes that find another process writing, run on a
single writer thread that owns the connection meanwhile (`_write_big`). Writes run in
``BEGIN IMMEDIATE`` (the write lock is taken up front, never a read-to-write upgrade) and
multi-statement reads in a deferred transaction, which gives each read a consistent WAL
snapshot; single-statement point reads run on the loop (`_read_now`).

Several processes may open the same file (the CLI adds a user while the server runs, sibling
nodes share a data dir). Their write transactions take turns on a flock of
``<file>-writer.lock`` (a waiting writer looks again within a millisecond), before SQLite's own
lock, whose busy handler naps for longer.

Durability: the loop's COMMIT writes the WAL without an fsync (``synchronous = NORMAL``), and
the caller is answered only after a syncer thread has fsynced the WAL after that commit
(`_durable`, one fsync per group of commits): what ``synchronous = FULL`` promises, so a
committed write survives a crash (DESIGN.md §4: 250 only after the message is durable).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

from postroom.store.errors import Conflict, StoreError

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
_INLINE_MAX = 256  # a write touching more rows than this runs on the writer thread
_CHECKPOINT_EVERY = 1.0  # seconds: the WAL is checkpointed (off the event loop) this often
READER_THREADS = 4
# the flock that writers of one file, in every process, take turns on (see _write_locked)
WRITE_LOCK_SUFFIX = "-writer.lock"


def _wal_mode(conn: sqlite3.Connection) -> str:
    """Switch the file to WAL, waiting while other nodes opening it at the same moment hold
    it: SQLite may answer a journal-mode change with "database is locked" at once, without
    waiting out busy_timeout (it does not wait where waiting could deadlock)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


_LOOP_TURNS = 4


class _Busy(Exception):
    """Another connection holds the write lock (BEGIN IMMEDIATE answered SQLITE_BUSY)."""


class SqliteFile:
    """One SQLite file in WAL mode, written by group commit; the stores on SQLite subclass it
    and give `_migrate` (their schema) and `_name` (for errors and thread names)."""

    _name = "sqlite store"
    _thread_prefix = "postroom-sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        # the write connection is used by one party at a time: the event loop (a write with
        # few rows, run inline) or, while _gate is held, the writer thread
        self._gate = asyncio.Lock()
        self._checkpointing = False
        self._checkpointed = 0.0  # time.monotonic() of the last checkpoint
        # commits made through this store, and how many of them are known to be on disk
        self._commits = 0
        self._on_disk = 0
        # group commit: the WAL is fsynced by the syncer thread, one fsync for every commit
        # made before it started
        self._syncer: ThreadPoolExecutor | None = None
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._syncing = False
        self._wal_fd: int | None = None
        self._wal_id: tuple[int, int] | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        # flock'ed around every write transaction: processes sharing the file take turns on it,
        # looking again within a millisecond, not after SQLite's busy handler's longer naps
        self._lock_fd: int | None = None

    # -- connections and executors

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _open_writer(self) -> None:
        conn = self._connect()
        try:
            mode = _wal_mode(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (got {mode})")
            # migrate at start-up: each missing step in its own write transaction
            self._migrate(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        # Commits on this connection write the WAL without an fsync; nobody hears of one
        # before the syncer has fsynced the WAL after it (_durable), which is what
        # synchronous = FULL would do, once per group of commits instead of once each.
        conn.execute("PRAGMA synchronous = NORMAL")
        # checkpoints run on the writer thread (_checkpoint), never inside a commit on the loop
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA busy_timeout = 0")  # the event loop never waits for a lock
        self._lock_fd = os.open(self.path + WRITE_LOCK_SUFFIX,
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._write_conn = conn

    def _open_reader(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        self._local.conn = conn
        with self._reader_lock:
            self._reader_conns.append(conn)

    async def open(self) -> None:
        if self._writer is not None:
            return
        prefix = self._thread_prefix
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-write")
        try:
            await asyncio.get_running_loop().run_in_executor(writer, self._open_writer)
        except BaseException:
            writer.shutdown(wait=False)
            raise
        self._writer = writer
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{prefix}-sync")
        self._readers = ThreadPoolExecutor(
            max_workers=READER_THREADS,
            thread_name_prefix=f"{prefix}-read",
            initializer=self._open_reader,
        )

    async def close(self) -> None:
        writer, readers = self._writer, self._readers
        if writer is None or readers is None:
            return
        self._writer = self._readers = None
        async with self._gate:
            pass  # a write on the writer thread finishes first
        if self._syncing or self._sync_waiters:
            with contextlib.suppress(StoreError):
                await self._durable()  # the commits not yet fsynced
        await asyncio.to_thread(self._shutdown, writer, readers)
        # forget the per-thread connections just closed (the event loop's own, of _read_now),
        # so a reopened store makes new ones
        self._local = threading.local()

    def _shutdown(self, writer: ThreadPoolExecutor, readers: ThreadPoolExecutor) -> None:
        writer.shutdown(wait=True)
        readers.shutdown(wait=True)
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = self._wal_id = None
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            conn.close()
        if self._write_conn is not None:
            try:
                self._write_conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            self._write_conn.close()
            self._write_conn = None

    # -- running transactions

    def _run_write(
        self,
        conn: sqlite3.Connection,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """One write transaction; raises _Busy if another connection holds the write lock."""
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise _Busy from exc
                raise
            try:
                result = fn(conn, *args, **kwargs)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        return result

    def _write_locked(
        self,
        conn: sqlite3.Connection,
        wait: bool,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """_run_write holding the flock of the write-lock file; raises _Busy if another process
        holds it and `wait` is false, StoreError if it still holds it after BUSY_TIMEOUT_MS.

        SQLite's own wait for its write lock (busy_timeout) naps 1, 2, 5 ms and longer, so
        processes taking turns at short transactions spend their time asleep; this one looks
        again within a millisecond. (A blocking flock would wake at once, but could not give
        up: a process stopped in the middle of a write would hang every write here.) Every
        process writing to the file goes through here (the server's nodes, the CLI)."""
        fd = self._lock_fd
        if fd is None:
            raise StoreError(f"{self._name} is not open")
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.00005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise _Busy from None
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: database is locked "
                                     "(another process holds its write lock)") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.001)
        try:
            return self._run_write(conn, fn, *args, **kwargs)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _run_write_patiently(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """_run_write on the writer thread, waiting for the write lock if another process
        holds it (the flock, then up to BUSY_TIMEOUT_MS for SQLite's own lock, which a
        connection outside this class may hold)."""
        conn = self._write_conn
        if conn is None:
            raise StoreError(f"{self._name} is not open")
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.001
        while True:
            try:
                return self._write_locked(conn, True, fn, *args, **kwargs)
            except _Busy:
                if time.monotonic() > deadline:
                    raise StoreError(f"{self.path}: database is locked") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _run_read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        conn: sqlite3.Connection = self._local.conn
        try:
            # one deferred transaction: every statement of the read sees the same snapshot
            conn.execute("BEGIN")
            try:
                return fn(conn, *args, **kwargs)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def _write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A small write: its SQL runs here on the event loop (no hop to a thread, no wait for
        the GIL between statements), then the caller waits until the WAL is fsynced."""
        result = await self._commit(fn, *args, **kwargs)
        if self._on_disk < self._commits:
            # its own commit, or commits it may have read (a STORE that found the flag set
            # by a commit not yet on disk), is not durable yet
            await self._durable()
        return result

    async def _commit(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """_write without the wait for the fsync: committed, visible, not yet durable. Only
        for a caller that waits for a later commit to the same WAL before it answers anyone:
        the WAL is replayed in order after a crash, so that commit's survival is this one's."""
        conn = self._write_conn
        if conn is None or self._writer is None:
            raise StoreError(f"{self._name} is not open")
        for turn in range(_LOOP_TURNS):
            if self._gate.locked():  # behind a big write, in order
                return await self._commit_big(fn, *args, **kwargs)
            changes = conn.total_changes
            try:
                result = self._write_locked(conn, False, fn, *args, **kwargs)
                break
            except _Busy:
                # Another process is writing (the server's other nodes on this machine):
                # its transactions are short, so look again after a turn of the loop, then
                # wait for it on the writer thread.
                if turn == _LOOP_TURNS - 1:
                    return await self._commit_big(fn, *args, **kwargs)
                await asyncio.sleep(0)
                if self._write_conn is not conn:
                    raise StoreError(f"{self._name} is not open") from None
        if conn.total_changes != changes:
            self._commits += 1
        return result

    async def _write_big(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A write that may take long (many rows, or waiting for another process's lock), on
        the writer thread so the event loop goes on serving; small writes wait behind it."""
        result = await self._commit_big(fn, *args, **kwargs)
        await self._durable()
        return result

    async def _commit_big(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """_write_big without the wait for the fsync (see _commit)."""
        if self._writer is None:
            raise StoreError(f"{self._name} is not open")
        call = functools.partial(self._run_write_patiently, fn, *args, **kwargs)
        async with self._gate:
            result = await asyncio.get_running_loop().run_in_executor(self._writer, call)
        self._commits += 1
        return result

    async def _write_for(self, rows: int, fn: Callable[[sqlite3.Connection], T]) -> T:
        """_write, or _write_big when the transaction touches more than _INLINE_MAX rows."""
        return await (self._write_big(fn) if rows > _INLINE_MAX else self._write(fn))

    async def _durable(self) -> None:
        """Return once every commit made before this call is on disk: the WAL fsynced."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sync_waiters.append(waiter)
        if not self._syncing:
            self._start_sync()
        await waiter

    def _start_sync(self) -> None:
        if self._syncer is None:
            for waiter in self._sync_waiters:
                if not waiter.done():
                    waiter.set_exception(StoreError(f"{self._name} is not open"))
            self._sync_waiters = []
            return
        waiters, self._sync_waiters = self._sync_waiters, []
        self._syncing = True
        done = asyncio.get_running_loop().run_in_executor(self._syncer, self._fsync_wal)
        done.add_done_callback(functools.partial(self._synced, waiters, self._commits))

    def _synced(
        self, waiters: list[asyncio.Future[None]], commits: int, done: asyncio.Future[None]
    ) -> None:
        self._syncing = False
        error = done.exception() if not done.cancelled() else StoreError("sync cancelled")
        if error is None:
            self._on_disk = max(self._on_disk, commits)  # the commits made before it began
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(StoreError(f"{self.path}: fsync of the WAL: {error}"))
        if self._sync_waiters:
            self._start_sync()
        elif (
            error is None
            and self._writer is not None
            and not self._checkpointing
            and time.monotonic() - self._checkpointed > _CHECKPOINT_EVERY
        ):
            # on the writer thread (idle but for big writes), so syncs never wait behind it
            self._checkpointing = True
            self._checkpointed = time.monotonic()
            self._writer.submit(self._checkpoint)

    def _fsync_wal(self) -> None:
        """fsync the WAL file (syncer thread): the commits written to it are on disk."""
        wal = self.path + "-wal"
        st = os.stat(wal)
        if self._wal_fd is None or self._wal_id != (st.st_dev, st.st_ino):
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            self._wal_id = (st.st_dev, st.st_ino)
        os.fdatasync(self._wal_fd)  # as SQLite syncs its own files: the data, and the size

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (writer thread), without blocking writers or readers;
        the next write then starts the WAL from its beginning again."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = self._connect()
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass  # retried after a later sync; readers holding old snapshots can delay it
        finally:
            self._checkpointing = False

    async def _read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._readers is None:
            raise StoreError(f"{self._name} is not open")
        call = functools.partial(self._run_read, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._readers, call)

    async def _read_now(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """A point read of ONE statement (one indexed row or a user's few folders) on the
        calling thread, in that statement's own implicit transaction.

        Tens of microseconds in WAL mode, where readers never wait for the writer; handing it
        to a reader thread and back costs more than that, several milliseconds on a busy
        machine, and IMAP makes a few of these per command. (No BEGIN/COMMIT around it: each
        is a call that lets go of the GIL, and a busy event loop waits to get it back.)
        """
        if self._readers is None:
            raise StoreError(f"{self._name} is not open")
        conn: sqlite3.Connection | None = self._write_conn
        if conn is not None and not self._gate.locked() and not conn.in_transaction:
            # the loop's own write connection: its page cache is never emptied by its own
            # commits, as every other connection's is
            try:
                return fn(conn, *args, **kwargs)
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from exc
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        try:
            return fn(conn, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the file's schema up to date (writer thread, at open)."""
        raise NotImplementedError
