"""MailService's listing cache shared by two nodes through Redis: whatever node A changes,
node B's very next read shows, on every change path; and a slow reader that read the store
before a change cannot file a stale listing after it (postroom.mailcache).

Both nodes run in this process over one SQLite metadata file and one blob directory, with the
machine's Redis as their shared cache (a key prefix unique to the run).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import MessageRecord, User
from postroom.service import MailService, NotFoundError
from postroom.store.errors import StoreError
from tests.engines import require_redis, unique_name

PASSWORD = "alice-secret-1"


def _message(subject: str) -> bytes:
    return (f"From: carol@example.org\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"\r\nbody of {subject}\r\n").encode()


async def _drop_keys(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[Postroom, Postroom]]:
    redis_url = require_redis()
    prefix = unique_name("mc") + ":"
    shared = tmp_path / "shared"
    shared.mkdir()
    config = tmp_path / "postroom.toml"
    config.write_text(
        "[storage]\n"
        f'metadata = "sqlite:///{shared}/metadata.db"\n'
        f'blobs = "file:///{shared}/blobs"\n'
        f'search = "sqlite:///{shared}/search.db"\n'
        f'cache = "{redis_url}?prefix={prefix}"\n'
        "[spam]\nenabled = false\n"
    )
    a = Postroom(load_settings(config, data_dir=str(tmp_path / "a"), hostname="a.example.test"))
    b = Postroom(load_settings(config, data_dir=str(tmp_path / "b"), hostname="b.example.test"))
    try:
        async with a, b:
            await a.service.add_domain("example.test")
            yield a, b
    finally:
        await _drop_keys(redis_url, prefix)


class CountingReads:
    """Counts B's reads of the store (a thin pass-through on the real store's methods)."""

    def __init__(self, service: MailService, *names: str) -> None:
        self.calls = 0
        store = service.metadata
        for name in names:
            real = getattr(store, name)
            setattr(store, name, self._counted(real))

    def _counted(self, real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)
        return counted


async def _inbox(svc: MailService, user: User) -> dict[str, MessageRecord]:
    page = await svc.list_messages(user, "INBOX")
    return {r.headers.subject: r for r in page.messages}


async def _counts(svc: MailService, user: User) -> dict[str, tuple[int, int]]:
    return {f.name: (c.total, c.unread) for f, c in await svc.list_folders(user)}


async def test_reads_are_served_from_the_cache(nodes: tuple[Postroom, Postroom]) -> None:
    a, b = nodes
    user = await a.service.add_user("alice@example.test", PASSWORD)
    record = await a.service.append(user, "INBOX", _message("one"))
    reads = CountingReads(b.service, "list_messages", "get_message", "list_folders")
    for _ in range(3):
        assert set(await _inbox(b.service, user)) == {"one"}
        assert (await b.service.get_message(user, record.message_id)).uid == record.uid
        assert (await _counts(b.service, user))["INBOX"] == (1, 1)
    assert reads.calls == 3  # one of each; the other reads were hits, A's cache included
    await a.service.append(user, "INBOX", _message("two"))
    assert set(await _inbox(b.service, user)) == {"one", "two"}
    assert reads.calls == 4


async def test_every_change_on_a_is_seen_by_b_at_once(nodes: tuple[Postroom, Postroom]) -> None:
    a, b = nodes
    svc_a, svc_b = a.service, b.service
    user = await svc_a.add_user("alice@example.test", PASSWORD)
    first = await svc_a.append(user, "INBOX", _message("first"))
    second = await svc_a.append(user, "INBOX", _message("second"))

    async def warm() -> None:  # B caches its listing, summaries and counts before each change
        await _inbox(svc_b, user)
        for record in (await svc_b.list_messages(user, "INBOX")).messages:
            await svc_b.get_message(user, record.message_id)
        await _counts(svc_b, user)

    # STORE: flags and unread counts
    await warm()
    await svc_a.store_flags(user, [first.message_id], add=["\\Seen", "\\Flagged"])
    assert (await _inbox(svc_b, user))["first"].flags.names() == ["\\Seen", "\\Flagged"]
    assert (await svc_b.get_message(user, first.message_id)).flags.names() == \
        ["\\Seen", "\\Flagged"]
    assert (await _counts(svc_b, user))["INBOX"] == (2, 1)
    await warm()
    await svc_a.set_flags(user, [first.message_id], remove=["\\Seen"])
    assert (await _inbox(svc_b, user))["first"].flags.names() == ["\\Flagged"]
    assert (await _counts(svc_b, user))["INBOX"] == (2, 2)

    # delivery over the queue path (deliver) and APPEND
    await warm()
    from postroom.core.models import Envelope
    await svc_a.deliver(Envelope("carol@example.org", ("alice@example.test",)),
                        _message("delivered"))
    assert "delivered" in await _inbox(svc_b, user)
    await warm()
    await svc_a.append(user, "INBOX", _message("appended"), flags=["\\Seen"])
    assert (await _inbox(svc_b, user))["appended"].flags.names() == ["\\Seen"]

    # MOVE, COPY, EXPUNGE
    await warm()
    moved = await svc_a.move(user, [second.message_id], "Archive")
    assert "second" not in await _inbox(svc_b, user)
    assert [r.headers.subject for r in (await svc_b.list_messages(user, "Archive")).messages] \
        == ["second"]
    assert (await svc_b.get_message(user, moved[0].message_id)).folder_id == \
        moved[0].folder_id
    assert (await _counts(svc_b, user))["Archive"] == (1, 1)
    await warm()
    copies = await svc_a.copy(user, [first.message_id], "Archive")
    assert {r.headers.subject for r in (await svc_b.list_messages(user, "Archive")).messages} \
        == {"first", "second"}
    await warm()
    await svc_b.list_messages(user, "Archive")
    await svc_a.expunge(user, [copies[0].message_id])
    assert [r.headers.subject for r in (await svc_b.list_messages(user, "Archive")).messages] \
        == ["second"]
    await warm()
    await svc_a.expunge(user, [first.message_id])
    assert "first" not in await _inbox(svc_b, user)
    try:
        await svc_b.get_message(user, first.message_id)
        raise AssertionError("B served an expunged message from its cache")
    except NotFoundError:
        pass

    # folders: create, subscribe, rename, delete
    await warm()
    await svc_a.create_folder(user, "Projects")
    assert "Projects" in await _counts(svc_b, user)
    await svc_a.set_subscribed(user, "Projects", False)
    assert [f.subscribed for f, _ in await svc_b.list_folders(user)
            if f.name == "Projects"] == [False]
    await svc_a.rename_folder(user, "Projects", "Work")
    names = await _counts(svc_b, user)
    assert "Work" in names and "Projects" not in names
    await svc_a.delete_folder(user, "Work")
    assert "Work" not in await _counts(svc_b, user)


async def test_a_slow_reader_cannot_file_a_stale_listing(
        nodes: tuple[Postroom, Postroom]) -> None:
    """B reads the store, then stalls; meanwhile A changes a flag and invalidates; B then
    files what it read. B's next listing must still show A's change."""
    a, b = nodes
    user = await a.service.add_user("alice@example.test", PASSWORD)
    record = await a.service.append(user, "INBOX", _message("race"))
    store = b.service.metadata
    real = store.list_messages
    has_read, release = asyncio.Event(), asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        found = await real(*args, **kwargs)
        has_read.set()
        await release.wait()  # the change below lands while this read is in flight
        return found

    setattr(store, "list_messages", slow)  # noqa: B010 - an instance attribute, for this test
    reader = asyncio.create_task(b.service.list_messages(user, "INBOX"))
    await asyncio.wait_for(has_read.wait(), 10)
    await a.service.store_flags(user, [record.message_id], add=["\\Seen"])
    release.set()
    stale = await reader
    assert stale.messages[0].flags.names() == []  # it read before the change: fine
    setattr(store, "list_messages", real)  # noqa: B010
    fresh = await b.service.list_messages(user, "INBOX")
    assert fresh.messages[0].flags.names() == ["\\Seen"]
    fresh_a = await a.service.list_messages(user, "INBOX")
    assert fresh_a.messages[0].flags.names() == ["\\Seen"]


async def test_a_failed_invalidation_never_shows_a_stale_listing_here(
        nodes: tuple[Postroom, Postroom]) -> None:
    """The cache unreachable for a change's invalidation (both tries), then back: the node
    that made the change shows it at its next read, whether the cache is back by then or not,
    and caches again once an invalidation gets through."""
    a, _ = nodes
    alice = await a.service.add_user("alice@example.test", PASSWORD)
    await a.service.append(alice, "INBOX", _message("first"))
    assert set(await _inbox(a.service, alice)) == {"first"}  # now cached
    cache = a.service.mail_cache.cache
    real = cache.delete_prefix
    failing = {"left": 3}  # both tries of the change, then the first read's retry

    async def unreachable(prefix: str) -> None:
        if failing["left"] > 0:
            failing["left"] -= 1
            raise StoreError("Error 111 connecting to the cache. Connection refused.")
        await real(prefix)

    cache.delete_prefix = unreachable  # type: ignore[method-assign]
    await a.service.append(alice, "INBOX", _message("second"))
    reads = CountingReads(a.service, "list_messages")
    assert set(await _inbox(a.service, alice)) == {"first", "second"}  # still unreachable
    assert set(await _inbox(a.service, alice)) == {"first", "second"}  # back: dropped now
    assert set(await _inbox(a.service, alice)) == {"first", "second"}  # and cached again
    assert reads.calls == 2
