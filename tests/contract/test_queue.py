"""Contract for the queue seam: every `Queue` implementation must pass this suite.

To add an implementation, add its name to `IMPLEMENTATIONS` and a branch to `_factory`
(skipping when its server is not configured). Leases and delays are kept to fractions of a
second so the suite stays fast.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.store.queue import INCOMING, OUTGOING, Queue, QueueItem
from postroom.store.sqlite_queue import SqliteQueue
from tests.engines import require_nats, unique_name

IMPLEMENTATIONS = ["sqlite", "nats"]

LEASE = 0.2

MakeQueue = Callable[[], Awaitable[Queue]]


def _factory(name: str, tmp_path: Path) -> Callable[[], Queue]:
    if name == "sqlite":
        path = str(tmp_path / "queue.db")
        # A long poll interval proves that a waiting take is woken by put and by due times,
        # not by polling.
        return lambda: SqliteQueue(path, poll_interval=5.0)
    if name == "nats":
        from postroom.store.nats_queue import NatsQueue

        url, prefix = require_nats(), unique_name("q")
        return lambda: NatsQueue(url, stream_prefix=prefix)
    raise AssertionError(f"unknown queue {name}")


async def _remove_streams(queue: Queue) -> None:
    """Delete the JetStream streams a NATS-backed test made (their prefix is its own)."""
    from postroom.store.nats_queue import NatsQueue

    if not isinstance(queue, NatsQueue):
        return
    import nats

    nc = await nats.connect(queue.servers)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            if name.config.name and name.config.name.startswith(queue.prefix + "_"):
                await js.delete_stream(name.config.name)
    finally:
        await nc.close()


@pytest_asyncio.fixture(params=IMPLEMENTATIONS)
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeQueue]:
    """Opens a new queue on the same underlying storage each call (to test reopening)."""
    build = _factory(request.param, tmp_path)
    opened: list[Queue] = []

    async def make() -> Queue:
        queue = build()
        await queue.open()
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.close()
    if opened:
        await _remove_streams(opened[0])


@pytest_asyncio.fixture
async def queue(make_queue: MakeQueue) -> Queue:
    return await make_queue()


async def _take(queue: Queue, topic: str = INCOMING, **kw: float) -> QueueItem:
    item = await queue.take(topic, lease=kw.pop("lease", 30.0), **kw)
    assert item is not None
    return item


async def test_empty_take_returns_none(queue: Queue) -> None:
    assert await queue.take(INCOMING) is None
    started = time.monotonic()
    assert await queue.take(INCOMING, wait=0.2) is None
    assert 0.15 <= time.monotonic() - started < 2.0


async def test_put_take_ack(queue: Queue) -> None:
    before = time.time()
    item_id = await queue.put(INCOMING, b"\x00payload\xff")
    item = await _take(queue)
    assert item.item_id == item_id
    assert item.topic == INCOMING
    assert item.payload == b"\x00payload\xff"
    assert item.attempts == 1
    assert item.last_error == ""
    assert before - 1 <= item.enqueued_at <= time.time() + 1
    await queue.ack(item)
    assert await queue.size(INCOMING) == 0
    assert await queue.take(INCOMING) is None


async def test_generated_ids_are_unique(queue: Queue) -> None:
    ids = {await queue.put(INCOMING, b"x") for _ in range(20)}
    assert len(ids) == 20
    assert await queue.size(INCOMING) == 20


async def test_fifo(queue: Queue) -> None:
    for n in range(5):
        await queue.put(INCOMING, str(n).encode(), item_id=f"m{n}")
    taken = [(await _take(queue)).item_id for _ in range(5)]
    assert taken == ["m0", "m1", "m2", "m3", "m4"]
    assert await queue.take(INCOMING) is None


async def test_order_is_by_due_time(queue: Queue) -> None:
    await queue.put(INCOMING, b"later", item_id="later", delay=0.3)
    await queue.put(INCOMING, b"now", item_id="now")
    assert (await _take(queue)).item_id == "now"
    assert await queue.take(INCOMING) is None
    await asyncio.sleep(0.35)
    assert (await _take(queue)).item_id == "later"


async def test_delay(queue: Queue) -> None:
    started = time.monotonic()
    await queue.put(INCOMING, b"x", item_id="d", delay=0.3)
    assert await queue.take(INCOMING) is None
    assert await queue.size(INCOMING) == 1
    item = await _take(queue, wait=3.0)
    elapsed = time.monotonic() - started
    assert item.item_id == "d"
    assert 0.25 <= elapsed < 1.5  # woken when it became due, not at a poll


async def test_retry_with_delay(queue: Queue) -> None:
    await queue.put(OUTGOING, b"x", item_id="r")
    first = await _take(queue, OUTGOING)
    await queue.retry(first, 0.2, "451 4.7.1 greylisted")
    assert await queue.take(OUTGOING) is None
    await asyncio.sleep(0.25)
    second = await _take(queue, OUTGOING)
    assert second.item_id == "r"
    assert second.attempts == 2
    assert second.last_error == "451 4.7.1 greylisted"
    assert second.payload == b"x"


async def test_retry_without_delay_is_due_at_once(queue: Queue) -> None:
    await queue.put(OUTGOING, b"x", item_id="r0")
    await queue.retry(await _take(queue, OUTGOING), 0.0, "oops")
    again = await _take(queue, OUTGOING)
    assert again.attempts == 2
    assert again.last_error == "oops"


async def test_taken_item_is_not_handed_out_twice(queue: Queue) -> None:
    await queue.put(INCOMING, b"x", item_id="once")
    await _take(queue, lease=LEASE)
    assert await queue.take(INCOMING) is None
    assert await queue.size(INCOMING) == 1  # leased items still count


async def test_lease_expiry_redelivers(queue: Queue) -> None:
    await queue.put(INCOMING, b"x", item_id="lost")
    first = await _take(queue, lease=LEASE)
    assert first.attempts == 1
    assert await queue.take(INCOMING) is None
    await asyncio.sleep(LEASE + 0.05)
    second = await _take(queue, lease=LEASE)
    assert second.item_id == "lost"
    assert second.attempts == 2
    assert second.payload == b"x"


async def test_waiting_take_gets_expired_lease(queue: Queue) -> None:
    await queue.put(INCOMING, b"x", item_id="lost")
    await _take(queue, lease=LEASE)
    started = time.monotonic()
    again = await _take(queue, lease=LEASE, wait=3.0)
    assert again.attempts == 2
    assert time.monotonic() - started < 1.5


async def test_stale_ack_is_ignored(queue: Queue) -> None:
    await queue.put(INCOMING, b"x", item_id="s")
    old = await _take(queue, lease=LEASE)
    await asyncio.sleep(LEASE + 0.05)
    new = await _take(queue, lease=30.0)
    assert new.attempts == old.attempts + 1
    await queue.ack(old)  # the first worker wakes up late: must not drop the new lease's item
    assert await queue.size(INCOMING) == 1
    await queue.retry(old, 0.0, "stale")  # nor re-queue it under the new worker
    assert await queue.take(INCOMING) is None
    await queue.ack(new)
    assert await queue.size(INCOMING) == 0


async def test_ack_removes_only_its_item(queue: Queue) -> None:
    await queue.put(INCOMING, b"a", item_id="a")
    await queue.put(INCOMING, b"b", item_id="b")
    await queue.ack(await _take(queue))
    assert [i.item_id for i in await queue.list(INCOMING)] == ["b"]


async def test_duplicate_item_id_is_ignored(queue: Queue) -> None:
    assert await queue.put(INCOMING, b"first", item_id="dup") == "dup"
    assert await queue.put(INCOMING, b"second", item_id="dup") == "dup"
    assert await queue.size(INCOMING) == 1
    item = await _take(queue)
    assert item.payload == b"first"
    # A re-put while leased does not reset the lease or hand it out again.
    assert await queue.put(INCOMING, b"third", item_id="dup") == "dup"
    assert await queue.take(INCOMING) is None


async def test_topics_are_isolated(queue: Queue) -> None:
    await queue.put(INCOMING, b"in", item_id="same")
    await queue.put(OUTGOING, b"out", item_id="same")  # the same id in another topic is distinct
    assert await queue.size(INCOMING) == 1
    assert await queue.size(OUTGOING) == 1
    assert (await _take(queue, OUTGOING)).payload == b"out"
    assert await queue.take(OUTGOING) is None
    item = await _take(queue, INCOMING)
    assert item.payload == b"in"
    await queue.ack(item)
    assert await queue.size(INCOMING) == 0
    assert await queue.size(OUTGOING) == 1
    assert await queue.take("other") is None


async def test_survives_close_and_reopen(make_queue: MakeQueue) -> None:
    first = await make_queue()
    for n in range(4):
        await first.put(INCOMING, f"p{n}".encode(), item_id=f"k{n}")
    await first.put(OUTGOING, b"out", item_id="o", delay=60)
    await first.ack(await _take(first))  # k0 done
    leased = await _take(first, lease=LEASE)  # k1 taken, never acked
    assert leased.item_id == "k1"
    await first.close()

    second = await make_queue()
    assert await second.size(INCOMING) == 3
    assert await second.size(OUTGOING) == 1
    assert {i.item_id for i in await second.list(INCOMING)} == {"k1", "k2", "k3"}
    assert (await _take(second)).payload == b"p2"
    assert (await _take(second)).item_id == "k3"
    await asyncio.sleep(LEASE + 0.05)  # the lease taken before the restart runs out
    redelivered = await _take(second)
    assert (redelivered.item_id, redelivered.attempts) == ("k1", 2)
    assert await second.take(OUTGOING) is None  # still delayed


async def test_take_with_wait_wakes_on_put(queue: Queue) -> None:
    started = time.monotonic()
    waiting = asyncio.create_task(queue.take(INCOMING, lease=30.0, wait=4.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await queue.put(INCOMING, b"wake", item_id="w")
    item = await asyncio.wait_for(waiting, 3.0)
    assert item is not None and item.item_id == "w"
    assert time.monotonic() - started < 1.0


async def test_one_put_wakes_one_of_many_waiters(queue: Queue) -> None:
    waiters = [asyncio.create_task(queue.take(INCOMING, lease=30.0, wait=0.6)) for _ in range(3)]
    await asyncio.sleep(0.05)
    await queue.put(INCOMING, b"x", item_id="only")
    results = await asyncio.gather(*waiters)
    assert [r.item_id for r in results if r is not None] == ["only"]


async def test_concurrent_puts_are_all_committed(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    ids = await asyncio.gather(
        *(queue.put(INCOMING, f"m{n}".encode(), item_id=f"id{n:03}") for n in range(200))
    )
    assert sorted(ids) == [f"id{n:03}" for n in range(200)]
    assert await queue.size(INCOMING) == 200
    if isinstance(queue, SqliteQueue):
        assert queue.commits < 200  # puts shared commits
    await queue.close()
    reopened = await make_queue()
    assert await reopened.size(INCOMING) == 200
    payloads = set()
    while (item := await reopened.take(INCOMING)) is not None:
        payloads.add(item.payload)
        await reopened.ack(item)
    assert payloads == {f"m{n}".encode() for n in range(200)}


async def test_list_size_remove(queue: Queue) -> None:
    assert await queue.list(INCOMING) == []
    assert await queue.size(INCOMING) == 0
    for n in range(5):
        await queue.put(INCOMING, f"p{n}".encode(), item_id=f"l{n}", delay=60 if n == 2 else 0)
    taken = await _take(queue)

    listed = await queue.list(INCOMING)
    # Waiting, delayed and leased items all show, oldest first.
    assert [i.item_id for i in listed] == ["l0", "l1", "l2", "l3", "l4"]
    assert listed[0].attempts == 1
    assert listed[0].payload == b"p0"
    assert listed[2].not_before > time.time() + 30
    assert [i.item_id for i in await queue.list(INCOMING, limit=2)] == ["l0", "l1"]
    assert await queue.list(OUTGOING) == []

    assert await queue.remove(INCOMING, "l3") is True
    assert await queue.remove(INCOMING, "l3") is False
    assert await queue.remove(OUTGOING, "l1") is False  # ids are per topic
    assert await queue.remove(INCOMING, taken.item_id) is True  # leased items can be removed
    assert await queue.size(INCOMING) == 3
    await queue.ack(taken)  # acking a removed item is harmless
    assert [i.item_id for i in await queue.list(INCOMING)] == ["l1", "l2", "l4"]


async def test_exists_sees_waiting_and_leased_items_until_removed(queue: Queue) -> None:
    await queue.put(OUTGOING, b"x", item_id="e1")
    await queue.put(OUTGOING, b"y", item_id="e2", delay=60)
    assert await queue.exists(OUTGOING, "e1") and await queue.exists(OUTGOING, "e2")
    assert not await queue.exists(INCOMING, "e1")  # ids are per topic
    taken = await queue.take(OUTGOING, lease=30)
    assert taken is not None and taken.item_id == "e1"
    assert await queue.exists(OUTGOING, "e1")  # leased, still there
    assert await queue.remove(OUTGOING, "e1")
    assert not await queue.exists(OUTGOING, "e1")
    await queue.ack(taken)
    assert not await queue.exists(OUTGOING, "nope")


async def test_take_many_leases_the_oldest_due_items(queue: Queue) -> None:
    for n in range(5):
        await queue.put(INCOMING, f"p{n}".encode(), item_id=f"b{n}", delay=60 if n == 3 else 0)
    first = await queue.take_many(INCOMING, max_items=3, lease=30.0)
    assert [i.item_id for i in first] == ["b0", "b1", "b2"]
    assert [(i.payload, i.attempts, i.topic) for i in first] == [
        (b"p0", 1, INCOMING), (b"p1", 1, INCOMING), (b"p2", 1, INCOMING)]
    rest = await queue.take_many(INCOMING, max_items=10, lease=30.0)
    assert [i.item_id for i in rest] == ["b4"]  # b3 is not due; leased ones are not handed out
    assert await queue.take_many(INCOMING, max_items=10) == []
    assert await queue.take(INCOMING) is None
    assert await queue.size(INCOMING) == 5


async def test_take_many_waits_for_the_first_item(queue: Queue) -> None:
    started = time.monotonic()
    assert await queue.take_many(INCOMING, max_items=5, wait=0.2) == []
    assert 0.15 <= time.monotonic() - started < 2.0
    waiting = asyncio.create_task(queue.take_many(INCOMING, max_items=5, lease=30.0, wait=4.0))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = time.monotonic()
    await queue.put(INCOMING, b"wake", item_id="w")
    items = await asyncio.wait_for(waiting, 3.0)
    assert [i.item_id for i in items] == ["w"]
    assert time.monotonic() - started < 1.0


async def test_take_many_batch_expires_and_is_redelivered(queue: Queue) -> None:
    for n in range(3):
        await queue.put(INCOMING, b"x", item_id=f"e{n}")
    assert len(await queue.take_many(INCOMING, max_items=3, lease=LEASE)) == 3
    await asyncio.sleep(LEASE + 0.05)
    again = await queue.take_many(INCOMING, max_items=3, lease=30.0, wait=2.0)
    if len(again) < 3:  # an engine may hand expired leases back one pull at a time
        again += await queue.take_many(INCOMING, max_items=3 - len(again), lease=30.0, wait=2.0)
    assert sorted((i.item_id, i.attempts) for i in again) == [("e0", 2), ("e1", 2), ("e2", 2)]


async def test_ack_many(queue: Queue) -> None:
    for n in range(4):
        await queue.put(INCOMING, b"x", item_id=f"a{n}")
    taken = await queue.take_many(INCOMING, max_items=3, lease=30.0)
    await queue.ack_many([])
    await queue.ack_many(taken)
    assert [i.item_id for i in await queue.list(INCOMING)] == ["a3"]
    await queue.ack_many(taken)  # again: harmless
    assert await queue.size(INCOMING) == 1


async def test_ack_many_ignores_stale_leases(queue: Queue) -> None:
    await queue.put(INCOMING, b"x", item_id="s0")
    await queue.put(INCOMING, b"x", item_id="s1")
    old = await queue.take_many(INCOMING, max_items=2, lease=LEASE)
    assert [i.item_id for i in old] == ["s0", "s1"]
    await asyncio.sleep(LEASE + 0.05)
    new = await _take(queue, lease=30.0)  # one of them went to another taker meanwhile
    assert new.attempts == 2
    await queue.ack_many(old)  # late: must not drop the new lease's item
    assert [i.item_id for i in await queue.list(INCOMING)] == [new.item_id]
    await queue.ack_many([new])
    assert await queue.size(INCOMING) == 0


async def test_take_many_on_two_nodes_shares_the_work(make_queue: MakeQueue) -> None:
    node_a, node_b = await make_queue(), await make_queue()
    total = 150
    await asyncio.gather(*(node_a.put(INCOMING, b"w", item_id=f"t{n:03}") for n in range(total)))
    taken: list[str] = []

    async def worker(queue: Queue) -> None:
        while batch := await queue.take_many(INCOMING, max_items=16, lease=30.0, wait=0.3):
            assert all(item.attempts == 1 for item in batch)
            taken.extend(item.item_id for item in batch)
            await queue.ack_many(batch)

    await asyncio.wait_for(
        asyncio.gather(*(worker(q) for q in (node_a, node_b) for _ in range(3))), 60)
    assert sorted(taken) == [f"t{n:03}" for n in range(total)]
    assert await node_a.size(INCOMING) == 0


async def test_nats_nodes_with_other_settings_share_the_queue() -> None:
    """A node configured with another ack_wait (an upgrade, a typo) still uses the existing
    stream and consumer instead of refusing mail."""
    from postroom.store.nats_queue import NatsQueue

    url, prefix = require_nats(), unique_name("q")
    first, second = NatsQueue(url, stream_prefix=prefix), NatsQueue(url, stream_prefix=prefix,
                                                                     ack_wait=7.0)
    await first.open()
    await second.open()
    try:
        await first.put(INCOMING, b"x", item_id="shared")
        item = await _take(second)
        assert item.item_id == "shared"
        await second.ack(item)
        assert await first.size(INCOMING) == 0
    finally:
        await first.close()
        await second.close()
        await _remove_streams(first)


async def test_concurrent_takers_on_two_nodes_share_the_work(make_queue: MakeQueue) -> None:
    """Workers on two nodes (two opened queues on the same storage) each get distinct items:
    no item is handed to two workers while its lease holds, and none is left behind."""
    node_a, node_b = await make_queue(), await make_queue()
    total = 120
    await asyncio.gather(*(node_a.put(INCOMING, b"w", item_id=f"w{n:03}") for n in range(total)))
    taken: list[str] = []

    async def worker(queue: Queue) -> None:
        while (item := await queue.take(INCOMING, lease=30.0, wait=0.3)) is not None:
            taken.append(item.item_id)
            assert item.attempts == 1
            await queue.ack(item)

    await asyncio.wait_for(
        asyncio.gather(*(worker(q) for q in (node_a, node_b) for _ in range(4))), 60)
    assert sorted(taken) == [f"w{n:03}" for n in range(total)]
    assert await node_a.size(INCOMING) == 0


async def test_nats_leftover_item_state_is_not_taken_over() -> None:
    """A crash between an ack and the removal of the item's state record leaves the record
    behind; an item queued later under the same id starts afresh all the same."""
    import json

    from postroom.store.nats_queue import NatsQueue, item_token

    url, prefix = require_nats(), unique_name("q")
    queue = NatsQueue(url, stream_prefix=prefix, duplicate_window=1.0)
    await queue.open()
    try:
        await queue.put(INCOMING, b"x", item_id="again")  # makes the streams
        await queue.ack(await _take(queue))
        js = queue._jetstream()
        leftover = {"seq": 999, "attempts": 7, "not_before": time.time() + 3600,
                    "last_error": "old", "reply": "nowhere"}
        await js.publish(f"{prefix}.s.{INCOMING}.{item_token('again')}",
                         json.dumps(leftover).encode())
        await asyncio.sleep(1.1)  # past the duplicate window: the id may be queued anew
        await queue.put(INCOMING, b"y", item_id="again")
        item = await _take(queue)
        assert (item.payload, item.attempts, item.last_error) == (b"y", 1, "")
        await queue.ack(item)
        assert await queue.size(INCOMING) == 0
    finally:
        await queue.close()
        await _remove_streams(queue)
