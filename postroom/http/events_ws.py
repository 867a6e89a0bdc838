"""GET /v1/events: a user's mail events pushed over a WebSocket.

One `EventHub` per node subscribes once to the whole event bus (every user), so with several
nodes on a shared bus (Redis) every node's hub sees every event, and a page can reconnect to
any node. The hub keeps a short log per user (`retention_events` events, at most
`retention_seconds` old) and fans events out to that user's connections on this node.

Frames, server to client, all JSON objects with a `type`:

- `ready` `{id, heartbeat}`: the connection is live; `id` is where the client now stands.
- `message.new` (with `message`, the summary the list shows, or null if it is already gone),
  `message.flags` (`flags`, `seen`, `flagged`), `message.moved` (`from_folder_id`),
  `message.deleted`, `folder.changed` (`name`, `change`): each with an `id`.
- `folder.counts` `{id, folders: [{id, name, role, total, unread}]}` after changes.
- `resync` `{id}`: events were missed and cannot be replayed; reload, then carry on from `id`.
- `heartbeat` `{time}`: after `heartbeat` seconds with nothing else sent (25 by default; a
  client may ask for another interval with `?heartbeat=SECONDS`, 1 to 300). A client's text
  frame `ping` is answered with `pong`.

Ids come from the event's own content (a keyed digest of its fields, which include the folder's
modseq), not from a node's counter, so every node gives one event the same id. A client that
reconnects with `?last_event_id=ID` gets the events after ID from the log, or `resync` when ID
is no longer (or never was) in this node's log.

Authentication: the API's bearer token, offered as the WebSocket subprotocol `bearer.TOKEN`
next to `postroom.v1` (a browser cannot set an Authorization header on a WebSocket), or the
`access_token` query parameter, or an `Authorization: Bearer` header. The server selects
`postroom.v1` and never echoes the token. A refused token closes the socket with code 4401.

Fan-out: an event's JSON, and its WebSocket frame, are built once for every connection of the
user (one summary read, one `json.dumps`, one frame header). A connection with nothing queued
gets the frame written straight to its transport in the same loop pass (no task wake-up per
connection, no ASGI send chain, no per-connection compression: an uncompressed frame is valid
even where permessage-deflate was negotiated, RFC 7692 section 6.1). A connection that is behind
(its transport paused by a slow reader, or a replay being sent) gets the frame queued behind the
rest and a drain task of its own that sends through ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.frames import Frame as WireFrame
from websockets.frames import Opcode

from postroom.core.models import User
from postroom.http.schemas import MessageSummary
from postroom.service import AuthFailed, MailService, NotFoundError, ServiceError
from postroom.store.events import (
    FOLDER_CHANGED,
    MESSAGE_DELETED,
    MESSAGE_FLAGS,
    MESSAGE_MOVED,
    MESSAGE_NEW,
    Event,
)

try:  # the transport we write finished frames to (see Connection._write_now)
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIOProtocol,
    )
except ImportError:  # pragma: no cover - another server, or another uvicorn
    _SansIOProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0  # seconds stop() waits for the hub's tasks to end

SUBPROTOCOL = "postroom.v1"
TOKEN_PREFIX = "bearer."
PUSHED = (MESSAGE_NEW, MESSAGE_FLAGS, MESSAGE_MOVED, MESSAGE_DELETED, FOLDER_CHANGED)
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4408
COUNTS_SUFFIX = ".c"
RAW_SEND_KEY = "postroom.raw_send"  # the server's own ASGI send, kept in the scope
HEARTBEAT_TICK = 1.0  # seconds between the hub's looks for idle connections


def event_id(event: Event) -> str:
    """The same id on every node: a digest of the event's fields (its modseq makes it unique)."""
    raw = json.dumps(asdict(event), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


class Frame:
    """One JSON text frame, encoded once: its text, and its bytes on the wire (built on first
    use; a server's frames are unmasked, so the bytes are the same for every connection)."""

    __slots__ = ("_wire", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._wire: bytes | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Frame:
        return cls(json.dumps(body, separators=(",", ":")))

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = WireFrame(Opcode.TEXT, self.text.encode()).serialize(
                mask=False, extensions=[])
        return self._wire


@dataclass(eq=False)
class Entry:
    """One event in a user's log; its JSON frame is built once, for all connections."""

    event: Event
    at: float
    seq: int = 0  # the hub's order of arrival: a connection is handed each entry once
    frame: asyncio.Future[str] | None = None
    rendered: Frame | None = None
    _id: str | None = None

    @property
    def id(self) -> str:
        """event_id(event), computed when first asked for: most events are logged for a
        reconnect that never comes, on a node where the user has no connection."""
        if self._id is None:
            self._id = event_id(self.event)
        return self._id


@dataclass(eq=False)
class UserLog:
    marker: str  # the id a client holds when nothing had happened yet
    entries: deque[Entry]
    connections: set[Connection] = field(default_factory=set)
    pruned: bool = False  # an entry has been dropped: the marker no longer means "from the start"
    counts_task: asyncio.Task[None] | None = None
    pending: deque[Entry] = field(default_factory=deque)  # accepted, not yet fanned out
    dispatcher: asyncio.Task[None] | None = None

    @property
    def latest(self) -> str:
        return self.entries[-1].id if self.entries else self.marker


Item = Entry | Frame | dict[str, Any]


def _transport_protocol(ws: WebSocket) -> Any:
    """uvicorn's WebSocket protocol under this connection, when it is one whose transport we
    can write finished frames to (its sans-I/O implementation, the default with `websockets`
    installed); None otherwise, and every frame then goes through the ASGI send."""
    raw_send = ws.scope.get(RAW_SEND_KEY)
    proto = getattr(raw_send, "__self__", None)
    if _SansIOProtocol is None or not isinstance(proto, _SansIOProtocol):
        return None
    return proto


class Connection:
    """One WebSocket. Frames go straight to the transport while nothing is queued; otherwise
    into a bounded backlog with a drain task. Too far behind and it is closed, and the client
    reconnects with its last id (replayed from the log, or told to resync)."""

    def __init__(self, ws: WebSocket, user: User, limit: int, hub: EventHub | None = None
                 ) -> None:
        self.ws = ws
        self.user = user
        self.limit = limit
        self.hub = hub
        self.backlog: deque[Item | None] = deque()  # None: close the socket
        self.drainer: asyncio.Task[None] | None = None
        self.too_slow = False
        self.closed = False
        self.heartbeat: float | None = None  # seconds; None: the hub's default
        self.last_sent = time.monotonic()
        self.seq = 0  # the newest log entry handed to this connection
        self._proto = _transport_protocol(ws)

    def push(self, item: Item) -> None:
        if self.closed or self.too_slow:
            return
        if isinstance(item, Entry):
            if item.seq <= self.seq:
                return  # already handed over (a replay raced the live feed)
            self.seq = item.seq
        if not self.backlog and self.drainer is None:
            frame = (item.rendered if isinstance(item, Entry)
                     else item if isinstance(item, Frame) else Frame.of(item))
            if frame is not None and self._write_now(frame):
                return
        if len(self.backlog) >= self.limit:
            self.too_slow = True
            self.backlog.clear()
            self.close_soon()
            return
        self.backlog.append(item)
        self._drain_soon()

    def close_soon(self) -> None:
        self.backlog.append(None)
        self._drain_soon()

    def _write_now(self, frame: Frame) -> bool:
        """Write a whole frame to the transport if it takes it now (not paused by a slow
        reader, not closing); the protocol's own frames are whole writes too, so none
        interleave."""
        proto = self._proto
        if proto is None or proto.close_sent or proto.disconnected:
            return False
        transport = proto.transport
        if not proto.writable.is_set() or transport is None or transport.is_closing():
            return False
        transport.write(frame.wire)
        self.last_sent = time.monotonic()
        return True

    def _drain_soon(self) -> None:
        if self.drainer is None:
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.backlog and not self.closed:
                item = self.backlog.popleft()
                if item is None:
                    self.closed = True
                    await self.ws.close(code=CLOSE_TOO_SLOW if self.too_slow else 1001)
                    return
                if isinstance(item, Entry):
                    text = (item.rendered.text if item.rendered is not None else
                            await self.hub.render(item, self.user) if self.hub is not None
                            else None)
                    if text is None:
                        continue
                elif isinstance(item, Frame):
                    text = item.text
                else:
                    text = json.dumps(item, separators=(",", ":"))
                await self.ws.send_text(text)
                self.last_sent = time.monotonic()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True
        except Exception:
            log.exception("push to %s", self.user.address)
            self.closed = True
        finally:
            self.drainer = None


class EventHub:
    def __init__(self, service: MailService, *, retention_seconds: float = 900.0,
                 retention_events: int = 1000, heartbeat: float = 25.0,
                 send_queue: int = 2000, counts_delay: float = 0.05) -> None:
        self.service = service
        self.retention_seconds = retention_seconds
        self.retention_events = retention_events
        self.heartbeat = heartbeat
        self.send_queue = send_queue
        self.counts_delay = counts_delay
        self._logs: dict[str, UserLog] = {}
        self._epoch = secrets.token_hex(4)
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._beats: asyncio.Task[None] | None = None
        self._seq = 0
        self._subscribed = asyncio.Event()
        self._stopping = False

    # -------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Subscribe to the bus (returns once subscribed). Idempotent."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="event-hub")
            self._beats = asyncio.create_task(self._heartbeats(), name="event-hub-heartbeats")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 10)

    async def stop(self) -> None:
        self._stopping = True
        tasks = {task for task in (self._task, self._beats) if task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a subscription's close can wait on an event bus that is itself going
            # away (Redis restarting), and a stopping node must not hang on it.
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        self._task = self._beats = None
        for user_log in self._logs.values():
            for conn in list(user_log.connections):
                conn.close_soon()

    @property
    def connection_count(self) -> int:
        return sum(len(u.connections) for u in self._logs.values())

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping:
            try:
                subscription = await self.service.events.subscribe(None)
            except Exception as exc:  # the bus is down: try again, connections stay open
                log.warning("event hub cannot subscribe: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            self._subscribed.set()
            last_sweep = time.monotonic()
            try:
                async for event in subscription:
                    self._accept(event)
                    now = time.monotonic()
                    if now - last_sweep > 30:
                        self._sweep(now)
                        last_sweep = now
            finally:
                with contextlib.suppress(Exception):
                    await subscription.close()
            if self._stopping:
                return
            # The subscription ended (overflow or a lost bus connection): events were missed.
            log.warning("event hub lost its subscription; every client resynchronises")
            self._subscribed.clear()
            self._lost()

    async def _heartbeats(self) -> None:
        """One sweep a tick over every connection instead of a timer per connection: an idle
        one (nothing sent for its interval) gets a heartbeat frame, encoded once per tick."""
        while True:
            await asyncio.sleep(min(HEARTBEAT_TICK, self.heartbeat))
            now = time.monotonic()
            frame: Frame | None = None
            for user_log in list(self._logs.values()):
                for conn in list(user_log.connections):
                    if now - conn.last_sent >= (conn.heartbeat or self.heartbeat):
                        frame = frame or Frame.of({"type": "heartbeat", "time": time.time()})
                        conn.last_sent = now
                        conn.push(frame)

    def _new_log(self) -> UserLog:
        self._generation += 1
        return UserLog(f"start.{self._epoch}.{self._generation}",
                       deque(maxlen=self.retention_events))

    def _lost(self) -> None:
        self._epoch = secrets.token_hex(4)
        old = self._logs
        self._logs = {}
        for user_id, user_log in old.items():
            if user_log.connections:
                fresh = self._new_log()
                fresh.connections = user_log.connections
                self._logs[user_id] = fresh
                for conn in fresh.connections:
                    conn.push({"type": "resync", "id": fresh.latest})

    def _sweep(self, now: float) -> None:
        for user_id, user_log in list(self._logs.items()):
            self._prune(user_log, now)
            if not user_log.entries and not user_log.connections:
                del self._logs[user_id]

    def _prune(self, user_log: UserLog, now: float) -> None:
        while user_log.entries and now - user_log.entries[0].at > self.retention_seconds:
            user_log.entries.popleft()
            user_log.pruned = True

    # ---------------------------------------------------------------------------- events

    def _accept(self, event: Event) -> None:
        if event.type not in PUSHED:
            return
        user_log = self._logs.get(event.user_id)
        if user_log is None:
            user_log = self._logs[event.user_id] = self._new_log()
        if len(user_log.entries) == user_log.entries.maxlen:
            user_log.pruned = True
        self._seq += 1
        entry = Entry(event, time.monotonic(), self._seq)
        user_log.entries.append(entry)
        if user_log.connections:
            user = next(iter(user_log.connections)).user
            user_log.pending.append(entry)
            if user_log.dispatcher is None:
                user_log.dispatcher = asyncio.create_task(self._dispatch(user_log, user))
            self._schedule_counts(event.user_id, user_log, user)

    async def _dispatch(self, user_log: UserLog, user: User) -> None:
        """Fan a user's events out in order: render each once, then hand the one frame to
        every connection of the user on this node (a direct write for most)."""
        try:
            while user_log.pending:
                entry = user_log.pending[0]
                text = await self.render(entry, user)
                if entry.rendered is None:
                    entry.rendered = Frame(text)
                user_log.pending.popleft()
                for conn in list(user_log.connections):
                    conn.push(entry)
        except Exception:
            log.exception("push fan-out for %s", user.address)
            user_log.pending.clear()
        finally:
            user_log.dispatcher = None

    def _schedule_counts(self, user_id: str, user_log: UserLog, user: User) -> None:
        if user_log.counts_task is None or user_log.counts_task.done():
            user_log.counts_task = asyncio.create_task(self._send_counts(user_id, user))

    async def _send_counts(self, user_id: str, user: User, delay: float | None = None) -> None:
        """Folder counts after a burst of changes (coalesced over `counts_delay`)."""
        await asyncio.sleep(self.counts_delay if delay is None else delay)
        user_log = self._logs.get(user_id)
        if user_log is None or not user_log.connections:
            return
        user_log.counts_task = None
        body = await self.counts_frame(user, user_log.latest)
        if body is not None:
            frame = Frame.of(body)  # encoded once for every connection of the user
            for conn in list(self._logs.get(user_id, user_log).connections):
                conn.push(frame)

    async def counts_frame(self, user: User, latest: str) -> dict[str, Any] | None:
        try:
            folders = await self.service.list_folders(user)
        except Exception:
            log.exception("folder counts for %s", user.address)
            return None
        return {"id": latest + COUNTS_SUFFIX, "type": "folder.counts", "folders": [
            {"id": f.folder_id, "name": f.name, "role": f.role.value if f.role else None,
             "total": c.total, "unread": c.unread} for f, c in folders]}

    async def render(self, entry: Entry, user: User) -> str:
        if entry.frame is None:
            entry.frame = asyncio.ensure_future(self._render(entry, user))
        return await asyncio.shield(entry.frame)

    async def _render(self, entry: Entry, user: User) -> str:
        ev = entry.event
        frame: dict[str, Any] = {"id": entry.id, "type": ev.type, "folder_id": ev.folder_id,
                                 "message_id": ev.message_id, "uid": ev.uid,
                                 "modseq": ev.modseq}
        if ev.type == MESSAGE_NEW:
            frame["thread_id"] = ev.data.get("thread_id", "")
            summary: dict[str, Any] | None = None
            try:
                record = await self.service.get_message(user, ev.message_id)
                if record.folder_id == ev.folder_id:
                    summary = MessageSummary.of(record).model_dump(mode="json", by_alias=True)
            except (NotFoundError, ServiceError):
                pass
            except Exception:
                log.exception("summary of %s", ev.message_id)
            frame["message"] = summary
        elif ev.type == MESSAGE_FLAGS:
            flags = list(ev.data.get("flags", []))
            frame.update(flags=flags, seen="\\Seen" in flags, flagged="\\Flagged" in flags)
        elif ev.type == MESSAGE_MOVED:
            frame.update(from_folder_id=ev.data.get("from_folder_id", ""),
                         from_uid=ev.data.get("from_uid", 0))
        elif ev.type == FOLDER_CHANGED:
            frame.update(name=ev.data.get("name", ""), change=ev.data.get("change", ""))
        return json.dumps(frame, separators=(",", ":"))

    # ------------------------------------------------------------------------ connections

    def attach(self, conn: Connection, last_id: str | None) -> None:
        """Register a connection and queue what it missed, in one step (no await), so no
        event can fall between the replay and the live feed."""
        user_id = conn.user.user_id
        user_log = self._logs.get(user_id)
        if user_log is None:
            user_log = self._logs[user_id] = self._new_log()
        self._prune(user_log, time.monotonic())
        user_log.connections.add(conn)
        conn.hub = self
        if last_id is not None:
            last_id = last_id.removesuffix(COUNTS_SUFFIX)
            ids = [e.id for e in user_log.entries]
            if last_id in ids:
                for entry in list(user_log.entries)[ids.index(last_id) + 1:]:
                    conn.push(entry)
            elif last_id == user_log.marker and not user_log.pruned:
                for entry in user_log.entries:
                    conn.push(entry)
            else:
                conn.push({"type": "resync", "id": user_log.latest})
        # Live from here: what the log held before (and was not replayed) is behind "ready".
        conn.seq = max(conn.seq, user_log.entries[-1].seq if user_log.entries else 0)
        conn.push({"type": "ready", "id": user_log.latest,
                   "heartbeat": conn.heartbeat or self.heartbeat})

    def detach(self, conn: Connection) -> None:
        user_log = self._logs.get(conn.user.user_id)
        if user_log is not None:
            user_log.connections.discard(conn)

    def latest(self, user_id: str) -> str | None:
        user_log = self._logs.get(user_id)
        return user_log.latest if user_log else None


def _token_of(ws: WebSocket) -> tuple[str | None, bool]:
    """The bearer token and whether the client offered our subprotocol."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")
               if p.strip()]
    token = None
    for proto in offered:
        if proto.startswith(TOKEN_PREFIX):
            token = proto[len(TOKEN_PREFIX):]
    if token is None:
        token = ws.query_params.get("access_token")
    if token is None:
        scheme, _, value = ws.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
    return token, SUBPROTOCOL in offered


class RawSendMiddleware:
    """Keeps the server's own ASGI send in a WebSocket scope, so the hub can reach the
    connection's transport (see `_transport_protocol`) under the framework's wrappers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND_KEY] = send
        await self.app(scope, receive, send)


def add_event_routes(app: FastAPI, service: MailService) -> EventHub:
    hub = EventHub(service)
    app.state.event_hub = hub
    app.add_middleware(RawSendMiddleware)

    @app.websocket("/v1/events")
    async def events(ws: WebSocket) -> None:
        token, ours = _token_of(ws)
        subprotocol = SUBPROTOCOL if ours else None
        user: User | None = None
        reason = "authentication required"
        if token:
            try:
                user = await service.user_for_token(token)
            except AuthFailed as exc:
                reason = str(exc)
        await ws.accept(subprotocol=subprotocol)
        if user is None:
            await ws.close(code=CLOSE_UNAUTHORIZED, reason=reason)
            return
        await hub.start()  # no-op once `postroom serve` has started it
        conn = Connection(ws, user, hub.send_queue, hub)
        with contextlib.suppress(ValueError):  # a client behind a stricter proxy asks for more
            conn.heartbeat = min(max(float(ws.query_params.get("heartbeat", "")), 1.0), 300.0)
        last_id = ws.query_params.get("last_event_id") or None
        hub.attach(conn, last_id)
        counts = await hub.counts_frame(user, hub.latest(user.user_id) or "")
        if counts is not None:
            conn.push(counts)
        try:
            while True:  # the client says little: a ping now and then, or goodbye
                text = await ws.receive_text()
                if text == "ping" or text.startswith('{"type":"ping"'):
                    conn.push({"type": "pong", "time": time.time()})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            hub.detach(conn)
            drainer = conn.drainer
            conn.closed = True
            if drainer is not None:
                drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await drainer
            if conn.too_slow:
                with contextlib.suppress(Exception):
                    await ws.close(code=CLOSE_TOO_SLOW, reason="too far behind; reconnect")

    return hub
