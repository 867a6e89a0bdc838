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

Batches: a worker takes up to BATCH due items at once (one queue transaction) and runs each step
over all of them before the next step, so the deliver step files every copy of the batch in one
metadata transaction and the batch is acked in one more: a handful of commits per batch instead
of several per message. A step may do a batch at once (`run_batch`, with the same effects as
`run` on each message); if that raises, the pipeline runs the step on each message alone, so one
bad message only ever fails itself. Under light load a batch is the one item that is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from postroom.blob_collector import release_queue_blobs
from postroom.core.models import Envelope, FolderRole
from postroom.service import DeliveryResult, Inbound, MailService
from postroom.store.queue import INCOMING, Queue, QueueItem

log = logging.getLogger(__name__)

# Retry schedule for items that fail for a passing reason (engine down, disk full).
RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0)
# How long a taken item stays ours without news; extended while we work on it.
LEASE = 10.0
# Items a worker takes at once: enough to share commits, few enough that a batch is quick.
BATCH = 64


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
    """One stage of the pipeline. A step may also have `async run_batch(messages)`: `run` for
    each message, done for the batch at once, returning per message None or the exception that
    stopped it. If run_batch itself raises, the pipeline runs `run` on each message instead (so
    a step raises only when that is safe to do)."""

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
        self._log_unknown(message)

    async def run_batch(self, messages: list[IncomingMessage]) -> list[BaseException | None]:
        # All or nothing, and idempotent by the delivery keys: on failure, each alone.
        results = await self.service.deliver_many([
            Inbound(m.envelope, m.raw, m.item.item_id, m.folders or None) for m in messages])
        for message, result in zip(messages, results, strict=True):
            message.result = result
            self._log_unknown(message)
        return [None] * len(messages)

    @staticmethod
    def _log_unknown(message: IncomingMessage) -> None:
        if message.result is not None and message.result.unknown:
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

    async def process_batch(
        self, items: Sequence[QueueItem]
    ) -> dict[str, BaseException | None]:
        """Run every item through the steps, step by step; per item id, None when it went
        through, else the exception that stopped it (Rejected: dropped, else: retry)."""
        outcome: dict[str, BaseException | None] = {item.item_id: None for item in items}
        live = [IncomingMessage(item) for item in items]
        for step in self.steps:
            if not live:
                break
            run_batch = getattr(step, "run_batch", None)
            errors: list[BaseException | None] | None = None
            if run_batch is not None and len(live) > 1:
                try:
                    errors = list(await run_batch(live))
                except Exception:
                    log.warning("incoming step %s failed for a batch of %d; running each alone",
                                step.name, len(live), exc_info=True)
            if errors is None:
                errors = list(await asyncio.gather(*(_run_step(step, m) for m in live)))
            for message, error in zip(live, errors, strict=True):
                if error is not None:
                    outcome[message.item.item_id] = error
            live = [m for m, error in zip(live, errors, strict=True) if error is None]
        return outcome


async def _run_step(step: Step, message: IncomingMessage) -> BaseException | None:
    try:
        await step.run(message)
    except Exception as exc:
        return exc
    return None


def _spam_steps(service: MailService) -> list[Step]:
    """Authentication and spam checks (postroom.spam), when the app turned them on."""
    from postroom.spam.filter import SpamFilter
    from postroom.spam.step import SpamCheck

    return [SpamCheck(service, service.spam)] if isinstance(service.spam, SpamFilter) else []


async def _hold_leases(queue: Queue, items: Sequence[QueueItem], lease: float) -> None:
    """Extend the items' leases while the steps are still working on them.

    Leases are short so that items a crashed node had taken are due again within seconds of a
    restart; a long-running pipeline keeps its items by pushing `not_before` out (a retry with
    the same attempt number is the queue's way to move an item's due time without releasing
    it: a late ack of this lease still matches).
    """
    while True:
        await asyncio.sleep(lease / 3)
        for item in items:
            await queue.retry(item, lease, error=item.last_error)


async def handle_batch(
    pipeline: IncomingPipeline, queue: Queue, items: Sequence[QueueItem], lease: float = 0.0
) -> None:
    """Run the items through the pipeline, then ack those done (or rejected) together and
    schedule a retry for each that failed."""
    holder = asyncio.create_task(_hold_leases(queue, items, lease)) if lease > 0 else None
    try:
        outcome = await pipeline.process_batch(items)
    finally:
        await _stop(holder)
    for item in items:
        error = outcome[item.item_id]
        if isinstance(error, Rejected):
            log.warning("incoming item %s rejected: %s", item.item_id, error)
    await queue.ack_many([item for item in items
                          if outcome[item.item_id] is None
                          or isinstance(outcome[item.item_id], Rejected)])
    refused = [item for item in items if isinstance(outcome[item.item_id], Rejected)]
    if refused:  # their bytes reached no mailbox: the blob collector may take them
        await release_queue_blobs(pipeline.service.metadata, refused)
    for item in items:
        error = outcome[item.item_id]
        if error is not None and not isinstance(error, Rejected):
            delay = RETRY_DELAYS[min(item.attempts - 1, len(RETRY_DELAYS) - 1)]
            log.error("incoming item %s failed (attempt %d); retrying in %.0fs",
                      item.item_id, item.attempts, delay, exc_info=error)
            await queue.retry(item, delay, error=repr(error)[:500])


async def handle_item(
    pipeline: IncomingPipeline, queue: Queue, item: QueueItem, lease: float = 0.0
) -> None:
    """Run one item through the pipeline, then ack it, or schedule a retry if a step failed."""
    await handle_batch(pipeline, queue, [item], lease)


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
    batch: int = BATCH,
) -> None:
    pipeline = pipeline or IncomingPipeline(service)
    while not stop.is_set():
        try:
            items = await queue.take_many(INCOMING, max_items=batch, lease=lease, wait=1.0)
        except Exception:
            log.exception("taking from the incoming queue failed")
            await asyncio.sleep(1.0)
            continue
        if not items:
            continue
        try:
            await handle_batch(pipeline, queue, items, lease)
        except Exception:  # the ack or retry itself failed: the lease brings the items back
            log.exception("finishing %d incoming item(s) failed", len(items))
