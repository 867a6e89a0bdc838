"""Fixtures shared by the integration tests: one embedded node (SQLite files and a blob
directory under the test's tmp_path) with the local domain example.test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import User


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Postroom]:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), hostname="mx.example.test")
    async with Postroom(settings) as n:
        await n.service.add_domain("example.test")
        yield n


@pytest_asyncio.fixture
async def users(node: Postroom) -> tuple[User, User]:
    """alice@example.test and bob@example.test."""
    a = await node.service.add_user("alice@example.test", "alice-secret-1")
    b = await node.service.add_user("bob@example.test", "bob-secret-22")
    return a, b
