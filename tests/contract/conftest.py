"""Shared fixtures for the contract suites: each seam's suite runs against every implementation.

A new backend plugs in by adding a param to the backend fixture and a branch that builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.store.metadata import MetadataStore
from postroom.store.sqlite_metadata import SqliteMetadataStore

MetadataFactory = Callable[[], MetadataStore]


@pytest.fixture(params=["sqlite"])
def metadata_store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> MetadataFactory:
    """Builds unopened stores that all share one fresh database (as separate processes would)."""
    if request.param == "sqlite":
        path = str(tmp_path / "metadata.sqlite3")
        return lambda: SqliteMetadataStore(path)
    raise NotImplementedError(request.param)


@pytest_asyncio.fixture
async def metadata_store(metadata_store_factory: MetadataFactory) -> AsyncIterator[MetadataStore]:
    store = metadata_store_factory()
    await store.open()
    try:
        yield store
    finally:
        await store.close()
