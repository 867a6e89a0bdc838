"""The queue on NATS JetStream (`nats://HOST:PORT[,HOST:PORT...]?stream_prefix=postroom`).

Layout, for a prefix P:

- one work-queue stream per topic, `P_q_<topic>`, subjects `P.q.<topic>.<item>`: one subject
  per item (its id, or `=` + base64url of it when the id has other characters), at most one
  message per subject and new ones refused (`discard_new_per_subject`), plus the item id as
  `Nats-Msg-Id`: putting an id that is queued is a no-op, for as long as it is queued;
- one durable pull consumer per topic stream, `workers`, shared by every node (explicit ack,
  unlimited deliveries), so any node's workers take any node's items;
- one small stream of *item states*, `P_s`, subjects `P.s.<topic>.<item>`, one message per
  subject (a key-value table without tombstones): attempts, due time, last error and the ack
  subject of the current lease, written with `Nats-Expected-Last-Subject-Sequence` (compare and
  set).

Why the state stream. JetStream counts deliveries, not takes (a delayed item is delivered once
early and put back), it cannot attach an error text to a NAK, it has one ack-wait per consumer
rather than a lease per take, and it accepts an ack from a worker whose lease ran out even after
the item went to another worker. The state record gives the Protocol's exact semantics:

- take: pull one message; if its due time (from the state, else from the put) is still ahead,
  NAK it with that delay and pull again; otherwise bump `attempts` with a compare-and-set (only
  one taker wins a race), then NAK it with `delay = lease`: JetStream redelivers it when the
  lease runs out unless it is acked first. That is the per-take lease, and at-least-once.
- ack/retry: honoured only while the state still names this take's attempt; a late ack from a
  worker whose lease ran out and whose item was taken again is ignored (as in SQLite), while a
  late ack of an item nobody took since still removes it. Retry stores the error and due time
  and NAKs with the delay (a delayed retry, kept by the server).
- Acks, NAKs and state writes are requests the server answers, so each returns only once done.

Durability: `put` returns once JetStream has stored the message (its PubAck); run NATS
clustered with `replicas=3` so that means a quorum of servers has it.

What the engine gives differently from SQLite (the Protocol allows both):
- Order: due items come oldest first, but an item whose delay or lease ran out is handed out
  before new items, even ones enqueued earlier.
- A re-put of an id that was acked is a no-op while it is within `duplicate_window` (default
  10 min); SQLite would queue it again. Either way the mail flow's delivery keys make the
  second run a no-op.
- `list` reads the stream message by message (one state lookup each): fine for
  `postroom queue list`, not meant for hot paths.
- `ack_wait` (default 30 s) bounds how long a message pulled by a process that died before its
  take finished (before the lease NAK) stays invisible, and how long items leased before a
  NATS server restart stay invisible after it (the NAK timers live in the server's memory).
- While NATS is unreachable every operation fails with StoreError after `request_timeout`
  (default 5 s; SMTP then answers 451) and the client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from postroom.store.errors import StoreError
from postroom.store.queue import QueueItem

log = logging.getLogger(__name__)

CONSUMER = "workers"
_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
_ENQUEUED = "Postroom-Enqueued-At"
_NOT_BEFORE = "Postroom-Not-Before"
_EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"
# How long a take with wait=0 lets the server look (it answers at once when an item is due).
_NO_WAIT_EXPIRES = 0.05
# A message whose due time is this close counts as due (clocks of nodes are never exact).
_DUE_SLACK = 0.005

# JetStream API error codes.
_ERR_PER_SUBJECT_FULL = 10077  # maximum messages per subject exceeded: the id is queued
_ERR_WRONG_LAST_SEQ = 10071  # compare-and-set lost
_ERR_STREAM_NAME_IN_USE = 10058


def item_token(item_id: str) -> str:
    """The item id as one subject token (and Nats-Msg-Id): itself when plain, else encoded."""
    if _PLAIN_ID.fullmatch(item_id):
        return item_id
    return "=" + base64.urlsafe_b64encode(item_id.encode()).decode().rstrip("=")


def item_id_of(token: str) -> str:
    if not token.startswith("="):
        return token
    raw = token[1:]
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return token


@contextlib.contextmanager
def _engine_errors(operation: str) -> Iterator[None]:
    """Callers see StoreError, never a NATS exception."""
    try:
        yield
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise StoreError(f"queue {operation}: {exc!r}") from exc


def _nak(delay: float) -> bytes:
    if delay <= 0:
        return b"-NAK"
    return b'-NAK {"delay": %d}' % max(1, int(delay * 1e9))


class NatsQueue:
    """`Queue` on NATS JetStream, shared by every node that names the same servers and prefix."""

    def __init__(
        self,
        servers: list[str] | str = "nats://127.0.0.1:4222",
        *,
        stream_prefix: str = "postroom",
        ack_wait: float = 30.0,
        duplicate_window: float = 600.0,
        replicas: int = 1,
        max_ack_pending: int = 100_000,
        max_waiting: int = 512,
        state_max_age: float = 30 * 24 * 3600.0,
        request_timeout: float = 5.0,
    ) -> None:
        if not _NAME.fullmatch(stream_prefix.replace("_", "-")):
            raise ValueError(f"invalid stream_prefix {stream_prefix!r}: letters, digits, - and _")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.prefix = stream_prefix
        self.ack_wait = ack_wait
        self.duplicate_window = duplicate_window
        self.replicas = replicas
        self.max_ack_pending = max_ack_pending
        self.max_waiting = max_waiting
        self.state_max_age = state_max_age
        # How long one JetStream request (put, ack, state write) may take before the operation
        # fails with StoreError, e.g. while the servers are unreachable (SMTP then says 451).
        self.request_timeout = request_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ready: set[str] = set()
        self._down = False
        self._ensure_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> NatsQueue:
        """`nats://[USER:PASS@]HOST:PORT[,HOST:PORT]?stream_prefix=P&ack_wait=S&replicas=N...`."""
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.netloc:
            raise ValueError(f"{url!r}: expected nats://HOST:PORT")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        servers = [f"{parts.scheme}://{host}" for host in parts.netloc.split(",") if host]
        return cls(
            servers,
            stream_prefix=query.get("stream_prefix", "postroom"),
            ack_wait=float(query.get("ack_wait", "30")),
            duplicate_window=float(query.get("duplicate_window", "600")),
            replicas=int(query.get("replicas", "1")),
            max_ack_pending=int(query.get("max_ack_pending", "100000")),
            max_waiting=int(query.get("max_waiting", "512")),
            request_timeout=float(query.get("request_timeout", "5")),
        )

    # Names

    def stream_of(self, topic: str) -> str:
        if not _NAME.fullmatch(topic):
            raise ValueError(f"invalid queue topic {topic!r}")
        return f"{self.prefix}_q_{topic}"

    @property
    def state_stream(self) -> str:
        return f"{self.prefix}_s"

    def _subject(self, topic: str, token: str) -> str:
        return f"{self.prefix}.q.{topic}.{token}"

    def _state_subject(self, topic: str, token: str) -> str:
        return f"{self.prefix}.s.{topic}.{token}"

    # Lifecycle

    async def open(self) -> None:
        if self._nc is not None:
            return

        async def on_error(exc: Exception) -> None:
            # While reconnecting every failed attempt reports here: once is enough.
            log.log(logging.DEBUG if self._down else logging.WARNING,
                    "NATS queue connection: %r", exc)

        async def on_disconnect() -> None:
            if self._nc is not None:  # not our own close()
                self._down = True
                log.warning("NATS queue: disconnected; reconnecting")

        async def on_reconnect() -> None:
            self._down = False
            log.warning("NATS queue: reconnected")

        with _engine_errors("connect"):
            nc = await nats.connect(
                servers=self.servers,
                name="postroom-queue",
                connect_timeout=5,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        self._nc = nc
        self._js = nc.jetstream(timeout=self.request_timeout)
        try:
            with _engine_errors("open"):
                await self._add_stream(StreamConfig(
                    name=self.state_stream,
                    subjects=[f"{self.prefix}.s.>"],
                    retention=RetentionPolicy.LIMITS,
                    storage=StorageType.FILE,
                    max_msgs_per_subject=1,
                    max_age=self.state_max_age,
                    num_replicas=self.replicas,
                ))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._ready.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    # The Queue protocol

    async def put(
        self, topic: str, payload: bytes, *, item_id: str | None = None, delay: float = 0.0
    ) -> str:
        item_id = item_id if item_id is not None else uuid.uuid4().hex
        token = item_token(item_id)
        now = time.time()
        headers = {
            "Nats-Msg-Id": token,
            _ENQUEUED: repr(now),
            _NOT_BEFORE: repr(now + max(delay, 0.0)),
        }
        with _engine_errors("put"):
            await self._ensure(topic)
            try:
                await self._jetstream().publish(
                    self._subject(topic, token), bytes(payload), headers=headers,
                    stream=self.stream_of(topic),
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code != _ERR_PER_SUBJECT_FULL:
                    raise
        return item_id  # stored, or already queued under this id (a no-op)

    async def take(
        self, topic: str, *, lease: float = 300.0, wait: float = 0.0
    ) -> QueueItem | None:
        deadline = time.monotonic() + max(wait, 0.0)
        with _engine_errors("take"):
            await self._ensure(topic)
            while True:
                msg = await self._pull(topic, deadline - time.monotonic())
                if msg is None:
                    return None
                item = await self._lease(topic, msg, lease)
                if item is not None:
                    return item

    async def take_many(
        self, topic: str, *, max_items: int, lease: float = 300.0, wait: float = 0.0
    ) -> list[QueueItem]:
        """One lease per item as `take` makes them (each has its own state record); only the
        first take waits."""
        items: list[QueueItem] = []
        while len(items) < max(1, max_items):
            item = await self.take(topic, lease=lease, wait=0.0 if items else wait)
            if item is None:
                break
            items.append(item)
        return items

    async def ack(self, item: QueueItem) -> None:
        token = item_token(item.item_id)
        with _engine_errors("ack"):
            state, _revision = await self._state_get(item.topic, token)
            if state is None or state["attempts"] != item.attempts:
                return  # removed, or a stale lease: the item went to another worker
            await self._acknowledge(state["reply"], b"+ACK")
            await self._jetstream().purge_stream(
                self.state_stream, subject=self._state_subject(item.topic, token)
            )

    async def ack_many(self, items: Sequence[QueueItem]) -> None:
        """The acks go out together: each is its own compare-and-set on the item's state."""
        await asyncio.gather(*(self.ack(item) for item in items))

    async def retry(self, item: QueueItem, delay: float, error: str = "") -> None:
        token = item_token(item.item_id)
        with _engine_errors("retry"):
            state, revision = await self._state_get(item.topic, token)
            if state is None or state["attempts"] != item.attempts:
                return
            state["not_before"] = time.time() + max(delay, 0.0)
            state["last_error"] = error
            if await self._state_put(item.topic, token, state, revision):
                await self._acknowledge(state["reply"], _nak(delay))

    async def list(self, topic: str, limit: int = 100) -> list[QueueItem]:
        items: list[QueueItem] = []
        stream = self.stream_of(topic)
        js = self._jetstream()
        with _engine_errors("list"):
            sequence = 1
            while len(items) < limit:
                try:
                    raw = await js.get_msg(stream, seq=sequence, next=True,
                                           subject=self._subject(topic, "*"))
                except nats.js.errors.NotFoundError:
                    break  # no stream, or no message at or after `sequence`
                sequence = (raw.seq or sequence) + 1
                if not raw.subject:
                    continue
                token = raw.subject.rsplit(".", 1)[-1]
                headers = raw.headers or {}
                enqueued = float(headers.get(_ENQUEUED, 0.0))
                state, _revision = await self._state_get(topic, token)
                if state is not None and state.get("seq") != raw.seq:
                    state = None
                items.append(QueueItem(
                    item_id=item_id_of(token),
                    topic=topic,
                    payload=bytes(raw.data or b""),
                    attempts=int(state["attempts"]) if state else 0,
                    enqueued_at=enqueued,
                    not_before=float(state["not_before"]) if state
                    else float(headers.get(_NOT_BEFORE, enqueued)),
                    last_error=str(state["last_error"]) if state else "",
                ))
        return items

    async def remove(self, topic: str, item_id: str) -> bool:
        token = item_token(item_id)
        stream = self.stream_of(topic)
        js = self._jetstream()
        with _engine_errors("remove"):
            try:
                await js.get_last_msg(stream, self._subject(topic, token))
            except nats.js.errors.NotFoundError:
                return False
            await js.purge_stream(stream, subject=self._subject(topic, token))
            await js.purge_stream(self.state_stream, subject=self._state_subject(topic, token))
        return True

    async def exists(self, topic: str, item_id: str) -> bool:
        token = item_token(item_id)
        with _engine_errors("exists"):
            try:
                await self._jetstream().get_last_msg(self.stream_of(topic),
                                                     self._subject(topic, token))
            except nats.js.errors.NotFoundError:
                return False
        return True

    async def size(self, topic: str) -> int:
        stream = self.stream_of(topic)
        with _engine_errors("size"):
            try:
                info = await self._jetstream().stream_info(stream)
            except nats.js.errors.NotFoundError:
                return 0
        return int(info.state.messages)

    # Taking

    async def _pull(self, topic: str, wait: float) -> Msg | None:
        """One message from the topic's consumer, waiting up to `wait` seconds; None if none."""
        nc = self._client()
        if not nc.is_connected:
            # A pull sent now would wait in the client's buffer: say so instead of "empty".
            raise StoreError("queue take: not connected to NATS")
        request: dict[str, Any] = {"batch": 1}
        if wait <= 0:
            # A bare no_wait pull goes unanswered (nats-server 2.9) when nothing is waiting but
            # some items are out on lease: it then waits for them. `expires` bounds that.
            request["no_wait"] = True
            wait = _NO_WAIT_EXPIRES
        request["expires"] = max(1_000_000, int(wait * 1e9))
        # An inbox of our own per pull, so concurrent takes never see each other's replies.
        inbox = nc.new_inbox()
        subscription = await nc.subscribe(inbox)
        try:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream_of(topic)}.{CONSUMER}",
                json.dumps(request).encode(),
                reply=inbox,
            )
            try:
                # The server answers by `expires` at the latest (408); wait a little longer so
                # a message it sends at the last moment is not left unread.
                msg = await subscription.next_msg(timeout=max(wait, 0.0) + self.request_timeout)
            except nats.errors.TimeoutError:
                raise StoreError("queue take: no answer from NATS") from None
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        status = (msg.headers or {}).get("Status")
        if status is None:
            return msg
        if status in ("404", "408"):
            return None  # nothing due / the wait ran out
        if status == "409":  # consumer deleted, or too many waiting pulls: try again later
            self._ready.discard(topic)
            description = (msg.headers or {}).get("Description", "")
            log.warning("NATS queue %s: pull refused (409 %s)", topic, description)
            await asyncio.sleep(min(max(wait, 0.0), 0.1))
            return None
        raise StoreError(f"queue take: pull answered {status}")

    async def _lease(
        self, topic: str, msg: Msg, lease: float, look: bool | None = None
    ) -> QueueItem | None:
        token = msg.subject.rsplit(".", 1)[-1]
        sequence = msg.metadata.sequence.stream
        headers = msg.headers or {}
        enqueued = float(headers.get(_ENQUEUED, 0.0))
        if look is None:
            # A first delivery has no state yet: skip the read and create it (compare-and-set
            # on "absent"); a leftover from an earlier item with this id makes that fail, and
            # then we read after all.
            look = msg.metadata.num_delivered != 1
        state, revision = await self._state_get(topic, token) if look else (None, 0)
        if state is not None and state.get("seq") != sequence:
            state = None  # left over from an earlier item with the same id
        now = time.time()
        not_before = float(state["not_before"]) if state else float(
            headers.get(_NOT_BEFORE, enqueued))
        if not_before - now > _DUE_SLACK:
            await self._acknowledge(msg.reply, _nak(not_before - now))  # not due: back it goes
            return None
        attempts = (int(state["attempts"]) if state else 0) + 1
        until = now + max(lease, 0.001)
        last_error = str(state["last_error"]) if state else ""
        record = {"seq": sequence, "attempts": attempts, "not_before": until,
                  "last_error": last_error, "reply": msg.reply}
        if not await self._state_put(topic, token, record, revision):
            if not look:
                return await self._lease(topic, msg, lease, look=True)
            return None  # another worker took this very delivery's item first
        await self._acknowledge(msg.reply, _nak(until - now))
        return QueueItem(
            item_id=item_id_of(token),
            topic=topic,
            payload=bytes(msg.data),
            attempts=attempts,
            enqueued_at=enqueued,
            not_before=until,
            last_error=last_error,
        )

    async def _acknowledge(self, reply: str, verb: bytes) -> None:
        """+ACK or -NAK, as a request: the server answers once it has applied it."""
        await self._client().request(reply, verb, timeout=self.request_timeout)

    # Item states

    async def _state_get(self, topic: str, token: str) -> tuple[dict[str, Any] | None, int]:
        try:
            raw = await self._jetstream().get_last_msg(
                self.state_stream, self._state_subject(topic, token)
            )
        except nats.js.errors.NotFoundError:
            return None, 0
        try:
            state = json.loads(raw.data or b"")
        except ValueError:
            state = None
        return (state if isinstance(state, dict) else None), int(raw.seq or 0)

    async def _state_put(
        self, topic: str, token: str, state: dict[str, Any], revision: int
    ) -> bool:
        """Write the state if its last revision is still `revision` (0: absent)."""
        try:
            await self._jetstream().publish(
                self._state_subject(topic, token),
                json.dumps(state, separators=(",", ":")).encode(),
                headers={_EXPECT_LAST: str(revision)},
                stream=self.state_stream,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_WRONG_LAST_SEQ:
                return False
            raise
        return True

    # Streams and consumers

    async def _ensure(self, topic: str) -> None:
        if topic in self._ready:
            return
        stream = self.stream_of(topic)
        async with self._ensure_lock:
            if topic in self._ready:
                return
            await self._add_stream(StreamConfig(
                name=stream,
                subjects=[f"{self.prefix}.q.{topic}.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                discard=DiscardPolicy.NEW,
                discard_new_per_subject=True,
                max_msgs_per_subject=1,
                duplicate_window=self.duplicate_window,
                num_replicas=self.replicas,
            ))
            config = ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                max_ack_pending=self.max_ack_pending,
                max_waiting=self.max_waiting,
            )
            try:
                await self._jetstream().add_consumer(stream, config)
            except nats.js.errors.APIError as exc:
                # Made by another node, or by an earlier version with other settings: use it as
                # it is rather than refuse mail (an operator changes it with the nats CLI).
                try:
                    await self._jetstream().consumer_info(stream, CONSUMER)
                except nats.js.errors.NotFoundError:
                    raise exc from None
                log.warning("NATS queue: consumer %s on %s exists with another configuration "
                            "(%s)", CONSUMER, stream, exc.description)
            self._ready.add(topic)

    async def _add_stream(self, config: StreamConfig) -> None:
        js = self._jetstream()
        try:
            await js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE or not config.name:
                raise
            # Made by an earlier version with other limits: use it as it is.
            log.warning("NATS queue: stream %s exists with another configuration", config.name)

    def _client(self) -> Client:
        if self._nc is None:
            raise StoreError("queue is not open")
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise StoreError("queue is not open")
        return self._js
