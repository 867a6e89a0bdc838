"""Incoming mail processing: take received mail off the incoming queue and file it.

Each queue item runs through a pipeline of steps, in order:

    load      the queue item's envelope and the message's bytes from the blob store
    spam      SPF/DKIM/ARC/DMARC, DNSBL, content and reputation (postroom.spam): usually
              analysed at SMTP time and carried in the item; here each recipient's verdict
              picks INBOX or Junk (later steps, e.g. virus checks, add theirs the same way)
    deliver   one copy per local recipient, keyed by the queue item id

At-least-once: an item is acked only after every recipient's copy is committed. If the worker
dies first, the lease runs out and another worker takes it, and the delivery keys make the second
run a no-op for recipients already served, so a redelivered item never makes a second copy.
A step that fails for a passing reason (engine down, disk full) raises; the item is retried
with backoff and never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

from postroom.core.models import Envelope, FolderRole
from postroom.service import DeliveryResult, MailService
from postroom.store.queue import INCOMING, Queue, QueueItem

log = logging.getLogger(__name__)

# Retry schedule for items that fail for a passing reason (engine down, disk full).
RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0)
# How long a taken item stays ours without news; extended while we work on it.
LEASE = 10.0


class Rejected(Exception):
    """A step decided the message must not be delivered (it is dropped, logged)."""


@dataclass(slots=True)
class IncomingMessage:
    """One queue item as it moves through the pipeline; steps fill in what they learn."""

    item: QueueItem
    envelope: Envelope = field(default_factory=lambda: Envelope("", ()))
    blob: str = ""
    received_at: float = 0.0
    raw: bytes = b""
    verdicts: dict[str, str] = field(default_factory=dict)
    folders: dict[str, FolderRole] = field(default_factory=dict)  # user id -> not INBOX
    result: DeliveryResult | None = None


class Step(Protocol):
    name: str

    async def run(self, message: IncomingMessage) -> None: ...


class LoadMessage:
    """Decode the queue payload written by MailService.enqueue_incoming and read the blob."""

    name = "load"

    def __init__(self, service: MailService) -> None:
        self.service = service

    async def run(self, message: IncomingMessage) -> None:
        data = json.loads(message.item.payload)
        message.envelope = Envelope(
            data["mail_from"], tuple(data["rcpt_to"]), data.get("client_ip", ""),
            data.get("helo", ""), data.get("authenticated_as", ""),
        )
        message.blob = data["blob"]
        message.received_at = float(data.get("received_at", 0.0))
        message.raw = await self.service.blobs.get(message.blob)


class DeliverToMailboxes:
    """File one copy per local recipient (the blob is stored once, however many there are)."""

    name = "deliver"

    def __init__(self, service: MailService) -> None:
        self.service = service

    async def run(self, message: IncomingMessage) -> None:
        message.result = await self.service.deliver(
            message.envelope, message.raw, delivery_key=message.item.item_id,
            folders=message.folders or None,
        )
        if message.result.unknown:
            log.warning("incoming item %s: unknown recipients %s", message.item.item_id,
                        message.result.unknown)


class IncomingPipeline:
    """The steps an incoming message goes through, in order."""

    def __init__(self, service: MailService, steps: list[Step] | None = None) -> None:
        self.service = service
        self.steps: list[Step] = steps if steps is not None else [
            LoadMessage(service),
            *_spam_steps(service),
            DeliverToMailboxes(service),
        ]

    async def process(self, item: QueueItem) -> IncomingMessage:
        message = IncomingMessage(item)
        for step in self.steps:
            await step.run(message)
        return message


def _spam_steps(service: MailService) -> list[Step]:
    """Authentication and spam checks (postroom.spam), when the app turned them on."""
    from postroom.spam.filter import SpamFilter
    from postroom.spam.step import SpamCheck

    return [SpamCheck(service, service.spam)] if isinstance(service.spam, SpamFilter) else []


async def _hold_lease(queue: Queue, item: QueueItem, lease: float) -> None:
    """Extend the item's lease while a step is still working on it.

    Leases are short so that items a crashed node had taken are due again within seconds of a
    restart; a long-running pipeline keeps its item by pushing `not_before` out (a retry with
    the same attempt number is the queue's way to move an item's due time without releasing
    it: a late ack of this lease still matches).
    """
    while True:
        await asyncio.sleep(lease / 3)
        await queue.retry(item, lease, error=item.last_error)


async def handle_item(
    pipeline: IncomingPipeline, queue: Queue, item: QueueItem, lease: float = 0.0
) -> None:
    """Run one item through the pipeline, then ack it, or schedule a retry if a step failed."""
    holder = asyncio.create_task(_hold_lease(queue, item, lease)) if lease > 0 else None
    try:
        await pipeline.process(item)
    except Rejected as exc:
        log.warning("incoming item %s rejected: %s", item.item_id, exc)
    except Exception as exc:
        delay = RETRY_DELAYS[min(item.attempts - 1, len(RETRY_DELAYS) - 1)]
        log.exception("incoming item %s failed (attempt %d); retrying in %.0fs",
                      item.item_id, item.attempts, delay)
        await _stop(holder)
        await queue.retry(item, delay, error=repr(exc)[:500])
        return
    finally:
        await _stop(holder)
    await queue.ack(item)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_incoming_worker(
    service: MailService,
    queue: Queue,
    stop: asyncio.Event,
    lease: float = LEASE,
    pipeline: IncomingPipeline | None = None,
) -> None:
    pipeline = pipeline or IncomingPipeline(service)
    while not stop.is_set():
        try:
            item = await queue.take(INCOMING, lease=lease, wait=1.0)
        except Exception:
            log.exception("taking from the incoming queue failed")
            await asyncio.sleep(1.0)
            continue
        if item is None:
            continue
        try:
            await handle_item(pipeline, queue, item, lease)
        except Exception:  # the ack or retry itself failed: the lease brings the item back
            log.exception("finishing incoming item %s failed", item.item_id)
