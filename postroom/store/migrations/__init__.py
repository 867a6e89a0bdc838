"""Versioned schema migrations for the metadata store, on SQLite and on PostgreSQL.

One ordered list of steps (`steps.py`), each with its SQL for both engines. A database records
the steps applied to it in ``schema_migrations``; the runner applies the missing ones in order,
each in its own transaction together with its bookkeeping row, so a step is either wholly applied
and recorded or not at all. Stores migrate when they open, and ``postroom migrate`` does the same
on demand (or only reports, with ``--status``).

Rolling upgrades: steps are written expand-then-contract (docs/ARCHITECTURE.md, "Schema
migrations"). An expand step only adds (tables, nullable or defaulted columns, indexes, backfills)
so code of the previous release keeps working on the migrated database. A contract step (a drop,
or a new constraint old code would break) names the oldest schema version whose code still runs
on its result (``oldest_compatible``); a node whose code is older than that refuses to start
instead of misbehaving, and one whose code is older than the database but still compatible runs
without migrating. The legacy one-row ``schema_version`` table of the first release holds the same
"oldest compatible" number, so a first-release node applies that rule too: it refuses exactly when
the value exceeds 1.

Concurrency: several nodes may start at once. SQLite serialises the steps on its write lock
(``BEGIN IMMEDIATE``); PostgreSQL on a transaction-scoped advisory lock named after the schema, and
each step re-reads the applied versions after taking it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from postroom.store.errors import StoreError
from postroom.store.migrations.steps import STEPS, Step

__all__ = [
    "LATEST",
    "STEPS",
    "MigrationOutcome",
    "SchemaState",
    "SchemaTooNew",
    "Step",
    "migrate_postgres",
    "migrate_postgres_dsn",
    "migrate_sqlite",
    "migrate_sqlite_file",
    "postgres_state",
    "split_sql",
    "sqlite_state",
]

LATEST = STEPS[-1].version

_SQLITE_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, oldest_compatible INTEGER NOT NULL,"
    " applied_at REAL NOT NULL)",
)
_POSTGRES_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, oldest_compatible INTEGER NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)",
)
# pg_advisory_xact_lock key: one per schema, so stores in different schemas never wait on each other
_POSTGRES_LOCK = "SELECT pg_advisory_xact_lock(hashtext('postroom.migrate:' || current_schema()))"


class SchemaTooNew(StoreError):
    """The database was migrated by newer code past what this code can run on."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands: the highest step applied (0: none) and what it allows."""

    version: int
    oldest_compatible: int
    latest: int  # the newest step this code knows
    pending: tuple[int, ...]  # steps this code would apply, in order

    @property
    def compatible(self) -> bool:
        return self.oldest_compatible <= self.latest


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    before: SchemaState
    after: SchemaState
    applied: tuple[int, ...]


def split_sql(script: str) -> list[str]:
    """A script's statements, for running inside an explicit transaction.

    (sqlite3's executescript would COMMIT first.) Comment lines are dropped; no statement of
    the steps has a ';' inside it.
    """
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _check_steps(steps: Sequence[Step]) -> None:
    versions = [s.version for s in steps]
    if versions != list(range(1, len(steps) + 1)):
        raise ValueError(f"migration steps must be numbered 1, 2, 3, ...: {versions}")


def _oldest_compatible(step: Step, applied: dict[int, int]) -> int:
    """What the database allows once `step` is applied: never lower than before."""
    return max(max(applied.values(), default=1), step.oldest_compatible or 1)


def _state(
    steps: Sequence[Step], applied: dict[int, int], target: int | None = None
) -> SchemaState:
    version = max(applied, default=0)
    oldest = max(applied.values(), default=0)
    last = len(steps) if target is None else min(target, len(steps))
    pending = tuple(v for v in range(1, last + 1) if v not in applied)
    return SchemaState(version, oldest, len(steps), pending)


def _refuse_if_too_new(state: SchemaState, where: str) -> None:
    if not state.compatible:
        raise SchemaTooNew(
            f"{where}: the metadata schema is at version {state.version} and needs code that"
            f" knows version {state.oldest_compatible} or later; this code knows"
            f" {state.latest}: upgrade this node"
        )


# ---- SQLite -----------------------------------------------------------------------------------


def _sqlite_applied(conn: sqlite3.Connection, steps: Sequence[Step]) -> dict[int, int]:
    """version -> oldest_compatible of each applied step (bookkeeping tables must exist)."""
    rows = conn.execute("SELECT version, oldest_compatible FROM schema_migrations").fetchall()
    applied = {int(r[0]): int(r[1]) for r in rows}
    if not applied:
        # A database made by the first release, before this runner: it wrote version 1 into
        # schema_version and nothing into schema_migrations. Its tables are step 1's.
        legacy = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if legacy is not None:
            if int(legacy) != 1:
                raise StoreError(f"unexpected legacy schema_version {legacy}")
            conn.execute(
                "INSERT INTO schema_migrations (version, name, oldest_compatible, applied_at)"
                " VALUES (1, ?, 1, ?)",
                (steps[0].name, time.time()),
            )
            applied = {1: 1}
    return applied


def _sqlite_set_legacy(conn: sqlite3.Connection, oldest_compatible: int) -> None:
    conn.execute("DELETE FROM schema_version")
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (oldest_compatible,))


def sqlite_state(conn: sqlite3.Connection, steps: Sequence[Step] = STEPS) -> SchemaState:
    """Where the database stands, without changing it (beyond the bookkeeping tables)."""
    _check_steps(steps)
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SQLITE_BOOKKEEPING:
            conn.execute(statement)
        state = _state(steps, _sqlite_applied(conn, steps))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return state


def migrate_sqlite(
    conn: sqlite3.Connection,
    steps: Sequence[Step] = STEPS,
    target: int | None = None,
    where: str = "sqlite",
) -> MigrationOutcome:
    """Apply the missing steps up to target (default: all), one transaction per step.

    The connection must be in autocommit mode (isolation_level=None). SchemaTooNew if the
    database was contracted past this code.
    """
    _check_steps(steps)
    before: SchemaState | None = None
    done: list[int] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SQLITE_BOOKKEEPING:
                conn.execute(statement)
            applied = _sqlite_applied(conn, steps)
            state = _state(steps, applied, target)
            if before is None:
                before = state
            _refuse_if_too_new(state, where)
            if not state.pending:
                conn.execute("COMMIT")
                return MigrationOutcome(before, _state(steps, applied), tuple(done))
            version = state.pending[0]
            step = steps[version - 1]
            for statement in split_sql(step.sqlite):
                conn.execute(statement)
            oldest = _oldest_compatible(step, applied)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, oldest_compatible, applied_at)"
                " VALUES (?, ?, ?, ?)",
                (version, step.name, oldest, time.time()),
            )
            _sqlite_set_legacy(conn, oldest)
            conn.execute("COMMIT")
            done.append(version)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# ---- PostgreSQL -------------------------------------------------------------------------------
# `conn` is an asyncpg connection; typed loosely so this module imports without the driver.


async def _postgres_applied(conn: Any) -> dict[int, int]:
    rows = await conn.fetch("SELECT version, oldest_compatible FROM schema_migrations")
    return {int(r[0]): int(r[1]) for r in rows}


async def postgres_state(conn: Any, steps: Sequence[Step] = STEPS) -> SchemaState:
    """Where the database (the connection's current schema) stands, without migrating."""
    _check_steps(steps)
    async with conn.transaction():
        await conn.execute(_POSTGRES_LOCK)
        for statement in _POSTGRES_BOOKKEEPING:
            await conn.execute(statement)
        return _state(steps, await _postgres_applied(conn))


async def migrate_postgres(
    conn: Any,
    steps: Sequence[Step] = STEPS,
    target: int | None = None,
    where: str = "postgresql",
) -> MigrationOutcome:
    """Apply the missing steps up to target (default: all), one transaction per step.

    Each transaction takes the schema's advisory lock first, so nodes starting together apply
    each step once; the others wait and then find it recorded.
    """
    _check_steps(steps)
    before: SchemaState | None = None
    done: list[int] = []
    while True:
        async with conn.transaction():
            await conn.execute(_POSTGRES_LOCK)
            for statement in _POSTGRES_BOOKKEEPING:
                await conn.execute(statement)
            applied = await _postgres_applied(conn)
            state = _state(steps, applied, target)
            if before is None:
                before = state
            _refuse_if_too_new(state, where)
            if not state.pending:
                return MigrationOutcome(before, _state(steps, applied), tuple(done))
            version = state.pending[0]
            step = steps[version - 1]
            await conn.execute(step.postgres)
            oldest = _oldest_compatible(step, applied)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, oldest_compatible, applied_at)"
                " VALUES ($1, $2, $3, $4)",
                version,
                step.name,
                oldest,
                time.time(),
            )
            await conn.execute("DELETE FROM schema_version")
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", oldest)
        done.append(version)


# ---- on demand (`postroom migrate`) -----------------------------------------------------------


def _sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA busy_timeout = 10000")  # a running server may hold the write lock
    return conn


def migrate_sqlite_file(
    path: str, target: int | None = None, status_only: bool = False
) -> MigrationOutcome:
    """Migrate (or with status_only, only inspect) the SQLite database at path."""
    conn = _sqlite_connect(path)
    try:
        if status_only:
            state = sqlite_state(conn)
            return MigrationOutcome(state, state, ())
        return migrate_sqlite(conn, target=target, where=path)
    finally:
        conn.close()


async def migrate_postgres_dsn(
    dsn: str, target: int | None = None, status_only: bool = False, where: str = "postgresql"
) -> MigrationOutcome:
    """Migrate (or with status_only, only inspect) the PostgreSQL schema the DSN selects."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn)
        try:
            if status_only:
                state = await postgres_state(conn)
                return MigrationOutcome(state, state, ())
            return await migrate_postgres(conn, target=target, where=where)
        finally:
            await conn.close()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StoreError(f"{where}: {exc}") from exc
