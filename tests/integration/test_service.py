"""MailService over the real embedded backends (SQLite files, a blob directory), in process."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_asyncio

from postroom.app import Postroom
from postroom.core.models import Envelope, FolderRole, User
from postroom.service import (
    AuthFailed,
    ConflictError,
    Draft,
    InvalidInput,
    MailService,
    NotFoundError,
    TooManyAttempts,
)
from postroom.store.events import MESSAGE_NEW
from postroom.store.queue import INCOMING, OUTGOING
from tests.corpus import messages


@pytest_asyncio.fixture
async def users(node: Postroom) -> tuple[User, User]:
    a = await node.service.add_user("Alice@Example.TEST", "alice-secret-1")
    b = await node.service.add_user("bob@example.test", "bob-secret-22")
    return a, b


def svc(node: Postroom) -> MailService:
    return node.service


ODD_MESSAGES = [
    b"Subject: only headers\r\nFrom: a@b.example\r\n",
    b"",
    b"\x00\xff\xfe garbage \r\n\r\n\x80\x81",
    b"Subject: =?utf-8?b?w6l0w6k=?= =?iso-8859-1?q?caf=E9?=\r\nFrom: \xe9t\xe9 <x@y.example>\r\n"
    b"\r\nbody\r\n",
    b"Subject: form\x0cfeed\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
    b"Content-Type: text/plain; charset=unknown-8bit\r\n\r\n\xe9\r\n--x",
    b"From: a@b.example\nSubject: bare LF lines\n\nbody\n",
]


@pytest.mark.parametrize("raw", ODD_MESSAGES)
async def test_delivery_keeps_exact_bytes_of_malformed_mail(
        node: Postroom, users: tuple[User, User], raw: bytes) -> None:
    _, bob = users
    result = await svc(node).deliver(Envelope("x@remote.example", ("bob@example.test",)), raw)
    record = result.delivered["bob@example.test"]
    assert await svc(node).raw_message(bob, record.message_id) == raw
    detail = await svc(node).message_detail(bob, record.message_id)
    assert detail.record.size == len(raw)


async def test_corpus_round_trip_exact(node: Postroom, users: tuple[User, User]) -> None:
    _, bob = users
    sample = messages("spam-2", limit=60) + messages("hard-ham-1", limit=60)
    ids = []
    for _, raw in sample:
        result = await svc(node).deliver(Envelope("x@remote.example", ("bob@example.test",)), raw)
        ids.append(result.delivered["bob@example.test"].message_id)
    for (name, raw), mid in zip(sample, ids, strict=True):
        assert await svc(node).raw_message(bob, mid) == raw, name
    page = await svc(node).list_messages(bob, "INBOX", limit=500)
    assert len(page.messages) == len(sample)


async def test_identical_content_stored_once(node: Postroom, users: tuple[User, User]) -> None:
    raw = b"From: a@remote.example\r\nSubject: twice\r\n\r\nsame bytes\r\n"
    await svc(node).deliver(Envelope("a@remote.example",
                                     ("alice@example.test", "bob@example.test")), raw)
    await svc(node).deliver(Envelope("a@remote.example", ("bob@example.test",)), raw)
    blob_files = [p for p in (node.settings.data_dir / "blobs").rglob("*") if p.is_file()]
    assert blob_files == []  # a small message: one row of the pack, in the metadata's file
    assert node.blobs.shares_log_with(node.metadata)
    with sqlite3.connect(node.settings.data_dir / "metadata.db") as conn:
        assert conn.execute("SELECT count(*) FROM packed_blobs").fetchone()[0] == 1
    from postroom.store.blobs import blob_hash

    assert await node.metadata.blob_refcount(blob_hash(raw)) == 3


async def test_incoming_queue_item_delivered_once(node: Postroom, users: tuple[User, User]) -> None:
    _, bob = users
    raw = b"From: a@remote.example\r\nSubject: queued\r\n\r\nhello\r\n"
    item_id = await svc(node).enqueue_incoming(
        Envelope("a@remote.example", ("bob@example.test", "nobody@example.test")), raw)
    item = await node.queue.take(INCOMING, lease=30)
    assert item is not None and item.item_id == item_id
    first = await svc(node).process_incoming(item.payload, item.item_id)
    again = await svc(node).process_incoming(item.payload, item.item_id)  # redelivered item
    assert first.unknown == ("nobody@example.test",)
    assert again.delivered["bob@example.test"].message_id == \
        first.delivered["bob@example.test"].message_id
    page = await svc(node).list_messages(bob, "INBOX")
    assert [m.headers.subject for m in page.messages] == ["queued"]
    # expunged after delivery: a late redelivery still makes no second copy
    await svc(node).expunge(bob, [first.delivered["bob@example.test"].message_id])
    third = await svc(node).process_incoming(item.payload, item.item_id)
    assert third.delivered == {}
    assert (await svc(node).list_messages(bob, "INBOX")).messages == []


async def test_workers_drain_the_incoming_queue(node: Postroom, users: tuple[User, User]) -> None:
    import asyncio

    _, bob = users
    sub = await node.events.subscribe(bob.user_id)
    await node.start_workers()
    for n in range(20):
        await svc(node).enqueue_incoming(
            Envelope("a@remote.example", ("bob@example.test",)),
            f"From: a@remote.example\r\nSubject: n{n}\r\n\r\nbody {n}\r\n".encode())
    seen = 0
    async with asyncio.timeout(20):
        async for event in sub:
            if event.type == MESSAGE_NEW:
                seen += 1
                if seen == 20:
                    break
    await sub.close()
    page = await svc(node).list_messages(bob, "INBOX", limit=100)
    assert sorted(m.headers.subject for m in page.messages) == sorted(f"n{n}" for n in range(20))
    for _ in range(500):  # the ack follows the delivery (and its event) shortly
        if not await node.queue.size(INCOMING):
            break
        await asyncio.sleep(0.02)
    assert await node.queue.size(INCOMING) == 0


async def test_aliases_subaddress_and_one_copy_per_user(
        node: Postroom, users: tuple[User, User]) -> None:
    _, bob = users
    await svc(node).add_alias("robert@example.test", "bob@example.test")
    raw = b"Subject: aliases\r\n\r\nx\r\n"
    result = await svc(node).deliver(
        Envelope("a@remote.example",
                 ("bob@example.test", "robert@example.test", "bob+lists@example.test")), raw)
    assert list(result.delivered) == ["bob@example.test"]
    assert len((await svc(node).list_messages(bob, "INBOX")).messages) == 1
    with pytest.raises(ConflictError):
        await svc(node).add_alias("bob@example.test", "alice@example.test")
    with pytest.raises(InvalidInput):
        await svc(node).add_alias("x@other.example", "bob@example.test")


async def test_send_local_remote_sent_copy(node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    result = await svc(node).send(alice, Draft(
        to=("bob@example.test", "far@remote.example"), bcc=("alice@example.test",),
        subject="hello", text="hi"))
    assert set(result.delivered) == {"bob@example.test", "alice@example.test"}
    assert result.queued == ("far@remote.example",)
    assert (await node.queue.list(OUTGOING))[0].item_id == result.queue_item
    sent = await svc(node).list_messages(alice, "Sent")
    assert [m.message_id for m in sent.messages] == [result.sent.message_id]
    assert b"Bcc: alice@example.test" in await svc(node).raw_message(alice,
                                                                     result.sent.message_id)
    bob_copy = (await svc(node).list_messages(bob, "INBOX")).messages[0]
    assert b"Bcc:" not in await svc(node).raw_message(bob, bob_copy.message_id)


async def test_user_isolation_in_the_service(node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    result = await svc(node).deliver(Envelope("x@remote.example", ("alice@example.test",)),
                                     b"Subject: private\r\n\r\nsecret\r\n")
    mid = result.delivered["alice@example.test"].message_id
    for call in (svc(node).get_message(bob, mid), svc(node).raw_message(bob, mid),
                 svc(node).delete(bob, mid), svc(node).attachment(bob, mid, 0)):
        with pytest.raises(NotFoundError):
            await call
    assert await svc(node).set_flags(bob, [mid], add=["\\Seen"]) == []
    assert await svc(node).move(bob, [mid], "Trash") == []
    assert await svc(node).expunge(bob, [mid]) == []
    alice_inbox = await svc(node).get_folder(alice, "INBOX")
    with pytest.raises(NotFoundError):
        await svc(node).list_messages(bob, alice_inbox.folder_id)
    for folder in (alice_inbox, alice_inbox.folder_id):  # her Folder, or its id
        with pytest.raises(NotFoundError):
            await svc(node).append(bob, folder, b"Subject: planted\r\n\r\nx\r\n")
    assert [r.message_id for r in (await svc(node).list_messages(alice, "INBOX")).messages] \
        == [mid]
    record = await svc(node).get_message(alice, mid)
    assert record.folder_id == alice_inbox.folder_id and not record.flags.names()


async def test_authentication_and_throttle(node: Postroom, users: tuple[User, User]) -> None:
    assert (await svc(node).authenticate("ALICE@example.test", "alice-secret-1")).address == \
        "alice@example.test"
    svc(node).throttle.limit = 3
    for _ in range(3):
        with pytest.raises(AuthFailed):
            await svc(node).authenticate("alice@example.test", "wrong", client="10.0.0.9")
    with pytest.raises(TooManyAttempts):
        await svc(node).authenticate("alice@example.test", "alice-secret-1", client="10.0.0.9")


async def test_folder_rules(node: Postroom, users: tuple[User, User]) -> None:
    alice, _ = users
    roles = {f.role for f, _ in await svc(node).list_folders(alice)}
    assert set(FolderRole) <= roles
    inbox = await svc(node).get_folder(alice, "inbox")  # INBOX is case-insensitive
    assert inbox.role is FolderRole.INBOX
    with pytest.raises(InvalidInput):
        await svc(node).rename_folder(alice, "INBOX", "Other")
    with pytest.raises(InvalidInput):
        await svc(node).delete_folder(alice, "Trash")
    with pytest.raises(ConflictError):
        await svc(node).create_folder(alice, "Sent")
    a = await svc(node).create_folder(alice, "A")
    with pytest.raises(InvalidInput):
        await svc(node).rename_folder(alice, a.folder_id, "A/B")


async def test_a_store_on_an_out_of_date_copy_changes_nothing(
        node: Postroom, users: tuple[User, User]) -> None:
    """IMAP hands store_flags its session's copy of the message: where that copy shows a
    change the read before the write is skipped, and the write itself still finds that the
    stored flags have it already (no modseq bump, nothing returned)."""
    alice, _ = users
    s = svc(node)
    record = await s.append(alice, "INBOX", b"Subject: x\r\n\r\nbody\r\n")
    changed, _ = await s.store_flags(alice, [record.message_id], add=["\\Seen"],
                                     believed=record)
    assert [r.flags.names() for r in changed] == [["\\Seen"]]
    before = await s.get_folder(alice, record.folder_id)
    # the copy from before still lacks \Seen, as a session that missed the change would have
    again, _ = await s.store_flags(alice, [record.message_id], add=["\\Seen"], believed=record)
    assert again == []
    after = await s.get_folder(alice, record.folder_id)
    assert after.highestmodseq == before.highestmodseq
    # an up-to-date copy that shows a change: written at once
    fresh = changed[0]
    removed, _ = await s.store_flags(alice, [record.message_id], remove=["\\Seen"],
                                     believed=fresh)
    assert [r.flags.names() for r in removed] == [[]]
    assert (await s.get_folder(alice, record.folder_id)).highestmodseq > after.highestmodseq
