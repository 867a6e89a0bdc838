"""Outbound delivery workers against a real SMTP peer on loopback (aiosmtpd) and real SQLite
backends: the lease held while a slow delivery runs, `queue delete`/`queue retry` on an item in
flight, the one-time delay notice, and certificate verification (smarthost and MX)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio

from postroom.app import Postroom
from postroom.blob_collector import collect_blobs
from postroom.config import Settings, load_settings
from postroom.core.models import Envelope, User
from postroom.mailflow import queue_view
from postroom.mailflow.outgoing import OutboundDelivery, run_delivery_worker
from postroom.mailflow.routing import Host, Router
from postroom.store.queue import OUTGOING
from tests.e2e.outbound_peers import self_signed

REMOTE = "bob@peer.test"


@dataclass
class Peer:
    """A small receiving MTA: after DATA it waits `delay`, then answers `reply`."""

    delay: float = 0.0
    reply: str = "250 2.0.0 queued"
    received: list[bytes] = field(default_factory=list)
    in_data: asyncio.Event = field(default_factory=asyncio.Event)
    tls_seen: list[bool] = field(default_factory=list)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      tls: ssl.SSLContext | None) -> None:
        secure = False

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await say("220 peer.test ESMTP")
        with contextlib.suppress(OSError, ssl.SSLError):
            while line := await reader.readline():
                verb = line.decode(errors="replace").strip().upper()
                if verb.startswith("EHLO"):
                    await say("250-peer.test" + ("\r\n250-STARTTLS" if tls and not secure
                                                 else "") + "\r\n250 8BITMIME")
                elif verb == "STARTTLS" and tls is not None:
                    await say("220 2.0.0 go ahead")
                    try:
                        await writer.start_tls(tls)
                    except (OSError, ssl.SSLError):
                        break
                    secure = True
                elif verb == "DATA":
                    await say("354 go ahead")
                    body = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk
                    self.in_data.set()
                    self.tls_seen.append(secure)
                    await asyncio.sleep(self.delay)
                    if self.reply.startswith("250"):
                        self.received.append(body)
                    await say(self.reply)
                elif verb == "QUIT":
                    await say("221 2.0.0 bye")
                    break
                else:
                    await say("250 2.0.0 ok")
        writer.close()


@contextlib.asynccontextmanager
async def peer_server(peer: Peer, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(lambda r, w: peer.session(r, w, tls), "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


class FixedRouter(Router):
    """Every domain's MX is `name` at 127.0.0.1 (the test's peer), without DNS."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def hosts_for(self, domain: str) -> list[Host]:
        return [Host(self.name, ("127.0.0.1",))]


def make_settings(tmp_path: Path, **delivery: Any) -> Settings:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), hostname="mx.example.test")
    settings.spam.enabled = False
    settings.delivery.schedule = [0.2]
    settings.delivery.idle_timeout = 0
    for key, value in delivery.items():
        setattr(settings.delivery, key, value)
    return settings


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Postroom]:
    async with Postroom(make_settings(tmp_path)) as n:
        await n.service.add_domain("example.test")
        yield n


async def alice_of(node: Postroom) -> User:
    return await node.service.add_user("alice@example.test", "alice-secret-1")


async def submit(node: Postroom, alice: User, subject: str) -> str:
    raw = (f"From: {alice.address}\r\nTo: {REMOTE}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n\r\nhello\r\n").encode()
    result = await node.service.submit(alice, Envelope(alice.address, (REMOTE,)), raw)
    assert result.queue_item
    return result.queue_item


def delivery_for(node: Postroom, port: int, router: Router | None = None) -> OutboundDelivery:
    node.settings.delivery.port = port
    return OutboundDelivery(node.service, node.queue, node.settings,
                            router=router or FixedRouter("mx.peer.test"))


async def run_worker(delivery: OutboundDelivery, node: Postroom
                     ) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(run_delivery_worker(delivery, node.queue, stop))


async def stop_worker(stop: asyncio.Event, task: asyncio.Task[None],
                      delivery: OutboundDelivery) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)
    await delivery.close()


async def until(check: Any) -> Any:
    for _ in range(300):  # 15 s
        if value := await check():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_slow_delivery_keeps_its_short_lease(node: Postroom) -> None:
    alice = await alice_of(node)
    node.settings.delivery.lease = 0.6
    peer = Peer(delay=2.0)
    async with peer_server(peer) as port:
        delivery = delivery_for(node, port)
        await submit(node, alice, "slow one")
        stop, task = await run_worker(delivery, node)
        try:
            await asyncio.wait_for(peer.in_data.wait(), 10)
            await asyncio.sleep(1.2)  # two lease lengths into DATA: still held, not due
            assert await node.queue.take(OUTGOING, lease=5) is None
            await until(lambda: _empty(node))
        finally:
            await stop_worker(stop, task, delivery)
    assert len(peer.received) == 1


async def _empty(node: Postroom) -> bool:
    return not await node.queue.list(OUTGOING)


async def test_sent_bytes_are_collected_with_the_last_sent_copy(node: Postroom) -> None:
    alice = await alice_of(node)
    peer = Peer()
    async with peer_server(peer) as port:
        delivery = delivery_for(node, port)
        await submit(node, alice, "collect later")
        stop, task = await run_worker(delivery, node)
        try:
            await until(lambda: _empty(node))
        finally:
            await stop_worker(stop, task, delivery)
    (sent,) = (await node.service.list_messages(alice, "Sent")).messages
    # the finished item let go of its bytes, but the Sent copy still names them
    assert await node.metadata.released_blobs(time.time() + 60) == [sent.blob_hash]
    report = await collect_blobs(node.metadata, node.blobs, node.queue, grace=0, settle=0)
    assert (report.collected, report.referenced) == (0, 1)
    assert b"collect later" in await node.service.raw_message(alice, sent.message_id)

    await node.service.expunge(alice, [sent.message_id])
    report = await collect_blobs(node.metadata, node.blobs, node.queue, grace=0, settle=0)
    assert report.collected == 1
    assert not await node.blobs.exists(sent.blob_hash)


async def test_delete_during_an_attempt_cancels_the_message(node: Postroom) -> None:
    alice = await alice_of(node)
    peer = Peer(delay=0.8, reply="451 4.3.0 try later")
    async with peer_server(peer) as port:
        delivery = delivery_for(node, port)
        item_id = await submit(node, alice, "cancel me")
        item = await node.queue.take(OUTGOING, lease=30)
        assert item is not None and item.item_id == item_id
        attempt = asyncio.create_task(delivery.handle(item))
        await asyncio.wait_for(peer.in_data.wait(), 10)
        assert await node.queue.remove(OUTGOING, item_id)  # what `queue delete` does
        await asyncio.wait_for(attempt, 10)
        await delivery.close()
    assert await node.queue.list(OUTGOING) == []  # the put-back was withdrawn


async def test_retry_during_an_attempt_leaves_one_item_with_its_history(node: Postroom) -> None:
    alice = await alice_of(node)
    peer = Peer(delay=0.8, reply="451 4.3.0 try later")
    async with peer_server(peer) as port:
        delivery = delivery_for(node, port)
        item_id = await submit(node, alice, "retry me")
        item = await node.queue.take(OUTGOING, lease=30)
        assert item is not None
        attempt = asyncio.create_task(delivery.handle(item))
        await asyncio.wait_for(peer.in_data.wait(), 10)
        listed = await queue_view.find(node.queue, item_id)
        assert listed is not None
        await queue_view.make_due(node.queue, listed)  # what `queue retry` does
        await asyncio.wait_for(attempt, 10)
        await delivery.close()
    items = await node.queue.list(OUTGOING)
    assert len(items) == 1, items
    row = queue_view.describe(items[0])
    assert row["first_id"] == item_id and row["attempts"] == 1
    assert "451 4.3.0" in json.dumps(row["history"])


async def test_delay_notice_is_sent_once(node: Postroom) -> None:
    alice = await alice_of(node)
    node.settings.delivery.delay_notice = 0.3
    node.settings.delivery.schedule = [0.15]
    peer = Peer(reply="451 4.2.1 mailbox busy")
    async with peer_server(peer) as port:
        delivery = delivery_for(node, port)
        await submit(node, alice, "slow to arrive")
        stop, task = await run_worker(delivery, node)
        try:
            async def attempts() -> bool:
                rows = [queue_view.describe(i) for i in await node.queue.list(OUTGOING)]
                return bool(rows) and rows[0]["attempts"] >= 6
            await until(attempts)
        finally:
            await stop_worker(stop, task, delivery)
    notices = await _reports(node, alice)
    assert len(notices) == 1, notices
    report = email.message_from_bytes(notices[0], policy=email.policy.default)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    status = list(report.iter_parts())[1].as_string()
    assert "Action: delayed" in status and "Status: 4.2.1" in status
    assert f"Final-Recipient: rfc822; {REMOTE}" in status
    [item] = await node.queue.list(OUTGOING)
    assert json.loads(item.payload)["delay_notified"] is True


async def _reports(node: Postroom, alice: User) -> list[bytes]:
    inbox = await node.service.get_folder(alice, "INBOX")
    _, records = await node.service.folder_messages(alice, inbox.folder_id)
    return [await node.service.record_bytes(alice, record) for record in records]


def tls_server(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    directory = tmp_path / f"tls-{name}"
    directory.mkdir()
    cert, key = self_signed(directory, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


async def _attempt(node: Postroom, delivery: OutboundDelivery, alice: User,
                   subject: str) -> dict[str, Any]:
    item_id = await submit(node, alice, subject)
    item = await node.queue.take(OUTGOING, lease=30)
    assert item is not None and item.item_id == item_id
    await delivery.handle(item)
    results: dict[str, Any] = {}
    for other in await node.queue.list(OUTGOING):
        row = queue_view.describe(other)
        if row["first_id"] == item_id:
            results = row["history"][-1]["results"][0]
            await node.queue.remove(OUTGOING, other.item_id)
    return results  # empty: delivered, the item is gone


async def test_smarthost_certificate_is_verified_when_asked(
        node: Postroom, tmp_path: Path) -> None:
    alice = await alice_of(node)
    context, cert = tls_server(tmp_path, "localhost")
    peer = Peer()
    async with peer_server(peer, context) as port:
        config = node.settings.delivery
        config.smarthost, config.smarthost_tls = f"127.0.0.1:{port}", "starttls"
        config.smarthost_tls_verify = True
        # Self-signed and not trusted (and 127.0.0.1 is not its name): deferred, not sent.
        refused = await _attempt(node, delivery_for(node, port), alice, "untrusted relay")
        assert refused["outcome"] == "deferred" and "certificate" in refused["reply"].lower()
        assert peer.received == []
        # Trusted, but the name we connect to is not the certificate's.
        config.tls_ca_file = str(cert)
        refused = await _attempt(node, delivery_for(node, port), alice, "wrong name")
        assert refused["outcome"] == "deferred" and peer.received == []
        # Trusted and named as configured: delivered over verified TLS.
        config.smarthost = f"localhost:{port}"
        assert await _attempt(node, delivery_for(node, port), alice, "trusted relay") == {}
        assert len(peer.received) == 1 and peer.tls_seen[-1]
        # Verification off (the default): the same untrusted certificate is fine.
        config.tls_ca_file, config.smarthost_tls_verify = "", False
        assert await _attempt(node, delivery_for(node, port), alice, "unverified") == {}


async def test_mx_certificate_verification_is_opt_in(node: Postroom, tmp_path: Path) -> None:
    alice = await alice_of(node)
    context, cert = tls_server(tmp_path, "mx.peer.test")
    peer = Peer()
    async with peer_server(peer, context) as port:
        config = node.settings.delivery
        # Default: opportunistic STARTTLS (RFC 7435), nothing verified.
        assert await _attempt(node, delivery_for(node, port), alice, "opportunistic") == {}
        assert peer.tls_seen == [True]
        config.tls_verify = True
        refused = await _attempt(node, delivery_for(node, port), alice, "untrusted mx")
        assert refused["outcome"] == "deferred" and "certificate" in refused["reply"].lower()
        config.tls_ca_file = str(cert)
        wrong = delivery_for(node, port, FixedRouter("other.peer.test"))
        refused = await _attempt(node, wrong, alice, "mx of another name")
        assert refused["outcome"] == "deferred" and len(peer.received) == 1
        assert await _attempt(node, delivery_for(node, port), alice, "verified mx") == {}
        assert len(peer.received) == 2
    # A verifying sender does not fall back to plaintext when the MX offers no STARTTLS.
    plain = Peer()
    async with peer_server(plain) as port:
        refused = await _attempt(node, delivery_for(node, port), alice, "no starttls")
        assert refused["outcome"] == "deferred" and "STARTTLS" in refused["reply"]
        assert plain.received == []
