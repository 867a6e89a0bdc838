"""One SMTP connection: the command state machine of RFC 5321 with its ESMTP extensions.

The session parses and answers; every decision about mail is MailService's (recipients, logins,
who may send as whom) and every message goes to MailService (`enqueue_incoming` for the MX,
`submit` for submission). The final 250 is written only after that call returns, i.e. after the
message is durable.

Replies are buffered and written when the session is about to wait for the client, so a
pipelined batch (RFC 2920) is answered in one write. Every reply but the greeting and the
HELO/EHLO answer carries an enhanced status code (RFC 2034, RFC 3463).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.parser
import email.policy
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from postroom.config import SmtpSettings
from postroom.core.address import domain_of, plaintext_login_allowed, safe_getaddresses
from postroom.core.models import Envelope, User
from postroom.service import AuthFailed, InvalidInput, MailService, RateLimited, TooManyAttempts
from postroom.smtp.commands import (
    CommandError,
    check_address,
    check_mail_params,
    check_rcpt_params,
    parse_params,
    parse_path,
    split_command,
)
from postroom.smtp.data import ConnectionLost, LineTooLong, SmtpReader, has_bare_newline
from postroom.smtp.trace import received_header, return_path_header, with_protocol
from postroom.store.errors import StoreError

log = logging.getLogger(__name__)


class Mode(Enum):
    MX = "mx"  # mail from the internet for local recipients; never relays
    SUBMISSION = "submission"  # authenticated users sending (RFC 6409)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    mode: Mode
    hostname: str
    max_size: int
    limits: SmtpSettings
    tls_context: ssl.SSLContext | None  # None: STARTTLS not offered
    plaintext_on_loopback: bool = True


@dataclass(slots=True)
class Transaction:
    """What MAIL FROM and RCPT TO have set up so far (RFC 5321 §3.3)."""

    mail_from: str
    mail_params: dict[str, str]
    smtputf8: bool
    recipients: list[str] = field(default_factory=list)
    rcpt_params: list[dict[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)  # BDAT so far
    chunk_bytes: int = 0
    bdat_failed: bool = False


class CloseSession(Exception):
    """The session ends after the reply already queued."""


_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def from_addresses(message: bytes) -> list[str]:
    """The addresses of the From: header(s) (RFC 5322 §3.6.2), read from the header only."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    parsed = _header_parser.parsebytes(head)
    values = [str(v) for v in parsed.get_all("From", [])]
    return [addr for _, addr in safe_getaddresses(values) if addr]


class SmtpSession:
    def __init__(
        self,
        service: MailService,
        config: SessionConfig,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.service = service
        self.config = config
        self.limits = config.limits
        self.writer = writer
        self.input = SmtpReader(reader)
        peer = writer.get_extra_info("peername")
        self.client_ip: str = peer[0] if isinstance(peer, tuple) else ""
        self.tls = writer.get_extra_info("ssl_object") is not None
        self.helo: str | None = None
        self.esmtp = False
        self.user: User | None = None
        self.tx: Transaction | None = None
        self.errors = 0
        self.junk = 0
        self._out: list[bytes] = []
        self._handlers: dict[str, Callable[[str], Awaitable[None]]] = {
            "EHLO": self.ehlo, "HELO": self.helo_cmd, "MAIL": self.mail, "RCPT": self.rcpt,
            "DATA": self.data, "BDAT": self.bdat, "RSET": self.rset, "NOOP": self.noop,
            "QUIT": self.quit, "VRFY": self.vrfy, "EXPN": self.expn, "HELP": self.help,
            "STARTTLS": self.starttls, "AUTH": self.auth,
        }

    # ------------------------------------------------------------------------------ plumbing

    def reply(self, code: int, status: str, text: str) -> None:
        sep = " " if status else ""
        self._out.append(f"{code} {status}{sep}{text}\r\n".encode("utf-8", "replace"))

    def reply_lines(self, code: int, lines: list[str]) -> None:
        out = [f"{code}-{line}\r\n" for line in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
        self._out.append("".join(out).encode("utf-8", "replace"))

    async def flush(self) -> None:
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
            await self.writer.drain()

    async def read_line(self) -> bytes:
        if not self.input.buffer or b"\n" not in self.input.buffer:
            await self.flush()  # about to wait for the client: answer what it pipelined
        return await self.input.read_line(self.limits.max_command_length,
                                          self.limits.command_timeout)

    @property
    def secure(self) -> bool:
        """May a password cross this connection? TLS, or loopback when allowed."""
        return plaintext_login_allowed(tls_active=self.tls, peer_ip=self.client_ip,
                                       plaintext_on_loopback=self.config.plaintext_on_loopback)

    async def run(self) -> None:
        try:
            self.reply(220, "", f"{self.config.hostname} ESMTP Postroom")
            while True:
                try:
                    raw = await self.read_line()
                except LineTooLong:
                    self.reply(500, "5.5.2", "Line too long")
                    self._count_error()
                    continue
                line = raw.decode("utf-8", "surrogateescape")
                verb, arg = split_command(line)
                handler = self._handlers.get(verb)
                try:
                    if handler is None:
                        self._count_error()
                        raise CommandError(500, "5.5.2", "Command unrecognized")
                    await handler(arg)
                except CommandError as exc:
                    self.reply(exc.code, exc.status, exc.text)
                    if exc.code >= 500:
                        self._count_error()
                except StoreError as exc:  # an engine is down: the client retries later
                    log.warning("SMTP %s from %s: storage unavailable: %s", verb,
                                self.client_ip, exc)
                    self.reply(451, "4.3.0", "Temporary storage failure; try again later")
        except CloseSession:
            pass
        except TimeoutError:
            self.reply(421, "4.4.2", f"{self.config.hostname} Timeout, closing connection")
        except (ConnectionLost, ConnectionError, ssl.SSLError):
            self._out.clear()
        except Exception:
            log.exception("SMTP session from %s failed", self.client_ip)
            self.reply(421, "4.3.0", "Internal error, closing connection")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), 10)
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 5)

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors > self.limits.max_errors:
            self.reply(421, "4.7.0", "Too many errors, closing connection")
            raise CloseSession()

    def _count_junk(self) -> None:
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self.reply(421, "4.7.0", "Too many commands without mail, closing connection")
            raise CloseSession()

    def _need_helo(self) -> None:
        if self.helo is None:
            raise CommandError(503, "5.5.1", "Send HELO/EHLO first")

    # -------------------------------------------------------------------------- greetings

    def _auth_offered(self) -> bool:
        return self.config.mode is Mode.SUBMISSION and self.secure and self.user is None

    async def ehlo(self, arg: str) -> None:
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: EHLO hostname")
        self._count_junk()
        self.helo, self.esmtp, self.tx = arg.split()[0], True, None
        lines = [f"{self.config.hostname} Hello {self.helo}", "PIPELINING",
                 f"SIZE {self.config.max_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                 "CHUNKING", "DSN"]
        if self.config.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self.reply_lines(250, lines)

    async def helo_cmd(self, arg: str) -> None:
        if not arg:
            raise CommandError(501, "5.5.4", "Syntax: HELO hostname")
        self._count_junk()
        self.helo, self.esmtp, self.tx = arg.split()[0], False, None
        self.reply(250, "", self.config.hostname)

    async def starttls(self, arg: str) -> None:
        if self.config.tls_context is None:
            raise CommandError(454, "4.7.0", "TLS not available")
        if self.tls:
            raise CommandError(503, "5.5.1", "Already using TLS")
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: STARTTLS")
        # Stop reading before the 220 goes out: the client's TLS hello must reach the TLS
        # layer, not our plaintext buffer.
        pause_reading = getattr(self.writer.transport, "pause_reading", None)
        if pause_reading is not None:  # uvloop's transports are not asyncio.ReadTransport
            pause_reading()
        self.reply(220, "2.0.0", "Ready to start TLS")
        # Anything pipelined behind STARTTLS was sent in the clear: drop it (CVE-2011-0411).
        dropped = self.input.discard_buffered()
        if dropped:
            log.info("dropped %d octets pipelined after STARTTLS from %s", dropped,
                     self.client_ip)
        await self.flush()
        try:
            await asyncio.wait_for(self.writer.start_tls(self.config.tls_context), 30)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("TLS handshake with %s failed: %s", self.client_ip, exc)
            raise ConnectionLost() from None
        self.tls = True
        # RFC 3207 §4.2: forget everything learnt before the handshake.
        self.helo, self.esmtp, self.user, self.tx = None, False, None, None

    # ------------------------------------------------------------------------------ AUTH

    async def auth(self, arg: str) -> None:
        if self.config.mode is not Mode.SUBMISSION:
            raise CommandError(502, "5.5.1", "AUTH not available on this port")
        self._need_helo()
        if self.user is not None:
            raise CommandError(503, "5.5.1", "Already authenticated")
        if self.tx is not None:
            raise CommandError(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self.secure:
            raise CommandError(538, "5.7.11", "Encryption required for requested "
                                               "authentication mechanism")
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism == "PLAIN":
            response = initial or await self._challenge("")
            fields = self._b64(response).split(b"\0")
            if len(fields) != 3:
                raise CommandError(501, "5.5.2", "Malformed PLAIN response")
            authzid, authcid, password = (f.decode("utf-8", "replace") for f in fields)
            if authzid and authzid.lower() != authcid.lower():
                raise CommandError(535, "5.7.8", "Authentication credentials invalid")
        elif mechanism == "LOGIN":
            first = initial or await self._challenge("VXNlcm5hbWU6")  # "Username:"
            authcid = self._b64(first).decode("utf-8", "replace")
            password = self._b64(await self._challenge("UGFzc3dvcmQ6")).decode("utf-8",
                                                                                "replace")
        else:
            raise CommandError(504, "5.5.4", "Unrecognized authentication mechanism")
        try:
            self.user = await self.service.authenticate(authcid, password, self.client_ip)
        except TooManyAttempts:
            raise CommandError(454, "4.7.0", "Too many failed logins, try again later") from None
        except AuthFailed:
            raise CommandError(535, "5.7.8", "Authentication credentials invalid") from None
        self.reply(235, "2.7.0", "Authentication successful")

    async def _challenge(self, text: str) -> str:
        self._out.append(f"334 {text}\r\n".encode())
        line = (await self.read_line()).decode("ascii", "replace").strip()
        if line == "*":
            raise CommandError(501, "5.0.0", "Authentication cancelled")
        return line

    @staticmethod
    def _b64(text: str) -> bytes:
        if text == "=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError(501, "5.5.2", "Cannot decode base64 response") from None

    # ----------------------------------------------------------------------- transaction

    async def mail(self, arg: str) -> None:
        self._need_helo()
        if self.tx is not None:
            raise CommandError(503, "5.5.1", "Nested MAIL command")
        if self.config.mode is Mode.SUBMISSION and self.user is None:
            raise CommandError(530, "5.7.0", "Authentication required")
        address, param_text = parse_path(arg, "FROM", allow_null=True)
        params = parse_params(param_text)
        if params and not self.esmtp:
            raise CommandError(555, "5.5.4", "Parameters need EHLO")
        check_mail_params(params, self.config.max_size)
        smtputf8 = "SMTPUTF8" in params
        mail_from = check_address(address, smtputf8=smtputf8) if address else ""
        if self.user is not None and not await self.service.may_send_as(self.user, mail_from):
            raise CommandError(553, "5.7.1", f"Sender address <{address}> not owned by "
                                             f"{self.user.address}")
        self.tx = Transaction(mail_from, params, smtputf8)
        self.junk = 0
        self.reply(250, "2.1.0", "Ok")

    async def rcpt(self, arg: str) -> None:
        tx = self.tx
        if tx is None:
            raise CommandError(503, "5.5.1", "Need MAIL before RCPT")
        address, param_text = parse_path(arg, "TO", allow_null=False)
        params = parse_params(param_text)
        if params and not self.esmtp:
            raise CommandError(555, "5.5.4", "Parameters need EHLO")
        check_rcpt_params(params)
        rcpt = check_address(address, smtputf8=tx.smtputf8)
        if len(tx.recipients) >= self.limits.max_recipients:
            raise CommandError(452, "4.5.3", "Too many recipients")
        local = await self.service.is_local_domain(domain_of(rcpt))
        if local:
            recipient = await self.service.resolve_recipient(rcpt)
            if recipient is None:
                raise CommandError(550, "5.1.1", f"<{address}>: Recipient address rejected: "
                                                 "User unknown")
            if self.user is None and await self.service.sender_refused(
                    tx.mail_from, self.client_ip, rcpt, recipient):
                raise CommandError(550, "5.7.1", f"<{address}>: Sender refused by policy")
        elif self.user is None:  # RFC 5321 §3.6.2: only authenticated clients may relay
            raise CommandError(550, "5.7.1", f"<{address}>: Relay access denied")
        if rcpt not in tx.recipients:
            tx.recipients.append(rcpt)
            tx.rcpt_params.append(params)
        self.reply(250, "2.1.5", "Ok")

    async def data(self, arg: str) -> None:
        if arg:
            raise CommandError(501, "5.5.4", "Syntax: DATA")
        tx = self.tx
        if tx is None:
            raise CommandError(503, "5.5.1", "Need MAIL command")
        if tx.chunks or tx.chunk_bytes:
            raise CommandError(503, "5.5.1", "DATA not allowed after BDAT")
        if not tx.recipients:
            raise CommandError(554, "5.5.1", "No valid recipients")
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>")
        await self.flush()
        result = await self.input.read_data(self.config.max_size, self.limits.max_line_length,
                                            self.limits.data_timeout)
        self.tx = None
        if result.bare_newline:
            # As Postfix's smtpd_forbid_bare_newline: refuse and hang up, so nothing that
            # followed a bare newline can ever be read as a command.
            self.reply(521, "5.5.2", f"{self.config.hostname} Error: bare <LF> or <CR> "
                                     "received; use <CR><LF> line endings")
            raise CloseSession()
        if result.oversize:
            raise CommandError(552, "5.3.4", "Message size exceeds fixed maximum size")
        if result.long_line:
            raise CommandError(554, "5.6.0", f"Message has a line longer than "
                                             f"{self.limits.max_line_length} octets")
        await self._accept(tx, result.message)

    async def bdat(self, arg: str) -> None:
        words = arg.split()
        if not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit()) \
                or (len(words) == 2 and words[1].upper() != "LAST"):
            # Without a size we cannot find the end of the chunk: hang up rather than read
            # message bytes as commands.
            self.reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
            raise CloseSession()
        if len(words[0]) > 15:  # a petabyte or more: too much to read through and drop
            self.reply(552, "5.3.4", "Message size exceeds fixed maximum size")
            raise CloseSession()
        size, last = int(words[0]), len(words) == 2
        tx = self.tx
        timeout = self.limits.data_timeout
        if tx is None or not tx.recipients:
            await self.input.skip_exact(size, timeout)
            if tx is None:
                raise CommandError(503, "5.5.1", "Need MAIL command")
            raise CommandError(554, "5.5.1", "No valid recipients")
        if tx.bdat_failed:
            await self.input.skip_exact(size, timeout)
            if last:
                self.tx = None
            raise CommandError(503, "5.5.1", "Earlier BDAT failed; transaction aborted")
        if tx.chunk_bytes + size > self.config.max_size:
            await self.input.skip_exact(size, timeout)
            tx.bdat_failed, tx.chunks = True, []
            if last:
                self.tx = None
            raise CommandError(552, "5.3.4", "Message size exceeds fixed maximum size")
        chunk = await self.input.read_exact(size, timeout)
        tx.chunks.append(chunk)
        tx.chunk_bytes += size
        if not last:
            self.reply(250, "2.0.0", f"{size} octets received")
            return
        self.tx = None
        message = b"".join(tx.chunks)
        if has_bare_newline(message):
            raise CommandError(554, "5.6.0", "Bare <LF> or <CR> in message; use <CR><LF>")
        await self._accept(tx, message)

    async def _accept(self, tx: Transaction, message: bytes) -> None:
        """Hand the message to MailService; the 250 follows only its durable return."""
        queue_id = secrets.token_hex(8)
        ssl_object = self.writer.get_extra_info("ssl_object")
        received = received_header(
            helo=self.helo or "", client_ip=self.client_ip, hostname=self.config.hostname,
            protocol=with_protocol(esmtp=self.esmtp, tls=self.tls, auth=self.user is not None,
                                   utf8=tx.smtputf8),
            queue_id=queue_id,
            recipient=tx.recipients[0] if len(tx.recipients) == 1 else None,
            tls_version=ssl_object.version() if ssl_object is not None else None,
        )
        envelope = Envelope(tx.mail_from, tuple(tx.recipients), self.client_ip, self.helo or "",
                            self.user.address if self.user else "")
        try:
            if self.user is None:
                raw = return_path_header(tx.mail_from) + received + message
                screening = await self.service.screen_incoming(envelope, raw)
                if screening.reject:
                    raise CommandError(550, "5.7.1", screening.reject)
                item = await self.service.enqueue_incoming(
                    envelope, raw[:len(raw) - len(message)] + screening.headers + message,
                    screening.data)
            else:
                senders = from_addresses(message)
                if not senders:
                    raise CommandError(550, "5.6.0", "Message has no From: header")
                for sender in senders:
                    if not await self.service.may_send_as(self.user, sender):
                        raise CommandError(553, "5.7.1", f"From: address <{sender}> not owned "
                                                         f"by {self.user.address}")
                result = await self.service.submit(self.user, envelope, received + message)
                item = result.queue_item or result.sent.message_id
        except InvalidInput as exc:
            raise CommandError(552, "5.3.4", str(exc)) from None
        except RateLimited as exc:
            raise CommandError(451, "4.7.1", str(exc)) from None
        except CommandError:
            raise
        except Exception:
            log.exception("storing a message from %s failed", self.client_ip)
            raise CommandError(451, "4.3.0", "Temporary failure storing the message; "
                                             "try again later") from None
        log.debug("accepted %s from <%s> for %d recipient(s), %d octets as %s", queue_id,
                  tx.mail_from, len(tx.recipients), len(message), item)
        self.reply(250, "2.0.0", f"Ok: queued as {item}")

    # --------------------------------------------------------------------------- the rest

    async def rset(self, arg: str) -> None:
        self._count_junk()
        self.tx = None
        self.reply(250, "2.0.0", "Ok")

    async def noop(self, arg: str) -> None:
        self._count_junk()
        self.reply(250, "2.0.0", "Ok")

    async def vrfy(self, arg: str) -> None:
        self._count_junk()
        # RFC 5321 §3.5.3: 252 when we will not say whether a user exists.
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt "
                                 "delivery")

    async def expn(self, arg: str) -> None:
        self._count_junk()
        raise CommandError(502, "5.5.1", "EXPN not available")

    async def help(self, arg: str) -> None:
        self._count_junk()
        self.reply(214, "2.0.0", "See RFC 5321")

    async def quit(self, arg: str) -> None:
        self.reply(221, "2.0.0", "Bye")
        raise CloseSession()
