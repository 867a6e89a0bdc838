"""Blob collection: deleting the bytes of messages that nothing refers to any more.

Blobs are content-addressed and shared (one blob for every recipient of a message, for a copy,
for the Sent copy and the outgoing queue item), so a blob may go only when no message row and
no queue item names it. The metadata store notes each blob that lost its last reference
(`released_blobs`, with when); a collection run takes those released more than `grace` seconds
ago and, for each:

1. skips it if a message row names it again (`blob_refcount`; the candidate is dropped: the
   next expunge of that row notes it again), or if a queue item names it (incoming, outgoing
   or held; kept as a candidate for a later run);
2. moves it to quarantine (`BlobStore.quarantine`), unless it was put within `grace` seconds:
   a put of bytes already stored refreshes the blob's put time, because the caller is about to
   file a reference to it. From here a put stores the blob afresh and a get brings it back;
3. waits `settle` seconds, for references being filed by puts that came just before step 2;
4. checks the rows and the queues again: referenced, the blob is restored; else the
   quarantined copy is deleted for good.

So a delivery, an APPEND or a submission of the same bytes racing the collector keeps its
blob: before step 2 the put time stops it, between 2 and 4 its put stores a fresh copy or its
read restores the quarantined one, and its reference is seen at step 4 if filed within
`settle` seconds of the put (a put and its reference are one request's work, milliseconds
apart). Every way out of doubt keeps the bytes: a blob is only lost if nothing referred to it.
Two nodes collecting at once can at worst restore each other's quarantined blob (kept, to be
collected when released again), never delete a referenced one.

Bytes that never reach a mailbox are noted when their queue item is done
(`release_queue_blobs`: incoming mail refused by a pipeline step, outgoing mail sent or bounced,
a queue item deleted by the operator) and checked the same way, so a blob that still has a
Sent copy stays. Bytes of a node that died between its put and its queue item (no 250 was
given for them) are found only by a scan of the whole store (`find_unreleased`, run by
`postroom blobs collect --scan`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postroom.store.blobs import DIGEST, BlobStore
from postroom.store.metadata import MetadataStore
from postroom.store.queue import HELD, INCOMING, OUTGOING, Queue, QueueItem

log = logging.getLogger(__name__)

QUEUE_TOPICS = (INCOMING, OUTGOING, HELD)
BATCH = 1000  # candidates per run
_DIGEST = re.compile(DIGEST.pattern.encode())  # found in queue payloads, as bytes


@dataclass(slots=True)
class CollectionReport:
    examined: int = 0
    collected: int = 0  # bytes deleted
    referenced: int = 0  # a message row names it again
    queued: int = 0  # a queue item names it: looked at again by a later run
    recent: int = 0  # put within the grace period: looked at again by a later run
    missing: int = 0  # already gone


async def queued_blobs(queue: Queue) -> set[str]:
    """Every sha256 digest named in a queued item's payload, whatever its format (a string
    that merely looks like a digest keeps a blob one run longer, never loses one)."""
    found: set[str] = set()
    for topic in QUEUE_TOPICS:
        size = await queue.size(topic)
        if size <= 0:
            continue
        for item in await queue.list(topic, limit=size + 1000):
            found.update(m.decode() for m in _DIGEST.findall(bytes(item.payload)))
    return found


def blob_of(item: QueueItem) -> str | None:
    """The blob a queue item's payload names (incoming and outgoing payloads say `blob`)."""
    try:
        blob = json.loads(item.payload).get("blob")
    except (ValueError, AttributeError):
        return None
    return blob if isinstance(blob, str) else None


async def release_queue_blobs(metadata: MetadataStore, items: Sequence[QueueItem]) -> None:
    """Finished queue items no longer hold their blobs: make those candidates (a blob that
    never reached a mailbox is collected this way). A failure only leaves the bytes stored:
    logged, never raised."""
    blobs = [b for b in map(blob_of, items) if b]
    try:
        if blobs:
            await metadata.note_released_blobs(blobs)
    except Exception:
        log.warning("noting %d released blob(s) failed; they stay stored", len(blobs),
                    exc_info=True)


async def collect_blobs(metadata: MetadataStore, blobs: BlobStore, queue: Queue, *,
                        grace: float = 3600.0, settle: float = 10.0, limit: int = BATCH,
                        now: float | None = None, released_before: float | None = None
                        ) -> CollectionReport:
    """One collection run over at most `limit` candidates (see the module's text): those
    released before `released_before` (default: `grace` seconds before `now`)."""
    started = time.time() if now is None else now
    if released_before is None:
        released_before = started - grace
    candidates = await metadata.released_blobs(released_before, limit)
    report = CollectionReport(examined=len(candidates))
    if not candidates:
        return report
    settled: list[str] = []  # candidates dealt with, dropped from the list
    queued = await queued_blobs(queue)
    held: list[str] = []
    for digest in candidates:
        if await metadata.blob_refcount(digest) > 0:
            report.referenced += 1
            settled.append(digest)
        elif digest in queued:
            report.queued += 1
        elif await blobs.quarantine(digest, grace):
            held.append(digest)
        elif await blobs.exists(digest):
            report.recent += 1
        else:
            # Gone, or left in quarantine by a run that stopped half-way: bring that back,
            # a later run collects it the ordinary way.
            await blobs.restore(digest)
            if await blobs.exists(digest):
                report.recent += 1
            else:
                report.missing += 1
                settled.append(digest)
    if held:
        await asyncio.sleep(settle)
        queued = await queued_blobs(queue)
        for digest in held:
            if digest in queued:
                await blobs.restore(digest)
                report.queued += 1
            elif await metadata.blob_refcount(digest) > 0:
                await blobs.restore(digest)
                report.referenced += 1
                settled.append(digest)
            else:
                await blobs.purge(digest)
                report.collected += 1
                settled.append(digest)
    await metadata.forget_released_blobs(settled)
    if report.collected:
        log.info("blob collection: %d deleted of %d released", report.collected,
                 report.examined)
    return report


async def collect_backlog(metadata: MetadataStore, blobs: BlobStore, queue: Queue, *,
                          grace: float, settle: float, released_before: float | None = None,
                          stop: asyncio.Event | None = None) -> list[CollectionReport]:
    """Collection runs of `BATCH` candidates while a full batch keeps making progress (a long
    backlog); one run when there is little to do."""
    reports: list[CollectionReport] = []
    while stop is None or not stop.is_set():
        report = await collect_blobs(metadata, blobs, queue, grace=grace, settle=settle,
                                     limit=BATCH, released_before=released_before)
        reports.append(report)
        if report.examined < BATCH or not (report.collected + report.referenced
                                           + report.missing):
            break
    return reports


async def find_unreleased(metadata: MetadataStore, blobs: BlobStore, *,
                          grace: float = 3600.0) -> int:
    """Scan the whole blob store for bytes no message row names and that were not put for
    `grace` seconds, and make them candidates (bytes left by a node that died between its put
    and its queue item, or stored before collection existed). A long read of a big store: an
    operator's command, not part of the periodic run. Returns how many it noted."""
    noted = 0
    batch: list[str] = []
    async for digest in blobs.scan(grace):
        if await metadata.blob_refcount(digest) == 0:
            batch.append(digest)
        if len(batch) >= BATCH:
            await metadata.note_released_blobs(batch)
            noted += len(batch)
            batch.clear()
    if batch:
        await metadata.note_released_blobs(batch)
        noted += len(batch)
    return noted


async def run_blob_collector(metadata: MetadataStore, blobs: BlobStore, queue: Queue,
                             stop: asyncio.Event, *, interval: float, grace: float,
                             settle: float = 10.0) -> None:
    """Collect every `interval` seconds until `stop` is set (a failed run is logged and
    tried again next time: nothing is deleted that a run did not finish checking)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
            return
        except TimeoutError:
            pass
        try:
            await collect_backlog(metadata, blobs, queue, grace=grace, settle=settle,
                                  stop=stop)
        except Exception:
            log.exception("blob collection failed; trying again in %.0f s", interval)
