"""A real PostgreSQL for the tests: one database per test run, one schema per test.

The server is the one at POSTROOM_TEST_POSTGRES (default: the machine's own on 127.0.0.1:5432,
trust auth, user postgres). A run creates its database `postroom_test_<random>` and drops it at
the end; each test gets a fresh schema in it, selected through the DSN's search_path, which is
cheaper than a database per test. When the server cannot be reached the tests that need it skip,
saying why (and under POSTROOM_REQUIRE_ALL=1 a skip is a failure).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

ADMIN_DSN = os.environ.get(
    "POSTROOM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def run_in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on its own loop in a helper thread.

    Fixtures use this so that asyncio.run never touches the test's own event loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="pgtest")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_schema(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    query = f"{parts.query}&search_path={schema}" if parts.query else f"search_path={schema}"
    return urlunsplit(parts._replace(query=query))


class TestDatabase:
    """The run's database; `new_schema()` gives a DSN whose tables land in a fresh schema."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, admin_dsn: str = ADMIN_DSN) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"postroom_test_{secrets.token_hex(6)}"
        self.dsn = with_database(admin_dsn, self.name)
        self._schemas = 0

    def create(self) -> None:
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_dsn, timeout=10)
            try:
                await conn.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await conn.close()

        run_in_thread(go)

    def drop(self) -> None:
        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(self.admin_dsn, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                await conn.close()

        run_in_thread(go)

    def new_schema(self) -> str:
        import asyncpg

        self._schemas += 1
        schema = f"t{self._schemas}_{secrets.token_hex(3)}"

        async def go() -> None:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                await conn.execute(f'CREATE SCHEMA "{schema}"')
            finally:
                await conn.close()

        run_in_thread(go)
        return with_schema(self.dsn, schema)


def open_test_database() -> tuple[TestDatabase | None, str]:
    """Create the run's database, or (None, why not)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return None, "asyncpg is not installed (pip install -e '.[scale]')"
    db = TestDatabase()
    try:
        db.create()
    except Exception as exc:
        parts = urlsplit(db.admin_dsn)
        return None, f"PostgreSQL not reachable at {parts.hostname}:{parts.port}: {exc!r}"
    return db, ""
