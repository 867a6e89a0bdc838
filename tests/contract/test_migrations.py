"""Schema migrations on both engines: upgrading a populated first-release database, start-up
races, rolling-upgrade compatibility, atomic steps and the `postroom migrate` command."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from postroom import cli
from postroom.core.models import Flag, Flags, FolderRole, HeaderSummary, MessageRecord, NewMessage
from postroom.store.metadata import MetadataStore, Token
from postroom.store.migrations import (
    LATEST,
    STEPS,
    MigrationOutcome,
    SchemaTooNew,
    Step,
    migrate_postgres,
    migrate_sqlite,
    split_sql,
)
from postroom.store.sqlite_metadata import SqliteMetadataStore


class Engine:
    """A raw connection to one empty database, and stores opened on it."""

    name: str

    async def migrate(
        self, steps: Sequence[Step] = STEPS, target: int | None = None
    ) -> MigrationOutcome:
        raise NotImplementedError

    async def execute(self, sql: str, *args: object) -> None:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def indexes(self) -> set[str]:
        raise NotImplementedError

    async def tables(self) -> set[str]:
        raise NotImplementedError

    def store(self) -> MetadataStore:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class SqliteEngine(Engine):
    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)

    async def migrate(
        self, steps: Sequence[Step] = STEPS, target: int | None = None
    ) -> MigrationOutcome:
        return migrate_sqlite(self.conn, steps, target)

    async def execute(self, sql: str, *args: object) -> None:
        self.conn.execute(sql, args)

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql, args).fetchall()]

    async def indexes(self) -> set[str]:
        rows = await self.fetch("SELECT name FROM sqlite_master WHERE type = 'index'")
        return {r[0] for r in rows}

    async def tables(self) -> set[str]:
        rows = await self.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}

    def store(self) -> MetadataStore:
        return SqliteMetadataStore(self.path)

    async def close(self) -> None:
        self.conn.close()


class PostgresEngine(Engine):
    name = "postgres"

    def __init__(self, dsn: str, conn: Any) -> None:
        self.dsn = dsn
        self.conn = conn

    @staticmethod
    def _numbered(sql: str) -> str:
        counter = iter(range(1, 1000))
        return re.sub(r"\?", lambda _: f"${next(counter)}", sql)

    async def migrate(
        self, steps: Sequence[Step] = STEPS, target: int | None = None
    ) -> MigrationOutcome:
        return await migrate_postgres(self.conn, steps, target)

    async def execute(self, sql: str, *args: object) -> None:
        await self.conn.execute(self._numbered(sql), *args)

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.conn.fetch(self._numbered(sql), *args)]

    async def indexes(self) -> set[str]:
        rows = await self.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        )
        return {r[0] for r in rows}

    async def tables(self) -> set[str]:
        rows = await self.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        return {r[0] for r in rows}

    def store(self) -> MetadataStore:
        from postroom.store.postgres_metadata import PostgresMetadataStore

        return PostgresMetadataStore(self.dsn, max_size=3)

    async def close(self) -> None:
        await self.conn.close()


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    made: Engine
    if request.param == "sqlite":
        made = SqliteEngine(str(tmp_path / "metadata.sqlite3"))
    else:
        import asyncpg

        dsn: str = request.getfixturevalue("postgres_dsn")
        made = PostgresEngine(dsn, await asyncpg.connect(dsn))
    try:
        yield made
    finally:
        await made.close()


# ---- a database as the first release left it ----------------------------------------------

USER = "01JAAAAAAAAAAAAAAAAAAAAAAA"
INBOX = "01JBBBBBBBBBBBBBBBBBBBBBBB"
WORK = "01JCCCCCCCCCCCCCCCCCCCCCCC"
M1 = "01JDDDDDDDDDDDDDDDDDDDDDDD"
M2 = "01JEEEEEEEEEEEEEEEEEEEEEEE"
THREAD = "01JFFFFFFFFFFFFFFFFFFFFFFF"
BLOB = "ab" * 32


def first_release_records() -> list[MessageRecord]:
    def record(
        message_id: str, uid: int, modseq: int, flags: Flags, h: HeaderSummary
    ) -> MessageRecord:
        return MessageRecord(
            user_id=USER,
            message_id=message_id,
            folder_id=INBOX,
            uid=uid,
            modseq=modseq,
            flags=flags,
            internal_date=1_700_000_000.0 + uid,
            size=1000 + uid,
            blob_hash=BLOB,
            headers=h,
            snippet=f"snippet {uid}",
            has_attachments=uid == 2,
            thread_id=THREAD,
            spam_verdict="ham",
        )

    root = HeaderSummary(
        from_="Bob <bob@example.org>",
        to="alice@example.com",
        subject="plans",
        date=1_699_999_999.0,
        message_id="<root@example.org>",
    )
    reply = HeaderSummary(
        from_="Carol <carol@example.org>",
        to="alice@example.com",
        cc="bob@example.org",
        subject="Re: plans",
        date=None,
        message_id="<reply@example.org>",
        in_reply_to="<root@example.org>",
        references=("<root@example.org>",),
    )
    return [
        record(M1, 1, 2, Flags(Flag.SEEN, ("$label1",)), root),
        record(M2, 2, 5, Flags(), reply),
    ]


async def populate_first_release(engine: Engine) -> None:
    """What the first release wrote: its step-1 tables, filled through its own columns."""
    if engine.name == "sqlite":
        # the first release created the tables itself and kept one row in schema_version
        for statement in split_sql(STEPS[0].sqlite):
            await engine.execute(statement)
        await engine.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await engine.execute("INSERT INTO schema_version (version) VALUES (1)")
    else:
        outcome = await engine.migrate(target=1)
        assert outcome.applied == (1,) and outcome.after.version == 1
    pg = engine.name == "postgres"
    await engine.execute(
        "INSERT INTO domains (name, created_at) VALUES (?, ?)", "example.com", 1.5e9
    )
    await engine.execute(
        "INSERT INTO users (user_id, address, password_hash, created_at, quota_bytes,"
        " last_uidvalidity) VALUES (?, ?, ?, ?, ?, ?)",
        USER,
        "alice@example.com",
        "argon2:old",
        1.6e9,
        0,
        1_700_000_002,
    )
    if pg:
        await engine.execute(
            "INSERT INTO user_addresses (address, user_id) VALUES (?, ?)", "alice@example.com", USER
        )
    await engine.execute(
        "INSERT INTO aliases (alias, target) VALUES (?, ?)",
        "postmaster@example.com",
        "alice@example.com",
    )
    await engine.execute(
        "INSERT INTO tokens (token_hash, user_id, expires_at) VALUES (?, ?, ?)", "tok", USER, 2e9
    )
    for folder_id, name, role, validity, uidnext, modseq, subscribed in (
        (INBOX, "INBOX", "inbox", 1_700_000_001, 3, 5, True),
        (WORK, "Work", None, 1_700_000_002, 1, 1, False),
    ):
        await engine.execute(
            "INSERT INTO folders (user_id, folder_id, name, role, uidvalidity, uidnext,"
            " highestmodseq, subscribed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            USER,
            folder_id,
            name,
            role,
            validity,
            uidnext,
            modseq,
            subscribed if pg else int(subscribed),
        )
    for rec in first_release_records():
        h = rec.headers
        await engine.execute(
            "INSERT INTO messages (user_id, message_id, folder_id, uid, modseq, sysflags,"
            " keywords, internal_date, size, blob_hash, from_, to_, cc, bcc, subject, date,"
            " header_message_id, in_reply_to, refs, snippet, has_attachments, thread_id,"
            " spam_verdict) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?, ?)",
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
            list(h.references) if pg else json.dumps(list(h.references)),
            rec.snippet,
            rec.has_attachments if pg else int(rec.has_attachments),
            rec.thread_id,
            rec.spam_verdict,
        )
        for ref in h.references:
            await engine.execute(
                "INSERT INTO message_refs (user_id, ref, message_id) VALUES (?, ?, ?)",
                USER,
                ref,
                rec.message_id,
            )
    await engine.execute(
        "INSERT INTO deliveries (user_id, delivery_key, message_id) VALUES (?, ?, ?)",
        USER,
        "queue-item-1:alice",
        M2,
    )
    if not pg:
        await engine.execute("INSERT INTO blob_refs (blob_hash, refcount) VALUES (?, 2)", BLOB)


async def test_upgrade_populated_first_release_database(engine: Engine) -> None:
    await populate_first_release(engine)
    assert "messages_by_modseq" not in await engine.indexes()

    store = engine.store()
    await store.open()  # migrates at start-up
    try:
        rows = await engine.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, LATEST + 1))
        assert "messages_by_modseq" in await engine.indexes()
        assert "messages_by_thread" in await engine.indexes()
        # first-release nodes still running in a rolling upgrade keep accepting this schema
        assert await engine.fetch("SELECT version FROM schema_version") == [(1,)]

        # everything the first release stored reads back unchanged
        user = await store.get_user_by_address("alice@example.com")
        assert user is not None and user.user_id == USER and user.password_hash == "argon2:old"
        assert await store.has_domain("example.com")
        alias = await store.get_alias("postmaster@example.com")
        assert alias is not None and alias.target == "alice@example.com"
        assert await store.get_token("tok") == Token("tok", USER, 2e9)
        folders = {f.name: f for f in await store.list_folders(USER)}
        assert list(folders) == ["INBOX", "Work"]
        inbox, work = folders["INBOX"], folders["Work"]
        assert (inbox.role, inbox.uidvalidity, inbox.uidnext, inbox.highestmodseq) == (
            FolderRole.INBOX,
            1_700_000_001,
            3,
            5,
        )
        assert work.role is None and not work.subscribed
        assert await store.list_uids(USER, INBOX) == first_release_records()
        assert await store.blob_refcount(BLOB) == 2
        counts = await store.folder_counts(USER)
        assert (counts[INBOX].total, counts[INBOX].unread) == (2, 1)

        # and the new code carries on from where the old left off
        again, created = await store.insert_message(
            USER, INBOX, new_message(), delivery_key="queue-item-1:alice"
        )
        assert not created and again.message_id == M2
        reply, created = await store.insert_message(
            USER, INBOX, new_message(in_reply_to="<reply@example.org>")
        )
        assert created and (reply.uid, reply.modseq, reply.thread_id) == (3, 6, THREAD)
        changed = await store.store_flags(USER, [M2], add=Flags(Flag.SEEN))
        assert [r.modseq for r in changed] == [7]
        newer = await store.create_folder(USER, "Later")
        assert newer.uidvalidity > 1_700_000_002
        assert await store.blob_refcount(BLOB) == 3
    finally:
        await store.close()

    # a second start finds nothing to do
    reopened = engine.store()
    await reopened.open()
    await reopened.close()
    assert len(await engine.fetch("SELECT version FROM schema_migrations")) == LATEST


def new_message(in_reply_to: str = "") -> NewMessage:
    return NewMessage(
        blob_hash=BLOB,
        size=500,
        internal_date=1_800_000_000.0,
        headers=HeaderSummary(
            subject="new", message_id="<new@example.org>", in_reply_to=in_reply_to
        ),
        snippet="",
        has_attachments=False,
    )


async def test_nodes_starting_together_apply_each_step_once(engine: Engine) -> None:
    stores = [engine.store() for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        rows = await engine.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, LATEST + 1))
        user = await stores[0].create_user("alice@example.com", "h")
        assert await stores[2].get_user(user.user_id) == user
    finally:
        await asyncio.gather(*(s.close() for s in stores))


def extra_steps() -> tuple[Step, Step]:
    expand = Step(
        LATEST + 1,
        "a table only newer code uses",
        "CREATE TABLE newer_feature (user_id TEXT NOT NULL, note TEXT)",
        "CREATE TABLE newer_feature (user_id TEXT NOT NULL, note TEXT)",
    )
    contract = Step(
        LATEST + 2,
        "drop what the code of LATEST still reads",
        "DROP INDEX messages_by_modseq",
        "DROP INDEX messages_by_modseq",
        oldest_compatible=LATEST + 1,
    )
    return expand, contract


async def test_rolling_upgrade_rules(engine: Engine) -> None:
    """Newer code's expand steps leave this code running; a contract step past it stops it."""
    expand, contract = extra_steps()
    await engine.migrate([*STEPS, expand])

    store = engine.store()
    await store.open()  # the database is newer, but compatible: no error, nothing applied
    try:
        user = await store.create_user("alice@example.com", "h")
        assert await store.get_user(user.user_id) == user
    finally:
        await store.close()
    assert len(await engine.fetch("SELECT version FROM schema_migrations")) == LATEST + 1

    outcome = await engine.migrate([*STEPS, expand, contract])
    assert outcome.applied == (LATEST + 2,) and outcome.after.oldest_compatible == LATEST + 1
    # the first release's own check reads this: it refuses as soon as the value exceeds 1
    assert await engine.fetch("SELECT version FROM schema_version") == [(LATEST + 1,)]
    refused = engine.store()
    with pytest.raises(SchemaTooNew):
        await refused.open()
    with pytest.raises(SchemaTooNew):
        await engine.migrate()


async def test_a_failing_step_leaves_no_trace(engine: Engine) -> None:
    broken = Step(
        LATEST + 1,
        "half a step",
        "CREATE TABLE half_done (a INTEGER); INSERT INTO no_such_table VALUES (1)",
        "CREATE TABLE half_done (a INTEGER); INSERT INTO no_such_table VALUES (1)",
    )
    await engine.migrate()
    with pytest.raises(Exception, match="no_such_table"):
        await engine.migrate([*STEPS, broken])
    assert "half_done" not in await engine.tables()
    rows = await engine.fetch("SELECT max(version) FROM schema_migrations")
    assert rows == [(LATEST,)]


async def test_steps_are_numbered_and_append_only(engine: Engine) -> None:
    assert [s.version for s in STEPS] == list(range(1, len(STEPS) + 1))
    with pytest.raises(ValueError, match="numbered"):
        await engine.migrate([STEPS[0], STEPS[0]])


def test_migrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert cli.main([*data, "migrate", "--status"]) == 0
    out = capsys.readouterr().out
    assert "version 0" in out and "pending: 1 initial schema" in out
    assert cli.main([*data, "migrate", "--to", "1"]) == 0
    assert "version 0 -> 1" in capsys.readouterr().out
    assert cli.main([*data, "migrate"]) == 0
    out = capsys.readouterr().out
    assert f"version 1 -> {LATEST}" in out
    assert cli.main([*data, "migrate"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    conn = sqlite3.connect(tmp_path / "metadata.db")
    try:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    finally:
        conn.close()
    assert versions == list(range(1, LATEST + 1))
