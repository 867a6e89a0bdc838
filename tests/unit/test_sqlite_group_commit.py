"""Group commit in the SQLite metadata store: concurrent writes share a COMMIT, yet each
transaction still succeeds or fails on its own and survives a reopen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postroom.store.errors import Conflict
from postroom.store.sqlite_metadata import SqliteMetadataStore


def test_concurrent_writes_fail_alone_and_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "meta.db")

    async def scenario() -> None:
        store = SqliteMetadataStore(path)
        await store.open()
        user = await store.create_user("a@example.test", "x")
        names = [f"F{i}" for i in range(40)] + ["F7"]  # one duplicate among them
        results = await asyncio.gather(
            *(store.create_folder(user.user_id, n) for n in names), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], Conflict)
        await store.close()
        again = SqliteMetadataStore(path)
        await again.open()
        folders = {f.name for f in await again.list_folders(user.user_id)}
        assert folders == {f"F{i}" for i in range(40)}
        await again.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("count", [1, 3])
def test_sequential_semantics_inside_a_batch(tmp_path: Path, count: int) -> None:
    async def scenario() -> None:
        store = SqliteMetadataStore(str(tmp_path / "meta.db"))
        await store.open()
        user = await store.create_user("b@example.test", "x")
        await asyncio.gather(*(store.create_folder(user.user_id, f"G{i}") for i in range(count)))
        assert len(await store.list_folders(user.user_id)) == count
        await store.close()

    asyncio.run(scenario())


def test_reopen_same_store_reads_on_the_loop_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqliteMetadataStore(str(tmp_path / "meta.db"))
        await store.open()
        user = await store.create_user("c@example.test", "x")
        folder = await store.create_folder(user.user_id, "H")
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()
        await store.open()
        assert await store.get_folder(user.user_id, folder.folder_id) == folder
        await store.close()

    asyncio.run(scenario())
