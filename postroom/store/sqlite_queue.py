"""The embedded queue: one SQLite file (WAL, synchronous=FULL), one row per item.

Leasing. `take` moves the item's `not_before` to the end of the lease and bumps `attempts`, in
one transaction; `take_many` does so for a batch of the oldest due items in one transaction,
and `ack_many` removes a batch in one (one WAL fsync per batch instead of one per item). An
item whose lease runs out is simply due again, so a worker that died never loses work
(at-least-once); `lease_until` only records the lease for `list`.

Acks and retries name the lease they answer by its `attempts`. A late ack from a worker whose
lease ran out and whose item was taken again (attempts moved on) is ignored, so it cannot delete
the newer lease's item while that one is still being worked on; the newer taker acks it. A late
ack whose item was *not* taken again still removes it: the work it reports is done.

Threading. All SQLite work runs on one dedicated thread (a single-worker executor), each
operation as one function with its own transaction, so the event loop never blocks on disk and
the connection is never shared between threads. Several processes may share the file:
`BEGIN IMMEDIATE` plus the busy timeout serialise their writers.

Group commit. With synchronous=FULL every commit waits for an fsync, which would cap puts at the
disk's fsync rate. Puts therefore go to a pending list; the database thread drains the whole list
into one transaction, so puts that arrive while a commit is in flight share the next one. Each
put still returns only after its own row is committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from postroom.store.errors import StoreError
from postroom.store.queue import QueueItem

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    topic TEXT NOT NULL,
    item_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    not_before REAL NOT NULL,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (topic, item_id)
);
CREATE INDEX IF NOT EXISTS items_due ON items (topic, not_before);
"""

_COLUMNS = "item_id, topic, payload, attempts, enqueued_at, not_before, last_error"
_Items = list[QueueItem]  # spelt here: inside the class, `list` is the method of that name


def _item(row: tuple[str, str, bytes, int, float, float, str]) -> QueueItem:
    item_id, topic, payload, attempts, enqueued_at, not_before, last_error = row
    return QueueItem(
        item_id=item_id,
        topic=topic,
        payload=bytes(payload),
        attempts=attempts,
        enqueued_at=enqueued_at,
        not_before=not_before,
        last_error=last_error,
    )


@dataclass(slots=True)
class _PendingPut:
    topic: str
    item_id: str
    payload: bytes
    enqueued_at: float
    not_before: float
    done: concurrent.futures.Future[None]


class SqliteQueue:
    """`Queue` on a SQLite file of its own (`sqlite:///var/lib/postroom/queue.db`)."""

    def __init__(
        self, path: str, *, poll_interval: float = 0.5, busy_timeout: float = 10.0
    ) -> None:
        self.path = path
        # How often a waiting `take` looks for items put by *other* processes; puts in this
        # process wake it at once, and items that become due later wake it when they do.
        self.poll_interval = poll_interval
        self.busy_timeout = busy_timeout
        self.commits = 0  # put transactions committed (group commit shows as commits < puts)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._pending: list[_PendingPut] = []
        self._pending_lock = threading.Lock()
        self._waiters: dict[str, set[asyncio.Event]] = {}

    # Lifecycle

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="postroom-queue"
        )
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        try:
            await self._run(self._disconnect)
        finally:
            self._executor = None
            executor.shutdown(wait=False)
            for events in self._waiters.values():
                for event in events:
                    event.set()

    # The Queue protocol

    async def put(
        self, topic: str, payload: bytes, *, item_id: str | None = None, delay: float = 0.0
    ) -> str:
        if self._executor is None:
            raise StoreError("queue is not open")
        item_id = item_id if item_id is not None else uuid.uuid4().hex
        now = time.time()
        pending = _PendingPut(
            topic=topic,
            item_id=item_id,
            payload=bytes(payload),
            enqueued_at=now,
            not_before=now + max(delay, 0.0),
            done=concurrent.futures.Future(),
        )
        with self._pending_lock:
            self._pending.append(pending)
        # The flush this schedules, or an earlier one still queued, commits our row; the
        # executor runs jobs in order, so once ours has run the row's fate is settled.
        await self._run(self._flush_puts)
        pending.done.result()
        self._wake(topic)
        return item_id

    async def take(
        self, topic: str, *, lease: float = 300.0, wait: float = 0.0
    ) -> QueueItem | None:
        items = await self.take_many(topic, max_items=1, lease=lease, wait=wait)
        return items[0] if items else None

    async def take_many(
        self, topic: str, *, max_items: int, lease: float = 300.0, wait: float = 0.0
    ) -> list[QueueItem]:
        deadline = time.monotonic() + max(wait, 0.0)
        limit = max(1, max_items)
        while True:
            items, next_due = await self._run(lambda: self._take_due(topic, lease, limit))
            if items:
                return items
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            pause = min(remaining, self.poll_interval)
            if next_due is not None:
                pause = min(pause, max(next_due - time.time(), 0.001))
            await self._sleep_or_wake(topic, pause)
            if self._executor is None:
                return []  # closed while we waited

    async def ack(self, item: QueueItem) -> None:
        await self._run(
            lambda: self._write(
                "DELETE FROM items WHERE topic = ? AND item_id = ? AND attempts = ?",
                (item.topic, item.item_id, item.attempts),
            )
        )

    async def ack_many(self, items: Sequence[QueueItem]) -> None:
        if not items:
            return
        rows = [(item.topic, item.item_id, item.attempts) for item in items]
        await self._run(
            lambda: self._write_many(
                "DELETE FROM items WHERE topic = ? AND item_id = ? AND attempts = ?", rows
            )
        )

    async def retry(self, item: QueueItem, delay: float, error: str = "") -> None:
        not_before = time.time() + max(delay, 0.0)
        await self._run(
            lambda: self._write(
                "UPDATE items SET not_before = ?, lease_until = NULL, last_error = ?"
                " WHERE topic = ? AND item_id = ? AND attempts = ?",
                (not_before, error, item.topic, item.item_id, item.attempts),
            )
        )
        if delay <= 0:
            self._wake(item.topic)

    async def list(self, topic: str, limit: int = 100) -> list[QueueItem]:
        def op() -> list[QueueItem]:
            rows = self._conn().execute(
                f"SELECT {_COLUMNS} FROM items WHERE topic = ? ORDER BY enqueued_at, rowid LIMIT ?",
                (topic, limit),
            )
            return [_item(row) for row in rows.fetchall()]

        return await self._run(op)

    async def remove(self, topic: str, item_id: str) -> bool:
        deleted = await self._run(
            lambda: self._write(
                "DELETE FROM items WHERE topic = ? AND item_id = ?", (topic, item_id)
            )
        )
        return deleted > 0

    async def exists(self, topic: str, item_id: str) -> bool:
        def op() -> bool:
            row = self._conn().execute(
                "SELECT 1 FROM items WHERE topic = ? AND item_id = ?", (topic, item_id)
            ).fetchone()
            return row is not None

        return await self._run(op)

    async def size(self, topic: str) -> int:
        def op() -> int:
            row = (
                self._conn()
                .execute("SELECT count(*) FROM items WHERE topic = ?", (topic,))
                .fetchone()
            )
            return int(row[0])

        return await self._run(op)

    # Event-loop side helpers

    async def _run(self, fn: Callable[[], _T]) -> _T:
        executor = self._executor
        if executor is None:
            raise StoreError("queue is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn)
        except sqlite3.Error as e:
            raise StoreError(f"queue database error: {e}") from e

    def _wake(self, topic: str) -> None:
        for event in self._waiters.get(topic, ()):
            event.set()

    async def _sleep_or_wake(self, topic: str, seconds: float) -> None:
        event = asyncio.Event()
        waiters = self._waiters.setdefault(topic, set())
        waiters.add(event)
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(topic, None)

    # Database thread side: each function below runs whole on the executor's one thread.

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("queue is not open")
        return self._db

    def _connect(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so each operation is exactly
        # one transaction and nothing is left open between operations.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _disconnect(self) -> None:
        self._flush_puts()
        if self._db is not None:
            self._db.close()
            self._db = None

    def _flush_puts(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT OR IGNORE INTO items"
                    " (topic, item_id, payload, attempts, enqueued_at, not_before)"
                    " VALUES (?, ?, ?, 0, ?, ?)",
                    [(p.topic, p.item_id, p.payload, p.enqueued_at, p.not_before) for p in batch],
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            error = StoreError(f"queue database error: {e}")
            for p in batch:
                p.done.set_exception(error)
            return
        except BaseException as e:
            for p in batch:
                p.done.set_exception(e)
            raise
        self.commits += 1
        for p in batch:
            p.done.set_result(None)

    def _take_due(
        self, topic: str, lease: float, limit: int
    ) -> tuple[_Items, float | None]:
        """Lease up to `limit` of the oldest due items in one transaction; if none is due,
        when the next one will be."""
        db = self._conn()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE topic = ? AND not_before <= ?"
                " ORDER BY not_before, enqueued_at, rowid LIMIT ?",
                (topic, now, limit),
            ).fetchall()
            if not rows:
                nxt = db.execute(
                    "SELECT min(not_before) FROM items WHERE topic = ?", (topic,)
                ).fetchone()
                db.execute("COMMIT")
                return [], (None if nxt[0] is None else float(nxt[0]))
            items = [_item(row) for row in rows]
            until = now + max(lease, 0.0)
            db.executemany(
                "UPDATE items SET not_before = ?, lease_until = ?, attempts = attempts + 1"
                " WHERE topic = ? AND item_id = ?",
                [(until, until, topic, item.item_id) for item in items],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        leased = [
            QueueItem(
                item_id=item.item_id,
                topic=item.topic,
                payload=item.payload,
                attempts=item.attempts + 1,
                enqueued_at=item.enqueued_at,
                not_before=until,
                last_error=item.last_error,
            )
            for item in items
        ]
        return leased, None

    def _write_many(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = db.execute(sql, params).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return changed
