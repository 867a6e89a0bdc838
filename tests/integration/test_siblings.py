"""`siblings:///DIR`: the event bus (Unix datagram sockets) and the cache (a shared memory map)
of the processes of one machine. Here the members are in one process, each with its own socket
and its own mapping, exactly as in two processes; tests/e2e/test_sibling_nodes.py runs two
servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from postroom.store import siblings
from postroom.store.events import MESSAGE_NEW, Event, Subscription
from postroom.store.sibling_cache import SiblingCache
from postroom.store.siblings import SiblingEventBus, SiblingGroup


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def new(user: str, uid: int) -> Event:
    return Event(MESSAGE_NEW, user, folder_id="inbox", uid=uid, modseq=uid)


class Node:
    """What one process holds: a group with its event bus and cache on it."""

    def __init__(self, directory: Path, queue_size: int = 1000) -> None:
        self.group = SiblingGroup(directory)
        self.events = SiblingEventBus(self.group, queue_size)
        self.cache = SiblingCache(directory)

    async def open(self) -> Node:
        await self.events.open()
        await self.cache.open()
        return self

    async def close(self) -> None:
        await self.cache.close()
        await self.events.close()


@pytest.fixture
async def pair(directory: Path) -> AsyncIterator[tuple[Node, Node]]:
    a = await Node(directory).open()
    b = await Node(directory).open()
    await asyncio.sleep(0.05)  # a's loop reads b's hello
    yield a, b
    await a.close()
    await b.close()


async def next_event(subscription: Subscription) -> Event:
    return await asyncio.wait_for(anext(aiter(subscription)), 2)


async def test_events_reach_the_other_member_and_its_own(pair: tuple[Node, Node]) -> None:
    a, b = pair
    assert a.group.members == [b.group.name]  # b's hello told a
    assert b.group.members == [a.group.name]  # b found a in the directory
    alice_on_b = await b.events.subscribe("alice")
    everyone_on_a = await a.events.subscribe()
    await a.events.publish(new("bob", 1))
    await a.events.publish(new("alice", 2))
    await b.events.publish(new("alice", 3))
    # bob's filtered out; b's own event comes at once, a's when b's loop reads its socket
    got = [await next_event(alice_on_b), await next_event(alice_on_b)]
    assert sorted(event.uid for event in got) == [2, 3] and got[0] == new("alice", 3)
    assert [await next_event(everyone_on_a) for _ in range(3)] == [
        new("bob", 1), new("alice", 2), new("alice", 3)]


async def test_an_invalidation_applies_before_the_next_read(pair: tuple[Node, Node]) -> None:
    a, b = pair
    for node in (a, b):
        await node.cache.set("u:alice:g1:folders", b"counts")
        await node.cache.set("u:bob:g1:folders", b"counts")
        await node.cache.set("plain", b"1")
    await a.cache.delete_prefix("u:alice:")
    await a.cache.delete("plain")
    # No message has to reach b: the stamps in the shared map already say it.
    assert await b.cache.get("u:alice:g1:folders") is None
    assert await b.cache.get("plain") is None
    assert await b.cache.get("u:bob:g1:folders") == b"counts"
    assert await a.cache.get("u:bob:g1:folders") == b"counts"
    await b.cache.set("u:alice:g2:folders", b"new counts")  # stored after the change: fresh
    assert await b.cache.get("u:alice:g2:folders") == b"new counts"
    await a.cache.delete_prefix("u:")  # shorter than a bucket: everything, everywhere
    assert await b.cache.get("u:bob:g1:folders") is None
    assert await b.cache.get("u:alice:g2:folders") is None


async def test_the_cache_map_survives_restarts_and_slots_collide_safely(
        directory: Path) -> None:
    first = SiblingCache(directory, slots=2)  # every bucket in one slot: all collide
    await first.open()
    await first.set("u:alice:g:x", b"1")
    await first.set("u:bob:g:x", b"2")
    await first.delete_prefix("u:alice:")
    assert await first.get("u:bob:g:x") is None  # a miss too many, never a stale hit
    await first.close()
    again = SiblingCache(directory, slots=2)
    await again.open()
    assert await again.get("u:bob:g:x") is None  # a new process starts empty
    await again.set("u:bob:g:x", b"3")
    assert await again.get("u:bob:g:x") == b"3"
    await again.close()


async def test_a_newcomer_and_a_member_that_left(directory: Path) -> None:
    a = await Node(directory).open()
    b = await Node(directory).open()
    c = await Node(directory).open()
    await asyncio.sleep(0.05)  # a's loop reads the hellos
    try:
        assert sorted(a.group.members) == sorted([b.group.name, c.group.name])
        await b.close()
        assert not (directory / b.group.name).exists()  # its socket file goes with it
        seen = await c.events.subscribe("alice")
        await a.events.publish(new("alice", 1))  # b is found gone and forgotten
        assert await next_event(seen) == new("alice", 1)
        assert a.group.members == [c.group.name]
    finally:
        await a.close()
        await c.close()


async def test_a_dead_process_socket_file_is_removed(directory: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(directory / "999999-dead"))
    dead.close()  # as a killed process leaves it: the file stays, nobody reads
    a = await Node(directory).open()
    try:
        assert a.group.members == []
        assert sorted(os.listdir(directory)) == sorted([a.group.name, ".cache-stamps"])
    finally:
        await a.close()


async def test_a_member_that_cannot_keep_up_is_told_of_the_gap(
    pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    monkeypatch.setattr(siblings, "BACKLOG", 10)
    subscription = await b.events.subscribe("alice")
    # b's loop gets no turn: its socket's queue fills, then a's backlog, then a drops it.
    for uid in range(3000):
        await a.events.publish(new("alice", uid))
    assert b.group.gaps == 0
    await asyncio.sleep(0.1)  # b reads; a sends what it kept, after the gap
    assert b.group.gaps >= 1
    assert subscription.overflowed and subscription.closed  # resynchronise, then resubscribe
    again = await b.events.subscribe("alice")
    await a.events.publish(new("alice", 99999))
    assert (await next_event(again)).uid == 99999


async def test_queued_datagrams_arrive_in_order(directory: Path) -> None:
    a = await Node(directory).open()
    b = await Node(directory, queue_size=10_000).open()
    await asyncio.sleep(0.05)  # a's loop reads b's hello
    subscription = await b.events.subscribe("alice")
    count = 3000  # more than a Unix datagram queue holds: some wait in a's backlog
    for uid in range(count):
        await a.events.publish(new("alice", uid))
    assert a.group._members[b.group.name].backlog  # the kernel's queue did fill
    got = [(await next_event(subscription)).uid for _ in range(count)]
    assert got == list(range(count))
    assert b.group.gaps == 0 and not subscription.overflowed
    assert not a.group._members[b.group.name].backlog
    await a.close()
    await b.close()


async def test_a_directory_too_long_for_a_socket_address(directory: Path) -> None:
    """A Unix socket's address holds ~100 bytes; a data dir's path may be longer."""
    deep = directory / ("d" * 60) / ("e" * 60)
    a = await Node(deep).open()
    b = await Node(deep).open()
    await asyncio.sleep(0.05)
    try:
        assert len(str(deep / b.group.name)) > siblings.MAX_PATH
        seen = await a.events.subscribe("alice")
        await b.events.publish(new("alice", 7))
        assert await next_event(seen) == new("alice", 7)
        assert a.group.members == [b.group.name]
    finally:
        await a.close()
        await b.close()
    assert os.listdir(deep) == [".cache-stamps"]  # the sockets went with their members


async def test_only_the_owner_may_send_to_a_member(tmp_path: Path) -> None:
    directory = tmp_path / "s"  # made by the group, for its user alone
    a = await Node(directory).open()
    try:
        assert (directory.stat().st_mode & 0o777) == 0o700
        assert ((directory / a.group.name).stat().st_mode & 0o777) == 0o600
    finally:
        await a.close()


async def test_a_directory_that_cannot_be_used_leaves_the_process_on_its_own(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The embedded default must not keep a node from starting: where DIR cannot be made
    (here a file is in the way), events and cache stay in the process, with a warning."""
    (tmp_path / "file").write_text("not a directory")
    node = Node(tmp_path / "file" / "siblings")
    await node.open()
    try:
        assert "events reach this process's subscribers only" in caplog.text
        assert "cannot map" in caplog.text
        seen = await node.events.subscribe("alice")
        await node.events.publish(new("alice", 1))
        assert await next_event(seen) == new("alice", 1)
        await node.cache.set("u:alice:g:x", b"1")
        assert await node.cache.get("u:alice:g:x") == b"1"
        await node.cache.delete_prefix("u:alice:")
        assert await node.cache.get("u:alice:g:x") is None
    finally:
        await node.close()
