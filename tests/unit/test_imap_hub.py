"""The IMAP hub's per-folder fan-out: one record read per new message for every watcher, and
events of a folder handed out in the order they came even while that read is under way."""

from __future__ import annotations

import asyncio

from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.imap.hub import SessionHub
from postroom.store.events import MESSAGE_FLAGS, MESSAGE_NEW, Event
from postroom.store.local_events import LocalEventBus


def _record(uid: int) -> MessageRecord:
    return MessageRecord(
        user_id="u", message_id=f"m{uid}", folder_id="inbox", uid=uid, modseq=uid,
        flags=Flags(), internal_date=0.0, size=1, blob_hash="0" * 64,
        headers=HeaderSummary(), snippet="", has_attachments=False, thread_id="t")


async def test_one_read_per_new_message_and_order_kept() -> None:
    hub = SessionHub(LocalEventBus())
    reads: list[str] = []
    release = asyncio.Event()

    async def loader(event: Event) -> MessageRecord | None:
        reads.append(event.message_id)
        await release.wait()
        return _record(event.uid)

    seen: list[list[tuple[str, int, bool]]] = [[] for _ in range(50)]
    for i in range(50):
        def wake(event: Event | None, i: int = i) -> None:
            assert event is not None
            seen[i].append((event.type, event.uid, hub.loaded(event) is not None))
        hub.watch("u", "inbox", wake, loader)
    hub.dispatch(Event(MESSAGE_NEW, "u", "inbox", 7, 7, "m7"))
    hub.dispatch(Event(MESSAGE_FLAGS, "u", "inbox", 7, 8, "m7", {"flags": ["\\Seen"]}))
    hub.dispatch(Event(MESSAGE_NEW, "u", "other", 1, 1, "x1"))  # nobody watches: dropped
    await asyncio.sleep(0)
    assert seen[0] == []  # the flag change waits behind the new message being read
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert reads == ["m7"]
    for events in seen:
        assert events == [(MESSAGE_NEW, 7, True), (MESSAGE_FLAGS, 7, False)]
    assert hub.loaded(Event(MESSAGE_NEW, "u", "inbox", 7, 7, "m7")) is None  # only while delivered


async def test_failed_read_still_wakes_watchers() -> None:
    hub = SessionHub(LocalEventBus())

    async def loader(event: Event) -> MessageRecord | None:
        raise OSError("store down")

    woken: list[Event | None] = []
    hub.watch("u", "inbox", woken.append, loader)
    hub.dispatch(Event(MESSAGE_NEW, "u", "inbox", 3, 3, "m3"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(woken) == 1
