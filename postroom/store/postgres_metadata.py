"""The scale-out metadata store: PostgreSQL through asyncpg, Citus-ready.

Same contract as the SQLite store (tests/contract/test_metadata.py runs on both), built for many
nodes writing at once:

- Every user table is keyed by user_id first and every statement names the user, so the schema
  distributes by user on Citus (docs/SCALING.md) and a mailbox's transaction touches one shard.
  There are no joins across users; the few global lookups (domains, aliases, user_addresses,
  tokens) are read by their own key.
- UIDs and MODSEQs come from ``UPDATE folders ... RETURNING`` inside the transaction that files
  the message: the row lock is held to commit, so writers on any number of nodes queue on the
  folder row and each sees the previous one's committed values. Never an in-process counter.
- Read-modify-write transactions (flags, move, expunge) lock the message rows they read
  (``FOR UPDATE``, in message_id order) and then the folder rows (in folder_id order); a deadlock
  or serialization failure PostgreSQL reports anyway is retried from the start.
- A delivery key is claimed with ``INSERT ... ON CONFLICT DO NOTHING``: a concurrent duplicate
  waits on the first one's uncommitted key and then finds it, so one queue item files one message.

Engine errors become the store's own (Conflict for constraint violations, StoreError otherwise).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace as dc_replace
from typing import Any, TypeVar

import asyncpg

from postroom.core.ids import new_id
from postroom.core.models import (
    HIERARCHY_SEPARATOR,
    Alias,
    Domain,
    Flag,
    Flags,
    Folder,
    FolderCounts,
    FolderRole,
    HeaderSummary,
    MessageRecord,
    NewMessage,
    User,
)
from postroom.store.errors import Conflict, NotFound, StoreError
from postroom.store.metadata import (
    Delivery,
    Expunged,
    ListCursor,
    ListEntry,
    Reputation,
    Token,
)
from postroom.store.migrations import MigrationOutcome, migrate_postgres

T = TypeVar("T")
Connection = Any  # asyncpg.Connection (the driver ships no type information)
Row = Any  # asyncpg.Record

TRANSIENT_RETRIES = 5

_MESSAGE_COLUMNS = (
    "user_id, message_id, folder_id, uid, modseq, sysflags, keywords, internal_date, size, "
    "blob_hash, from_, to_, cc, bcc, subject, date, header_message_id, in_reply_to, refs, "
    "snippet, has_attachments, thread_id, spam_verdict"
)
_MESSAGE_PLACEHOLDERS = ", ".join(f"${i}" for i in range(1, len(_MESSAGE_COLUMNS.split(", ")) + 1))
_FOLDER_COLUMNS = "user_id, folder_id, name, role, uidvalidity, uidnext, highestmodseq, subscribed"
_USER_COLUMNS = "user_id, address, password_hash, created_at, quota_bytes"
# Listings sort by COLLATE "C" (code point order), as SQLite's BINARY does, whatever the
# database's default collation.


# ---- row conversion ----------------------------------------------------------------------


def _normal_flags(flags: Flags) -> Flags:
    """Keywords sorted and unique, so two equal flag sets compare equal."""
    return Flags(Flag(int(flags.system)), tuple(sorted(set(flags.keywords))))


def _user(row: Row) -> User:
    return User(
        user_id=str(row["user_id"]),
        address=str(row["address"]),
        password_hash=str(row["password_hash"]),
        created_at=float(row["created_at"]),
        quota_bytes=int(row["quota_bytes"]),
    )


def _folder(row: Row) -> Folder:
    role = row["role"]
    return Folder(
        user_id=str(row["user_id"]),
        folder_id=str(row["folder_id"]),
        name=str(row["name"]),
        role=FolderRole(role) if role is not None else None,
        uidvalidity=int(row["uidvalidity"]),
        uidnext=int(row["uidnext"]),
        highestmodseq=int(row["highestmodseq"]),
        subscribed=bool(row["subscribed"]),
    )


def _record(row: Row) -> MessageRecord:
    date = row["date"]
    return MessageRecord(
        user_id=str(row["user_id"]),
        message_id=str(row["message_id"]),
        folder_id=str(row["folder_id"]),
        uid=int(row["uid"]),
        modseq=int(row["modseq"]),
        flags=Flags(Flag(int(row["sysflags"])), tuple(str(row["keywords"]).split())),
        internal_date=float(row["internal_date"]),
        size=int(row["size"]),
        blob_hash=str(row["blob_hash"]),
        headers=HeaderSummary(
            from_=str(row["from_"]),
            to=str(row["to_"]),
            cc=str(row["cc"]),
            bcc=str(row["bcc"]),
            subject=str(row["subject"]),
            date=float(date) if date is not None else None,
            message_id=str(row["header_message_id"]),
            in_reply_to=str(row["in_reply_to"]),
            references=tuple(str(r) for r in row["refs"]),
        ),
        snippet=str(row["snippet"]),
        has_attachments=bool(row["has_attachments"]),
        thread_id=str(row["thread_id"]),
        spam_verdict=str(row["spam_verdict"]),
    )


def _record_params(rec: MessageRecord) -> tuple[object, ...]:
    h = rec.headers
    return (
        rec.user_id,
        rec.message_id,
        rec.folder_id,
        rec.uid,
        rec.modseq,
        int(rec.flags.system),
        " ".join(rec.flags.keywords),
        rec.internal_date,
        rec.size,
        rec.blob_hash,
        h.from_,
        h.to,
        h.cc,
        h.bcc,
        h.subject,
        h.date,
        h.message_id,
        h.in_reply_to,
        list(h.references),
        rec.snippet,
        rec.has_attachments,
        rec.thread_id,
        rec.spam_verdict,
    )


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# ---- statements shared by several transactions --------------------------------------------


async def _fetch_records(
    conn: Connection, user_id: str, message_ids: Sequence[str], lock: bool = False
) -> list[MessageRecord]:
    """The user's records among message_ids, in the order given; others' ids are skipped.

    With lock, the rows are locked for update in message_id order (one order for every
    transaction, so two of them never wait on each other in a circle).
    """
    ids = _unique(message_ids)
    if not ids:
        return []
    sql = (
        f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        " WHERE user_id = $1 AND message_id = ANY($2::text[])"
    )
    if lock:
        sql += " ORDER BY message_id FOR UPDATE"
    rows = await conn.fetch(sql, user_id, ids)
    by_id = {str(row["message_id"]): _record(row) for row in rows}
    return [by_id[i] for i in ids if i in by_id]


async def _fetch_folder(
    conn: Connection, user_id: str, folder_id: str, lock: bool = False
) -> Folder | None:
    sql = f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = $1 AND folder_id = $2"
    if lock:
        sql += " FOR UPDATE"
    row = await conn.fetchrow(sql, user_id, folder_id)
    return _folder(row) if row is not None else None


async def _require_folder(
    conn: Connection, user_id: str, folder_id: str, lock: bool = False
) -> Folder:
    folder = await _fetch_folder(conn, user_id, folder_id, lock)
    if folder is None:
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return folder


async def _lock_folders(conn: Connection, user_id: str, folder_ids: Iterable[str]) -> None:
    """Lock several folder rows in folder_id order before updating them one by one."""
    ids = sorted(set(folder_ids))
    if len(ids) > 1:
        await conn.execute(
            "SELECT 1 FROM folders WHERE user_id = $1 AND folder_id = ANY($2::text[])"
            " ORDER BY folder_id FOR UPDATE",
            user_id,
            ids,
        )


async def _allocate_uids(
    conn: Connection, user_id: str, folder_id: str, count: int
) -> tuple[int, int]:
    """Reserve `count` uids and one new modseq in the folder: (first uid, modseq).

    The UPDATE takes the folder row's lock until commit: the only uid allocator (DESIGN.md §3).
    """
    row = await conn.fetchrow(
        "UPDATE folders SET uidnext = uidnext + $1, highestmodseq = highestmodseq + 1"
        " WHERE user_id = $2 AND folder_id = $3 RETURNING uidnext, highestmodseq",
        count,
        user_id,
        folder_id,
    )
    if row is None:
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return int(row[0]) - count, int(row[1])


async def _bump_modseq(conn: Connection, user_id: str, folder_id: str) -> int:
    value = await conn.fetchval(
        "UPDATE folders SET highestmodseq = highestmodseq + 1"
        " WHERE user_id = $1 AND folder_id = $2 RETURNING highestmodseq",
        user_id,
        folder_id,
    )
    if value is None:  # the record's folder vanished: cannot happen under the foreign key
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return int(value)


async def _bump_modseqs(
    conn: Connection, user_id: str, folder_ids: Iterable[str]
) -> dict[str, int]:
    ids = _unique(folder_ids)
    await _lock_folders(conn, user_id, ids)
    return {folder_id: await _bump_modseq(conn, user_id, folder_id) for folder_id in ids}


async def _next_uidvalidities(conn: Connection, user_id: str, count: int) -> list[int]:
    """Fresh uidvalidities for the user's folders, never reused (RFC 3501 §2.3.1.1).

    Each is at least the current time and above every one handed out before, so a folder
    deleted and recreated (or renamed) within one second still gets a new value. One atomic
    update of the user's row: concurrent folder creations queue on it.
    """
    last = await conn.fetchval(
        "UPDATE users SET last_uidvalidity = greatest($2::bigint, last_uidvalidity + 1) + $3 - 1"
        " WHERE user_id = $1 RETURNING last_uidvalidity",
        user_id,
        int(time.time()),
        count,
    )
    if last is None:
        raise NotFound(f"no user {user_id}")
    first = int(last) - count + 1
    return [first + i for i in range(count)]


async def _insert_records(conn: Connection, records: Sequence[MessageRecord]) -> None:
    if not records:
        return
    await conn.executemany(
        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_PLACEHOLDERS})",
        [_record_params(rec) for rec in records],
    )
    refs = [
        (rec.user_id, ref, rec.message_id)
        for rec in records
        for ref in _unique(r for r in (rec.headers.in_reply_to, *rec.headers.references) if r)
    ]
    if refs:
        await conn.executemany(
            "INSERT INTO message_refs (user_id, ref, message_id) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            refs,
        )


async def _file_message(
    conn: Connection,
    user_id: str,
    folder_id: str,
    message: NewMessage,
    delivery_key: str | None,
) -> tuple[MessageRecord, bool]:
    """The body of `insert_message`'s transaction (and of each of `insert_messages`)."""
    message_id = new_id()
    if delivery_key is not None:
        # Claim the key first. A concurrent insert with the same key (on any node)
        # holds it uncommitted: this waits for it, then finds the key taken.
        try:
            claimed = await conn.fetchval(
                "INSERT INTO deliveries (user_id, delivery_key, message_id)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1",
                user_id,
                delivery_key,
                message_id,
            )
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"no user {user_id}") from None
        if claimed is None:
            earlier = await conn.fetchval(
                "SELECT message_id FROM deliveries"
                " WHERE user_id = $1 AND delivery_key = $2",
                user_id,
                delivery_key,
            )
            found = await _fetch_records(conn, user_id, [str(earlier)])
            if not found:
                raise Conflict("already delivered")
            return found[0], False
    uid, modseq = await _allocate_uids(conn, user_id, folder_id, 1)
    record = MessageRecord(
        user_id=user_id,
        message_id=message_id,
        folder_id=folder_id,
        uid=uid,
        modseq=modseq,
        flags=_normal_flags(message.flags),
        internal_date=message.internal_date,
        size=message.size,
        blob_hash=message.blob_hash,
        headers=message.headers,
        snippet=message.snippet,
        has_attachments=message.has_attachments,
        thread_id=await _resolve_thread(conn, user_id, message.headers),
        spam_verdict=message.spam_verdict,
    )
    await _insert_records(conn, [record])
    return record, True


async def _resolve_thread(conn: Connection, user_id: str, headers: HeaderSummary) -> str:
    """The conversation a new message belongs to, looked up only among the user's own mail.

    The same order as the SQLite store: the parent (In-Reply-To), then References from nearest
    to root, then another copy of the same message; failing those, a message already filed
    that names this one as an ancestor (its parent arrived after it); otherwise a new thread.
    Both lookups are one statement, ranked in that order: one round trip per delivery.
    """
    own = headers.message_id
    ancestors = _unique(
        r for r in (headers.in_reply_to, *reversed(headers.references)) if r and r != own
    )
    if own:
        ancestors.append(own)
    if not ancestors:
        return new_id()
    thread = await conn.fetchval(
        "SELECT thread_id FROM ("
        " SELECT 0 AS pass, array_position($2::text[], header_message_id) AS rank,"
        " internal_date, uid, thread_id FROM messages"
        " WHERE user_id = $1 AND header_message_id = ANY($2::text[])"
        " UNION ALL"
        " SELECT 1, 0, m.internal_date, m.uid, m.thread_id FROM message_refs AS r"
        " JOIN messages AS m ON m.user_id = r.user_id AND m.message_id = r.message_id"
        " WHERE r.user_id = $1 AND r.ref = $3"
        ") AS found ORDER BY pass, rank, internal_date, uid LIMIT 1",
        user_id,
        ancestors,
        own or None,
    )
    return str(thread) if thread is not None else new_id()


async def _log_vanished(
    conn: Connection, user_id: str, gone: Sequence[tuple[str, int, int]]
) -> None:
    """Note (folder, uid, modseq) of records that left a folder, for QRESYNC."""
    if gone:
        await conn.executemany(
            "INSERT INTO vanished (user_id, folder_id, uid, modseq) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING",
            [(user_id, f, u, m) for f, u, m in gone],
        )


async def _note_released(conn: Connection, blob_hashes: Sequence[str]) -> None:
    """Blobs that lost a reference become the collector's candidates (it counts the rows
    naming each before it deletes anything)."""
    if blob_hashes:
        await conn.execute(
            "INSERT INTO blob_released (blob_hash, released_at)"
            " SELECT h, extract(epoch FROM clock_timestamp()) FROM unnest($1::text[]) AS h"
            " ON CONFLICT (blob_hash) DO UPDATE SET released_at = excluded.released_at",
            sorted(set(blob_hashes)),
        )


async def _delete_records(conn: Connection, records: Sequence[MessageRecord]) -> list[Expunged]:
    """Remove records (already known to be the user's); one modseq bump per source folder.

    The blob references go with the rows: a blob's count is the number of rows naming it.
    """
    if not records:
        return []
    user_id = records[0].user_id
    modseqs = await _bump_modseqs(conn, user_id, (r.folder_id for r in records))
    await conn.execute(
        "DELETE FROM messages WHERE user_id = $1 AND message_id = ANY($2::text[])",
        user_id,
        [r.message_id for r in records],
    )
    await _log_vanished(conn, user_id, [(r.folder_id, r.uid, modseqs[r.folder_id])
                                        for r in records])
    await _note_released(conn, [r.blob_hash for r in records])
    return [
        Expunged(r.folder_id, r.uid, r.message_id, r.blob_hash, modseqs[r.folder_id])
        for r in records
    ]


async def _users_of_domain(conn: Connection, domain: str) -> list[User]:
    rows = await conn.fetch(
        f'SELECT {_USER_COLUMNS} FROM users WHERE address LIKE $1 ORDER BY address COLLATE "C"',
        "%@" + _like_escape(domain),
    )
    return [u for u in map(_user, rows) if _domain_of(u.address) == domain]


# ---- the store -----------------------------------------------------------------------------


class PostgresMetadataStore:
    """MetadataStore on PostgreSQL (or Citus): a pool of connections per node.

    ``dsn`` is a libpq-style URL (postgresql://user@host:port/db); extra query parameters are
    passed to the server as settings (``?search_path=tenant_a`` picks a schema).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        command_timeout: float = 60.0,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self.migration: MigrationOutcome | None = None

    # -- pool and transactions

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=self.command_timeout,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                # migrate at start-up; nodes starting together take turns on an advisory lock
                self.migration = await migrate_postgres(conn, where=_redacted(self.dsn))
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
                raise StoreError(f"{_redacted(self.dsn)}: cannot migrate: {exc}") from exc
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("metadata store is not open")
        return self._pool

    async def _write(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run fn as one transaction, from the start again on a deadlock or serialization
        failure (fn must not keep state across attempts)."""
        pool = self._require_pool()
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await fn(conn)
            except (
                asyncpg.DeadlockDetectedError,
                asyncpg.SerializationError,
            ) as exc:
                if attempt == TRANSIENT_RETRIES:
                    raise StoreError(str(exc)) from exc
                await asyncio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise Conflict(str(exc)) from exc
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise StoreError(str(exc)) from exc
        raise AssertionError("unreachable")

    async def _read(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn:
                return await fn(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise StoreError(str(exc)) from exc

    # -- domains

    async def add_domain(self, name: str) -> Domain:
        async def tx(conn: Connection) -> Domain:
            domain = Domain(name, time.time())
            done = await conn.fetchval(
                "INSERT INTO domains (name, created_at) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                name,
                domain.created_at,
            )
            if done is None:
                raise Conflict(f"domain {name} exists")
            return domain

        return await self._write(tx)

    async def remove_domain(self, name: str) -> None:
        async def tx(conn: Connection) -> None:
            if (
                await conn.fetchval("SELECT 1 FROM domains WHERE name = $1 FOR UPDATE", name)
                is None
            ):
                raise NotFound(f"no domain {name}")
            if await _users_of_domain(conn, name):
                raise Conflict(f"domain {name} still has users")
            await conn.execute("DELETE FROM domains WHERE name = $1", name)

        await self._write(tx)

    async def list_domains(self) -> list[Domain]:
        async def tx(conn: Connection) -> list[Domain]:
            rows = await conn.fetch(
                'SELECT name, created_at FROM domains ORDER BY name COLLATE "C"'
            )
            return [Domain(str(r[0]), float(r[1])) for r in rows]

        return await self._read(tx)

    async def has_domain(self, name: str) -> bool:
        async def tx(conn: Connection) -> bool:
            return await conn.fetchval("SELECT 1 FROM domains WHERE name = $1", name) is not None

        return await self._read(tx)

    # -- users

    async def create_user(self, address: str, password_hash: str) -> User:
        async def tx(conn: Connection) -> User:
            user = User(new_id(), address, password_hash, time.time())
            # the address lookup row is the uniqueness check; a concurrent claim of the same
            # address waits on this one's row and then finds it taken
            claimed = await conn.fetchval(
                "INSERT INTO user_addresses (address, user_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                address,
                user.user_id,
            )
            if claimed is None:
                raise Conflict(f"address {address} is taken")
            await conn.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5)",
                user.user_id,
                address,
                password_hash,
                user.created_at,
                user.quota_bytes,
            )
            return user

        return await self._write(tx)

    async def get_user(self, user_id: str) -> User | None:
        async def tx(conn: Connection) -> User | None:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", user_id
            )
            return _user(row) if row is not None else None

        return await self._read(tx)

    async def get_user_by_address(self, address: str) -> User | None:
        async def tx(conn: Connection) -> User | None:
            # two lookups by their own keys rather than a join across distribution columns
            user_id = await conn.fetchval(
                "SELECT user_id FROM user_addresses WHERE address = $1", address
            )
            if user_id is None:
                return None
            row = await conn.fetchrow(
                f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = $1", user_id
            )
            return _user(row) if row is not None and row["address"] == address else None

        return await self._read(tx)

    async def list_users(self, domain: str | None = None) -> list[User]:
        async def tx(conn: Connection) -> list[User]:
            if domain is not None:
                return await _users_of_domain(conn, domain)
            rows = await conn.fetch(
                f'SELECT {_USER_COLUMNS} FROM users ORDER BY address COLLATE "C"'
            )
            return [_user(r) for r in rows]

        return await self._read(tx)

    async def set_password(self, user_id: str, password_hash: str) -> None:
        async def tx(conn: Connection) -> None:
            done = await conn.fetchval(
                "UPDATE users SET password_hash = $1 WHERE user_id = $2 RETURNING 1",
                password_hash,
                user_id,
            )
            if done is None:
                raise NotFound(f"no user {user_id}")

        await self._write(tx)

    async def delete_user(self, user_id: str) -> list[str]:
        """Remove the user with folders, messages, tokens, delivery keys and address.

        Returns each distinct blob hash that lost at least one reference; the caller collects
        those whose refcount is now zero.
        """

        async def tx(conn: Connection) -> list[str]:
            address = await conn.fetchval(
                "SELECT address FROM users WHERE user_id = $1 FOR UPDATE", user_id
            )
            if address is None:
                raise NotFound(f"no user {user_id}")
            hashes = await conn.fetch(
                "DELETE FROM messages WHERE user_id = $1 RETURNING blob_hash", user_id
            )
            await conn.execute("DELETE FROM message_refs WHERE user_id = $1", user_id)
            await conn.execute("DELETE FROM deliveries WHERE user_id = $1", user_id)
            await conn.execute("DELETE FROM folders WHERE user_id = $1", user_id)
            await conn.execute("DELETE FROM vanished WHERE user_id = $1", user_id)
            await conn.execute("DELETE FROM tokens WHERE user_id = $1", user_id)
            await conn.execute(
                "DELETE FROM user_addresses WHERE address = $1 AND user_id = $2", address, user_id
            )
            await conn.execute("DELETE FROM users WHERE user_id = $1", user_id)
            released = sorted({str(r[0]) for r in hashes})
            await _note_released(conn, released)
            return released

        return await self._write(tx)

    # -- aliases

    async def add_alias(self, alias: str, target: str) -> Alias:
        async def tx(conn: Connection) -> Alias:
            done = await conn.fetchval(
                "INSERT INTO aliases (alias, target) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                alias,
                target,
            )
            if done is None:
                raise Conflict(f"alias {alias} exists")
            return Alias(alias, target)

        return await self._write(tx)

    async def remove_alias(self, alias: str) -> None:
        async def tx(conn: Connection) -> None:
            done = await conn.fetchval("DELETE FROM aliases WHERE alias = $1 RETURNING 1", alias)
            if done is None:
                raise NotFound(f"no alias {alias}")

        await self._write(tx)

    async def list_aliases(self) -> list[Alias]:
        async def tx(conn: Connection) -> list[Alias]:
            rows = await conn.fetch('SELECT alias, target FROM aliases ORDER BY alias COLLATE "C"')
            return [Alias(str(r[0]), str(r[1])) for r in rows]

        return await self._read(tx)

    async def get_alias(self, alias: str) -> Alias | None:
        async def tx(conn: Connection) -> Alias | None:
            row = await conn.fetchrow("SELECT alias, target FROM aliases WHERE alias = $1", alias)
            return Alias(str(row[0]), str(row[1])) if row is not None else None

        return await self._read(tx)

    # -- tokens

    async def add_token(self, token: Token) -> None:
        async def tx(conn: Connection) -> None:
            # FOR SHARE: the user cannot be deleted under this token before it commits
            if (
                await conn.fetchval(
                    "SELECT 1 FROM users WHERE user_id = $1 FOR SHARE", token.user_id
                )
                is None
            ):
                raise NotFound(f"no user {token.user_id}")
            done = await conn.fetchval(
                "INSERT INTO tokens (token_hash, user_id, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                token.token_hash,
                token.user_id,
                token.expires_at,
            )
            if done is None:
                raise Conflict("token exists")

        await self._write(tx)

    async def get_token(self, token_hash: str) -> Token | None:
        """The stored token, expired or not: the caller compares expires_at with its clock."""

        async def tx(conn: Connection) -> Token | None:
            row = await conn.fetchrow(
                "SELECT token_hash, user_id, expires_at FROM tokens WHERE token_hash = $1",
                token_hash,
            )
            return Token(str(row[0]), str(row[1]), float(row[2])) if row is not None else None

        return await self._read(tx)

    async def delete_token(self, token_hash: str) -> None:
        """Revoke a token; revoking one that is already gone is not an error."""

        async def tx(conn: Connection) -> None:
            await conn.execute("DELETE FROM tokens WHERE token_hash = $1", token_hash)

        await self._write(tx)

    # -- folders

    async def create_folder(
        self, user_id: str, name: str, role: FolderRole | None = None
    ) -> Folder:
        async def tx(conn: Connection) -> Folder:
            # locks the user's row first: NotFound for no user, and folder creations queue
            (uidvalidity,) = await _next_uidvalidities(conn, user_id, 1)
            if await conn.fetchval(
                "SELECT 1 FROM folders WHERE user_id = $1 AND name = $2", user_id, name
            ):
                raise Conflict(f"folder {name} exists")
            if role is not None and await conn.fetchval(
                "SELECT 1 FROM folders WHERE user_id = $1 AND role = $2", user_id, role.value
            ):
                raise Conflict(f"a folder with role {role.value} exists")
            folder = Folder(user_id, new_id(), name, role, uidvalidity, 1, 1, True)
            await conn.execute(
                f"INSERT INTO folders ({_FOLDER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                user_id,
                folder.folder_id,
                name,
                role.value if role is not None else None,
                uidvalidity,
                folder.uidnext,
                folder.highestmodseq,
                True,
            )
            return folder

        return await self._write(tx)

    async def list_folders(self, user_id: str) -> list[Folder]:
        async def tx(conn: Connection) -> list[Folder]:
            rows = await conn.fetch(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = $1"
                ' ORDER BY name COLLATE "C"',
                user_id,
            )
            return [_folder(r) for r in rows]

        return await self._read(tx)

    async def get_folder(self, user_id: str, folder_id: str) -> Folder | None:
        async def tx(conn: Connection) -> Folder | None:
            return await _fetch_folder(conn, user_id, folder_id)

        return await self._read(tx)

    async def get_folder_by_name(self, user_id: str, name: str) -> Folder | None:
        async def tx(conn: Connection) -> Folder | None:
            row = await conn.fetchrow(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = $1 AND name = $2",
                user_id,
                name,
            )
            return _folder(row) if row is not None else None

        return await self._read(tx)

    async def get_folder_by_role(self, user_id: str, role: FolderRole) -> Folder | None:
        async def tx(conn: Connection) -> Folder | None:
            row = await conn.fetchrow(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = $1 AND role = $2",
                user_id,
                role.value,
            )
            return _folder(row) if row is not None else None

        return await self._read(tx)

    async def rename_folder(self, user_id: str, folder_id: str, new_name: str) -> Folder:
        """Rename the folder and its subtree (prefix replaced); each gets a new uidvalidity.

        Conflict when new_name, or any renamed child's new name, is taken by a folder outside
        the subtree, or when new_name lies inside the folder's own subtree.
        """

        async def tx(conn: Connection) -> Folder:
            # the user's row first (as create_folder does), then the folder
            await conn.execute("SELECT 1 FROM users WHERE user_id = $1 FOR UPDATE", user_id)
            folder = await _require_folder(conn, user_id, folder_id, lock=True)
            old = folder.name
            old_prefix = old + HIERARCHY_SEPARATOR
            if new_name == old or new_name.startswith(old_prefix):
                raise Conflict(f"cannot rename {old} to {new_name}")
            rows = await conn.fetch(
                f"SELECT {_FOLDER_COLUMNS} FROM folders"
                ' WHERE user_id = $1 AND starts_with(name, $2) ORDER BY name COLLATE "C"',
                user_id,
                old_prefix,
            )
            subtree = [folder, *map(_folder, rows)]
            renames = [(f, new_name + f.name[len(old) :]) for f in subtree]
            moving = {f.folder_id for f in subtree}
            taken = await conn.fetch(
                "SELECT folder_id FROM folders WHERE user_id = $1 AND name = ANY($2::text[])",
                user_id,
                [name for _, name in renames],
            )
            if any(str(r[0]) not in moving for r in taken):
                raise Conflict(f"a folder under the name {new_name} exists")
            validities = await _next_uidvalidities(conn, user_id, len(renames))
            # two passes, so no intermediate state trips UNIQUE(user_id, name); control
            # characters never appear in valid folder names (and PostgreSQL text has no NUL)
            await conn.executemany(
                "UPDATE folders SET name = $1 WHERE user_id = $2 AND folder_id = $3",
                [("\x01" + f.folder_id, user_id, f.folder_id) for f, _ in renames],
            )
            await conn.executemany(
                "UPDATE folders SET name = $1, uidvalidity = $2"
                " WHERE user_id = $3 AND folder_id = $4",
                [
                    (name, validity, user_id, f.folder_id)
                    for (f, name), validity in zip(renames, validities, strict=True)
                ],
            )
            return dc_replace(folder, name=new_name, uidvalidity=validities[0])

        return await self._write(tx)

    async def delete_folder(self, user_id: str, folder_id: str) -> list[Expunged]:
        """Remove the folder and its messages; Conflict while it has child folders."""

        async def tx(conn: Connection) -> list[Expunged]:
            # locking the folder first makes a concurrent delivery into it wait, then find
            # the folder gone (NotFound) instead of leaving a message behind
            folder = await _require_folder(conn, user_id, folder_id, lock=True)
            if await conn.fetchval(
                "SELECT 1 FROM folders WHERE user_id = $1 AND starts_with(name, $2) LIMIT 1",
                user_id,
                folder.name + HIERARCHY_SEPARATOR,
            ):
                raise Conflict(f"folder {folder.name} has child folders")
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user_id = $1 AND folder_id = $2 ORDER BY uid",
                user_id,
                folder_id,
            )
            gone = await _delete_records(conn, [_record(r) for r in rows])
            await conn.execute(
                "DELETE FROM folders WHERE user_id = $1 AND folder_id = $2", user_id, folder_id
            )
            await conn.execute(
                "DELETE FROM vanished WHERE user_id = $1 AND folder_id = $2", user_id, folder_id
            )
            return gone

        return await self._write(tx)

    async def set_subscribed(self, user_id: str, folder_id: str, subscribed: bool) -> None:
        async def tx(conn: Connection) -> None:
            done = await conn.fetchval(
                "UPDATE folders SET subscribed = $1 WHERE user_id = $2 AND folder_id = $3"
                " RETURNING 1",
                subscribed,
                user_id,
                folder_id,
            )
            if done is None:
                raise NotFound(f"no folder {folder_id} for user {user_id}")

        await self._write(tx)

    async def folder_counts(
        self, user_id: str, folder_id: str | None = None
    ) -> dict[str, FolderCounts]:
        async def tx(conn: Connection) -> dict[str, FolderCounts]:
            rows = await conn.fetch(
                "SELECT f.folder_id, count(m.message_id),"
                " count(m.message_id) FILTER (WHERE m.sysflags & $1 = 0)"
                " FROM folders AS f LEFT JOIN messages AS m"
                " ON m.user_id = f.user_id AND m.folder_id = f.folder_id"
                " WHERE f.user_id = $2 AND ($3::text IS NULL OR f.folder_id = $3)"
                " GROUP BY f.folder_id",
                int(Flag.SEEN),
                user_id,
                folder_id,
            )
            return {str(r[0]): FolderCounts(int(r[1]), int(r[2])) for r in rows}

        return await self._read(tx)

    # -- messages

    async def insert_message(
        self,
        user_id: str,
        folder_id: str,
        message: NewMessage,
        delivery_key: str | None = None,
    ) -> tuple[MessageRecord, bool]:
        """File a message: allocate uid and modseq, resolve its thread, count a blob reference.

        With a delivery_key, the key is recorded in the same transaction. A second insert with
        the same key never files a second copy: it returns (the first record, False) while that
        record exists (wherever it was moved), and raises Conflict("already delivered") if it
        has since been expunged.
        """

        async def tx(conn: Connection) -> tuple[MessageRecord, bool]:
            return await _file_message(conn, user_id, folder_id, message, delivery_key)

        return await self._write(tx)

    async def insert_messages(
        self, deliveries: Sequence[Delivery]
    ) -> list[tuple[MessageRecord, bool] | None]:
        """Every delivery's `insert_message` in one transaction (one commit).

        They are filed in (user, folder) order, which keeps the input order within a folder:
        batches on several nodes then take their folder row locks in the same order and
        cannot deadlock on them. Results come back in the order given.
        """
        batch = list(deliveries)
        order = sorted(range(len(batch)), key=lambda i: (batch[i].user_id, batch[i].folder_id))

        async def tx(conn: Connection) -> list[tuple[MessageRecord, bool] | None]:
            out: list[tuple[MessageRecord, bool] | None] = [None] * len(batch)
            for i in order:
                d = batch[i]
                try:
                    out[i] = await _file_message(conn, d.user_id, d.folder_id, d.message,
                                                 d.delivery_key)
                except Conflict:  # our own check, no statement failed: the transaction holds
                    out[i] = None
            return out

        return await self._write(tx) if batch else []

    async def get_message(self, user_id: str, message_id: str) -> MessageRecord | None:
        found = await self.get_messages(user_id, [message_id])
        return found[0] if found else None

    async def get_messages(self, user_id: str, message_ids: Sequence[str]) -> list[MessageRecord]:
        """The user's records among message_ids, in the order given (others' ids skipped)."""
        ids = list(message_ids)

        async def tx(conn: Connection) -> list[MessageRecord]:
            return await _fetch_records(conn, user_id, ids)

        return await self._read(tx)

    async def list_messages(
        self,
        user_id: str,
        folder_id: str,
        limit: int,
        before: ListCursor | None = None,
    ) -> list[MessageRecord]:
        async def tx(conn: Connection) -> list[MessageRecord]:
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 AND folder_id = $2"
            params: list[object] = [user_id, folder_id]
            if before is not None:
                sql += " AND (internal_date, uid) < ($3, $4)"
                params += [before.internal_date, before.uid]
            sql += f" ORDER BY internal_date DESC, uid DESC LIMIT ${len(params) + 1}"
            params.append(max(limit, 0))
            return [_record(r) for r in await conn.fetch(sql, *params)]

        return await self._read(tx)

    async def list_uids(self, user_id: str, folder_id: str) -> list[MessageRecord]:
        async def tx(conn: Connection) -> list[MessageRecord]:
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user_id = $1 AND folder_id = $2 ORDER BY uid",
                user_id,
                folder_id,
            )
            return [_record(r) for r in rows]

        return await self._read(tx)

    async def list_thread(
        self, user_id: str, thread_id: str, limit: int = 500
    ) -> list[MessageRecord]:
        async def tx(conn: Connection) -> list[MessageRecord]:
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = $1 AND thread_id = $2"
                " ORDER BY internal_date, folder_id, uid LIMIT $3",
                user_id,
                thread_id,
                max(limit, 0),
            )
            return [_record(r) for r in rows]

        return await self._read(tx)

    async def store_flags(
        self,
        user_id: str,
        message_ids: Sequence[str],
        add: Flags | None = None,
        remove: Flags | None = None,
        replace: Flags | None = None,
        unchanged_since: int | None = None,
    ) -> list[MessageRecord]:
        """Change flags: replace (if given), then add, then remove.

        Records whose flags actually change all get the same new modseq per folder, the
        folder's highestmodseq + 1 (RFC 7162 §3.1 allows several messages to share one).
        With unchanged_since (CONDSTORE), records whose modseq is above it are left alone
        (RFC 7162 §3.1.3); the caller reports those as MODIFIED. Only changed records are
        returned, in the order given.
        """
        ids = list(message_ids)

        async def tx(conn: Connection) -> list[MessageRecord]:
            changed: list[MessageRecord] = []
            for rec in await _fetch_records(conn, user_id, ids, lock=True):
                if unchanged_since is not None and rec.modseq > unchanged_since:
                    continue
                flags = rec.flags if replace is None else _normal_flags(replace)
                if add is not None:
                    flags = flags.union(add)
                if remove is not None:
                    flags = flags.difference(remove)
                flags = _normal_flags(flags)
                if flags != rec.flags:
                    changed.append(dc_replace(rec, flags=flags))
            if not changed:
                return []
            modseqs = await _bump_modseqs(conn, user_id, (r.folder_id for r in changed))
            changed = [dc_replace(r, modseq=modseqs[r.folder_id]) for r in changed]
            await conn.executemany(
                "UPDATE messages SET sysflags = $1, keywords = $2, modseq = $3"
                " WHERE user_id = $4 AND message_id = $5",
                [
                    (
                        int(r.flags.system),
                        " ".join(r.flags.keywords),
                        r.modseq,
                        user_id,
                        r.message_id,
                    )
                    for r in changed
                ],
            )
            return changed

        return await self._write(tx)

    async def move_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[tuple[Expunged, MessageRecord]]:
        """Move (RFC 6851): each message keeps its message_id, gets a new uid in the target.

        Target uids are allocated in the order given and share one new modseq; each source
        folder's highestmodseq is bumped once (the Expunged modseq). NotFound if the target
        is not the user's folder; ids that are not the user's are skipped.
        """
        ids = list(message_ids)

        async def tx(conn: Connection) -> list[tuple[Expunged, MessageRecord]]:
            await _require_folder(conn, user_id, target_folder_id)
            records = await _fetch_records(conn, user_id, ids, lock=True)
            if not records:
                return []
            sources = _unique(r.folder_id for r in records)
            await _lock_folders(conn, user_id, [*sources, target_folder_id])
            source_modseqs = await _bump_modseqs(conn, user_id, sources)
            first_uid, modseq = await _allocate_uids(conn, user_id, target_folder_id, len(records))
            out: list[tuple[Expunged, MessageRecord]] = []
            for i, rec in enumerate(records):
                moved = dc_replace(
                    rec, folder_id=target_folder_id, uid=first_uid + i, modseq=modseq
                )
                gone = Expunged(
                    rec.folder_id,
                    rec.uid,
                    rec.message_id,
                    rec.blob_hash,
                    source_modseqs[rec.folder_id],
                )
                out.append((gone, moved))
            await conn.executemany(
                "UPDATE messages SET folder_id = $1, uid = $2, modseq = $3"
                " WHERE user_id = $4 AND message_id = $5",
                [(m.folder_id, m.uid, m.modseq, user_id, m.message_id) for _, m in out],
            )
            await _log_vanished(conn, user_id, [(g.folder_id, g.uid, g.modseq) for g, _ in out])
            return out

        return await self._write(tx)

    async def copy_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[MessageRecord]:
        """Copy: new message_id and uid in the target, same flags, thread and blob (+1 ref)."""
        ids = list(message_ids)

        async def tx(conn: Connection) -> list[MessageRecord]:
            await _require_folder(conn, user_id, target_folder_id)
            records = await _fetch_records(conn, user_id, ids)
            if not records:
                return []
            first_uid, modseq = await _allocate_uids(conn, user_id, target_folder_id, len(records))
            copies = [
                dc_replace(
                    rec,
                    message_id=new_id(),
                    folder_id=target_folder_id,
                    uid=first_uid + i,
                    modseq=modseq,
                )
                for i, rec in enumerate(records)
            ]
            await _insert_records(conn, copies)
            return copies

        return await self._write(tx)

    async def expunge(self, user_id: str, message_ids: Sequence[str]) -> list[Expunged]:
        """Remove the user's records among message_ids (others skipped), in the order given."""
        ids = list(message_ids)

        async def tx(conn: Connection) -> list[Expunged]:
            return await _delete_records(conn, await _fetch_records(conn, user_id, ids, lock=True))

        return await self._write(tx)

    async def vanished(self, user_id: str, folder_id: str, since_modseq: int) -> list[int]:
        async def tx(conn: Connection) -> list[int]:
            rows = await conn.fetch(
                "SELECT uid FROM vanished WHERE user_id = $1 AND folder_id = $2 AND modseq > $3"
                " ORDER BY uid",
                user_id,
                folder_id,
                since_modseq,
            )
            return [int(r[0]) for r in rows]

        return await self._read(tx)

    # -- blob references

    async def blob_refcount(self, blob_hash: str) -> int:
        """How many message records name the blob, across all users (the blob collector's
        question; on Citus it visits every shard, through messages_by_blob)."""

        async def tx(conn: Connection) -> int:
            return int(
                await conn.fetchval("SELECT count(*) FROM messages WHERE blob_hash = $1", blob_hash)
            )

        return await self._read(tx)

    async def released_blobs(self, before: float, limit: int = 1000) -> list[str]:
        async def tx(conn: Connection) -> list[str]:
            rows = await conn.fetch(
                "SELECT blob_hash FROM blob_released WHERE released_at < $1"
                " ORDER BY released_at LIMIT $2", before, max(limit, 0))
            return [str(r[0]) for r in rows]

        return await self._read(tx)

    async def note_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        async def tx(conn: Connection) -> None:
            await _note_released(conn, blob_hashes)

        await self._write(tx)

    async def forget_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        async def tx(conn: Connection) -> None:
            await conn.execute("DELETE FROM blob_released WHERE blob_hash = ANY($1::text[])",
                               list(blob_hashes))

        await self._write(tx)

    # -- spam filtering (spam.py's rows; reputation is service-wide, the rest keyed by user)

    async def get_reputation(self, subjects: Sequence[str]) -> dict[str, Reputation]:
        wanted = list(dict.fromkeys(subjects))

        async def tx(conn: Connection) -> dict[str, Reputation]:
            rows = await conn.fetch(
                "SELECT subject, ham, spam, updated_at FROM spam_reputation"
                " WHERE subject = ANY($1::text[])", wanted)
            return {str(r[0]): Reputation(str(r[0]), float(r[1]), float(r[2]), float(r[3]))
                    for r in rows}

        return await self._read(tx) if wanted else {}

    async def add_reputation(
        self, subjects: Sequence[str], *, ham: float, spam: float, now: float, half_life: float
    ) -> None:
        wanted = sorted(set(subjects))  # a fixed order: concurrent updates cannot deadlock

        async def tx(conn: Connection) -> None:
            await conn.executemany(
                "INSERT INTO spam_reputation AS r (subject, ham, spam, updated_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (subject) DO UPDATE SET"
                " ham = r.ham * power(0.5, greatest(0.0, $4 - r.updated_at) / $5) + $2,"
                " spam = r.spam * power(0.5, greatest(0.0, $4 - r.updated_at) / $5) + $3,"
                " updated_at = greatest(r.updated_at, $4)",
                [(s, ham, spam, now, half_life if half_life > 0 else float("inf"))
                 for s in wanted])

        if wanted:
            await self._write(tx)

    async def set_list_entry(self, user_id: str, value: str, action: str) -> None:
        async def tx(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO spam_lists (user_id, value, action, created_at)"
                " VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (user_id, value) DO UPDATE SET action = EXCLUDED.action",
                user_id, value, action, time.time())

        await self._write(tx)

    async def remove_list_entry(self, user_id: str, value: str) -> bool:
        async def tx(conn: Connection) -> bool:
            done = await conn.fetchval(
                "DELETE FROM spam_lists WHERE user_id = $1 AND value = $2 RETURNING 1",
                user_id, value)
            return done is not None

        return await self._write(tx)

    async def list_entries(self, user_id: str) -> list[ListEntry]:
        async def tx(conn: Connection) -> list[ListEntry]:
            rows = await conn.fetch(
                "SELECT user_id, value, action FROM spam_lists WHERE user_id = $1"
                " ORDER BY value COLLATE \"C\"", user_id)
            return [ListEntry(str(r[0]), str(r[1]), str(r[2])) for r in rows]

        return await self._read(tx)

    async def match_list_entries(
        self, user_ids: Sequence[str], values: Sequence[str]
    ) -> list[ListEntry]:
        users = list(dict.fromkeys(user_ids))
        wanted = list(dict.fromkeys(values))

        async def tx(conn: Connection) -> list[ListEntry]:
            rows = await conn.fetch(
                "SELECT user_id, value, action FROM spam_lists"
                " WHERE user_id = ANY($1::text[]) AND value = ANY($2::text[])", users, wanted)
            return [ListEntry(str(r[0]), str(r[1]), str(r[2])) for r in rows]

        return await self._read(tx) if users and wanted else []

    async def add_contacts(self, user_id: str, addresses: Sequence[str], now: float) -> None:
        wanted = sorted(set(addresses))

        async def tx(conn: Connection) -> None:
            await conn.executemany(
                "INSERT INTO contacts (user_id, address, last_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (user_id, address) DO UPDATE SET last_at = EXCLUDED.last_at",
                [(user_id, a, now) for a in wanted])

        if wanted:
            await self._write(tx)

    async def known_contacts(self, user_id: str, addresses: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(addresses))

        async def tx(conn: Connection) -> set[str]:
            rows = await conn.fetch(
                "SELECT address FROM contacts WHERE user_id = $1 AND address = ANY($2::text[])",
                user_id, wanted)
            return {str(r[0]) for r in rows}

        return await self._read(tx) if wanted else set()

    async def get_spam_model(self, user_id: str) -> bytes | None:
        async def tx(conn: Connection) -> bytes | None:
            value = await conn.fetchval("SELECT model FROM spam_models WHERE user_id = $1",
                                        user_id)
            return bytes(value) if value is not None else None

        return await self._read(tx)

    async def put_spam_model(self, user_id: str, model: bytes, now: float) -> None:
        async def tx(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO spam_models (user_id, model, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (user_id) DO UPDATE SET model = EXCLUDED.model,"
                " updated_at = EXCLUDED.updated_at", user_id, model, now)

        await self._write(tx)

    async def record_send(self, user_id: str, recipients: int, now: float) -> None:
        async def tx(conn: Connection) -> None:
            await conn.execute("DELETE FROM send_log WHERE user_id = $1 AND sent_at < $2",
                               user_id, now - 86400.0)
            await conn.execute(
                "INSERT INTO send_log (user_id, entry_id, sent_at, recipients)"
                " VALUES ($1, $2, $3, $4)", user_id, new_id(), now, recipients)

        await self._write(tx)

    async def send_totals(self, user_id: str, since: float) -> tuple[int, int]:
        async def tx(conn: Connection) -> tuple[int, int]:
            row = await conn.fetchrow(
                "SELECT count(*), COALESCE(sum(recipients), 0) FROM send_log"
                " WHERE user_id = $1 AND sent_at >= $2", user_id, since)
            return int(row[0]), int(row[1])

        return await self._read(tx)


def _redacted(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    scheme, sep, rest = dsn.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at:
        return dsn
    return f"{scheme}://{creds.partition(':')[0]}@{host}"
