"""The incoming pipeline in batches, over the real embedded backends: each item's fate is its own.

A worker takes several items at once and files every copy of the batch in one metadata
transaction; an item that fails or is rejected must not take the others with it, and a batch
taken again after a crash files nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest

from postroom.app import Postroom
from postroom.blob_collector import collect_blobs
from postroom.core.models import Envelope, User
from postroom.mailflow.incoming import (
    DeliverToMailboxes,
    IncomingMessage,
    IncomingPipeline,
    LoadMessage,
    Rejected,
    handle_batch,
)
from postroom.service import DeliveryResult, Inbound
from postroom.store.blobs import blob_hash
from postroom.store.errors import NotFound
from postroom.store.queue import INCOMING, QueueItem


def raw(n: int) -> bytes:
    return (f"From: a@remote.example\r\nSubject: n{n}\r\nMessage-ID: <n{n}@x>\r\n\r\n"
            f"{n}\r\n").encode()


async def enqueue(node: Postroom, count: int, rcpt: tuple[str, ...]) -> list[str]:
    return [await node.service.enqueue_incoming(Envelope("a@remote.example", rcpt), raw(n))
            for n in range(count)]


async def subjects(node: Postroom, user: User, folder: str = "INBOX") -> list[str]:
    page = await node.service.list_messages(user, folder, limit=500)
    return sorted(m.headers.subject for m in page.messages)


class Trouble:
    """A step that rejects message n1 and fails n2 (a passing fault), passing the rest."""

    name = "trouble"

    async def run(self, message: IncomingMessage) -> None:
        subject = message.raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
        if subject == b"n1":
            raise Rejected("n1 is refused")
        if subject == b"n2":
            raise OSError("disk full for n2")


async def test_a_batch_is_filed_in_one_transaction(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    await enqueue(node, 30, ("alice@example.test", "bob@example.test", "nobody@example.test"))
    items = await node.queue.take_many(INCOMING, max_items=100, lease=30)
    assert len(items) == 30
    pipeline = IncomingPipeline(node.service)
    await handle_batch(pipeline, node.queue, items)
    expected = sorted(f"n{n}" for n in range(30))
    assert await subjects(node, alice) == expected
    assert await subjects(node, bob) == expected
    assert await node.queue.size(INCOMING) == 0
    # one blob per message, however many recipients
    records = [m for user in (alice, bob)
               for m in (await node.service.list_messages(user, "INBOX", limit=100)).messages]
    assert len(records) == 60 and len({m.blob_hash for m in records}) == 30


async def test_each_item_keeps_its_own_fate(node: Postroom, users: tuple[User, User]) -> None:
    alice, _ = users
    await enqueue(node, 6, ("alice@example.test",))
    items = await node.queue.take_many(INCOMING, max_items=10, lease=30)
    pipeline = IncomingPipeline(node.service, [LoadMessage(node.service), Trouble(),
                                               DeliverToMailboxes(node.service)])
    await handle_batch(pipeline, node.queue, items)
    assert await subjects(node, alice) == ["n0", "n3", "n4", "n5"]
    left = await node.queue.list(INCOMING)
    assert len(left) == 1  # n2, due again later with its error; n1 was dropped
    assert "disk full for n2" in left[0].last_error
    assert left[0].not_before > items[0].not_before - 30 + 1
    # n1's bytes reached no mailbox: the blob collector takes them, and only them
    refused = blob_hash(raw(1))
    assert await node.metadata.released_blobs(time.time() + 60) == [refused]
    report = await collect_blobs(node.metadata, node.blobs, node.queue, grace=0, settle=0)
    assert report.collected == 1
    with pytest.raises(NotFound):
        await node.blobs.get(refused)
    assert await node.blobs.get(blob_hash(raw(2))) == raw(2)  # still queued for a retry


async def test_a_failing_batch_delivery_falls_back_to_each_message(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, _ = users
    await enqueue(node, 5, ("alice@example.test",))
    items = await node.queue.take_many(INCOMING, max_items=10, lease=30)
    service = node.service
    real = service.deliver_many
    calls: list[int] = []

    async def deliver_many(messages: Sequence[Inbound]) -> list[DeliveryResult]:
        calls.append(len(messages))
        if len(messages) > 1:
            raise OSError("the batch transaction failed")
        return await real(messages)

    service.deliver_many = deliver_many  # type: ignore[method-assign]
    try:
        await handle_batch(IncomingPipeline(service), node.queue, items)
    finally:
        del service.deliver_many
    assert calls == [5, 1, 1, 1, 1, 1]
    assert await subjects(node, alice) == [f"n{n}" for n in range(5)]
    assert await node.queue.size(INCOMING) == 0


async def test_a_batch_taken_again_files_nothing_twice(
        node: Postroom, users: tuple[User, User]) -> None:
    """The worker died after filing but before the ack: the leases run out, the items come
    back (in another batch shape) and their delivery keys make the second run a no-op."""
    alice, bob = users
    await enqueue(node, 8, ("alice@example.test", "bob@example.test"))
    first = await node.queue.take_many(INCOMING, max_items=10, lease=0.2)
    pipeline = IncomingPipeline(node.service)
    outcome = await pipeline.process_batch(first)  # filed; never acked
    assert all(error is None for error in outcome.values())
    await asyncio.sleep(0.3)
    again: list[QueueItem] = []
    while batch := await node.queue.take_many(INCOMING, max_items=3, lease=30):
        again += batch
        await handle_batch(pipeline, node.queue, batch)
    assert sorted(i.item_id for i in again) == sorted(i.item_id for i in first)
    assert all(i.attempts == 2 for i in again)
    expected = [f"n{n}" for n in range(8)]
    assert await subjects(node, alice) == expected
    assert await subjects(node, bob) == expected


async def test_workers_drain_many_items_in_batches(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, _ = users
    ids = await enqueue(node, 150, ("alice@example.test",))
    assert len(set(ids)) == 150
    await node.start_workers()
    for _ in range(1200):
        if len(await subjects(node, alice)) == 150 and not await node.queue.size(INCOMING):
            break
        await asyncio.sleep(0.05)
    assert await subjects(node, alice) == sorted(f"n{n}" for n in range(150))
    payloads = [json.loads(i.payload) for i in await node.queue.list(INCOMING)]
    assert payloads == []
