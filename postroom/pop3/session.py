"""One POP3 connection: the AUTHORIZATION, TRANSACTION and UPDATE states of RFC 1939.

The session only parses and formats POP3; every lookup and change goes through MailService.
Its maildrop is a snapshot of INBOX taken at login: message numbers, sizes and unique ids stay
fixed for the session, deletions are only marks until QUIT (RFC 1939 §6), and a session that ends
any other way (dropped connection, autologout) deletes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from postroom.core.address import plaintext_login_allowed
from postroom.core.models import MessageRecord, User
from postroom.pop3.locks import MaildropLocks
from postroom.pop3.sizes import SIZES
from postroom.pop3.wire import (
    Command,
    CommandError,
    crlf_size,
    multiline,
    parse_command,
    wire_message,
    wire_top,
)
from postroom.service import (
    AuthFailed,
    MailService,
    NotFoundError,
    TooManyAttempts,
)

log = logging.getLogger(__name__)

MAX_LINE = 4096  # RFC 2449 §4 allows 255 octets per command; SASL responses may be longer
SIZE_READS = 16  # blobs read at once while sizing the maildrop at login


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"


class LineTooLong(Exception):
    pass


@dataclass
class Maildrop:
    """The messages of one session, numbered from 1, with their marks."""

    user: User
    folder_id: str
    messages: list[MessageRecord]
    sizes: list[int]
    deleted: set[int] = field(default_factory=set)  # 0-based indices
    retrieved: set[int] = field(default_factory=set)

    def live(self) -> list[int]:
        return [i for i in range(len(self.messages)) if i not in self.deleted]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(self.sizes[i] for i in live)


class Pop3Session:
    def __init__(
        self,
        service: MailService,
        locks: MaildropLocks,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls_context: ssl.SSLContext | None,
        tls_active: bool,
        plaintext_on_loopback: bool,
        delete_action: Literal["expunge", "trash"] = "expunge",
        idle_timeout: float = 600.0,
    ) -> None:
        self.service = service
        self.locks = locks
        self.reader = reader
        self.writer = writer
        self.tls_context = tls_context
        self.tls_active = tls_active
        self.plaintext_on_loopback = plaintext_on_loopback
        self.delete_action = delete_action
        self.idle_timeout = idle_timeout
        peer = writer.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.state = State.AUTHORIZATION
        self.pending_user: str | None = None
        self.maildrop: Maildrop | None = None
        self.closing = False

    # --------------------------------------------------------------------------- connection

    async def run(self) -> None:
        try:
            await self.reply(f"+OK {self.service.hostname} Postroom POP3 server ready")
            while not self.closing:
                try:
                    line = await self.next_line()
                except LineTooLong:
                    await self.reply(f"-ERR line too long (at most {MAX_LINE} octets)")
                    continue
                if line is None:
                    break
                await self.dispatch(line)
        except TimeoutError:
            # RFC 1939 §3: the autologout timer ends the session without UPDATE.
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self.reply("-ERR autologout: idle for too long")
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("pop3 connection from %s ended: %r", self.peer_ip, exc)
        finally:
            self.release()
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 5)

    async def next_line(self) -> bytes | None:
        """The next line, within the autologout time (TimeoutError otherwise)."""
        async with asyncio.timeout(self.idle_timeout):  # no task per line, as wait_for makes
            return await self.read_line()

    async def read_line(self) -> bytes | None:
        """The next line without its CRLF (or bare LF); None at end of stream."""
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            await self._discard_line(exc.consumed)
            raise LineTooLong from None
        if len(line) > MAX_LINE:
            raise LineTooLong
        return line.rstrip(b"\n").rstrip(b"\r")

    async def _discard_line(self, consumed: int) -> None:
        await self.reader.readexactly(consumed)
        while True:
            try:
                await self.reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self.reader.readexactly(exc.consumed)

    async def reply(self, line: str, body: bytes = b"") -> None:
        self.writer.write(line.encode() + b"\r\n" + body)
        await self.writer.drain()

    def release(self) -> None:
        if self.maildrop is not None:
            self.locks.release(self.maildrop.user.user_id, self)

    # ------------------------------------------------------------------------------ commands

    async def dispatch(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except CommandError as exc:
            self.pending_user = None
            await self.reply(f"-ERR {exc}")
            return
        handler = _COMMANDS.get(command.keyword)
        if handler is None:
            self.pending_user = None
            await self.reply(f"-ERR unknown command {command.keyword}")
            return
        states, method = handler
        if self.state not in states:
            self.pending_user = None
            await self.reply(f"-ERR {command.keyword} is not valid in the {self.state.value} "
                             "state")
            return
        if command.keyword != "PASS":  # RFC 1939 §7: PASS only right after USER
            self.pending_user = None
        try:
            await method(self, command)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            raise
        except LineTooLong:
            await self.reply(f"-ERR line too long (at most {MAX_LINE} octets)")
        except Exception:
            log.exception("pop3 %s failed", command.keyword)
            await self.reply("-ERR [SYS/TEMP] internal error; try again")

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER",
                "IMPLEMENTATION Postroom"]
        if self.state is State.AUTHORIZATION:
            if self.may_authenticate():
                caps += ["USER", "SASL PLAIN"]
            if self.tls_context is not None and not self.tls_active:
                caps.append("STLS")
        return caps

    def may_authenticate(self) -> bool:
        """RFC 2595 §2: plaintext passwords only over TLS, or from loopback if configured."""
        return plaintext_login_allowed(tls_active=self.tls_active, peer_ip=self.peer_ip,
                                       plaintext_on_loopback=self.plaintext_on_loopback)

    async def cmd_capa(self, command: Command) -> None:
        await self.reply("+OK capability list follows", multiline(self.capabilities()))

    async def cmd_quit(self, command: Command) -> None:
        self.closing = True
        if self.maildrop is None:
            await self.reply(f"+OK {self.service.hostname} Postroom POP3 server signing off")
            return
        await self.update(self.maildrop)

    async def cmd_stls(self, command: Command) -> None:
        if command.args:
            await self.reply("-ERR STLS takes no arguments")
            return
        if self.tls_active:
            await self.reply("-ERR already using TLS")
            return
        if self.tls_context is None:
            await self.reply("-ERR TLS is not available")
            return
        await self.reply("+OK begin TLS negotiation")
        # RFC 2595 §2.2 (and CVE-2011-0411): anything the client pipelined after STLS arrived
        # in plaintext and must not be read as if it had come over TLS.
        buffered = getattr(self.reader, "_buffer", None)
        if isinstance(buffered, bytearray):
            buffered.clear()
        await self.writer.start_tls(self.tls_context)
        self.tls_active = True

    async def cmd_apop(self, command: Command) -> None:
        await self.reply("-ERR [AUTH] APOP is not supported; use USER/PASS or AUTH PLAIN")

    async def cmd_user(self, command: Command) -> None:
        if not self.may_authenticate():
            await self.reply("-ERR [AUTH] plaintext authentication needs TLS; use STLS")
            return
        name = command.rest.strip()
        if not name:
            await self.reply("-ERR USER needs a user name")
            return
        self.pending_user = name
        await self.reply("+OK send PASS")

    async def cmd_pass(self, command: Command) -> None:
        name, self.pending_user = self.pending_user, None
        if name is None:
            await self.reply("-ERR PASS must follow a successful USER")
            return
        if not command.rest:
            await self.reply("-ERR PASS needs a password")
            return
        await self.login(name, command.rest)

    async def cmd_auth(self, command: Command) -> None:
        if not command.args:
            # The mechanism list of RFC 1734, which some clients still ask for.
            await self.reply("+OK SASL mechanisms follow", multiline(["PLAIN"]))
            return
        if not self.may_authenticate():
            await self.reply("-ERR [AUTH] plaintext authentication needs TLS; use STLS")
            return
        mechanism = command.args[0].upper()
        if mechanism != "PLAIN":
            await self.reply(f"-ERR unsupported SASL mechanism {command.args[0][:20]}")
            return
        if len(command.args) > 2:
            await self.reply("-ERR AUTH PLAIN takes at most one initial response")
            return
        if len(command.args) == 2:
            response = command.args[1]
            if response == "=":  # RFC 5034 §4: "=" is an empty initial response
                response = ""
        else:
            await self.reply("+ ")
            line = await self.next_line()
            if line is None:
                self.closing = True
                return
            response = line.decode("ascii", errors="replace").strip()
            if response == "*":  # RFC 5034 §4: the client cancels
                await self.reply("-ERR [AUTH] authentication cancelled")
                return
        try:
            decoded = base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            await self.reply("-ERR [AUTH] invalid base64 in the SASL response")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            await self.reply("-ERR [AUTH] malformed PLAIN response (authzid NUL authcid NUL "
                             "password)")
            return
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            await self.reply("-ERR [AUTH] PLAIN response is not valid UTF-8")
            return
        if authzid and authzid.lower() != authcid.lower():
            await self.reply("-ERR [AUTH] acting as another user is not allowed")
            return
        await self.login(authcid, password)

    async def login(self, name: str, password: str) -> None:
        try:
            user = await self.service.authenticate(name, password, client=self.peer_ip)
        except TooManyAttempts:
            await self.reply("-ERR [AUTH] too many failed logins; try again later")
            return
        except AuthFailed:
            log.info("pop3 login failed for %r from %s", name[:100], self.peer_ip)
            await self.reply("-ERR [AUTH] invalid user name or password")
            return
        if not self.locks.acquire(user.user_id, self):
            await self.reply("-ERR [IN-USE] the maildrop is open in another POP3 session")
            return
        try:
            self.maildrop = await self.open_maildrop(user)
        except Exception:
            self.locks.release(user.user_id, self)
            log.exception("pop3 could not open the maildrop of %s", user.address)
            await self.reply("-ERR [SYS/TEMP] the maildrop cannot be opened; try again later")
            return
        self.state = State.TRANSACTION
        count, size = self.maildrop.stat()
        log.info("pop3 login %s from %s: %d messages", user.address, self.peer_ip, count)
        await self.reply(f"+OK maildrop has {count} messages ({size} octets)")

    async def open_maildrop(self, user: User) -> Maildrop:
        snapshot = await self.service.mailbox_snapshot(user)
        records = snapshot.messages
        sizes = [0] * len(records)
        limit = asyncio.Semaphore(SIZE_READS)

        async def size_of(i: int) -> None:
            known = SIZES.get(records[i].blob_hash)
            if known is not None:
                sizes[i] = known
                return
            async with limit:
                try:
                    sizes[i] = crlf_size(await self.service.record_bytes(user, records[i]))
                except NotFoundError:  # expunged meanwhile: shown, but RETR will say so
                    sizes[i] = records[i].size
                    return
            SIZES.put(records[i].blob_hash, sizes[i])

        await asyncio.gather(*(size_of(i) for i in range(len(records))))
        return Maildrop(user, snapshot.folder.folder_id, records, sizes)

    # ------------------------------------------------------------------- TRANSACTION state

    def _drop(self) -> Maildrop:
        assert self.maildrop is not None  # TRANSACTION state implies a maildrop
        return self.maildrop

    def message_number(self, drop: Maildrop, text: str, *, allow_deleted: bool = False
                       ) -> int | str:
        """The 0-based index for a message-number argument, or the -ERR reason."""
        if not text.isascii() or not text.isdigit():
            return f"invalid message number {text[:20]!r}"
        number = int(text)
        if not 1 <= number <= len(drop.messages):
            return (f"no such message {number}; the maildrop has {len(drop.messages)} "
                    "messages")
        if not allow_deleted and number - 1 in drop.deleted:
            return f"message {number} is already deleted"
        return number - 1

    async def _one_message(self, command: Command, extra: int = 0) -> int | None:
        drop = self._drop()
        wanted = 1 + extra
        if len(command.args) != wanted:
            what = "a message number" if not extra else "a message number and a line count"
            await self.reply(f"-ERR {command.keyword} needs {what}")
            return None
        index = self.message_number(drop, command.args[0])
        if isinstance(index, str):
            await self.reply(f"-ERR {index}")
            return None
        return index

    async def cmd_stat(self, command: Command) -> None:
        if command.args:
            await self.reply("-ERR STAT takes no arguments")
            return
        count, size = self._drop().stat()
        await self.reply(f"+OK {count} {size}")

    async def cmd_list(self, command: Command) -> None:
        drop = self._drop()
        if command.args:
            index = await self._one_message(command)
            if index is not None:
                await self.reply(f"+OK {index + 1} {drop.sizes[index]}")
            return
        count, size = drop.stat()
        lines = [f"{i + 1} {drop.sizes[i]}" for i in drop.live()]
        await self.reply(f"+OK {count} messages ({size} octets)", multiline(lines))

    async def cmd_uidl(self, command: Command) -> None:
        # The unique id is the message's own id: it never changes, even when the message is
        # moved out of INBOX and back, and is never reused (RFC 1939 §7).
        drop = self._drop()
        if command.args:
            index = await self._one_message(command)
            if index is not None:
                await self.reply(f"+OK {index + 1} {drop.messages[index].message_id}")
            return
        lines = [f"{i + 1} {drop.messages[i].message_id}" for i in drop.live()]
        await self.reply("+OK unique-id listing follows", multiline(lines))

    async def _raw(self, drop: Maildrop, index: int) -> bytes | None:
        try:
            return await self.service.record_bytes(drop.user, drop.messages[index])
        except NotFoundError:
            await self.reply(f"-ERR message {index + 1} was removed by another client")
            return None

    async def cmd_retr(self, command: Command) -> None:
        index = await self._one_message(command)
        if index is None:
            return
        drop = self._drop()
        raw = await self._raw(drop, index)
        if raw is None:
            return
        drop.retrieved.add(index)
        await self.reply(f"+OK {crlf_size(raw)} octets", wire_message(raw))

    async def cmd_top(self, command: Command) -> None:
        index = await self._one_message(command, extra=1)
        if index is None:
            return
        count = command.args[1]
        if not count.isascii() or not count.isdigit():
            await self.reply(f"-ERR invalid line count {count[:20]!r}")
            return
        drop = self._drop()
        raw = await self._raw(drop, index)
        if raw is None:
            return
        await self.reply("+OK top of message follows", wire_top(raw, int(count)))

    async def cmd_dele(self, command: Command) -> None:
        index = await self._one_message(command)
        if index is None:
            return
        self._drop().deleted.add(index)
        await self.reply(f"+OK message {index + 1} deleted")

    async def cmd_noop(self, command: Command) -> None:
        await self.reply("+OK")

    async def cmd_rset(self, command: Command) -> None:
        if command.args:
            await self.reply("-ERR RSET takes no arguments")
            return
        drop = self._drop()
        drop.deleted.clear()
        count, size = drop.stat()
        await self.reply(f"+OK maildrop has {count} messages ({size} octets)")

    # ------------------------------------------------------------------------ UPDATE state

    async def update(self, drop: Maildrop) -> None:
        """RFC 1939 §6: remove the messages marked deleted, then release the maildrop."""
        deleted = [drop.messages[i].message_id for i in sorted(drop.deleted)]
        seen = [drop.messages[i].message_id for i in sorted(drop.retrieved - drop.deleted)]
        left = len(drop.messages) - len(deleted)
        try:
            if deleted:
                await self.service.remove_from_folder(
                    drop.user, drop.folder_id, deleted, to_trash=self.delete_action == "trash")
        except Exception:  # ServiceError or an engine failure: report, keep the mail
            log.exception("pop3 UPDATE failed for %s", drop.user.address)
            await self.reply("-ERR [SYS/TEMP] some deleted messages were not removed")
            return
        finally:
            self.release()
            self.maildrop = None
        if seen:  # downloaded mail counts as read for IMAP and webmail
            try:
                await self.service.set_flags(drop.user, seen, add=["\\Seen"])
            except Exception:
                log.exception("pop3 could not mark retrieved messages seen")
        await self.reply(f"+OK {self.service.hostname} Postroom POP3 server signing off "
                         f"({left} messages left)")


_Handler = tuple[frozenset[State], Callable[[Pop3Session, Command], Awaitable[None]]]
_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

_COMMANDS: dict[str, _Handler] = {
    "CAPA": (_BOTH, Pop3Session.cmd_capa),
    "QUIT": (_BOTH, Pop3Session.cmd_quit),
    "STLS": (_AUTH, Pop3Session.cmd_stls),
    "USER": (_AUTH, Pop3Session.cmd_user),
    "PASS": (_AUTH, Pop3Session.cmd_pass),
    "AUTH": (_AUTH, Pop3Session.cmd_auth),
    "APOP": (_AUTH, Pop3Session.cmd_apop),
    "STAT": (_TRANS, Pop3Session.cmd_stat),
    "LIST": (_TRANS, Pop3Session.cmd_list),
    "UIDL": (_TRANS, Pop3Session.cmd_uidl),
    "RETR": (_TRANS, Pop3Session.cmd_retr),
    "TOP": (_TRANS, Pop3Session.cmd_top),
    "DELE": (_TRANS, Pop3Session.cmd_dele),
    "NOOP": (_TRANS, Pop3Session.cmd_noop),
    "RSET": (_TRANS, Pop3Session.cmd_rset),
}
