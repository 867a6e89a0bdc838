"""Contract for the event seam: every `EventBus` implementation must pass this suite.

To add an implementation, add its name to `IMPLEMENTATIONS` and a branch to `_factory`
(skipping when its server is not configured).

Tests never cancel a pending read (that would end a generator-based iterator); they show that an
event was *not* delivered by publishing a marker afterwards and checking what arrives first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from postroom.store.events import (
    FOLDER_COUNTS,
    MESSAGE_FLAGS,
    MESSAGE_NEW,
    Event,
    EventBus,
    Subscription,
)
from postroom.store.local_events import LocalEventBus
from tests.engines import require_redis, unique_name

IMPLEMENTATIONS = ["local", "siblings", "redis"]

TIMEOUT = 2.0


def _factory(name: str) -> EventBus:
    if name == "local":
        return LocalEventBus()
    if name == "siblings":
        from postroom.store.siblings import SiblingEventBus, SiblingGroup

        return SiblingEventBus(SiblingGroup(tempfile.mkdtemp(prefix="ps-", dir="/tmp")))
    if name == "redis":
        from postroom.store.redis_events import RedisEventBus

        return RedisEventBus(require_redis(), prefix=unique_name("e") + ":")
    raise AssertionError(f"unknown event bus {name}")


@pytest_asyncio.fixture(params=IMPLEMENTATIONS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    bus = _factory(request.param)
    await bus.open()
    yield bus
    await bus.close()
    _clean(bus)


def _clean(bus: EventBus) -> None:
    from postroom.store.siblings import SiblingEventBus

    if isinstance(bus, SiblingEventBus):
        shutil.rmtree(bus.group.directory, ignore_errors=True)


class Reader:
    """Reads one subscription through a single iterator."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self._it = aiter(subscription)

    async def next(self) -> Event:
        return await asyncio.wait_for(anext(self._it), TIMEOUT)

    async def rest(self) -> list[Event]:
        """Every remaining event, until the iteration ends."""

        async def drain() -> list[Event]:
            return [event async for event in self._it]

        return await asyncio.wait_for(drain(), TIMEOUT)


def new(user: str, uid: int = 1) -> Event:
    return Event(MESSAGE_NEW, user, folder_id="inbox", uid=uid, modseq=uid)


async def test_delivers_published_events(bus: EventBus) -> None:
    reader = Reader(await bus.subscribe("alice"))
    event = Event(
        MESSAGE_FLAGS,
        "alice",
        "inbox",
        uid=7,
        modseq=42,
        message_id="m1",
        data={"flags": ["\\Seen"], "nested": {"n": 1}},
    )
    await bus.publish(event)
    assert await reader.next() == event


async def test_per_user_filtering(bus: EventBus) -> None:
    alice = Reader(await bus.subscribe("alice"))
    bob = Reader(await bus.subscribe("bob"))
    await bus.publish(new("bob", 1))
    await bus.publish(new("alice", 2))
    await bus.publish(new("bob", 3))
    assert await alice.next() == new("alice", 2)
    assert await bob.next() == new("bob", 1)
    assert await bob.next() == new("bob", 3)
    await bus.publish(new("alice", 4))
    assert await alice.next() == new("alice", 4)  # bob's 3 never reached alice


async def test_wildcard_subscription_gets_every_user(bus: EventBus) -> None:
    everyone = Reader(await bus.subscribe())
    events = [new("alice", 1), new("bob", 2), Event(FOLDER_COUNTS, "carol", "inbox")]
    for event in events:
        await bus.publish(event)
    assert [await everyone.next() for _ in events] == events


async def test_multiple_subscribers_each_get_a_copy(bus: EventBus) -> None:
    readers = [Reader(await bus.subscribe("alice")) for _ in range(3)]
    everyone = Reader(await bus.subscribe(None))
    for uid in range(1, 4):
        await bus.publish(new("alice", uid))
    for reader in [*readers, everyone]:
        assert [await reader.next() for _ in range(3)] == [new("alice", u) for u in range(1, 4)]


async def test_only_events_from_subscription_on(bus: EventBus) -> None:
    await bus.publish(new("alice", 1))
    reader = Reader(await bus.subscribe("alice"))
    await bus.publish(new("alice", 2))
    assert await reader.next() == new("alice", 2)


async def test_closed_subscription_ends(bus: EventBus) -> None:
    subscription = await bus.subscribe("alice")
    reader = Reader(subscription)
    other = Reader(await bus.subscribe("alice"))
    pending = asyncio.create_task(reader.rest())
    await asyncio.sleep(0.05)  # the reader is now blocked waiting for an event
    await subscription.close()
    assert await pending == []
    await bus.publish(new("alice", 1))  # publishing after a close is fine
    assert await other.next() == new("alice", 1)
    await subscription.close()  # closing twice is fine


async def test_bus_close_ends_every_subscription(bus: EventBus) -> None:
    readers = [Reader(await bus.subscribe(user)) for user in ("alice", "bob", None)]
    pending = [asyncio.create_task(r.rest()) for r in readers]
    await asyncio.sleep(0.05)
    await bus.close()
    assert await asyncio.gather(*pending) == [[], [], []]


async def test_encode_decode_round_trip() -> None:
    event = Event(
        MESSAGE_NEW,
        "u-1",
        "f-2",
        uid=3,
        modseq=4,
        message_id="<x@example.org>",
        data={"subject": "Grüße ✉", "size": 1234, "flags": ["\\Seen"], "spam": False},
    )
    raw = event.encode()
    assert isinstance(raw, bytes)
    assert Event.decode(raw) == event
    # every field, by name (nodes of two releases decode each other's events)
    assert json.loads(raw) == dataclasses.asdict(event)
    assert Event.decode(Event("folder.changed", "u").encode()) == Event("folder.changed", "u")


async def test_slow_subscriber_does_not_block_publisher() -> None:
    bus = LocalEventBus(queue_size=5)
    await bus.open()
    slow = await bus.subscribe("alice")
    fast = Reader(await bus.subscribe("alice"))
    for uid in range(5):
        await bus.publish(new("alice", uid))
        assert await fast.next() == new("alice", uid)
    # slow has read nothing and its buffer is full: the next publish drops it, promptly.
    await asyncio.wait_for(bus.publish(new("alice", 99)), 0.5)
    assert await fast.next() == new("alice", 99)
    assert slow.overflowed and slow.closed
    assert await Reader(slow).rest() == []
    await bus.close()


# Redis: what only a bus shared between processes can show.


async def _redis_pair() -> tuple[EventBus, EventBus]:
    from postroom.store.redis_events import RedisEventBus

    url, prefix = require_redis(), unique_name("e") + ":"
    node_a, node_b = RedisEventBus(url, prefix=prefix), RedisEventBus(url, prefix=prefix)
    await node_a.open()
    await node_b.open()
    return node_a, node_b


async def test_redis_events_reach_other_nodes() -> None:
    node_a, node_b = await _redis_pair()
    try:
        alice_on_b = Reader(await node_b.subscribe("alice"))
        everyone_on_a = Reader(await node_a.subscribe())
        await node_a.publish(new("bob", 1))
        await node_a.publish(new("alice", 2))
        assert await alice_on_b.next() == new("alice", 2)
        assert await everyone_on_a.next() == new("bob", 1)
        assert await everyone_on_a.next() == new("alice", 2)
    finally:
        await node_a.close()
        await node_b.close()


async def test_redis_resubscribe_after_last_listener_left() -> None:
    node_a, node_b = await _redis_pair()
    try:
        for uid in range(1, 4):  # subscribe, close (UNSUBSCRIBE), subscribe again, quickly
            subscription = await node_b.subscribe("alice")
            await node_a.publish(new("alice", uid))
            assert await Reader(subscription).next() == new("alice", uid)
            await subscription.close()
    finally:
        await node_a.close()
        await node_b.close()


async def test_redis_lost_connection_ends_subscriptions() -> None:
    from redis.asyncio import Redis

    from postroom.store.redis_events import RedisEventBus

    node_a, node_b = await _redis_pair()
    admin = Redis.from_url(require_redis())
    try:
        assert isinstance(node_b, RedisEventBus)
        subscription = await node_b.subscribe("alice")
        pending = asyncio.create_task(Reader(subscription).rest())
        await asyncio.sleep(0.05)
        clients = await admin.client_list(_type="pubsub")
        ids = [c["id"] for c in clients if c.get("name") == node_b.subscriber_name]
        assert len(ids) == 1
        await admin.execute_command("CLIENT", "KILL", "ID", ids[0])  # type: ignore[no-untyped-call]
        assert await pending == []  # ended: the subscriber must resynchronise
        assert subscription.interrupted and subscription.overflowed
        again = Reader(await node_b.subscribe("alice"))  # and the bus works again
        await node_a.publish(new("alice", 5))
        assert await again.next() == new("alice", 5)
    finally:
        await admin.aclose()
        await node_a.close()
        await node_b.close()
