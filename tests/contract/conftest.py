"""Shared fixtures for the contract suites: each seam's suite runs against every implementation.

A new backend plugs in by adding a param to the backend fixture and a branch that builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.store.metadata import MetadataStore
from postroom.store.sqlite_metadata import SqliteMetadataStore
from tests.pgtest import TestDatabase, open_test_database

MetadataFactory = Callable[[], MetadataStore]


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[tuple[TestDatabase | None, str]]:
    """This run's PostgreSQL database (dropped at the end), or None and why it is missing."""
    db, why = open_test_database()
    try:
        yield db, why
    finally:
        if db is not None:
            db.drop()


@pytest.fixture
def postgres_dsn(postgres_database: tuple[TestDatabase | None, str]) -> str:
    """A DSN whose tables land in a fresh schema of the run's database."""
    db, why = postgres_database
    if db is None:
        pytest.skip(why)
    return db.new_schema()


@pytest.fixture(params=["sqlite", "postgres"])
def metadata_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MetadataFactory:
    """Builds unopened stores that all share one fresh database (as separate processes would)."""
    if request.param == "sqlite":
        path = str(tmp_path / "metadata.sqlite3")
        return lambda: SqliteMetadataStore(path)
    if request.param == "postgres":
        from postroom.store.postgres_metadata import PostgresMetadataStore

        dsn: str = request.getfixturevalue("postgres_dsn")
        return lambda: PostgresMetadataStore(dsn, max_size=4)
    raise NotImplementedError(request.param)


@pytest_asyncio.fixture
async def metadata_store(metadata_store_factory: MetadataFactory) -> AsyncIterator[MetadataStore]:
    store = metadata_store_factory()
    await store.open()
    try:
        yield store
    finally:
        await store.close()
