"""One IMAP connection: the states and commands of RFC 3501 and the extensions it announces.

The session parses and formats IMAP and calls MailService for everything else. Its only state
is the connection's: who is logged in, the selected folder's sequence number map (`mailbox`),
and what the client enabled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import functools
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from postroom import __version__
from postroom.core.address import plaintext_login_allowed
from postroom.core.models import (
    Flag,
    FlagError,
    Flags,
    Folder,
    FolderCounts,
    FolderRole,
    MessageRecord,
    User,
)
from postroom.imap import fetch as fetchmod
from postroom.imap import mime
from postroom.imap.hub import SessionHub
from postroom.imap.mailbox import Selected, uid_set
from postroom.imap.parser import (
    Cursor,
    LineTooLong,
    LiteralTooLarge,
    ParseError,
    RawCommand,
    SequenceSet,
    read_command,
    resolve,
)
from postroom.imap.response import (
    decode_mailbox,
    flag_list,
    mailbox,
    string,
)
from postroom.imap.search import (
    CHARSETS,
    BadCharset,
    Candidate,
    Context,
    Program,
    parse_program,
    sequence_text,
)
from postroom.imap.sort import SORT_KEYS, sort_records, thread_references, thread_text
from postroom.search.imap import criterion as index_criterion
from postroom.service import (
    AuthFailed,
    ConflictError,
    InvalidInput,
    MailService,
    NotFoundError,
    TooManyAttempts,
)
from postroom.store.errors import StoreError
from postroom.store.events import (
    MESSAGE_DELETED,
    MESSAGE_FLAGS,
    MESSAGE_MOVED,
    MESSAGE_NEW,
    Event,
)

log = logging.getLogger(__name__)

SEPARATOR = "/"
SYSTEM_FLAGS = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
_ROLE_ATTRIBUTE = {
    FolderRole.SENT: "\\Sent",
    FolderRole.DRAFTS: "\\Drafts",
    FolderRole.JUNK: "\\Junk",
    FolderRole.TRASH: "\\Trash",
    FolderRole.ARCHIVE: "\\Archive",
}
_STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ",
                 "APPENDLIMIT")
_CONTENT_READS = 16  # message bytes read at once by FETCH and SEARCH


class State(enum.Enum):
    NOT_AUTHENTICATED = 1
    AUTHENTICATED = 2
    SELECTED = 3
    LOGOUT = 4


@dataclass(frozen=True)
class Limits:
    max_line: int = 65536
    max_literal: int = 50 * 1024 * 1024
    commands_per_second: int = 2000
    idle_timeout: float = 1800.0
    connections_per_user: int = 50


class Reply(Exception):
    """Ends a command with a tagged NO or BAD (status) and a text, optionally a code."""

    def __init__(self, status: str, text: str, code: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def _no(text: str, code: str = "") -> Reply:
    return Reply("NO", text, code)


def _bad(text: str) -> Reply:
    return Reply("BAD", text)


def _match(pattern: str, name: str) -> bool:
    """LIST wildcards (RFC 3501 §6.3.8): * matches anything, % anything but the separator.

    One pass over the pattern keeping the set of name positions reached so far, so a pattern
    like `%*%*%*%*x` costs (pattern length x name length) steps, never the exponential
    backtracking of trying each split in turn."""
    if name == "INBOX" or name.startswith("INBOX/"):
        head = pattern[:5]
        if head.upper() == "INBOX":
            pattern = "INBOX" + pattern[5:]
    if pattern == "*":
        return True
    reached = {0}
    for c in pattern:
        if not reached:
            return False
        if c == "*":
            reached = set(range(min(reached), len(name) + 1))
        elif c == "%":
            spread: set[int] = set()
            for n in sorted(reached):
                if n in spread:
                    continue
                spread.add(n)
                while n < len(name) and name[n] != SEPARATOR:
                    n += 1
                    spread.add(n)
            reached = spread
        else:
            reached = {n + 1 for n in reached if n < len(name) and name[n] == c}
    return len(name) in reached


class ImapSession:
    def __init__(
        self,
        service: MailService,
        hub: SessionHub,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls_context: ssl.SSLContext | None,
        tls_active: bool,
        plaintext_on_loopback: bool,
        limits: Limits,
        structures: mime.StructureCache,
    ) -> None:
        self.service = service
        self.hub = hub
        self.reader = reader
        self.writer = writer
        self.tls_context = tls_context
        self.tls_active = tls_active
        self.plaintext_on_loopback = plaintext_on_loopback
        self.limits = limits
        self.structures = structures
        peer = writer.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.state = State.NOT_AUTHENTICATED
        self.user: User | None = None
        self.selected: Selected | None = None
        self.condstore = False
        self.qresync = False
        self.wake = asyncio.Event()
        self.idling = False  # waiting in IDLE with everything sent: events may be written at once
        self.out = bytearray()
        self._rate_window = 0.0
        self._rate_count = 0
        self._reading_since: float | None = None  # loop time the wait for a command began
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False

    # ------------------------------------------------------------------------------ connection

    async def run(self) -> None:
        try:
            await self.send(b"* OK [CAPABILITY " + self.capabilities().encode()
                            + b"] Postroom IMAP4rev1 server ready")
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self.limits.idle_timeout, self._watch)
            while self.state is not State.LOGOUT:
                self._reading_since = loop.time()
                try:
                    command = await self.read()
                except LineTooLong:
                    await self.send(b"* BAD command line too long (at most %d octets)"
                                    % self.limits.max_line)
                    continue
                except LiteralTooLarge as exc:
                    await self.send(f"{exc.tag} NO [TOOBIG] {exc}".encode())
                    continue
                finally:
                    self._reading_since = None
                if command is None:
                    break
                await self.execute(command)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError) as exc:
            if not self._timed_out:
                log.debug("imap connection from %s ended: %r", self.peer_ip, exc)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.unselect()
            if self.user is not None:
                self.hub.disconnect(self.user.user_id)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 5)

    def _watch(self) -> None:
        """The autologout timer (RFC 3501 §5.4): one timer per connection, looked at when it
        fires, instead of a timeout armed and cancelled around every command read (that cost
        a timer and three system calls per command). Only the wait for the client's next
        command counts (a literal included); a command running, IDLE among them, does not."""
        loop = asyncio.get_running_loop()
        timeout = self.limits.idle_timeout
        since = self._reading_since
        if since is not None and loop.time() - since >= timeout:
            self._timed_out = True
            self._watchdog = None
            # nothing else is being written while the session waits for a command
            self.writer.write(b"* BYE Autologout; idle for too long\r\n")
            self.writer.close()  # the read sees the end of the stream, and the session ends
            return
        delay = timeout if since is None else since + timeout - loop.time()
        self._watchdog = loop.call_later(max(delay, 0.01), self._watch)

    async def read(self) -> RawCommand | None:
        return await read_command(
            self.reader, self.continuation, max_line=self.limits.max_line,
            max_literal=self.limits.max_literal,
            max_total=self.limits.max_literal + self.limits.max_line * 4,
        )

    async def continuation(self) -> None:
        await self.send(b"+ Ready for literal data")
        # The client now sends the literal, and many (Python's imaplib among them) send the
        # CRLF that ends the command as a second small write, which Nagle's algorithm holds
        # until the literal is acknowledged; Linux delays that ACK up to 40 ms when it has
        # nothing to send back. Acknowledge at once instead (TCP_QUICKACK lasts until the
        # next answer), so an APPEND takes milliseconds, not 44.
        sock = self.writer.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def emit(self, line: bytes) -> None:
        self.out += line + b"\r\n"

    async def flush(self) -> None:
        if self.out:
            self.writer.write(bytes(self.out))
            self.out.clear()
        await self.writer.drain()

    async def send(self, line: bytes) -> None:
        self.emit(line)
        await self.flush()

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                "UNSELECT", "CHILDREN", "SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS",
                "UIDPLUS", "MOVE", "ESEARCH", "CONDSTORE", "QRESYNC", "SORT", "SORT=DISPLAY",
                "THREAD=REFERENCES",
                f"APPENDLIMIT={self.limits.max_literal}"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.tls_context is not None and not self.tls_active:
                caps.append("STARTTLS")
            if self.may_authenticate():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps)

    def may_authenticate(self) -> bool:
        """Plaintext passwords only over TLS, or from loopback if so configured (RFC 3501 §11.1)."""
        return plaintext_login_allowed(tls_active=self.tls_active, peer_ip=self.peer_ip,
                                       plaintext_on_loopback=self.plaintext_on_loopback)

    # ------------------------------------------------------------------------------ dispatch

    def _rate_ok(self) -> bool:
        now = time.monotonic()
        if now - self._rate_window >= 1.0:
            self._rate_window = now
            self._rate_count = 0
        self._rate_count += 1
        return self._rate_count <= self.limits.commands_per_second

    async def execute(self, command: RawCommand) -> None:
        cur = Cursor(command)
        tag = "*"
        try:
            tag = cur.tag()
            cur.sp()
            name = cur.keyword()
        except ParseError as exc:
            await self.send(f"{tag} BAD {exc}".encode())
            return
        uid = False
        if name == "UID":
            try:
                cur.sp()
                name = cur.keyword()
            except ParseError as exc:
                await self.send(f"{tag} BAD {exc}".encode())
                return
            uid = True
            if name not in _UID_COMMANDS:
                await self.send(f"{tag} BAD UID {name[:20]} is not a UID command".encode())
                return
        entry = _COMMANDS.get(name)
        if entry is None:
            await self.send(f"{tag} BAD unknown command {name[:30]}".encode())
            return
        states, handler = entry
        if self.state not in states:
            await self.send(f"{tag} BAD {name} is not valid in the "
                            f"{self.state.name.replace('_', ' ').lower()} state".encode())
            return
        if not self._rate_ok():
            await self.send(f"{tag} NO [LIMIT] too many commands per second; slow down".encode())
            return
        # RFC 3501 §7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (nor COPY, to be
        # safe with clients that pipeline on sequence numbers); UID variants may see them.
        allow_expunge = uid or name not in ("FETCH", "STORE", "SEARCH", "COPY", "SORT",
                                            "THREAD")
        try:
            done = await handler(self, tag, cur, uid)
        except Reply as reply:
            if self.selected is not None and reply.status == "NO":
                await self.updates(allow_expunge)
            code = f"[{reply.code}] " if reply.code else ""
            await self.send(f"{tag} {reply.status} {code}{reply.text}".encode())
            return
        except ParseError as exc:
            self.out.clear()
            await self.send(f"{tag} BAD {exc}".encode())
            return
        except _DoneSignal:
            return
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            raise
        except StoreError as exc:  # an engine is down (RFC 5530: try again later)
            log.warning("imap %s: storage unavailable: %s", name, exc)
            self.out.clear()
            await self.send(f"{tag} NO [UNAVAILABLE] storage unavailable; try again".encode())
            return
        except Exception:
            log.exception("imap %s failed", name)
            self.out.clear()
            await self.send(f"{tag} NO [SERVERBUG] internal error; try again".encode())
            return
        if self.selected is not None and name not in ("SELECT", "EXAMINE"):
            try:
                await self.updates(allow_expunge)
            except StoreError as exc:  # the command itself was done; report changes later
                log.warning("imap updates after %s: storage unavailable: %s", name, exc)
        await self.send(f"{tag} {done}".encode())

    async def updates(self, allow_expunge: bool, force: bool = False) -> None:
        """Untagged EXPUNGE/EXISTS/FETCH for changes made elsewhere.

        Changes reported by the event bus are applied from the events themselves (a new
        message costs one point read, shared by every session through the record cache);
        a forced check (NOOP, CHECK) compares the folder's uidnext and highestmodseq and
        re-reads the folder only when they moved without an event (another process wrote).
        """
        selected = self.selected
        if selected is None or self.user is None:
            return
        user = self.user
        here = selected.folder.folder_id
        if force and not selected.dirty:
            try:
                folder = await self.service.get_folder(user, here)
            except NotFoundError:
                self.emit(b"* BYE the selected mailbox was deleted")
                self.state = State.LOGOUT
                return
            if folder.highestmodseq <= selected.highestmodseq \
                    and folder.uidnext <= selected.folder.uidnext:
                if allow_expunge and selected.gone:
                    for line in selected.report_gone():
                        self.emit(line)
                return
            selected.full_resync = True
        elif not selected.dirty:
            if allow_expunge and selected.gone:
                for line in selected.report_gone():
                    self.emit(line)
            return
        selected.dirty = False
        events, selected.pending = selected.pending, []
        records: list[MessageRecord] | None = None
        folder = selected.folder
        if not selected.full_resync:
            records = await self._apply_events(selected, events)
            if records is not None:
                top_uid = max([folder.uidnext - 1, *(r.uid for r in records)])
                top_modseq = max([selected.highestmodseq, *(e.modseq for e in events)])
                folder = replace(folder, uidnext=top_uid + 1, highestmodseq=top_modseq)
        if records is None:
            selected.full_resync = False
            try:
                folder, records = await self.service.folder_messages(user, here)
            except NotFoundError:
                self.emit(b"* BYE the selected mailbox was deleted")
                self.state = State.LOGOUT
                return
            records = [_intern(r) for r in records]
        claim = self._claim(selected, [r.uid for r in records if r.uid > selected.max_uid])
        for line in selected.sync(folder, records, allow_expunge=allow_expunge, claim=claim,
                                  condstore=self.condstore):
            self.emit(line)

    async def _apply_events(self, selected: Selected, events: list[Event]
                            ) -> list[MessageRecord] | None:
        """The folder's records after `events`, from the session's map; None: re-read."""
        user = self._user()
        here = selected.folder.folder_id
        current = {u: r for u, r in selected.records.items() if u not in selected.gone}
        for event in events:
            moved_from = event.data.get("from_folder_id") if event.type == MESSAGE_MOVED else None
            if event.type == MESSAGE_FLAGS and event.folder_id == here:
                record = current.get(event.uid)
                names = event.data.get("flags")
                if record is not None and event.modseq > record.modseq \
                        and isinstance(names, list):
                    try:
                        flags = Flags.parse(names)
                    except FlagError:
                        return None
                    current[event.uid] = replace(record, flags=flags, modseq=event.modseq)
            elif event.type in (MESSAGE_NEW, MESSAGE_MOVED) and event.folder_id == here:
                if event.uid in current:
                    continue
                record = await _record_for(self.service, user, event)
                if record is None or record.folder_id != here:
                    continue  # moved on or gone already: its own event follows
                current[record.uid] = record
            elif event.type == MESSAGE_DELETED and event.folder_id == here:
                current.pop(event.uid, None)
            elif moved_from == here:
                uid = event.data.get("from_uid")
                if isinstance(uid, int):
                    current.pop(uid, None)
            elif event.type not in (MESSAGE_NEW, MESSAGE_MOVED, MESSAGE_FLAGS,
                                    MESSAGE_DELETED):
                return None  # folder renamed or deleted, or something new: re-read
        return sorted(current.values(), key=lambda r: r.uid)

    def _claim(self, selected: Selected, uids: list[int]) -> set[int]:
        assert self.user is not None
        if selected.readonly:
            return self.hub.unclaimed(self.user.user_id, selected.folder.folder_id, uids)
        return self.hub.claim_recent(self.user.user_id, selected.folder.folder_id, uids)

    def unselect(self) -> None:
        if self.selected is not None and self.user is not None:
            self.hub.unwatch(self.user.user_id, self.selected.folder.folder_id, self._on_event)
        self.selected = None
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    def _on_event(self, event: Event | None) -> None:
        selected = self.selected
        if selected is None:
            return
        if event is None:
            selected.full_resync = True
        elif selected.already_known(event):
            return
        elif event.type == MESSAGE_NEW and self._idle_fast(selected, event):
            return
        else:
            selected.pending.append(event)
            if len(selected.pending) > 1000:
                selected.pending.clear()
                selected.full_resync = True
        selected.dirty = True
        self.wake.set()

    def _idle_fast(self, selected: Selected, event: Event) -> bool:
        """In IDLE, announce a new message at once from the record the hub read for every
        session of the folder: no store read and no task wake-up of this session's own."""
        if not self.idling or selected.dirty or selected.pending or selected.full_resync \
                or selected.gone or self.out or event.folder_id != selected.folder.folder_id:
            return False
        record = self.hub.loaded(event)
        if record is None:
            return False
        record = _intern(record)
        if record.uid <= selected.max_uid:
            return False
        recent = bool(self._claim(selected, [record.uid]))
        lines = selected.append_new(record, recent)
        self.writer.write(b"".join(line + b"\r\n" for line in lines))
        return True

    # -------------------------------------------------------------------- any state commands

    async def cmd_capability(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        self.emit(b"* CAPABILITY " + self.capabilities().encode())
        return "OK CAPABILITY completed"

    async def cmd_noop(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        if self.selected is not None:
            await self.updates(True, force=True)
        return "OK NOOP completed"

    async def cmd_logout(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        self.emit(b"* BYE Postroom IMAP server logging out")
        self.state = State.LOGOUT
        return "OK LOGOUT completed"

    async def cmd_id(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        if cur.peek() == 0x28:
            cur.expect(b"(")
            count = 0
            while not cur.maybe(b")"):
                if count:
                    cur.sp()
                cur.string()
                cur.sp()
                cur.nstring_or_nil()
                count += 1
                if count > 30:
                    raise ParseError("too many ID fields")
        else:
            if cur.nstring_or_nil() is not None:
                raise ParseError("ID takes NIL or a parenthesised list")
        cur.end()
        self.emit(b'* ID ("name" "Postroom" "version" ' + string(__version__) + b")")
        return "OK ID completed"

    async def cmd_enable(self, tag: str, cur: Cursor, uid: bool) -> str:
        enabled: list[str] = []
        while not cur.at_end():
            cur.sp()
            word = cur.keyword()
            if word == "CONDSTORE" and "CONDSTORE" not in enabled:
                self.condstore = True
                enabled.append(word)
            elif word == "QRESYNC" and "QRESYNC" not in enabled:
                # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
                self.condstore = self.qresync = True
                if self.selected is not None:
                    self.selected.qresync = True
                enabled.append(word)
        if not enabled and not cur.at_end():
            raise ParseError("ENABLE needs capability names")
        self.emit(("* ENABLED " + " ".join(enabled)).rstrip().encode())
        return "OK ENABLE completed"

    # ------------------------------------------------------------- not authenticated state

    async def cmd_starttls(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        if self.tls_active:
            raise _bad("TLS is already active")
        if self.tls_context is None:
            raise _no("TLS is not available")
        await self.send(f"{tag} OK begin TLS negotiation now".encode())
        # RFC 3501 §6.2.1 (and CVE-2011-0411): nothing pipelined in plaintext after STARTTLS
        # may be taken as if it came over TLS.
        buffered = getattr(self.reader, "_buffer", None)
        if isinstance(buffered, bytearray):
            buffered.clear()
        await self.writer.start_tls(self.tls_context)
        self.tls_active = True
        raise _Done

    async def cmd_login(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        name = cur.astring_text()
        cur.sp()
        password = cur.astring_text()
        cur.end()
        if not self.may_authenticate():
            raise _no("plaintext login needs TLS; use STARTTLS", "PRIVACYREQUIRED")
        return await self.login(name, password)

    async def cmd_authenticate(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        mechanism = cur.keyword()
        initial: bytes | None = None
        if not cur.at_end():
            cur.sp()
            initial = cur.astring()
        cur.end()
        if mechanism != "PLAIN":
            raise _no(f"unsupported SASL mechanism {mechanism[:20]}; use PLAIN",
                      "CANNOT")
        if not self.may_authenticate():
            raise _no("plaintext authentication needs TLS; use STARTTLS", "PRIVACYREQUIRED")
        if initial is None:
            await self.send(b"+ ")
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("client went away during AUTHENTICATE")
            initial = line.rstrip(b"\r\n")
            if initial == b"*":
                raise _bad("authentication cancelled")
        elif initial == b"=":  # RFC 4959: "=" is an empty initial response
            initial = b""
        try:
            decoded = base64.b64decode(initial, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("invalid base64 in the SASL response") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            raise _bad("malformed PLAIN response (authzid NUL authcid NUL password)")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise _bad("the PLAIN response is not valid UTF-8") from None
        if authzid and authzid.lower() != authcid.lower():
            raise _no("acting as another user is not allowed", "AUTHORIZATIONFAILED")
        return await self.login(authcid, password)

    async def login(self, name: str, password: str) -> str:
        try:
            user = await self.service.authenticate(name, password, client=self.peer_ip)
        except TooManyAttempts:
            raise _no("too many failed logins; try again later", "UNAVAILABLE") from None
        except AuthFailed:
            log.info("imap login failed for %r from %s", name[:100], self.peer_ip)
            raise _no("invalid user name or password", "AUTHENTICATIONFAILED") from None
        if not self.hub.connect(user.user_id, self.limits.connections_per_user):
            raise _no("too many connections for this user", "LIMIT")
        self.user = user
        self.state = State.AUTHENTICATED
        return f"OK [CAPABILITY {self.capabilities()}] logged in"

    # ----------------------------------------------------------------- authenticated state

    def _user(self) -> User:
        assert self.user is not None
        return self.user

    def _mailbox_arg(self, cur: Cursor) -> str:
        return decode_mailbox(cur.mailbox())

    async def _folder(self, name: str) -> Folder:
        folder = await self.service.find_folder(self._user(), name)
        if folder is None:
            raise _no(f"no mailbox {name[:100]}", "NONEXISTENT")
        return folder

    async def cmd_select(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._select(cur, readonly=False)

    async def cmd_examine(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._select(cur, readonly=True)

    async def _select(self, cur: Cursor, readonly: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        resync: _Resync | None = None
        if not cur.at_end():
            cur.sp()
            cur.expect(b"(")
            while True:
                param = cur.keyword()
                if param == "CONDSTORE":
                    self.condstore = True
                elif param == "QRESYNC":
                    if not self.qresync:
                        raise _bad("QRESYNC needs ENABLE QRESYNC first")
                    cur.sp()
                    resync = _parse_resync(cur)
                else:
                    raise ParseError(f"unknown SELECT parameter {param[:30]}")
                if cur.maybe(b")"):
                    break
                cur.sp()
        cur.end()
        user = self._user()
        previous = self.selected
        try:
            folder = await self._folder(name)
        except Reply:
            if self.selected is not None:  # a failed SELECT still closes the previous one
                self.unselect()
                self.emit(b"* OK [CLOSED] previous mailbox closed")
            raise
        known = None
        if previous is not None and previous is self.selected \
                and previous.folder.folder_id == folder.folder_id:
            known = await self._current_records(previous)
        if self.selected is not None:
            self.unselect()
            self.emit(b"* OK [CLOSED] previous mailbox closed")
        if known is not None:
            folder, records = known
        else:
            folder, records = await self.service.folder_messages(user, folder.folder_id)
            records = [_intern(r) for r in records]
        selected = Selected(folder, readonly, qresync=self.qresync)
        uids = [r.uid for r in records]
        recent = (self.hub.unclaimed(user.user_id, folder.folder_id, uids) if readonly
                  else self.hub.claim_recent(user.user_id, folder.folder_id, uids))
        selected.load(folder, records, recent)
        self.selected = selected
        self.state = State.SELECTED
        self.hub.watch(user.user_id, folder.folder_id, self._on_event,
                       functools.partial(_record_for, self.service, user))
        keywords = sorted({k for r in records for k in r.flags.keywords}
                          | {"$Junk", "$NotJunk"})
        flags = SYSTEM_FLAGS + " " + " ".join(keywords)
        self.emit(f"* FLAGS ({flags})".encode())
        permanent = "()" if readonly else f"({flags} \\*)"
        self.emit(f"* OK [PERMANENTFLAGS {permanent}] flags permitted".encode())
        self.emit(b"* %d EXISTS" % selected.exists)
        self.emit(b"* %d RECENT" % len(recent))
        for i, record in enumerate(records):
            if Flag.SEEN not in record.flags:
                self.emit(b"* OK [UNSEEN %d] first unseen message" % (i + 1))
                break
        self.emit(b"* OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
        self.emit(b"* OK [UIDNEXT %d] predicted next UID" % folder.uidnext)
        self.emit(b"* OK [HIGHESTMODSEQ %d] highest modseq" % folder.highestmodseq)
        if resync is not None and resync.uidvalidity == folder.uidvalidity:
            await self._resync(selected, resync)
        mode = "READ-ONLY" if readonly else "READ-WRITE"
        return f"OK [{mode}] {'EXAMINE' if readonly else 'SELECT'} completed"

    async def _current_records(self, selected: Selected
                               ) -> tuple[Folder, list[MessageRecord]] | None:
        """The selected folder's state and records as of now, from the session's own map
        brought up to date by its pending events (a SELECT of the folder already selected);
        None when only a re-read can tell: events were missed, or the folder moved past
        what the events explain (another process wrote)."""
        if selected.full_resync:
            return None
        events = list(selected.pending)
        if selected.dirty and events:
            records = await self._apply_events(selected, events)
            if records is None:
                return None
        else:
            records = [selected.records[u] for u in selected.uids if u not in selected.gone]
        top_uid = max([selected.folder.uidnext - 1, *(r.uid for r in records)])
        top_modseq = max([selected.highestmodseq, *(e.modseq for e in events)])
        try:
            folder = await self.service.get_folder(self._user(), selected.folder.folder_id)
        except NotFoundError:
            return None
        if self.selected is not selected or selected.full_resync \
                or len(selected.pending) != len(events) \
                or folder.highestmodseq > top_modseq or folder.uidnext > top_uid + 1:
            return None
        return folder, records

    async def _resync(self, selected: Selected, resync: _Resync) -> None:
        """RFC 7162 §3.2.5: what changed since the client's modseq, as VANISHED (EARLIER)
        for removed uids and FETCH for messages whose flags changed."""
        gone = await self.service.vanished(self._user(), selected.folder.folder_id,
                                           resync.modseq)
        if resync.known is not None:
            ranges = resolve(resync.known, max([selected.max_uid, *gone, 1]))
            gone = [u for u in gone if any(lo <= u <= hi for lo, hi in ranges)]
        gone = [u for u in gone if u not in selected.records]
        if gone:
            self.emit(b"* VANISHED (EARLIER) " + uid_set(gone).encode())
        for msn, u in enumerate(selected.uids, 1):
            record = selected.records[u]
            if record.modseq > resync.modseq:
                self.emit(b"* %d FETCH (UID %d FLAGS " % (msn, u)
                          + flag_list(record.flags, u in selected.recent)
                          + b" MODSEQ (%d))" % record.modseq)

    async def cmd_create(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        if not cur.at_end():  # RFC 6154 CREATE-SPECIAL-USE is not offered: refuse params
            raise ParseError("CREATE takes one mailbox name")
        cur.end()
        name = name.rstrip(SEPARATOR)  # RFC 3501 §6.3.3: a trailing separator is dropped
        if not name:
            raise _bad("CREATE needs a mailbox name")
        if name.upper() == "INBOX":
            raise _no("INBOX already exists", "ALREADYEXISTS")
        try:
            await self.service.create_folder(self._user(), name)
        except ConflictError:
            raise _no(f"mailbox {name[:100]} already exists", "ALREADYEXISTS") from None
        except InvalidInput as exc:
            raise _no(str(exc), "CANNOT") from None
        return "OK CREATE completed"

    async def cmd_delete(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        cur.end()
        folder = await self._folder(name)
        if self.selected is not None and self.selected.folder.folder_id == folder.folder_id:
            self.unselect()
            self.emit(b"* OK [CLOSED] mailbox closed")
        try:
            await self.service.delete_folder(self._user(), folder.folder_id)
        except ConflictError as exc:
            raise _no(str(exc), "INUSE") from None
        except InvalidInput as exc:
            raise _no(str(exc), "CANNOT") from None
        return "OK DELETE completed"

    async def cmd_rename(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        old = self._mailbox_arg(cur)
        cur.sp()
        new = self._mailbox_arg(cur).rstrip(SEPARATOR)
        cur.end()
        folder = await self._folder(old)
        try:
            await self.service.rename_folder(self._user(), folder.folder_id, new)
        except ConflictError:
            raise _no(f"mailbox {new[:100]} already exists", "ALREADYEXISTS") from None
        except InvalidInput as exc:
            raise _no(str(exc), "CANNOT") from None
        return "OK RENAME completed"

    async def cmd_subscribe(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._subscribe(cur, True)

    async def cmd_unsubscribe(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._subscribe(cur, False)

    async def _subscribe(self, cur: Cursor, on: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        cur.end()
        folder = await self._folder(name)
        await self.service.set_subscribed(self._user(), folder.folder_id, on)
        return f"OK {'SUBSCRIBE' if on else 'UNSUBSCRIBE'} completed"

    async def cmd_namespace(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        self.emit(b'* NAMESPACE (("" "/")) NIL NIL')
        return "OK NAMESPACE completed"

    async def cmd_list(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._list(cur, lsub=False)

    async def cmd_lsub(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._list(cur, lsub=True)

    async def _list(self, cur: Cursor, lsub: bool) -> str:
        cur.sp()
        selection: list[str] = []
        if not lsub and cur.peek() == 0x28:  # LIST-EXTENDED selection options (RFC 5258)
            selection = [s.upper() for s in cur.paren_list(cur.atom)]
            cur.sp()
        reference = self._mailbox_arg(cur)
        cur.sp()
        if not lsub and cur.peek() == 0x28:
            patterns = cur.paren_list(cur.list_mailbox)
        else:
            patterns = [cur.list_mailbox()]
        returns: list[str] = []
        status_items: list[str] = []
        if not cur.at_end() and not lsub:
            cur.sp()
            if cur.keyword() != "RETURN":
                raise ParseError("expected RETURN")
            cur.sp()
            cur.expect(b"(")
            while not cur.maybe(b")"):
                if returns:
                    cur.sp()
                word = cur.keyword()
                returns.append(word)
                if word == "STATUS":
                    cur.sp()
                    status_items = [s.upper() for s in cur.paren_list(cur.atom)]
                    for item in status_items:
                        if item not in _STATUS_ITEMS:
                            raise ParseError(f"unknown STATUS item {item[:30]}")
        cur.end()
        for option in selection:
            if option not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                raise ParseError(f"unknown LIST selection option {option[:30]}")
        if "RECURSIVEMATCH" in selection and selection == ["RECURSIVEMATCH"]:
            raise ParseError("RECURSIVEMATCH needs another selection option")
        word = "LSUB" if lsub else "LIST"
        patterns = [decode_mailbox(p) for p in patterns]
        if patterns == [""] and not selection:
            # RFC 3501 §6.3.8: the hierarchy delimiter and the root of the reference
            self.emit(f'* {word} (\\Noselect) "/" ""'.encode())
            return f"OK {word} completed"
        folders = await self.service.folders(self._user())
        names = {f.name for f in folders}
        only_subscribed = lsub or "SUBSCRIBED" in selection
        only_special = "SPECIAL-USE" in selection
        for folder in folders:
            if not any(_match(reference + p if not p.startswith(SEPARATOR) or not reference
                              else p, folder.name) for p in patterns if p != ""):
                continue
            if only_subscribed and not folder.subscribed:
                continue
            if only_special and folder.role not in _ROLE_ATTRIBUTE:
                continue
            attributes: list[str] = []
            has_children = any(n.startswith(folder.name + SEPARATOR) for n in names)
            if not lsub:
                attributes.append("\\HasChildren" if has_children else "\\HasNoChildren")
            if (not lsub and folder.role in _ROLE_ATTRIBUTE
                    and ("SPECIAL-USE" in returns or "SPECIAL-USE" in selection or not returns)):
                attributes.append(_ROLE_ATTRIBUTE[folder.role])
            if folder.subscribed and ("SUBSCRIBED" in returns or "SUBSCRIBED" in selection):
                attributes.append("\\Subscribed")
            self.emit(f"* {word} ({' '.join(attributes)}) \"/\" ".encode() + mailbox(folder.name))
            if status_items:
                self.emit(await self._status_line(folder, status_items))
        return f"OK {word} completed"

    async def cmd_status(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        cur.sp()
        items = [s.upper() for s in cur.paren_list(cur.atom)]
        cur.end()
        for item in items:
            if item not in _STATUS_ITEMS:
                raise ParseError(f"unknown STATUS item {item[:30]}")
        folder = await self._folder(name)
        self.emit(await self._status_line(folder, items))
        return "OK STATUS completed"

    async def _status_line(self, folder: Folder, items: list[str]) -> bytes:
        user = self._user()
        known = None
        if self.selected is not None and self.selected.folder.folder_id == folder.folder_id:
            known = await self._current_records(self.selected)
        if known is not None:  # the selected folder: counted from the up-to-date map
            folder, records = known
            counts = FolderCounts(len(records),
                                  sum(1 for r in records if Flag.SEEN not in r.flags))
        else:
            folder, counts = await self.service.folder_status(user, folder.folder_id)
        values: list[str] = []
        for item in items:
            if item == "MESSAGES":
                value = counts.total
            elif item == "UNSEEN":
                value = counts.unread
            elif item == "UIDNEXT":
                value = folder.uidnext
            elif item == "UIDVALIDITY":
                value = folder.uidvalidity
            elif item == "HIGHESTMODSEQ":
                value = folder.highestmodseq
            elif item == "APPENDLIMIT":
                value = self.limits.max_literal
            else:  # RECENT: what a SELECT would claim now
                if self.selected is not None \
                        and self.selected.folder.folder_id == folder.folder_id:
                    value = len(self.selected.recent)
                else:
                    _, records = await self.service.folder_messages(user, folder.folder_id)
                    value = len(self.hub.unclaimed(user.user_id, folder.folder_id,
                                                   [r.uid for r in records]))
            values.append(f"{item} {value}")
        return b"* STATUS " + mailbox(folder.name) + f" ({' '.join(values)})".encode()

    async def cmd_append(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        name = self._mailbox_arg(cur)
        cur.sp()
        flags: list[str] = []
        when: float | None = None
        if cur.peek() == 0x28:
            flags = cur.flag_list()
            cur.sp()
        if cur.peek() == 0x22:
            when = cur.date_time()
            cur.sp()
        data = cur.literal()
        cur.end()
        flags = [f for f in flags if f.lower() != "\\recent"]
        folder = await self.service.find_folder(self._user(), name)
        if folder is None:
            raise _no(f"no mailbox {name[:100]}", "TRYCREATE")
        if len(data) > self.limits.max_literal:
            raise _no("message too large", "TOOBIG")
        try:
            record = await self.service.append(self._user(), folder, data, flags, when,
                                               index_later=True)
        except InvalidInput as exc:
            raise _no(str(exc), "CANNOT") from None
        self.structures.keep_content(record.blob_hash, data)
        _intern(record)  # the hub hands it to this folder's sessions without a read
        selected = self.selected
        if selected is not None and selected.folder.folder_id == folder.folder_id:
            recent = bool(self.hub.claim_recent(self._user().user_id, folder.folder_id,
                                                [record.uid])) and not selected.readonly
            for line in selected.add_own(record, recent):
                self.emit(line)
        return f"OK [APPENDUID {folder.uidvalidity} {record.uid}] APPEND completed"

    async def cmd_idle(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        await self.send(b"+ idling")
        done = asyncio.ensure_future(self.reader.readline())
        try:
            while True:
                if self.selected is not None:
                    await self.updates(True)
                    await self.flush()
                    if self.state is State.LOGOUT:
                        return "OK IDLE terminated"
                self.wake.clear()
                waiter = asyncio.ensure_future(self.wake.wait())
                self.idling = True
                try:
                    finished, _ = await asyncio.wait({done, waiter},
                                                     return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self.idling = False
                if waiter not in finished:
                    waiter.cancel()
                if done in finished:
                    break
        finally:
            if not done.done():
                done.cancel()
        line = done.result()
        if not line:
            raise ConnectionError("client went away during IDLE")
        if line.rstrip(b"\r\n").upper() != b"DONE":
            raise _bad("expected DONE to end IDLE")
        return "OK IDLE terminated"

    # ------------------------------------------------------------------------ selected state

    def _sel(self) -> Selected:
        assert self.selected is not None
        return self.selected

    def _uids(self, cur: Cursor, uid: bool) -> list[int]:
        seq = cur.sequence_set()
        selected = self._sel()
        if uid:
            return selected.by_uid(seq)
        try:
            return selected.by_msn(seq)
        except ValueError as exc:
            raise _bad(str(exc)) from None

    async def cmd_check(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        await self.updates(True, force=True)
        return "OK CHECK completed"

    async def cmd_close(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        selected = self._sel()
        if not selected.readonly:
            deleted = [r.message_id for u, r in selected.records.items()
                       if Flag.DELETED in r.flags and u not in selected.gone]
            if deleted:
                await self.service.expunge(self._user(), deleted, index_later=True)
        self.unselect()
        return "OK CLOSE completed"

    async def cmd_unselect(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.end()
        self.unselect()
        return "OK UNSELECT completed"

    async def cmd_expunge(self, tag: str, cur: Cursor, uid: bool) -> str:
        wanted: set[int] | None = None
        if uid:
            cur.sp()
            wanted = set(self._uids(cur, True))
        cur.end()
        selected = self._sel()
        if selected.readonly:
            raise _no("the mailbox is read-only", "READ-ONLY")
        # the map is current: events from other sessions mark it dirty and are applied first
        await self.updates(True)
        deleted = [r.message_id for u, r in selected.records.items()
                   if Flag.DELETED in r.flags and u not in selected.gone
                   and (wanted is None or u in wanted)]
        if deleted:
            removed = await self.service.expunge(self._user(), deleted, index_later=True)
            here = selected.folder.folder_id
            selected.gone |= {g.uid for g in removed if g.folder_id == here}
            selected.own_modseqs([g.modseq for g in removed if g.folder_id == here])
            for line in selected.report_gone():
                self.emit(line)
        await self.updates(True)
        return "OK EXPUNGE completed"

    async def cmd_fetch(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        start = cur.pos
        uids = self._uids(cur, uid)
        seq_end = cur.pos
        cur.sp()
        request = fetchmod.parse_request(cur)
        cur.end()
        selected = self._sel()
        if request.vanished:
            if not uid or not self.qresync:
                raise _bad("VANISHED needs UID FETCH and ENABLE QRESYNC")
            assert request.changedsince is not None
            cur.pos = start
            ranges = resolve(cur.sequence_set(), selected.max_uid)
            cur.pos = seq_end
            gone = await self.service.vanished(self._user(), selected.folder.folder_id,
                                               request.changedsince)
            gone = [u for u in gone if u not in selected.records
                    and any(lo <= u <= hi for lo, hi in ranges)]
            if gone:
                self.emit(b"* VANISHED (EARLIER) " + uid_set(gone).encode())
        if request.changedsince is not None:
            self.condstore = True
            if not request.has("MODSEQ"):
                request.items.append(fetchmod.Item("MODSEQ"))
            uids = [u for u in uids if selected.records[u].modseq > request.changedsince]
        if uid and not request.has("UID"):
            request.items.insert(0, fetchmod.Item("UID"))
        if request.has("MODSEQ"):
            self.condstore = True
        user = self._user()
        add_flags = False
        if request.sets_seen and not selected.readonly:
            unseen = [selected.records[u].message_id for u in uids
                      if Flag.SEEN not in selected.records[u].flags and u not in selected.gone]
            if unseen:
                changed, _ = await self.service.store_flags(user, unseen, add=["\\Seen"],
                                                            index_later=True)
                for record in changed:
                    if record.uid in selected.records:
                        selected.records[record.uid] = record
                selected.own_modseqs([r.modseq for r in changed
                                      if r.folder_id == selected.folder.folder_id])
                add_flags = not request.has("FLAGS")
        missing = 0
        sem = asyncio.Semaphore(_CONTENT_READS)

        async def load(record: MessageRecord) -> bytes | None:
            raw = self.structures.content(record.blob_hash)
            if raw is not None:
                return raw
            async with sem:
                try:
                    raw = await self.service.record_bytes(user, record)
                except NotFoundError:
                    return None
            self.structures.keep_content(record.blob_hash, raw)
            return raw

        content = request.needs_content  # asked once, not for every message
        add_modseq = add_flags and self.condstore and not request.has("MODSEQ")
        items, records, recents = request.items, selected.records, selected.recent
        batch = 64 if content else len(uids) or 1
        for start in range(0, len(uids), batch):
            chunk = uids[start : start + batch]
            raws: list[bytes | None] = [None] * len(chunk)
            if content and len(chunk) == 1:  # one message: no task to gather
                raws = [await load(records[chunk[0]])]
            elif content:
                raws = list(await asyncio.gather(*(load(records[u]) for u in chunk)))
            for u, raw in zip(chunk, raws, strict=True):
                record = records[u]
                root = None
                if content:
                    if raw is None:
                        missing += 1
                        continue
                    root = self.structures.get(record.blob_hash, raw)
                recent = u in recents
                parts = [fetchmod.build(i, record, raw, root, recent) for i in items]
                if add_flags:
                    parts.append(b"FLAGS " + flag_list(record.flags, recent))
                if add_modseq:
                    parts.append(b"MODSEQ (%d)" % record.modseq)
                msn = selected.msn_of(u)
                self.out += b"* %d FETCH (" % (msn or 0) + b" ".join(parts) + b")\r\n"
                if len(self.out) > 256 * 1024:
                    await self.flush()
        if missing:
            raise _no("some of the messages no longer exist", "EXPUNGEISSUED")
        return f"OK {'UID ' if uid else ''}FETCH completed"

    async def cmd_store(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        uids = self._uids(cur, uid)
        cur.sp()
        unchanged_since: int | None = None
        if cur.peek() == 0x28:
            cur.expect(b"(")
            if cur.keyword() != "UNCHANGEDSINCE":
                raise ParseError("expected UNCHANGEDSINCE")
            cur.sp()
            unchanged_since = cur.number64()
            cur.expect(b")")
            cur.sp()
            self.condstore = True
        action = cur.atom().upper()
        if action not in ("FLAGS", "+FLAGS", "-FLAGS", "FLAGS.SILENT", "+FLAGS.SILENT",
                          "-FLAGS.SILENT"):
            raise ParseError(f"unknown STORE action {action[:30]}")
        cur.sp()
        flags = cur.flags_or_list()
        cur.end()
        selected = self._sel()
        if selected.readonly:
            raise _no("the mailbox is read-only", "READ-ONLY")
        if "\\*" in flags:
            raise _bad("\\* is not a flag")
        flags = [f for f in flags if f.lower() != "\\recent"]
        silent = action.endswith(".SILENT")
        live = [u for u in uids if u not in selected.gone]
        ids = [selected.records[u].message_id for u in live]
        by_id = {selected.records[u].message_id: u for u in live}
        kind = action.split(".")[0]
        try:
            changed, modified = await self.service.store_flags(
                self._user(), ids,
                add=flags if kind == "+FLAGS" else (),
                remove=flags if kind == "-FLAGS" else (),
                replace=flags if kind == "FLAGS" else None,
                unchanged_since=unchanged_since, index_later=True,
                believed=selected.records[live[0]] if len(live) == 1 else None,
            )
        except InvalidInput as exc:
            raise _bad(str(exc)) from None
        changed_uids: set[int] = set()
        for record in changed:
            u = by_id.get(record.message_id)
            if u is not None:
                selected.records[u] = record
                changed_uids.add(u)
        selected.own_modseqs([r.modseq for r in changed
                              if r.folder_id == selected.folder.folder_id])
        modified_uids = sorted(by_id[m] for m in modified if m in by_id)
        for u in live:
            if u in modified_uids:
                continue
            if silent and not (self.condstore and u in changed_uids):
                continue
            if unchanged_since is not None and u not in changed_uids and silent:
                continue
            self.emit(selected.flags_response(u, self.condstore, with_uid=uid))
        if modified_uids:
            numbers = modified_uids if uid else [selected.msn_of(u) or 0 for u in modified_uids]
            return (f"OK [MODIFIED {sequence_text(numbers)}] conditional STORE failed for "
                    "some messages")
        return f"OK {'UID ' if uid else ''}STORE completed"

    async def cmd_copy(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._copy(cur, uid, move=False)

    async def cmd_move(self, tag: str, cur: Cursor, uid: bool) -> str:
        return await self._copy(cur, uid, move=True)

    async def _copy(self, cur: Cursor, uid: bool, move: bool) -> str:
        cur.sp()
        uids = self._uids(cur, uid)
        cur.sp()
        name = self._mailbox_arg(cur)
        cur.end()
        selected = self._sel()
        word = "MOVE" if move else "COPY"
        if move and selected.readonly:
            raise _no("the mailbox is read-only", "READ-ONLY")
        target = await self.service.find_folder(self._user(), name)
        if target is None:
            raise _no(f"no mailbox {name[:100]}", "TRYCREATE")
        live = [u for u in uids if u not in selected.gone]
        if not live:
            return f"OK {word} completed (nothing to {word.lower()})"
        ids = [selected.records[u].message_id for u in live]
        by_id = {selected.records[u].message_id: u for u in live}
        pairs: list[tuple[int, int]] = []
        user = self._user()
        if move and target.folder_id != selected.folder.folder_id:
            moved = await self.service.move(user, ids, target.folder_id)
            pairs = [(by_id[r.message_id], r.uid) for r in moved if r.message_id in by_id]
        else:
            copies = await self.service.copy_mapped(user, ids, target.folder_id)
            pairs = [(by_id[s.message_id], c.uid) for s, c in copies if s.message_id in by_id]
            if move:  # MOVE into the selected folder itself: copy, then expunge the sources
                await self.service.expunge(user, [selected.records[s].message_id
                                                  for s, _ in pairs])
        code = ""
        if pairs:
            pairs.sort()
            code = (f"COPYUID {target.uidvalidity} {sequence_text([s for s, _ in pairs])} "
                    f"{','.join(str(d) for _, d in pairs)}")
            if len(pairs) > 1 and all(pairs[i + 1][1] == pairs[i][1] + 1
                                      for i in range(len(pairs) - 1)):
                code = (f"COPYUID {target.uidvalidity} {sequence_text([s for s, _ in pairs])} "
                        f"{pairs[0][1]}:{pairs[-1][1]}")
        if move:
            if code:
                self.emit(f"* OK [{code}] moved".encode())
            if target.folder_id != selected.folder.folder_id:
                selected.gone |= {s for s, _ in pairs}
            else:
                selected.dirty = True
            await self.updates(True)
            for line in selected.report_gone():
                self.emit(line)
            return f"OK {'UID ' if uid else ''}MOVE completed"
        if target.folder_id == selected.folder.folder_id:
            selected.dirty = True
        return f"OK [{code}] {'UID ' if uid else ''}COPY completed" if code else "OK COPY completed"

    async def cmd_search(self, tag: str, cur: Cursor, uid: bool) -> str:
        cur.sp()
        returns: list[str] | None = None
        if cur.line[cur.pos : cur.pos + 7].upper() == b"RETURN ":
            cur.atom()
            cur.sp()
            returns = [r.upper() for r in cur.paren_list(cur.atom)]
            for option in returns:
                if option not in ("MIN", "MAX", "ALL", "COUNT"):
                    raise ParseError(f"unknown SEARCH RETURN option {option[:30]}")
            if not returns:
                returns = ["ALL"]
            cur.sp()
        try:
            program = parse_program(cur)
        except BadCharset:
            raise _no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)") from None
        cur.end()
        if program.uses_modseq:
            self.condstore = True
        matched = await self._search(program)
        selected = self._sel()
        numbers = matched if uid else [selected.msn_of(u) or 0 for u in matched]
        top_modseq = max((selected.records[u].modseq for u in matched), default=0)
        if returns is None:
            line = b"* SEARCH" + b"".join(b" %d" % n for n in numbers)
            if program.uses_modseq and matched:
                line += b" (MODSEQ %d)" % top_modseq
            self.emit(line)
        else:
            out = f'* ESEARCH (TAG "{tag}")' + (" UID" if uid else "")
            if numbers:
                if "MIN" in returns:
                    out += f" MIN {min(numbers)}"
                if "MAX" in returns:
                    out += f" MAX {max(numbers)}"
                if "ALL" in returns:
                    out += f" ALL {sequence_text(numbers)}"
            if "COUNT" in returns:
                out += f" COUNT {len(numbers)}"
            if program.uses_modseq and matched:
                out += f" MODSEQ {top_modseq}"
            self.emit(out.encode())
        return f"OK {'UID ' if uid else ''}SEARCH completed"

    async def cmd_sort(self, tag: str, cur: Cursor, uid: bool) -> str:
        """RFC 5256: SORT (criteria) charset search-keys."""
        cur.sp()
        cur.expect(b"(")
        criteria: list[tuple[str, bool]] = []
        reverse = False
        while True:
            word = cur.keyword()
            if word == "REVERSE" and not reverse:
                reverse = True
                cur.sp()
                continue
            if word not in SORT_KEYS:
                raise ParseError(f"unknown sort criterion {word[:30]}")
            criteria.append((word, reverse))
            reverse = False
            if cur.maybe(b")"):
                break
            cur.sp()
        program = self._charset_program(cur)
        selected = self._sel()
        matched = await self._search(program)
        ordered = sort_records([selected.records[u] for u in matched], criteria)
        numbers = [r.uid if uid else selected.msn_of(r.uid) or 0 for r in ordered]
        self.emit(b"* SORT" + b"".join(b" %d" % n for n in numbers))
        return f"OK {'UID ' if uid else ''}SORT completed"

    async def cmd_thread(self, tag: str, cur: Cursor, uid: bool) -> str:
        """RFC 5256: THREAD REFERENCES charset search-keys."""
        cur.sp()
        algorithm = cur.keyword()
        if algorithm != "REFERENCES":
            raise ParseError(f"unsupported threading algorithm {algorithm[:30]}")
        program = self._charset_program(cur)
        selected = self._sel()
        matched = await self._search(program)
        roots = thread_references([selected.records[u] for u in matched])
        text = thread_text(roots, (lambda r: r.uid) if uid
                           else (lambda r: selected.msn_of(r.uid) or 0))
        self.emit(b"* THREAD " + text if text else b"* THREAD")
        return f"OK {'UID ' if uid else ''}THREAD completed"

    def _charset_program(self, cur: Cursor) -> Program:
        cur.sp()
        charset = cur.astring_text().upper()
        if charset not in CHARSETS:
            raise _no("unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        cur.sp()
        program = parse_program(cur)
        cur.end()
        if program.uses_modseq:
            self.condstore = True
        return program

    async def _search(self, program: Program) -> list[int]:
        selected = self._sel()
        user = self._user()
        ctx = Context(selected.exists, selected.max_uid)
        records, recent, match = selected.records, selected.recent, program.key.match
        if not program.key.needs_content:
            # one Candidate looked at in turn (no object per message: a SEARCH of a few
            # flags over a large folder spent its time making and collecting them)
            out: list[int] = []
            probe: Candidate | None = None
            for i, u in enumerate(selected.uids):
                if probe is None:
                    probe = Candidate(i + 1, records[u], u in recent)
                else:
                    probe.msn, probe.record, probe.recent = i + 1, records[u], u in recent
                if match(probe, ctx):
                    out.append(u)
            return out
        candidates = [Candidate(i + 1, records[u], u in recent)
                      for i, u in enumerate(selected.uids)]
        matched: list[int] = []
        # The search index narrows text keys to the records that may match; the exact
        # RFC 3501 check below then reads only those.
        possible = await self.service.search_candidates(
            user, selected.folder.folder_id, index_criterion(program.key),
            [c.record.message_id for c in candidates])
        candidates = [c for c in candidates if c.record.message_id in possible]
        sem = asyncio.Semaphore(_CONTENT_READS)

        async def load(c: Candidate) -> None:
            async with sem:
                try:
                    c.raw = await self.service.record_bytes(user, c.record)
                except NotFoundError:
                    c.raw = b""
            c.part = self.structures.get(c.record.blob_hash, c.raw) if c.raw else mime.parse(b"")

        for start in range(0, len(candidates), 64):
            chunk = candidates[start : start + 64]
            await asyncio.gather(*(load(c) for c in chunk))
            for c in chunk:
                if program.key.match(c, ctx):
                    matched.append(c.record.uid)
                c.raw = None
                c.part = None
        return matched


# Records shared by the sessions of this process: many connections of one user (a phone, a
# laptop, a dozen IDLE folders) hold the same objects instead of a copy each, and a new
# message announced to all of them is read from the store once.
_RECORDS: OrderedDict[tuple[str, str], MessageRecord] = OrderedDict()
_RECORDS_MAX = 200_000


def _intern(record: MessageRecord) -> MessageRecord:
    key = (record.user_id, record.message_id)
    cached = _RECORDS.get(key)
    if cached is not None and cached.modseq == record.modseq and cached.uid == record.uid \
            and cached.folder_id == record.folder_id and cached.flags == record.flags:
        return cached
    _RECORDS[key] = record
    _RECORDS.move_to_end(key)
    if len(_RECORDS) > _RECORDS_MAX:
        _RECORDS.popitem(last=False)
    return record


async def _record_for(service: MailService, user: User, event: Event) -> MessageRecord | None:
    """The record a new-message event names, from the cache when it is that very version."""
    cached = _RECORDS.get((user.user_id, event.message_id))
    if cached is not None and cached.uid == event.uid and cached.folder_id == event.folder_id:
        return cached
    message_id = event.message_id
    try:
        record = await service.get_message(user, message_id)
    except NotFoundError:
        return None
    return _intern(record)


@dataclass(frozen=True)
class _Resync:
    """SELECT's QRESYNC parameter: what the client last saw (RFC 7162 §3.2.5)."""

    uidvalidity: int
    modseq: int
    known: SequenceSet | None  # known-uids; seq-match-data is accepted and not needed


def _parse_resync(cur: Cursor) -> _Resync:
    cur.expect(b"(")
    uidvalidity = cur.number(nonzero=True)
    cur.sp()
    modseq = cur.number64()
    known: SequenceSet | None = None
    if cur.maybe(b" "):
        if cur.peek() != 0x28:
            known = cur.sequence_set()
            if not cur.maybe(b" "):
                cur.expect(b")")
                return _Resync(uidvalidity, modseq, known)
        cur.expect(b"(")  # seq-match-data: (known-sequence-set known-uid-set)
        cur.sequence_set()
        cur.sp()
        cur.sequence_set()
        cur.expect(b")")
    cur.expect(b")")
    return _Resync(uidvalidity, modseq, known)


class _DoneSignal(Exception):
    """STARTTLS has answered already: no tagged response follows."""


_Done = _DoneSignal()

Handler = Callable[[ImapSession, str, Cursor, bool], Awaitable[str]]
_ANY = frozenset(State)
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
_AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})

_COMMANDS: dict[str, tuple[frozenset[State], Handler]] = {
    "CAPABILITY": (_ANY, ImapSession.cmd_capability),
    "NOOP": (_ANY, ImapSession.cmd_noop),
    "LOGOUT": (_ANY, ImapSession.cmd_logout),
    "ID": (_ANY, ImapSession.cmd_id),
    "ENABLE": (_AUTH, ImapSession.cmd_enable),
    "STARTTLS": (_NOT_AUTH, ImapSession.cmd_starttls),
    "LOGIN": (_NOT_AUTH, ImapSession.cmd_login),
    "AUTHENTICATE": (_NOT_AUTH, ImapSession.cmd_authenticate),
    "SELECT": (_AUTH, ImapSession.cmd_select),
    "EXAMINE": (_AUTH, ImapSession.cmd_examine),
    "CREATE": (_AUTH, ImapSession.cmd_create),
    "DELETE": (_AUTH, ImapSession.cmd_delete),
    "RENAME": (_AUTH, ImapSession.cmd_rename),
    "SUBSCRIBE": (_AUTH, ImapSession.cmd_subscribe),
    "UNSUBSCRIBE": (_AUTH, ImapSession.cmd_unsubscribe),
    "NAMESPACE": (_AUTH, ImapSession.cmd_namespace),
    "LIST": (_AUTH, ImapSession.cmd_list),
    "LSUB": (_AUTH, ImapSession.cmd_lsub),
    "STATUS": (_AUTH, ImapSession.cmd_status),
    "APPEND": (_AUTH, ImapSession.cmd_append),
    "IDLE": (_AUTH, ImapSession.cmd_idle),
    "CHECK": (_SELECTED, ImapSession.cmd_check),
    "CLOSE": (_SELECTED, ImapSession.cmd_close),
    "UNSELECT": (_SELECTED, ImapSession.cmd_unselect),
    "EXPUNGE": (_SELECTED, ImapSession.cmd_expunge),
    "SEARCH": (_SELECTED, ImapSession.cmd_search),
    "FETCH": (_SELECTED, ImapSession.cmd_fetch),
    "STORE": (_SELECTED, ImapSession.cmd_store),
    "COPY": (_SELECTED, ImapSession.cmd_copy),
    "MOVE": (_SELECTED, ImapSession.cmd_move),
    "SORT": (_SELECTED, ImapSession.cmd_sort),
    "THREAD": (_SELECTED, ImapSession.cmd_thread),
}
_UID_COMMANDS = frozenset({"FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "SORT",
                           "THREAD"})
