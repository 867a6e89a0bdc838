"""Metadata store benchmark: messages filed per second through the MetadataStore, on SQLite and
on PostgreSQL, next to the anchor of each engine measured in the same run: the same row written
by one bare INSERT per transaction (no uid allocation, no thread lookup, no delivery key), the
floor any store on that engine pays.

    .venv/bin/python -m bench.metadata_store -n 3000 -c 16 -u 100
    .venv/bin/python -m bench.metadata_store --postgres postgresql://postgres@127.0.0.1:5432/postgres

Each filing is what a delivery does: allocate uid and modseq on the folder row, resolve the
thread, record the delivery key, insert the row, all in one transaction, with `c` writers at once
over `u` mailboxes. PostgreSQL runs in a database made for the run and dropped after it. Not a
test: run it by hand; figures go to docs/BENCHMARKS.md and docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from postroom.core.models import FolderRole, HeaderSummary, NewMessage
from postroom.store.metadata import MetadataStore

_serial = itertools.count()


def new_message(n: int) -> NewMessage:
    return NewMessage(
        blob_hash=f"{n:064x}",
        size=50_000,
        internal_date=1_800_000_000.0 + n,
        headers=HeaderSummary(
            from_="Sender <sender@example.org>",
            to="bench@example.test",
            subject=f"benchmark message {n}",
            date=1_800_000_000.0,
            message_id=f"<{n}@bench.example.org>",
            in_reply_to=f"<{n - 1}@bench.example.org>" if n % 3 else "",
        ),
        snippet="x" * 200,
        has_attachments=False,
    )


async def run_writers(count: int, writers: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Messages per second for `count` calls of `one`, `writers` at a time."""
    jobs = iter(range(count))

    async def writer() -> None:
        for n in jobs:
            await one(n)

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return count / (time.perf_counter() - start)


async def bench_store(store: MetadataStore, count: int, writers: int, users: int) -> float:
    await store.open()
    try:
        inboxes = []
        for u in range(users):
            user = await store.create_user(f"bench{u}@example.test", "x")
            inbox = await store.create_folder(user.user_id, "INBOX", FolderRole.INBOX)
            inboxes.append((user.user_id, inbox.folder_id))

        async def one(n: int) -> None:
            user_id, folder_id = inboxes[n % users]
            await store.insert_message(user_id, folder_id, new_message(n), f"item-{n}")

        return await run_writers(count, writers, one)
    finally:
        await store.close()


# ---- anchors: one bare INSERT per transaction -------------------------------------------------

_ROW = (
    "CREATE TABLE bare (user_id TEXT, message_id TEXT, folder_id TEXT, uid BIGINT,"
    " internal_date DOUBLE PRECISION, size BIGINT, blob_hash TEXT, from_ TEXT, to_ TEXT,"
    " subject TEXT, header_message_id TEXT, snippet TEXT, PRIMARY KEY (user_id, message_id))"
)


def _bare_params(n: int) -> tuple[object, ...]:
    m = new_message(n)
    return (
        f"user{n % 100}",
        f"{n:026d}",
        "inbox",
        n,
        m.internal_date,
        m.size,
        m.blob_hash,
        m.headers.from_,
        m.headers.to,
        m.headers.subject,
        m.headers.message_id,
        m.snippet,
    )


async def anchor_sqlite(path: str, count: int) -> float:
    """SQLite allows one writer: the anchor is one connection committing each row (WAL, FULL)."""

    def run() -> float:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(_ROW.replace("DOUBLE PRECISION", "REAL"))
        sql = "INSERT INTO bare VALUES (" + ", ".join("?" * 12) + ")"
        start = time.perf_counter()
        for n in range(count):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, _bare_params(n))
            conn.execute("COMMIT")
        rate = count / (time.perf_counter() - start)
        conn.close()
        return rate

    return await asyncio.to_thread(run)


async def anchor_postgres(dsn: str, count: int, writers: int) -> float:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=writers, max_size=writers)
    try:
        await pool.execute(_ROW)
        sql = "INSERT INTO bare VALUES (" + ", ".join(f"${i}" for i in range(1, 13)) + ")"

        async def one(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(sql, *_bare_params(n))

        return await run_writers(count, writers, one)
    finally:
        await pool.close()


# ---- PostgreSQL database for the run --------------------------------------------------------


async def make_database(admin_dsn: str) -> tuple[str, str]:
    import asyncpg

    name = f"postroom_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))


async def drop_database(admin_dsn: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="messages per engine")
    parser.add_argument("-c", type=int, default=16, help="concurrent writers")
    parser.add_argument("-u", type=int, default=100, help="mailboxes")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="an admin DSN; '' to skip PostgreSQL",
    )
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []

    from postroom.store.sqlite_metadata import SqliteMetadataStore

    with tempfile.TemporaryDirectory() as tmp:
        store_rate = await bench_store(
            SqliteMetadataStore(str(Path(tmp) / "m.db")), args.n, args.c, args.u
        )
        rows.append(
            (
                "SQLite (WAL, synchronous=FULL)",
                store_rate,
                await anchor_sqlite(str(Path(tmp) / "bare.db"), args.n),
            )
        )

    if args.postgres:
        from postroom.store.postgres_metadata import PostgresMetadataStore

        name, dsn = await make_database(args.postgres)
        try:
            store_rate = await bench_store(
                PostgresMetadataStore(dsn, max_size=args.c), args.n, args.c, args.u
            )
            rows.append(
                (
                    "PostgreSQL (asyncpg pool)",
                    store_rate,
                    await anchor_postgres(dsn, args.n, args.c),
                )
            )
        finally:
            await drop_database(args.postgres, name)

    print(f"\n{args.n} messages, {args.c} writers, {args.u} mailboxes\n")
    print(
        "| engine | MetadataStore.insert_message /s | anchor: bare INSERT per commit /s | ratio |"
    )
    print("|---|---|---|---|")
    for engine, store_rate, anchor in rows:
        print(f"| {engine} | {store_rate:,.0f} | {anchor:,.0f} | {store_rate / anchor:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
