"""The queue seam: durable work queues with delayed retry and at-least-once delivery.

A taken item is leased: if it is neither acked nor retried before the lease runs out (the worker
died), it is handed out again. Consumers must therefore be idempotent; the mail flow records
`(item id, recipient)` with each delivery so a second run is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

INCOMING = "incoming"
OUTGOING = "outgoing"
# Outgoing mail held for the admin (outbound abuse); no worker takes it, `queue release` does.
HELD = "held"


@dataclass(frozen=True, slots=True)
class QueueItem:
    item_id: str
    topic: str
    payload: bytes
    attempts: int  # how many times it has been taken, this time included
    enqueued_at: float
    not_before: float
    last_error: str = ""


class Queue(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put(
        self, topic: str, payload: bytes, *, item_id: str | None = None, delay: float = 0.0
    ) -> str:
        """Enqueue durably; returns the item id. Putting an existing id again is a no-op."""
        ...
    async def take(
        self, topic: str, *, lease: float = 300.0, wait: float = 0.0
    ) -> QueueItem | None:
        """Lease the oldest due item, waiting up to `wait` seconds for one to become due."""
        ...
    async def take_many(
        self, topic: str, *, max_items: int, lease: float = 300.0, wait: float = 0.0
    ) -> list[QueueItem]:
        """Lease up to `max_items` due items, oldest first, each as `take` would; waits up to
        `wait` seconds for the first. Empty when none became due. Engines that can do it
        lease the whole batch in one transaction or round trip."""
        ...
    async def ack(self, item: QueueItem) -> None:
        """Done: the item is removed for good."""
        ...
    async def ack_many(self, items: Sequence[QueueItem]) -> None:
        """`ack` each item (an ack of a lease that ran out and went to another taker is
        ignored, as with `ack`); in one transaction or round trip where the engine can."""
        ...
    async def retry(self, item: QueueItem, delay: float, error: str = "") -> None:
        """Not done: hand it out again after `delay` seconds."""
        ...
    async def list(self, topic: str, limit: int = 100) -> list[QueueItem]:
        """Waiting and leased items, oldest first (for `postroom queue list`)."""
        ...
    async def remove(self, topic: str, item_id: str) -> bool: ...
    async def exists(self, topic: str, item_id: str) -> bool:
        """Whether the item is still queued (waiting or leased): a worker about to put back
        what it holds checks that no operator removed it meanwhile."""
        ...
    async def size(self, topic: str) -> int: ...
