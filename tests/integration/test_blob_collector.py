"""Blob collection over the real embedded backends (SQLite files, a blob directory): bytes go
only when no message and no queue item names them, and a reference racing the collector keeps
its bytes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

from postroom.app import Postroom
from postroom.blob_collector import collect_blobs, find_unreleased, run_blob_collector
from postroom.core.models import Envelope, User
from postroom.store.blobs import blob_hash
from postroom.store.fs_blobs import FsBlobStore
from postroom.store.queue import INCOMING

RAW = (b"From: carol@remote.example\r\nTo: alice@example.test, bob@example.test\r\n"
       b"Subject: to be collected\r\nMessage-ID: <collect.1@remote.example>\r\n\r\n"
       b"Shared by two mailboxes.\r\n")
BOTH = Envelope("carol@remote.example", ("alice@example.test", "bob@example.test"))


def stored(node: Postroom, digest: str) -> bool:
    """The bytes are kept (not quarantined): a file, or a row of the store's pack."""
    assert isinstance(node.blobs, FsBlobStore)
    if os.path.isfile(node.blobs.path_of(digest)):
        return True
    if node.blobs.pack is None:
        return False
    with sqlite3.connect(node.blobs.pack.path) as conn:
        row = conn.execute("SELECT quarantined FROM packed_blobs WHERE digest = ?",
                           (bytes.fromhex(digest),)).fetchone()
    return row is not None and row[0] == 0


def age(node: Postroom, digest: str, seconds: float) -> None:
    """Make the blob's last put `seconds` ago, wherever it is kept."""
    assert isinstance(node.blobs, FsBlobStore)
    then = time.time() - seconds
    if os.path.isfile(node.blobs.path_of(digest)):
        os.utime(node.blobs.path_of(digest), (then, then))
    if node.blobs.pack is not None:
        with sqlite3.connect(node.blobs.pack.path) as conn:
            conn.execute("UPDATE packed_blobs SET put_at = ? WHERE digest = ?",
                         (then, bytes.fromhex(digest)))


async def collect(node: Postroom, **kwargs: float) -> tuple[int, int, int, int]:
    kwargs.setdefault("grace", 0.0)
    kwargs.setdefault("settle", 0.0)
    report = await collect_blobs(node.metadata, node.blobs, node.queue, **kwargs)
    return report.collected, report.referenced, report.queued, report.recent


async def deliver_both(node: Postroom) -> tuple[str, str, str]:
    result = await node.service.deliver(BOTH, RAW)
    a = result.delivered["alice@example.test"]
    b = result.delivered["bob@example.test"]
    assert a.blob_hash == b.blob_hash == blob_hash(RAW)
    return a.blob_hash, a.message_id, b.message_id


async def test_collected_only_after_the_last_reference(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    (copy,) = await node.service.copy(alice, [a_id], "Archive")
    await node.service.expunge(alice, [a_id])
    await collect(node)
    assert stored(node, digest)  # alice's copy in Archive and bob's message still name it
    await node.service.expunge(alice, [copy.message_id])
    assert (await collect(node))[0] == 0
    assert await node.service.raw_message(bob, b_id) == RAW

    await node.service.expunge(bob, [b_id])
    assert await collect(node, grace=3600) == (0, 0, 0, 0)  # released only just now
    assert stored(node, digest)
    assert (await collect(node))[0] == 1
    assert not stored(node, digest)
    assert await node.metadata.released_blobs(time.time() + 60) == []
    assert await collect(node) == (0, 0, 0, 0)


async def test_a_queued_item_keeps_its_blob(node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    await node.service.expunge(alice, [a_id])
    await node.service.expunge(bob, [b_id])
    # the same bytes arrive again and wait on the incoming queue (no worker runs here)
    item_id = await node.service.enqueue_incoming(BOTH, RAW)
    assert await collect(node) == (0, 0, 1, 0)
    assert stored(node, digest)
    assert await collect(node) == (0, 0, 1, 0)  # still a candidate, still kept

    assert await node.queue.remove(INCOMING, item_id)
    assert (await collect(node))[0] == 1
    assert not stored(node, digest)


async def test_a_put_within_the_grace_period_keeps_the_blob(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    await node.service.expunge(alice, [a_id])
    await node.service.expunge(bob, [b_id])
    await node.blobs.put(RAW)  # someone is about to file a reference to these bytes
    later = time.time() + 120  # the release is old enough, the put is not
    assert await collect(node, grace=60, now=later) == (0, 0, 0, 1)
    assert stored(node, digest)


async def test_a_delivery_racing_the_collector_keeps_its_bytes(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    await node.service.expunge(alice, [a_id])
    await node.service.expunge(bob, [b_id])

    run = asyncio.create_task(collect(node, settle=1.0))
    while stored(node, digest):  # wait until the collector has moved it aside
        assert not run.done()
        await asyncio.sleep(0.01)
    result = await node.service.deliver(Envelope("carol@remote.example", ("bob@example.test",)),
                                        RAW)
    assert await run == (0, 1, 0, 0)
    record = result.delivered["bob@example.test"]
    assert await node.service.raw_message(bob, record.message_id) == RAW
    assert stored(node, digest)

    # and a reader of a quarantined blob brings it back
    await node.service.expunge(bob, [record.message_id])
    run = asyncio.create_task(collect(node, settle=1.0))
    while stored(node, digest):
        assert not run.done()
        await asyncio.sleep(0.01)
    assert await node.blobs.get(digest) == RAW
    assert stored(node, digest)
    await run
    assert stored(node, digest)  # the collector's purge found nothing left to delete


async def test_the_server_collects_in_the_background(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    stop = asyncio.Event()
    task = asyncio.create_task(run_blob_collector(node.metadata, node.blobs, node.queue, stop,
                                                  interval=0.05, grace=0.0, settle=0.0))
    try:
        await node.service.expunge(alice, [a_id])
        await asyncio.sleep(0.3)
        assert stored(node, digest)
        await node.service.expunge(bob, [b_id])
        deadline = time.monotonic() + 10
        while stored(node, digest):
            assert time.monotonic() < deadline, "not collected"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_collect_command(node: Postroom, users: tuple[User, User]) -> None:
    alice, bob = users
    digest, a_id, b_id = await deliver_both(node)
    await node.service.expunge(alice, [a_id])
    await node.service.expunge(bob, [b_id])
    command = [sys.executable, "-m", "postroom.cli", "--data-dir",
               str(node.settings.data_dir), "blobs", "collect", "--settle", "0"]
    out = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                  timeout=120)
    assert out.returncode == 0, out.stderr
    assert "0 blob(s) deleted" in out.stdout  # the default grace: released only just now
    assert stored(node, digest)
    out = await asyncio.to_thread(subprocess.run, [*command, "--grace", "0"],
                                  capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 blob(s) deleted" in out.stdout
    assert not stored(node, digest)

    orphan = await node.blobs.put(b"never named by a message\r\n")
    age(node, orphan, 7200)
    out = await asyncio.to_thread(subprocess.run, [*command, "--scan"],
                                  capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "scan: 1 blob(s) named by no message" in out.stdout
    assert "1 blob(s) deleted" in out.stdout
    assert not stored(node, orphan)


async def test_a_scan_finds_bytes_no_message_ever_named(
        node: Postroom, users: tuple[User, User]) -> None:
    alice, _ = users
    kept = (await node.service.deliver(BOTH, RAW)).delivered["alice@example.test"]
    orphan = await node.blobs.put(b"put by a node that died before its queue item\r\n")
    for digest in (orphan, kept.blob_hash):
        age(node, digest, 7200)
    assert await collect(node) == (0, 0, 0, 0)  # nothing released it
    assert await find_unreleased(node.metadata, node.blobs, grace=3600) == 1
    report = await collect_blobs(node.metadata, node.blobs, node.queue, grace=3600, settle=0,
                                 released_before=time.time() + 1)
    assert report.collected == 1
    assert not stored(node, orphan)
    assert await node.service.raw_message(alice, kept.message_id) == RAW
