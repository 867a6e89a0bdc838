"""The webmail push hub stops within its bound even when the event bus hangs on the way out
(a subscription's close waiting on a Redis that is restarting)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

from postroom.http import events_ws
from postroom.http.events_ws import EventHub
from postroom.store.local_events import LocalEventBus, LocalSubscription


class _StuckSubscription(LocalSubscription):
    async def close(self) -> None:
        await asyncio.Event().wait()  # never returns, as a close on a dead connection can


class _StuckBus(LocalEventBus):
    async def subscribe(self, user_id: str | None = None) -> LocalSubscription:
        subscription = _StuckSubscription(self, user_id, self.queue_size)
        self._subscriptions.add(subscription)
        return subscription


def test_stop_is_bounded_when_the_subscription_never_closes() -> None:
    async def scenario() -> None:
        hub = EventHub(cast(Any, SimpleNamespace(events=_StuckBus())))
        await hub.start()
        started = time.monotonic()
        await hub.stop()
        assert time.monotonic() - started < events_ws.STOP_TIMEOUT + 2

    asyncio.run(scenario())
