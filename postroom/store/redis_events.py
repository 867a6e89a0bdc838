"""The event bus on Redis pub/sub (`redis://HOST:PORT/DB?prefix=postroom:`): every node sees
every event, so an IMAP IDLE on node B wakes for mail that node A delivered.

Channels. Each event is published twice, in one round trip: on its user's channel
`PREFIX ev:u:<user id>` and on the wildcard channel `PREFIX ev:all` (caches and other consumers
of everyone's events). A node subscribes to a channel only while a local subscriber wants it,
so a node holding a thousand IDLE sessions listens to a thousand user channels, not to the
whole stream.

One connection per node. All of a node's subscriptions share one subscriber connection; a
reader task routes each message to the local subscribers of its channel. `subscribe` returns
only once Redis has confirmed the SUBSCRIBE, so every event published afterwards reaches it.

Losses are made visible, never silent. Pub/sub has no replay: an event published while the
connection is down is gone. So when the subscriber connection fails, every subscription ends
with `overflowed` set (and `interrupted`), exactly like a slow subscriber that overflows its
buffer: the consumer resynchronises from the store (an IMAP session re-reads its folder, a WebSocket
client reconnects) and subscribes again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from postroom.store.errors import StoreError
from postroom.store.events import Event
from postroom.store.redis_cache import DEFAULT_PREFIX, split_redis_url

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 10.0


class RedisSubscription:
    """One local subscriber's feed: an async iterator of `Event` that ends when closed."""

    def __init__(self, bus: RedisEventBus, channel: str, queue_size: int) -> None:
        self.channel = channel
        # Ended having missed events: fell `queue_size` events behind, or the connection to
        # Redis failed (then `interrupted` too). Either way: resynchronise, subscribe again.
        self.overflowed = False
        self.interrupted = False
        self._bus = bus
        self._limit = queue_size
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, event: Event) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= self._limit:
            self.overflowed = True
            self._end()
            return
        self._queue.put_nowait(event)

    def __aiter__(self) -> RedisSubscription:
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
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


@dataclass(slots=True)
class _Channel:
    ready: asyncio.Future[None]
    listeners: set[RedisSubscription] = field(default_factory=set)


class RedisEventBus:
    """`EventBus` over Redis pub/sub, shared by every node that names the same Redis and prefix."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        queue_size: int = 1000,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.url = url
        self.prefix = prefix
        self.queue_size = queue_size
        self._redis: Redis | None = None
        self._sub_client: Redis | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._channels: dict[str, _Channel] = {}
        # SUBSCRIBE confirmations come back in the order the commands were sent, per channel.
        self._confirmations: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._open = False

    @classmethod
    def from_url(cls, url: str) -> RedisEventBus:
        plain, ours = split_redis_url(url, "prefix", "queue_size")
        return cls(plain, prefix=ours.get("prefix", DEFAULT_PREFIX),
                   queue_size=int(ours.get("queue_size", "1000")))

    @property
    def subscriber_name(self) -> str:
        """The subscriber connection's CLIENT SETNAME, to find it in `CLIENT LIST`."""
        return f"{self.prefix}events".replace(" ", "_")

    def channel_of(self, user_id: str | None) -> str:
        return f"{self.prefix}ev:all" if user_id is None else f"{self.prefix}ev:u:{user_id}"

    # Lifecycle

    async def open(self) -> None:
        if self._open:
            return
        client: Redis = Redis.from_url(self.url, socket_connect_timeout=10)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise StoreError(f"event bus: cannot reach Redis: {exc}") from exc
        self._redis = client
        # The subscriber connection must not reconnect behind our back: a silent reconnect
        # would come back subscribed to nothing. An error ends the subscriptions instead.
        self._sub_client = Redis.from_url(
            self.url, socket_connect_timeout=10, retry=Retry(NoBackoff(), 0),
            client_name=self.subscriber_name,
        )
        self._open = True

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        for channel in list(self._channels.values()):
            for subscription in list(channel.listeners):
                subscription._end()
        await self._drop_connection(StoreError("event bus is closed"))
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in (self._sub_client, self._redis):
            if client is not None:
                await client.aclose()
        self._sub_client = self._redis = None

    # The EventBus protocol

    async def publish(self, event: Event) -> None:
        if self._redis is None:
            raise StoreError("event bus is not open")
        raw = event.encode()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.publish(self.channel_of(event.user_id), raw)
                pipe.publish(self.channel_of(None), raw)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"event publish: {exc}") from exc

    async def subscribe(self, user_id: str | None = None) -> RedisSubscription:
        if not self._open:
            raise StoreError("event bus is closed")
        name = self.channel_of(user_id)
        subscription = RedisSubscription(self, name, self.queue_size)
        async with self._lock:
            channel = self._channels.get(name)
            if channel is None:
                channel = _Channel(asyncio.get_running_loop().create_future())
                self._channels[name] = channel
                self._confirmations.setdefault(name, collections.deque()).append(channel.ready)
                try:
                    pubsub = await self._connection()
                    await pubsub.execute_command("SUBSCRIBE", name)
                except (RedisError, OSError) as exc:
                    self._channels.pop(name, None)
                    await self._drop_connection(exc)
                    raise StoreError(f"event subscribe: {exc}") from exc
            channel.listeners.add(subscription)
        try:
            await asyncio.wait_for(asyncio.shield(channel.ready), SUBSCRIBE_TIMEOUT)
        except (TimeoutError, StoreError) as exc:
            subscription._end()
            raise StoreError(f"event subscribe: not confirmed by Redis: {exc}") from exc
        return subscription

    # The subscriber connection

    async def _connection(self) -> Any:
        if self._pubsub is None:
            assert self._sub_client is not None
            pubsub = self._sub_client.pubsub()
            await pubsub.connect()  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            self._reader = asyncio.create_task(self._read(pubsub), name="redis-events-reader")
        return self._pubsub

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                response = await pubsub.parse_response(block=True)
                if not response:
                    continue
                kind = bytes(response[0])
                name = bytes(response[1]).decode()
                if kind == b"message":
                    self._dispatch(name, bytes(response[2]))
                elif kind == b"subscribe":
                    waiting = self._confirmations.get(name)
                    if waiting:
                        future = waiting.popleft()
                        if not waiting:
                            del self._confirmations[name]
                        if not future.done():
                            future.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._pubsub is pubsub:
                log.warning("event bus: lost the Redis subscriber connection (%s); "
                            "subscribers must resynchronise", exc)
                self._spawn(self._drop_connection(exc))

    def _dispatch(self, name: str, raw: bytes) -> None:
        channel = self._channels.get(name)
        if channel is None:
            return
        try:
            event = Event.decode(raw)
        except (ValueError, TypeError):
            log.warning("event bus: undecodable event on %s dropped", name)
            return
        for subscription in list(channel.listeners):
            subscription.offer(event)

    async def _drop_connection(self, error: BaseException) -> None:
        """Forget the subscriber connection; every subscription on it ends, marked interrupted."""
        pubsub, self._pubsub = self._pubsub, None
        reader, self._reader = self._reader, None
        channels, self._channels = self._channels, {}
        confirmations, self._confirmations = self._confirmations, {}
        for waiting in confirmations.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(StoreError(str(error)))
                    future.exception()  # retrieved: nobody may be waiting any more
        for channel in channels.values():
            for subscription in list(channel.listeners):
                subscription.interrupted = subscription.overflowed = self._open
                subscription._end()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _forget(self, subscription: RedisSubscription) -> None:
        channel = self._channels.get(subscription.channel)
        if channel is None or subscription not in channel.listeners:
            return
        channel.listeners.discard(subscription)
        if not channel.listeners:
            del self._channels[subscription.channel]
            if self._pubsub is not None:
                self._spawn(self._unsubscribe(self._pubsub, subscription.channel))

    async def _unsubscribe(self, pubsub: Any, name: str) -> None:
        async with self._lock:
            if self._pubsub is not pubsub or name in self._channels:
                return  # reconnected meanwhile, or someone subscribed again
            try:
                await pubsub.execute_command("UNSUBSCRIBE", name)
            except (RedisError, OSError) as exc:
                log.debug("event bus: UNSUBSCRIBE %s failed: %s", name, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
