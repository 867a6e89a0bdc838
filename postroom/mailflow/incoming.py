"""The incoming processing worker: takes received mail off the incoming queue and files it.

At-least-once: an item is acked only after every recipient's copy is committed; if the worker
dies first the lease runs out and another worker takes it, and the delivery keys make the
second run a no-op for recipients already served.
"""

from __future__ import annotations

import asyncio
import logging

from postroom.service import MailService
from postroom.store.queue import INCOMING, Queue

log = logging.getLogger(__name__)

# Retry schedule for items that fail for a passing reason (engine down, disk full).
RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0)


async def run_incoming_worker(
    service: MailService, queue: Queue, stop: asyncio.Event, lease: float = 300.0
) -> None:
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
            result = await service.process_incoming(item.payload, item.item_id)
        except Exception as exc:
            delay = RETRY_DELAYS[min(item.attempts - 1, len(RETRY_DELAYS) - 1)]
            log.exception("incoming item %s failed (attempt %d); retrying in %.0fs",
                          item.item_id, item.attempts, delay)
            await queue.retry(item, delay, error=repr(exc)[:500])
            continue
        if result.unknown:
            log.warning("incoming item %s: unknown recipients %s", item.item_id, result.unknown)
        await queue.ack(item)
