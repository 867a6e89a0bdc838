"""The event bus of the processes of one machine that share a data dir, without a network
server (`siblings:///DIR` for `[storage] events`; postroom.store.sibling_cache is its cache).

Several Postroom processes on one machine (IMAP nodes sharing a port with SO_REUSEPORT, say, to
use every core) share the SQLite file and the blob directory; what they must also share is the
event bus: an IDLE on one wakes for mail the other stored. Redis does that for nodes on many
machines, at the cost of a network round trip per event. On one machine the kernel can do it
for a system call per member:

- Each process binds a Unix datagram socket in DIR and, on opening, sends a hello to every
  socket already there, so every member knows every other (a member learns of a newcomer from
  its hello; a newcomer finds the members in the directory). A message is one datagram sent to
  each other member, through one connected socket per member.
- Unix datagrams are neither lost nor reordered by the kernel; a full receive queue makes the
  sender wait. The sender does not wait: it queues what the member could not take yet and sends
  it when the member's socket can take more (the loop watches it), in order. Only past
  `BACKLOG` queued datagrams does it drop them; every datagram carries a sequence number per
  pair of members, so the receiver sees the gap and says so (`gap_handlers`): the event bus ends
  its subscriptions as overflowed (subscribers resynchronise from the store, as for a slow
  subscriber).
- A member that died leaves its socket file; connecting to it is refused, and the sender then
  removes the file.

The kernel's queue per socket is short (`net.unix.max_dgram_qlen`, 10 to 512 datagrams), so a
burst of events often waits in the sender's queue for a moment; what must be fresh at once,
the cache, does not travel this way but through memory the processes share.

Linux and other Unixes only. A socket's address holds about 100 bytes: a longer DIR is reached
through the directory's open descriptor (`/proc/self/fd/N/NAME`, Linux).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from postroom.store.errors import StoreError
from postroom.store.events import Event
from postroom.store.local_events import LocalEventBus

log = logging.getLogger(__name__)

BACKLOG = 100_000  # datagrams queued for one member before they are dropped (and the gap shown)
MAX_PATH = 100  # sun_path holds 108 bytes with its terminating NUL on Linux

HELLO = b"H"
_HEADER = struct.Struct("!cQB")  # kind, sequence number of this pair, length of sender's name

Handler = Callable[[bytes], None]


class _Member:
    """Another process of the group, as this one sends to it."""

    __slots__ = ("backlog", "dropped", "name", "seq", "sock", "watched")

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.seq = 0
        self.backlog: collections.deque[bytes] = collections.deque()
        self.watched = False
        self.dropped = 0  # datagrams dropped since the backlog last emptied


class SiblingGroup:
    """This process's membership of the group of processes sharing `directory`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.name = ""
        self.handlers: dict[bytes, Handler] = {}
        self.gap_handlers: list[Callable[[], None]] = []
        self.gaps = 0  # times a gap was seen (datagrams dropped for this process)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._members: dict[str, _Member] = {}
        self._dirfd: int | None = None
        self._received: dict[str, int] = {}  # member name -> last sequence number read

    @property
    def members(self) -> list[str]:
        return sorted(self._members)

    # Lifecycle

    async def open(self) -> None:
        if self._sock is not None:
            return
        # only this user's processes may join: sending to a socket needs write permission
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"siblings: cannot use {self.directory}: {exc}") from exc
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self._address(name))
            os.chmod(name, 0o600, dir_fd=self._dirfd)
            sock.setblocking(False)
        except (OSError, StoreError) as exc:
            sock.close()
            os.close(self._dirfd)
            self._dirfd = None
            raise StoreError(f"siblings: cannot bind a socket in {self.directory}: {exc}"
                             ) from exc
        self._sock, self.name = sock, name
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self.drain)
        for entry in os.scandir(self._dirfd):
            if entry.name != name and not entry.name.startswith("."):
                member = self._member(entry.name)
                if member is not None:
                    self._send_to(member, HELLO, b"")

    async def close(self) -> None:
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()
        self._unlink(self.name)
        for member in list(self._members.values()):
            self._forget(member)
        self._received.clear()
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    def _address(self, name: str) -> str:
        path = str(self.directory / name)
        if len(path.encode()) <= MAX_PATH:
            return path
        if self._dirfd is None or not os.path.isdir("/proc/self/fd"):
            raise StoreError(f"siblings: {self.directory} is too long a path for a Unix socket")
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def _unlink(self, name: str) -> None:
        if self._dirfd is not None:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dirfd)

    # Sending

    def send(self, kind: bytes, payload: bytes) -> None:
        """Send to every other member (queued for any that cannot take it yet)."""
        for member in list(self._members.values()):
            self._send_to(member, kind, payload)

    def _send_to(self, member: _Member, kind: bytes, payload: bytes) -> None:
        member.seq += 1
        sender = self.name.encode()
        datagram = _HEADER.pack(kind, member.seq, len(sender)) + sender + payload
        if member.backlog:
            self._queue(member, datagram)
            return
        try:
            member.sock.send(datagram)
        except BlockingIOError:
            self._queue(member, datagram)
        except OSError as exc:
            self._failed(member, exc)

    def _queue(self, member: _Member, datagram: bytes) -> None:
        if len(member.backlog) >= BACKLOG:
            # Dropped; the gap in the sequence numbers tells the member when it reads again.
            if not member.dropped:
                log.warning("siblings: %s is %d datagrams behind; dropping them", member.name,
                            BACKLOG)
            member.dropped += len(member.backlog)
            member.backlog.clear()
            return
        member.backlog.append(datagram)
        if not member.watched and self._loop is not None:
            member.watched = True
            self._loop.add_writer(member.sock.fileno(), self._flush, member)

    def _flush(self, member: _Member) -> None:
        while member.backlog:
            try:
                member.sock.send(member.backlog[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed(member, exc)
                return
            member.backlog.popleft()
        if member.dropped:
            log.warning("siblings: %s caught up; %d datagrams to it were dropped", member.name,
                        member.dropped)
            member.dropped = 0
        if member.watched and self._loop is not None:
            member.watched = False
            self._loop.remove_writer(member.sock.fileno())

    def _failed(self, member: _Member, exc: OSError) -> None:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
            log.debug("siblings: %s is gone", member.name)
            if exc.errno == errno.ECONNREFUSED:  # its process died and left the file
                self._unlink(member.name)
        else:
            log.warning("siblings: sending to %s failed: %s", member.name, exc)
        self._forget(member)

    def _member(self, name: str) -> _Member | None:
        member = self._members.get(name)
        if member is not None:
            return member
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self._address(name))
            sock.setblocking(False)
        except (OSError, StoreError) as exc:
            sock.close()
            if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
                self._unlink(name)  # a dead process's socket file
            return None
        member = self._members[name] = _Member(name, sock)
        return member

    def _forget(self, member: _Member) -> None:
        if self._members.get(member.name) is member:
            del self._members[member.name]
        if member.watched and self._loop is not None:
            self._loop.remove_writer(member.sock.fileno())
        member.sock.close()

    # Receiving

    def drain(self) -> None:
        """Handle every datagram already delivered to this process; never waits."""
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                datagram = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("siblings: receiving failed: %s", exc)
                return
            self._receive(datagram)

    def _receive(self, datagram: bytes) -> None:
        try:
            kind, seq, length = _HEADER.unpack_from(datagram)
        except struct.error:
            log.warning("siblings: a malformed datagram dropped")
            return
        start = _HEADER.size
        sender = datagram[start:start + length].decode(errors="replace")
        payload = datagram[start + length:]
        last = self._received.get(sender, 0)
        self._received[sender] = seq
        if seq != last + 1:
            self.gaps += 1
            log.warning("siblings: datagrams from %s were lost (got #%d after #%d)", sender,
                        seq, last)
            for on_gap in list(self.gap_handlers):
                on_gap()
        if sender not in self._members:
            self._member(sender)  # a newcomer (its hello) or one we had given up on
        if kind == HELLO:
            return
        handler = self.handlers.get(kind)
        if handler is not None:
            try:
                handler(payload)
            except Exception:
                log.exception("siblings: handling a %r datagram failed", kind)


# ------------------------------------------------------------------------ the event bus

EVENT = b"E"


class SiblingEventBus(LocalEventBus):
    """`EventBus` for the processes of one machine: this process's subscribers as the local
    bus has them, and every event also sent to the other members, whose subscribers get it
    from their own bus. A gap (datagrams dropped for this process) ends every subscription as
    overflowed, so subscribers resynchronise."""

    def __init__(self, group: SiblingGroup, queue_size: int = 1000) -> None:
        super().__init__(queue_size)
        self.group = group
        group.handlers[EVENT] = self._received
        group.gap_handlers.append(self.interrupt)

    async def open(self) -> None:
        await super().open()
        try:
            await self.group.open()
        except StoreError as exc:  # the embedded default must not keep a node from starting
            log.warning("%s; events reach this process's subscribers only", exc)

    async def close(self) -> None:
        await super().close()
        await self.group.close()

    async def publish(self, event: Event) -> None:
        self.fan_out(event)
        if self.group._members:  # alone (the usual single process): nothing to encode
            self.group.send(EVENT, event.encode())

    def _received(self, payload: bytes) -> None:
        try:
            event = Event.decode(payload)
        except (ValueError, TypeError):
            log.warning("siblings: an undecodable event dropped")
            return
        self.fan_out(event)

