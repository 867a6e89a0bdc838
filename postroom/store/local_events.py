"""The in-process event bus (`local://`): fan-out to asyncio queues; the embedded default,
siblings://, is this plus the other processes of the data dir (postroom.store.siblings).

Publishing never waits for a subscriber. Each subscription buffers up to `queue_size` events;
a subscriber that falls that far behind is dropped: its subscription is closed and its iterator
ends (with `overflowed` set), instead of slowing the publisher and through it mail delivery. A
dropped subscriber has missed events, so it should resynchronise from the store (an IMAP session
re-reads the folder state; a WebSocket client reconnects) and subscribe again.
"""

from __future__ import annotations

import asyncio

from postroom.store.errors import StoreError
from postroom.store.events import Event


class LocalSubscription:
    """One subscriber's feed: an async iterator of `Event` that ends when closed."""

    def __init__(self, bus: LocalEventBus, user_id: str | None, queue_size: int) -> None:
        self.user_id = user_id
        self.overflowed = False
        self._bus = bus
        self._limit = queue_size
        # Unbounded so the end marker (None) always fits; `offer` enforces the limit for events.
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def wants(self, event: Event) -> bool:
        return self.user_id is None or self.user_id == event.user_id

    def offer(self, event: Event) -> bool:
        """Queue the event without blocking; False (and closed) if the subscriber is too slow."""
        if self._closed:
            return False
        if self._queue.qsize() >= self._limit:
            self.overflowed = True
            self._end()
            return False
        self._queue.put_nowait(event)
        return True

    def __aiter__(self) -> LocalSubscription:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None or self._closed:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bus._forget(self)
        # Buffered events are dropped: after close the iterator ends at once.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)  # wakes an iterator blocked in get()


class LocalEventBus:
    """`EventBus` within one process: every front end in the process sees every event."""

    def __init__(self, queue_size: int = 1000) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._subscriptions: set[LocalSubscription] = set()
        self._closed = False

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()

    async def publish(self, event: Event) -> None:
        self.fan_out(event)

    def fan_out(self, event: Event) -> None:
        """Hand the event to this process's subscribers (what `publish` does), synchronously."""
        for subscription in list(self._subscriptions):
            if subscription.wants(event):
                subscription.offer(event)

    def interrupt(self) -> None:
        """End every subscription as overflowed: they may have missed events."""
        for subscription in list(self._subscriptions):
            subscription.overflowed = True
            subscription._end()

    async def subscribe(self, user_id: str | None = None) -> LocalSubscription:
        if self._closed:
            raise StoreError("event bus is closed")
        subscription = LocalSubscription(self, user_id, self.queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def _forget(self, subscription: LocalSubscription) -> None:
        self._subscriptions.discard(subscription)
