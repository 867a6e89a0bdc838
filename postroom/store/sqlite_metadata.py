"""The embedded metadata store: one SQLite file in WAL mode (`postroom/store/sqlite_file.py`
has its concurrency and durability model: small writes on the event loop, group commit).

Several processes may open the same file (the CLI adds a user while the server runs): uids and
modseqs are allocated by an atomic ``UPDATE folders ... RETURNING`` inside the write
transaction, never by an in-process counter, so two writers can never hand out the same uid.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace as dc_replace
from typing import Any, ParamSpec, TypeVar

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
    flag_of,
)
from postroom.store.errors import Conflict, NotFound
from postroom.store.metadata import (
    Delivery,
    Expunged,
    ListCursor,
    ListEntry,
    Reputation,
    Token,
)
from postroom.store.migrations import migrate_sqlite
from postroom.store.sqlite_file import SqliteFile

P = ParamSpec("P")
T = TypeVar("T")


# The schema lives in postroom/store/migrations (step 1 is the first release's); every table that
# belongs to a user has user_id first in its key (DESIGN.md §3).

_MESSAGE_COLUMNS = (
    "user_id, message_id, folder_id, uid, modseq, sysflags, keywords, internal_date, size, "
    "blob_hash, from_, to_, cc, bcc, subject, date, header_message_id, in_reply_to, refs, "
    "snippet, has_attachments, thread_id, spam_verdict"
)
_MESSAGE_PLACEHOLDERS = ", ".join("?" * len(_MESSAGE_COLUMNS.split(", ")))
_FOLDER_COLUMNS = "user_id, folder_id, name, role, uidvalidity, uidnext, highestmodseq, subscribed"
_USER_COLUMNS = "user_id, address, password_hash, created_at, quota_bytes"


# ---- row conversion ----------------------------------------------------------------------


def _normal_flags(flags: Flags) -> Flags:
    """Keywords sorted and unique, so two equal flag sets compare equal."""
    return Flags(Flag(int(flags.system)), tuple(sorted(set(flags.keywords))))


def _user(row: sqlite3.Row) -> User:
    return User(
        user_id=str(row["user_id"]),
        address=str(row["address"]),
        password_hash=str(row["password_hash"]),
        created_at=float(row["created_at"]),
        quota_bytes=int(row["quota_bytes"]),
    )


def _folder(row: Sequence[Any]) -> Folder:
    """A folder row selected as _FOLDER_COLUMNS, read by position (see _record)."""
    user_id, folder_id, name, role, uidvalidity, uidnext, highestmodseq, subscribed = row
    return Folder(
        user_id=str(user_id),
        folder_id=str(folder_id),
        name=str(name),
        role=FolderRole(role) if role is not None else None,
        uidvalidity=int(uidvalidity),
        uidnext=int(uidnext),
        highestmodseq=int(highestmodseq),
        subscribed=bool(subscribed),
    )


def _record(row: Sequence[Any]) -> MessageRecord:
    """A message row selected as _MESSAGE_COLUMNS, read by position: sqlite3.Row's lookup by
    name compares the column names one by one, which made this cost twice as much."""
    (user_id, message_id, folder_id, uid, modseq, sysflags, keywords, internal_date, size,
     blob_hash, from_, to, cc, bcc, subject, date, header_message_id, in_reply_to, refs,
     snippet, has_attachments, thread_id, spam_verdict) = row
    return MessageRecord(
        user_id=str(user_id),
        message_id=str(message_id),
        folder_id=str(folder_id),
        uid=int(uid),
        modseq=int(modseq),
        flags=Flags(flag_of(int(sysflags)),
                    tuple(str(keywords).split()) if keywords else ()),
        internal_date=float(internal_date),
        size=int(size),
        blob_hash=str(blob_hash),
        headers=HeaderSummary(
            from_=str(from_),
            to=str(to),
            cc=str(cc),
            bcc=str(bcc),
            subject=str(subject),
            date=float(date) if date is not None else None,
            message_id=str(header_message_id),
            in_reply_to=str(in_reply_to),
            references=() if refs == "[]" else tuple(str(r) for r in json.loads(str(refs))),
        ),
        snippet=str(snippet),
        has_attachments=bool(has_attachments),
        thread_id=str(thread_id),
        spam_verdict=str(spam_verdict),
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
        json.dumps(list(h.references)),
        rec.snippet,
        int(rec.has_attachments),
        rec.thread_id,
        rec.spam_verdict,
    )


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2]


# ---- statements shared by several transactions --------------------------------------------


def _fetch_records(
    conn: sqlite3.Connection, user_id: str, message_ids: Sequence[str]
) -> list[MessageRecord]:
    """The user's records among message_ids, in the order given; others' ids are skipped."""
    ids = _unique(message_ids)
    if not ids:
        return []
    if len(ids) == 1:  # a point read: the primary key, without json_each
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = ? AND message_id = ?",
            (user_id, ids[0]),
        ).fetchone()
        return [_record(row)] if row is not None else []
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages"
        " WHERE user_id = ? AND message_id IN (SELECT value FROM json_each(?))",
        (user_id, json.dumps(ids)),
    ).fetchall()
    by_id = {str(row[1]): _record(row) for row in rows}
    return [by_id[i] for i in ids if i in by_id]


def _fetch_folder(conn: sqlite3.Connection, user_id: str, folder_id: str) -> Folder | None:
    row = conn.execute(
        f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = ? AND folder_id = ?",
        (user_id, folder_id),
    ).fetchone()
    return _folder(row) if row is not None else None


def _require_folder(conn: sqlite3.Connection, user_id: str, folder_id: str) -> Folder:
    folder = _fetch_folder(conn, user_id, folder_id)
    if folder is None:
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return folder


def _allocate_uids(
    conn: sqlite3.Connection, user_id: str, folder_id: str, count: int
) -> tuple[int, int]:
    """Reserve `count` uids and one new modseq in the folder: (first uid, modseq).

    The atomic UPDATE inside the write transaction is the only uid allocator (DESIGN.md §3).
    """
    row = conn.execute(
        "UPDATE folders SET uidnext = uidnext + ?, highestmodseq = highestmodseq + 1"
        " WHERE user_id = ? AND folder_id = ? RETURNING uidnext, highestmodseq",
        (count, user_id, folder_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return int(row[0]) - count, int(row[1])


def _bump_modseq(conn: sqlite3.Connection, user_id: str, folder_id: str) -> int:
    row = conn.execute(
        "UPDATE folders SET highestmodseq = highestmodseq + 1"
        " WHERE user_id = ? AND folder_id = ? RETURNING highestmodseq",
        (user_id, folder_id),
    ).fetchone()
    if row is None:  # the record's folder vanished: cannot happen under the foreign key
        raise NotFound(f"no folder {folder_id} for user {user_id}")
    return int(row[0])


def _next_uidvalidities(conn: sqlite3.Connection, user_id: str, count: int) -> list[int]:
    """Fresh uidvalidities for the user's folders, never reused (RFC 3501 §2.3.1.1).

    Each is at least the current time and above every one handed out before, so a folder
    deleted and recreated (or renamed) within one second still gets a new value.
    """
    row = conn.execute(
        "SELECT last_uidvalidity FROM users WHERE user_id = ?", (user_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no user {user_id}")
    first = max(int(time.time()), int(row[0]) + 1)
    values = [first + i for i in range(count)]
    conn.execute("UPDATE users SET last_uidvalidity = ? WHERE user_id = ?", (values[-1], user_id))
    return values


def _add_blob_refs(conn: sqlite3.Connection, hashes: Iterable[str]) -> None:
    conn.executemany(
        "INSERT INTO blob_refs (blob_hash, refcount) VALUES (?, ?)"
        " ON CONFLICT (blob_hash) DO UPDATE SET refcount = refcount + excluded.refcount",
        list(Counter(hashes).items()),
    )


def _release_blob_refs(conn: sqlite3.Connection, hashes: Iterable[str]) -> None:
    counts = list(Counter(hashes).items())
    conn.executemany(
        "UPDATE blob_refs SET refcount = refcount - ? WHERE blob_hash = ?",
        [(n, h) for h, n in counts],
    )
    # no row means no reference: the blob collector may take it (blob_released says since when)
    gone = [(h,) for h, _ in counts]
    now = time.time()
    conn.executemany(
        "INSERT INTO blob_released (blob_hash, released_at)"
        " SELECT blob_hash, ? FROM blob_refs WHERE blob_hash = ? AND refcount <= 0"
        " ON CONFLICT (blob_hash) DO UPDATE SET released_at = excluded.released_at",
        [(now, h) for h, _ in counts],
    )
    conn.executemany("DELETE FROM blob_refs WHERE blob_hash = ? AND refcount <= 0", gone)


def _insert_record(conn: sqlite3.Connection, rec: MessageRecord) -> None:
    conn.execute(
        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_PLACEHOLDERS})",
        _record_params(rec),
    )
    refs = _unique(r for r in (rec.headers.in_reply_to, *rec.headers.references) if r)
    conn.executemany(
        "INSERT OR IGNORE INTO message_refs (user_id, ref, message_id) VALUES (?, ?, ?)",
        [(rec.user_id, ref, rec.message_id) for ref in refs],
    )


def _file_message(
    conn: sqlite3.Connection,
    user_id: str,
    folder_id: str,
    message: NewMessage,
    delivery_key: str | None,
) -> tuple[MessageRecord, bool]:
    """The body of `insert_message`'s transaction (and of each of `insert_messages`)."""
    if delivery_key is not None:
        row = conn.execute(
            "SELECT message_id FROM deliveries WHERE user_id = ? AND delivery_key = ?",
            (user_id, delivery_key),
        ).fetchone()
        if row is not None:
            found = _fetch_records(conn, user_id, [str(row[0])])
            if found:
                return found[0], False
            raise Conflict("already delivered")
    uid, modseq = _allocate_uids(conn, user_id, folder_id, 1)
    record = MessageRecord(
        user_id=user_id,
        message_id=new_id(),
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
        thread_id=_resolve_thread(conn, user_id, message.headers),
        spam_verdict=message.spam_verdict,
    )
    _insert_record(conn, record)
    _add_blob_refs(conn, [record.blob_hash])
    if delivery_key is not None:
        conn.execute(
            "INSERT INTO deliveries (user_id, delivery_key, message_id) VALUES (?, ?, ?)",
            (user_id, delivery_key, record.message_id),
        )
    return record, True


def _resolve_thread(conn: sqlite3.Connection, user_id: str, headers: HeaderSummary) -> str:
    """The conversation a new message belongs to, looked up only among the user's own mail.

    First its ancestors: the parent (In-Reply-To), then References from nearest to root
    (RFC 5322 §3.6.4 lists them root first); then another copy of the same message (the Sent
    copy of a message that also came back through a list). Failing that, a message already
    filed that names this one as an ancestor: the parent arrived after its replies. Otherwise
    a new thread.
    """
    own = headers.message_id
    ancestors = _unique(
        r for r in (headers.in_reply_to, *reversed(headers.references)) if r and r != own
    )
    if own:
        ancestors.append(own)
    if ancestors:
        rows = conn.execute(
            "SELECT header_message_id, thread_id FROM messages"
            " WHERE user_id = ? AND header_message_id IN (SELECT value FROM json_each(?))"
            " ORDER BY internal_date, uid",
            (user_id, json.dumps(ancestors)),
        ).fetchall()
        found: dict[str, str] = {}
        for row in rows:
            found.setdefault(str(row[0]), str(row[1]))
        for ref in ancestors:
            if ref in found:
                return found[ref]
    if own:
        row = conn.execute(
            "SELECT m.thread_id FROM message_refs AS r"
            " JOIN messages AS m ON m.user_id = r.user_id AND m.message_id = r.message_id"
            " WHERE r.user_id = ? AND r.ref = ?"
            " ORDER BY m.internal_date, m.uid LIMIT 1",
            (user_id, own),
        ).fetchone()
        if row is not None:
            return str(row[0])
    return new_id()


def _delete_records(conn: sqlite3.Connection, records: Sequence[MessageRecord]) -> list[Expunged]:
    """Remove records (already known to be the user's); one modseq bump per source folder."""
    if not records:
        return []
    user_id = records[0].user_id
    modseqs = {
        folder_id: _bump_modseq(conn, user_id, folder_id)
        for folder_id in _unique(r.folder_id for r in records)
    }
    conn.executemany(
        "DELETE FROM messages WHERE user_id = ? AND message_id = ?",
        [(r.user_id, r.message_id) for r in records],
    )
    _release_blob_refs(conn, (r.blob_hash for r in records))
    _log_vanished(conn, user_id, [(r.folder_id, r.uid, modseqs[r.folder_id]) for r in records])
    return [
        Expunged(r.folder_id, r.uid, r.message_id, r.blob_hash, modseqs[r.folder_id])
        for r in records
    ]


def _log_vanished(
    conn: sqlite3.Connection, user_id: str, gone: Sequence[tuple[str, int, int]]
) -> None:
    """Note (folder, uid, modseq) of records that left a folder, for QRESYNC."""
    conn.executemany(
        "INSERT OR IGNORE INTO vanished (user_id, folder_id, uid, modseq) VALUES (?, ?, ?, ?)",
        [(user_id, f, u, m) for f, u, m in gone],
    )


# Turns of the event loop a small write waits for another process's write lock before it goes
# to the writer thread to wait there.
class SqliteMetadataStore(SqliteFile):
    """MetadataStore on one SQLite file (WAL), safe for several processes on the same file."""

    _name = "metadata store"
    _thread_prefix = "postroom-meta"

    def _migrate(self, conn: sqlite3.Connection) -> None:
        migrate_sqlite(conn, where=self.path)

    # -- domains

    async def add_domain(self, name: str) -> Domain:
        def tx(conn: sqlite3.Connection) -> Domain:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"domain {name} exists")
            domain = Domain(name, time.time())
            conn.execute(
                "INSERT INTO domains (name, created_at) VALUES (?, ?)", (name, domain.created_at)
            )
            return domain

        return await self._write(tx)

    async def remove_domain(self, name: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if not conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no domain {name}")
            if _users_of_domain(conn, name):
                raise Conflict(f"domain {name} still has users")
            conn.execute("DELETE FROM domains WHERE name = ?", (name,))

        await self._write(tx)

    async def list_domains(self) -> list[Domain]:
        def tx(conn: sqlite3.Connection) -> list[Domain]:
            rows = conn.execute("SELECT name, created_at FROM domains ORDER BY name").fetchall()
            return [Domain(str(r[0]), float(r[1])) for r in rows]

        return await self._read(tx)

    async def has_domain(self, name: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is not None
            )

        return await self._read(tx)

    # -- users

    async def create_user(self, address: str, password_hash: str) -> User:
        def tx(conn: sqlite3.Connection) -> User:
            if conn.execute("SELECT 1 FROM users WHERE address = ?", (address,)).fetchone():
                raise Conflict(f"address {address} is taken")
            user = User(new_id(), address, password_hash, time.time())
            conn.execute(
                f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (user.user_id, address, password_hash, user.created_at, user.quota_bytes),
            )
            return user

        return await self._write(tx)

    async def get_user(self, user_id: str) -> User | None:
        def tx(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
            return _user(row) if row is not None else None

        return await self._read_now(tx)  # one indexed row

    async def get_user_by_address(self, address: str) -> User | None:
        def tx(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE address = ?", (address,)
            ).fetchone()
            return _user(row) if row is not None else None

        return await self._read_now(tx)  # one indexed row

    async def list_users(self, domain: str | None = None) -> list[User]:
        def tx(conn: sqlite3.Connection) -> list[User]:
            if domain is not None:
                return _users_of_domain(conn, domain)
            rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY address").fetchall()
            return [_user(r) for r in rows]

        return await self._read(tx)

    async def set_password(self, user_id: str, password_hash: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no user {user_id}")

        await self._write(tx)

    async def delete_user(self, user_id: str) -> list[str]:
        """Remove the user with folders, messages, tokens and delivery keys.

        Returns each distinct blob hash that lost at least one reference; the caller collects
        those whose refcount is now zero.
        """

        def tx(conn: sqlite3.Connection) -> list[str]:
            if not conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone():
                raise NotFound(f"no user {user_id}")
            hashes = [
                str(r[0])
                for r in conn.execute(
                    "SELECT blob_hash FROM messages WHERE user_id = ?", (user_id,)
                )
            ]
            conn.execute("DELETE FROM message_refs WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM messages WHERE user_id = ?", (user_id,))
            _release_blob_refs(conn, hashes)
            conn.execute("DELETE FROM deliveries WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM folders WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM vanished WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            return sorted(set(hashes))

        return await self._write_big(tx)

    # -- aliases

    async def add_alias(self, alias: str, target: str) -> Alias:
        def tx(conn: sqlite3.Connection) -> Alias:
            if conn.execute("SELECT 1 FROM aliases WHERE alias = ?", (alias,)).fetchone():
                raise Conflict(f"alias {alias} exists")
            conn.execute("INSERT INTO aliases (alias, target) VALUES (?, ?)", (alias, target))
            return Alias(alias, target)

        return await self._write(tx)

    async def remove_alias(self, alias: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount == 0:
                raise NotFound(f"no alias {alias}")

        await self._write(tx)

    async def list_aliases(self) -> list[Alias]:
        def tx(conn: sqlite3.Connection) -> list[Alias]:
            rows = conn.execute("SELECT alias, target FROM aliases ORDER BY alias").fetchall()
            return [Alias(str(r[0]), str(r[1])) for r in rows]

        return await self._read(tx)

    async def get_alias(self, alias: str) -> Alias | None:
        def tx(conn: sqlite3.Connection) -> Alias | None:
            row = conn.execute(
                "SELECT alias, target FROM aliases WHERE alias = ?", (alias,)
            ).fetchone()
            return Alias(str(row[0]), str(row[1])) if row is not None else None

        return await self._read(tx)

    # -- tokens

    async def add_token(self, token: Token) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if not conn.execute(
                "SELECT 1 FROM users WHERE user_id = ?", (token.user_id,)
            ).fetchone():
                raise NotFound(f"no user {token.user_id}")
            if conn.execute(
                "SELECT 1 FROM tokens WHERE token_hash = ?", (token.token_hash,)
            ).fetchone():
                raise Conflict("token exists")
            conn.execute(
                "INSERT INTO tokens (token_hash, user_id, expires_at) VALUES (?, ?, ?)",
                (token.token_hash, token.user_id, token.expires_at),
            )

        await self._write(tx)

    async def get_token(self, token_hash: str) -> Token | None:
        """The stored token, expired or not: the caller compares expires_at with its clock."""

        def tx(conn: sqlite3.Connection) -> Token | None:
            row = conn.execute(
                "SELECT token_hash, user_id, expires_at FROM tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return Token(str(row[0]), str(row[1]), float(row[2])) if row is not None else None

        return await self._read_now(tx)  # one indexed row

    async def delete_token(self, token_hash: str) -> None:
        """Revoke a token; revoking one that is already gone is not an error."""

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM tokens WHERE token_hash = ?", (token_hash,))

        await self._write(tx)

    # -- folders

    async def create_folder(
        self, user_id: str, name: str, role: FolderRole | None = None
    ) -> Folder:
        def tx(conn: sqlite3.Connection) -> Folder:
            (uidvalidity,) = _next_uidvalidities(conn, user_id, 1)  # NotFound for no user
            if conn.execute(
                "SELECT 1 FROM folders WHERE user_id = ? AND name = ?", (user_id, name)
            ).fetchone():
                raise Conflict(f"folder {name} exists")
            if (
                role is not None
                and conn.execute(
                    "SELECT 1 FROM folders WHERE user_id = ? AND role = ?", (user_id, role.value)
                ).fetchone()
            ):
                raise Conflict(f"a folder with role {role.value} exists")
            folder = Folder(user_id, new_id(), name, role, uidvalidity, 1, 1, True)
            conn.execute(
                f"INSERT INTO folders ({_FOLDER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    folder.folder_id,
                    name,
                    role.value if role is not None else None,
                    uidvalidity,
                    folder.uidnext,
                    folder.highestmodseq,
                    1,
                ),
            )
            return folder

        return await self._write(tx)

    async def list_folders(self, user_id: str) -> list[Folder]:
        def tx(conn: sqlite3.Connection) -> list[Folder]:
            rows = conn.execute(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = ? ORDER BY name",
                (user_id,),
            ).fetchall()
            return [_folder(r) for r in rows]

        return await self._read_now(tx)

    async def get_folder(self, user_id: str, folder_id: str) -> Folder | None:
        return await self._read_now(_fetch_folder, user_id, folder_id)

    async def get_folder_by_name(self, user_id: str, name: str) -> Folder | None:
        def tx(conn: sqlite3.Connection) -> Folder | None:
            row = conn.execute(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = ? AND name = ?",
                (user_id, name),
            ).fetchone()
            return _folder(row) if row is not None else None

        return await self._read_now(tx)

    async def get_folder_by_role(self, user_id: str, role: FolderRole) -> Folder | None:
        def tx(conn: sqlite3.Connection) -> Folder | None:
            row = conn.execute(
                f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE user_id = ? AND role = ?",
                (user_id, role.value),
            ).fetchone()
            return _folder(row) if row is not None else None

        return await self._read_now(tx)

    async def rename_folder(self, user_id: str, folder_id: str, new_name: str) -> Folder:
        """Rename the folder and its subtree (prefix replaced); each gets a new uidvalidity.

        Conflict when new_name, or any renamed child's new name, is taken by a folder outside
        the subtree, or when new_name lies inside the folder's own subtree.
        """

        def tx(conn: sqlite3.Connection) -> Folder:
            folder = _require_folder(conn, user_id, folder_id)
            old = folder.name
            old_prefix = old + HIERARCHY_SEPARATOR
            if new_name == old or new_name.startswith(old_prefix):
                raise Conflict(f"cannot rename {old} to {new_name}")
            subtree = [folder] + [
                _folder(r)
                for r in conn.execute(
                    f"SELECT {_FOLDER_COLUMNS} FROM folders"
                    " WHERE user_id = ? AND substr(name, 1, ?) = ? ORDER BY name",
                    (user_id, len(old_prefix), old_prefix),
                )
            ]
            renames = [(f, new_name + f.name[len(old) :]) for f in subtree]
            moving = {f.folder_id for f in subtree}
            for _, name in renames:
                row = conn.execute(
                    "SELECT folder_id FROM folders WHERE user_id = ? AND name = ?",
                    (user_id, name),
                ).fetchone()
                if row is not None and str(row[0]) not in moving:
                    raise Conflict(f"folder {name} exists")
            validities = _next_uidvalidities(conn, user_id, len(renames))
            # two passes, so no intermediate state trips UNIQUE(user_id, name); control
            # characters never appear in valid folder names
            conn.executemany(
                "UPDATE folders SET name = ? WHERE user_id = ? AND folder_id = ?",
                [("\x00" + f.folder_id, user_id, f.folder_id) for f, _ in renames],
            )
            conn.executemany(
                "UPDATE folders SET name = ?, uidvalidity = ? WHERE user_id = ? AND folder_id = ?",
                [
                    (name, validity, user_id, f.folder_id)
                    for (f, name), validity in zip(renames, validities, strict=True)
                ],
            )
            return dc_replace(folder, name=new_name, uidvalidity=validities[0])

        return await self._write_big(tx)

    async def delete_folder(self, user_id: str, folder_id: str) -> list[Expunged]:
        """Remove the folder and its messages; Conflict while it has child folders."""

        def tx(conn: sqlite3.Connection) -> list[Expunged]:
            folder = _require_folder(conn, user_id, folder_id)
            prefix = folder.name + HIERARCHY_SEPARATOR
            if conn.execute(
                "SELECT 1 FROM folders WHERE user_id = ? AND substr(name, 1, ?) = ? LIMIT 1",
                (user_id, len(prefix), prefix),
            ).fetchone():
                raise Conflict(f"folder {folder.name} has child folders")
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user_id = ? AND folder_id = ? ORDER BY uid",
                (user_id, folder_id),
            ).fetchall()
            gone = _delete_records(conn, [_record(r) for r in rows])
            conn.execute(
                "DELETE FROM folders WHERE user_id = ? AND folder_id = ?", (user_id, folder_id)
            )
            conn.execute(
                "DELETE FROM vanished WHERE user_id = ? AND folder_id = ?", (user_id, folder_id)
            )
            return gone

        return await self._write_big(tx)

    async def set_subscribed(self, user_id: str, folder_id: str, subscribed: bool) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE folders SET subscribed = ? WHERE user_id = ? AND folder_id = ?",
                (int(subscribed), user_id, folder_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no folder {folder_id} for user {user_id}")

        await self._write(tx)

    async def folder_counts(
        self, user_id: str, folder_id: str | None = None
    ) -> dict[str, FolderCounts]:
        one = "" if folder_id is None else " AND f.folder_id = ?"

        def tx(conn: sqlite3.Connection) -> dict[str, FolderCounts]:
            rows = conn.execute(
                "SELECT f.folder_id, count(m.message_id),"
                " coalesce(sum(m.sysflags & ? = 0), 0)"
                " FROM folders AS f LEFT JOIN messages AS m"
                " ON m.user_id = f.user_id AND m.folder_id = f.folder_id"
                f" WHERE f.user_id = ?{one} GROUP BY f.folder_id",
                (int(Flag.SEEN), user_id) + (() if folder_id is None else (folder_id,)),
            ).fetchall()
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

        return await self._write(_file_message, user_id, folder_id, message, delivery_key)

    async def insert_messages(
        self, deliveries: Sequence[Delivery]
    ) -> list[tuple[MessageRecord, bool] | None]:
        """Every delivery's `insert_message` in one write transaction (one fsync)."""
        batch = list(deliveries)

        def tx(conn: sqlite3.Connection) -> list[tuple[MessageRecord, bool] | None]:
            out: list[tuple[MessageRecord, bool] | None] = []
            for d in batch:
                try:
                    out.append(_file_message(conn, d.user_id, d.folder_id, d.message,
                                             d.delivery_key))
                except Conflict:  # raised before this delivery wrote anything
                    out.append(None)
            return out

        return await self._write_for(len(batch), tx) if batch else []

    async def get_message(self, user_id: str, message_id: str) -> MessageRecord | None:
        found = await self._read_now(_fetch_records, user_id, [message_id])
        return found[0] if found else None

    async def get_messages(self, user_id: str, message_ids: Sequence[str]) -> list[MessageRecord]:
        """The user's records among message_ids, in the order given (others' ids skipped)."""
        return await self._read(_fetch_records, user_id, list(message_ids))

    async def list_messages(
        self,
        user_id: str,
        folder_id: str,
        limit: int,
        before: ListCursor | None = None,
    ) -> list[MessageRecord]:
        def tx(conn: sqlite3.Connection) -> list[MessageRecord]:
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = ? AND folder_id = ?"
            params: list[object] = [user_id, folder_id]
            if before is not None:
                sql += " AND (internal_date, uid) < (?, ?)"
                params += [before.internal_date, before.uid]
            sql += " ORDER BY internal_date DESC, uid DESC LIMIT ?"
            params.append(max(limit, 0))
            return [_record(r) for r in conn.execute(sql, params)]

        return await self._read(tx)

    async def list_uids(self, user_id: str, folder_id: str) -> list[MessageRecord]:
        def tx(conn: sqlite3.Connection) -> list[MessageRecord]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE user_id = ? AND folder_id = ? ORDER BY uid",
                (user_id, folder_id),
            )
            return [_record(r) for r in rows]

        return await self._read(tx)

    async def list_thread(
        self, user_id: str, thread_id: str, limit: int = 500
    ) -> list[MessageRecord]:
        def tx(conn: sqlite3.Connection) -> list[MessageRecord]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE user_id = ? AND thread_id = ?"
                " ORDER BY internal_date, folder_id, uid LIMIT ?",
                (user_id, thread_id, max(limit, 0)),
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

        def tx(conn: sqlite3.Connection) -> list[MessageRecord]:
            changing: list[tuple[MessageRecord, Flags]] = []
            for rec in _fetch_records(conn, user_id, ids):
                if unchanged_since is not None and rec.modseq > unchanged_since:
                    continue
                flags = rec.flags if replace is None else _normal_flags(replace)
                if add is not None:
                    flags = flags.union(add)
                if remove is not None:
                    flags = flags.difference(remove)
                flags = _normal_flags(flags)
                if flags != rec.flags:
                    changing.append((rec, flags))
            if not changing:
                return []
            modseqs = {
                folder_id: _bump_modseq(conn, user_id, folder_id)
                for folder_id in _unique(r.folder_id for r, _ in changing)
            }
            changed = [dc_replace(r, flags=flags, modseq=modseqs[r.folder_id])
                       for r, flags in changing]
            conn.executemany(
                "UPDATE messages SET sysflags = ?, keywords = ?, modseq = ?"
                " WHERE user_id = ? AND message_id = ?",
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

        return await self._write_for(len(ids), tx)

    async def move_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[tuple[Expunged, MessageRecord]]:
        """Move (RFC 6851): each message keeps its message_id, gets a new uid in the target.

        Target uids are allocated in the order given and share one new modseq; each source
        folder's highestmodseq is bumped once (the Expunged modseq). NotFound if the target
        is not the user's folder; ids that are not the user's are skipped.
        """
        ids = list(message_ids)

        def tx(conn: sqlite3.Connection) -> list[tuple[Expunged, MessageRecord]]:
            _require_folder(conn, user_id, target_folder_id)
            records = _fetch_records(conn, user_id, ids)
            if not records:
                return []
            source_modseqs = {
                folder_id: _bump_modseq(conn, user_id, folder_id)
                for folder_id in _unique(r.folder_id for r in records)
            }
            first_uid, modseq = _allocate_uids(conn, user_id, target_folder_id, len(records))
            out: list[tuple[Expunged, MessageRecord]] = []
            for i, rec in enumerate(records):
                moved = dc_replace(
                    rec, folder_id=target_folder_id, uid=first_uid + i, modseq=modseq
                )
                conn.execute(
                    "UPDATE messages SET folder_id = ?, uid = ?, modseq = ?"
                    " WHERE user_id = ? AND message_id = ?",
                    (moved.folder_id, moved.uid, moved.modseq, user_id, rec.message_id),
                )
                gone = Expunged(
                    rec.folder_id,
                    rec.uid,
                    rec.message_id,
                    rec.blob_hash,
                    source_modseqs[rec.folder_id],
                )
                out.append((gone, moved))
            _log_vanished(conn, user_id, [(g.folder_id, g.uid, g.modseq) for g, _ in out])
            return out

        return await self._write_for(len(ids), tx)

    async def copy_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[MessageRecord]:
        """Copy: new message_id and uid in the target, same flags, thread and blob (+1 ref)."""
        ids = list(message_ids)

        def tx(conn: sqlite3.Connection) -> list[MessageRecord]:
            _require_folder(conn, user_id, target_folder_id)
            records = _fetch_records(conn, user_id, ids)
            if not records:
                return []
            first_uid, modseq = _allocate_uids(conn, user_id, target_folder_id, len(records))
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
            for copy in copies:
                _insert_record(conn, copy)
            _add_blob_refs(conn, (c.blob_hash for c in copies))
            return copies

        return await self._write_for(len(ids), tx)

    async def expunge(self, user_id: str, message_ids: Sequence[str]) -> list[Expunged]:
        """Remove the user's records among message_ids (others skipped), in the order given."""
        ids = list(message_ids)

        def tx(conn: sqlite3.Connection) -> list[Expunged]:
            return _delete_records(conn, _fetch_records(conn, user_id, ids))

        return await self._write_for(len(ids), tx)

    # -- blob references

    async def vanished(self, user_id: str, folder_id: str, since_modseq: int) -> list[int]:
        def tx(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT uid FROM vanished WHERE user_id = ? AND folder_id = ? AND modseq > ?"
                " ORDER BY uid",
                (user_id, folder_id, since_modseq),
            )
            return [int(r[0]) for r in rows]

        return await self._read(tx)

    async def blob_refcount(self, blob_hash: str) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT refcount FROM blob_refs WHERE blob_hash = ?", (blob_hash,)
            ).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._read(tx)

    async def released_blobs(self, before: float, limit: int = 1000) -> list[str]:
        def tx(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT blob_hash FROM blob_released WHERE released_at < ?"
                " ORDER BY released_at LIMIT ?", (before, max(limit, 0)))
            return [str(r[0]) for r in rows]

        return await self._read(tx)

    async def note_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        now = time.time()

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO blob_released (blob_hash, released_at) VALUES (?, ?)"
                " ON CONFLICT (blob_hash) DO UPDATE SET released_at = excluded.released_at",
                [(h, now) for h in sorted(set(blob_hashes))])

        await self._write(tx)

    async def forget_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM blob_released WHERE blob_hash = ?",
                             [(h,) for h in blob_hashes])

        await self._write(tx)

    # -- spam filtering

    async def get_reputation(self, subjects: Sequence[str]) -> dict[str, Reputation]:
        wanted = list(dict.fromkeys(subjects))

        def tx(conn: sqlite3.Connection) -> dict[str, Reputation]:
            out: dict[str, Reputation] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                    "SELECT subject, ham, spam, updated_at FROM spam_reputation"
                    f" WHERE subject IN ({marks})", chunk,
                ):
                    out[str(row[0])] = Reputation(str(row[0]), float(row[1]), float(row[2]),
                                                  float(row[3]))
            return out

        return await self._read(tx) if wanted else {}

    async def add_reputation(
        self, subjects: Sequence[str], *, ham: float, spam: float, now: float, half_life: float
    ) -> None:
        wanted = list(dict.fromkeys(subjects))

        def tx(conn: sqlite3.Connection) -> None:
            for subject in wanted:
                row = conn.execute(
                    "SELECT ham, spam, updated_at FROM spam_reputation WHERE subject = ?",
                    (subject,),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO spam_reputation (subject, ham, spam, updated_at)"
                        " VALUES (?, ?, ?, ?)", (subject, ham, spam, now))
                    continue
                age = max(0.0, now - float(row[2]))
                keep = 0.5 ** (age / half_life) if half_life > 0 else 1.0
                conn.execute(
                    "UPDATE spam_reputation SET ham = ?, spam = ?, updated_at = ?"
                    " WHERE subject = ?",
                    (float(row[0]) * keep + ham, float(row[1]) * keep + spam,
                     max(now, float(row[2])), subject))

        if wanted:
            await self._write(tx)

    async def set_list_entry(self, user_id: str, value: str, action: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO spam_lists (user_id, value, action, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_id, value) DO UPDATE SET action = excluded.action",
                (user_id, value, action, time.time()))

        await self._write(tx)

    async def remove_list_entry(self, user_id: str, value: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM spam_lists WHERE user_id = ? AND value = ?",
                               (user_id, value))
            return cur.rowcount > 0

        return await self._write(tx)

    async def list_entries(self, user_id: str) -> list[ListEntry]:
        def tx(conn: sqlite3.Connection) -> list[ListEntry]:
            return [ListEntry(str(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
                "SELECT user_id, value, action FROM spam_lists WHERE user_id = ?"
                " ORDER BY value", (user_id,))]

        return await self._read(tx)

    async def match_list_entries(
        self, user_ids: Sequence[str], values: Sequence[str]
    ) -> list[ListEntry]:
        users = list(dict.fromkeys(user_ids))
        wanted = list(dict.fromkeys(values))

        def tx(conn: sqlite3.Connection) -> list[ListEntry]:
            out: list[ListEntry] = []
            for user_id in users:
                for chunk in _chunks(wanted):
                    marks = ",".join("?" * len(chunk))
                    out += [ListEntry(str(r[0]), str(r[1]), str(r[2])) for r in conn.execute(
                        "SELECT user_id, value, action FROM spam_lists"
                        f" WHERE user_id = ? AND value IN ({marks})", (user_id, *chunk))]
            return out

        return await self._read(tx) if users and wanted else []

    async def add_contacts(self, user_id: str, addresses: Sequence[str], now: float) -> None:
        wanted = list(dict.fromkeys(addresses))

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO contacts (user_id, address, last_at) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id, address) DO UPDATE SET last_at = excluded.last_at",
                [(user_id, a, now) for a in wanted])

        if wanted:
            await self._write(tx)

    async def known_contacts(self, user_id: str, addresses: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(addresses))

        def tx(conn: sqlite3.Connection) -> set[str]:
            out: set[str] = set()
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                out |= {str(r[0]) for r in conn.execute(
                    f"SELECT address FROM contacts WHERE user_id = ? AND address IN ({marks})",
                    (user_id, *chunk))}
            return out

        return await self._read(tx) if wanted else set()

    async def get_spam_model(self, user_id: str) -> bytes | None:
        def tx(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT model FROM spam_models WHERE user_id = ?",
                               (user_id,)).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._read(tx)

    async def put_spam_model(self, user_id: str, model: bytes, now: float) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO spam_models (user_id, model, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET model = excluded.model,"
                " updated_at = excluded.updated_at", (user_id, model, now))

        await self._write_big(tx)

    async def record_send(self, user_id: str, recipients: int, now: float) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM send_log WHERE user_id = ? AND sent_at < ?",
                         (user_id, now - 86400.0))
            conn.execute(
                "INSERT INTO send_log (user_id, entry_id, sent_at, recipients)"
                " VALUES (?, ?, ?, ?)", (user_id, new_id(), now, recipients))

        await self._write(tx)

    async def send_totals(self, user_id: str, since: float) -> tuple[int, int]:
        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(recipients), 0) FROM send_log"
                " WHERE user_id = ? AND sent_at >= ?", (user_id, since)).fetchone()
            return int(row[0]), int(row[1])

        return await self._read(tx)


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    return [values[i:i + size] for i in range(0, len(values), size)]


def _users_of_domain(conn: sqlite3.Connection, domain: str) -> list[User]:
    escaped = domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = conn.execute(
        f"SELECT {_USER_COLUMNS} FROM users WHERE address LIKE ? ESCAPE '\\' ORDER BY address",
        ("%@" + escaped,),
    ).fetchall()
    # LIKE ignores ASCII case; the store compares names exactly, as everywhere else
    return [u for u in map(_user, rows) if _domain_of(u.address) == domain]
