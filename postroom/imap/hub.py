"""Fan-out of the event bus to the IMAP sessions of one node.

One subscription per node (not per connection) reads every event and wakes the sessions of the
event's user that have the event's folder selected, so 10,000 idle connections cost one bus
subscriber, a dict entry each and no task of their own beyond their reader. When the bus drops the
subscriber (it fell behind), every session is woken, since any of them may have missed a change.

Fan-out is per user and folder, not per connection: for a new message the hub reads its record
once (through the loader of one of the watching sessions) and then calls every watcher with it
at hand (`loaded`), so a thousand IDLE sessions of one mailbox cost one store read and a
thousand small socket writes, not a thousand reads and task wake-ups. Events of one folder are
handed out in the order they came, even while such a read is under way.

The hub also keeps what RFC 3501 makes per-server rather than per-session: the connection count
per user (a limit), and which messages some session has already been shown as \\Recent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from postroom.core.models import MessageRecord
from postroom.store.events import MESSAGE_MOVED, MESSAGE_NEW, Event, EventBus

log = logging.getLogger(__name__)

Waker = Callable[[Event | None], None]
Loader = Callable[[Event], Awaitable["MessageRecord | None"]]


class SessionHub:
    def __init__(self, events: EventBus) -> None:
        self.events = events
        self._watchers: dict[tuple[str, str], set[Waker]] = {}
        self._loaders: dict[tuple[str, str], Loader] = {}
        # folders whose events wait behind a record being read: delivered in order after it
        self._queued: dict[tuple[str, str], list[Event]] = {}
        self._loaded: dict[tuple[str, str], MessageRecord] = {}
        self._fanouts: set[asyncio.Task[None]] = set()
        self._connections: dict[str, int] = {}
        self._recent: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    # -- event fan-out

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="imap-event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                subscription = await self.events.subscribe(None)
            except Exception:
                log.exception("imap hub could not subscribe to the event bus")
                await asyncio.sleep(1)
                continue
            try:
                async for event in subscription:
                    self.dispatch(event)
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()
            if getattr(subscription, "overflowed", False):
                log.warning("imap hub fell behind the event bus; waking every session")
                self.wake_all()
                continue
            return  # the bus was closed

    def dispatch(self, event: Event) -> None:
        folders = [event.folder_id]
        if event.type == MESSAGE_MOVED:
            source = event.data.get("from_folder_id")
            if isinstance(source, str):
                folders.append(source)
        for folder_id in folders:
            key = (event.user_id, folder_id)
            if key not in self._watchers:
                continue
            queued = self._queued.get(key)
            if queued is not None:
                queued.append(event)
            elif event.type == MESSAGE_NEW and folder_id == event.folder_id \
                    and key in self._loaders:
                self._queued[key] = [event]
                task = asyncio.create_task(self._fan_out(key), name="imap-hub-fanout")
                self._fanouts.add(task)
                task.add_done_callback(self._fanouts.discard)
            else:
                self._deliver(key, event)

    def _deliver(self, key: tuple[str, str], event: Event) -> None:
        for wake in list(self._watchers.get(key, ())):
            try:
                wake(event)
            except Exception:  # one broken session must not starve the others
                log.exception("imap session wake-up failed")

    async def _fan_out(self, key: tuple[str, str]) -> None:
        """Deliver the folder's queued events in order, reading each new record once."""
        queue = self._queued[key]
        try:
            while queue:
                event = queue.pop(0)
                record = None
                loader = self._loaders.get(key)
                if event.type == MESSAGE_NEW and loader is not None:
                    try:
                        record = await loader(event)
                    except Exception as exc:  # the sessions read it themselves, later
                        log.debug("imap hub could not read %s: %r", event.message_id, exc)
                rkey = (event.user_id, event.message_id)
                if record is not None:
                    self._loaded[rkey] = record
                try:
                    self._deliver(key, event)
                finally:
                    self._loaded.pop(rkey, None)
        finally:
            del self._queued[key]

    def loaded(self, event: Event) -> MessageRecord | None:
        """The record of the new message being handed out right now, if the hub read it."""
        record = self._loaded.get((event.user_id, event.message_id))
        if record is None or record.uid != event.uid or record.folder_id != event.folder_id:
            return None
        return record

    def wake_all(self) -> None:
        for wakers in list(self._watchers.values()):
            for wake in list(wakers):
                wake(None)

    def watch(self, user_id: str, folder_id: str, wake: Waker, loader: Loader | None = None
              ) -> None:
        self._watchers.setdefault((user_id, folder_id), set()).add(wake)
        if loader is not None:
            self._loaders.setdefault((user_id, folder_id), loader)

    def unwatch(self, user_id: str, folder_id: str, wake: Waker) -> None:
        key = (user_id, folder_id)
        wakers = self._watchers.get(key)
        if wakers is not None:
            wakers.discard(wake)
            if not wakers:
                del self._watchers[key]
                self._loaders.pop(key, None)

    # -- per-user connection limit

    def connect(self, user_id: str, limit: int) -> bool:
        count = self._connections.get(user_id, 0)
        if limit and count >= limit:
            return False
        self._connections[user_id] = count + 1
        return True

    def disconnect(self, user_id: str) -> None:
        count = self._connections.get(user_id, 0) - 1
        if count > 0:
            self._connections[user_id] = count
        else:
            self._connections.pop(user_id, None)

    # -- \Recent (RFC 3501 §2.3.2): shown as recent to one session only

    def claim_recent(self, user_id: str, folder_id: str, uids: list[int]) -> set[int]:
        """The uids among `uids` no session has been shown yet; they are now claimed."""
        key = (user_id, folder_id)
        claimed = self._recent.get(key, 0)
        fresh = {u for u in uids if u > claimed}
        if fresh:
            self._recent[key] = max(fresh)
        return fresh

    def unclaimed(self, user_id: str, folder_id: str, uids: list[int]) -> set[int]:
        """What EXAMINE reports as recent, without claiming it."""
        claimed = self._recent.get((user_id, folder_id), 0)
        return {u for u in uids if u > claimed}


_HUBS: weakref.WeakKeyDictionary[Any, SessionHub] = weakref.WeakKeyDictionary()


def hub_for(events: EventBus) -> SessionHub:
    """The hub shared by every IMAP listener over one event bus (imap and imaps)."""
    hub = _HUBS.get(events)
    if hub is None:
        hub = _HUBS[events] = SessionHub(events)
    return hub
