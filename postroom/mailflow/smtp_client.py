"""The SMTP client of outbound delivery (RFC 5321), on asyncio streams.

Hand-written rather than aiosmtplib because delivery needs what that library does not give:
PIPELINING (RFC 2920: MAIL, every RCPT and DATA in one round trip), the reply to each RCPT kept
per recipient, and a connection that carries message after message to the same host.

A transaction's outcome is per recipient: each gets the reply that decided it (its RCPT reply if
refused, else the reply to the end of DATA). Network trouble and timeouts raise `SmtpError`;
every failure keeps the reply text so it can go into the queue history and the DSN.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from dataclasses import dataclass, field
from typing import Literal

TlsMode = Literal["opportunistic", "starttls", "implicit", "none"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_MAX_REPLY_LINES = 1000


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines).strip()

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code the reply carries, or one implied by its class."""
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class SmtpError(Exception):
    """The session failed as a whole (network, timeout, TLS, an unusable greeting or EHLO).

    `reply` is the server's reply when there was one; `permanent` is set only for a 5xx greeting
    or EHLO/HELO refusal, which RFC 5321 §3.1 lets a client take as "no mail here".
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply is not None and self.reply.permanent


@dataclass(slots=True)
class Transaction:
    """The replies of one mail transaction."""

    mail: Reply
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None

    def outcome(self, rcpt: str) -> Reply:
        """The reply that decided this recipient's fate."""
        if not self.mail.ok:
            return self.mail
        reply = self.rcpt.get(rcpt)
        if reply is None:
            return Reply(451, ("4.4.0 no reply to RCPT",))
        if not reply.ok:
            return reply
        return self.data if self.data is not None else Reply(451, ("4.4.0 no reply to DATA",))


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def wire_format(raw: bytes) -> bytes:
    """The message with CRLF line ends and a final CRLF (what DKIM signs and DATA carries)."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def dot_stuff(wire: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with '.' gets one more, and '.' CRLF ends the data."""
    if wire.startswith(b"."):
        wire = b"." + wire
    return wire.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def insecure_context() -> ssl.SSLContext:
    """Opportunistic TLS (RFC 7435): encrypt whatever the peer offers, verify nothing."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verifying_context(cafile: str | None = None) -> ssl.SSLContext:
    """TLS that checks the certificate chain (against `cafile`, else the system's CAs) and that
    it names the host we meant to reach (RFC 6125)."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)


class SmtpClient:
    """One SMTP connection. Use `connect`, then `send` any number of times, then `quit`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        command_timeout: float,
        data_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.greeting: Reply | None = None
        self.broken = False
        self._dirty = False  # a transaction was left open: RSET before the next MAIL

    @classmethod
    async def connect(
        cls,
        address: str,
        port: int,
        *,
        helo: str,
        tls: TlsMode = "opportunistic",
        server_name: str | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        data_timeout: float = 600.0,
        tls_context: ssl.SSLContext | None = None,
        source_address: str = "",
    ) -> SmtpClient:
        """Connect, read the greeting, EHLO, and STARTTLS if offered (or required).

        `source_address` binds the local end (`[delivery] source_address`) when it is of the
        destination's address family; mail to the other family leaves from the default.
        """
        context = tls_context or insecure_context()
        local = (source_address, 0) if source_address and (":" in source_address) == (
            ":" in address) else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    address, port,
                    ssl=context if tls == "implicit" else None,
                    server_hostname=(server_name or address) if tls == "implicit" else None,
                    local_addr=local),
                connect_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise SmtpError(f"cannot connect to {address} port {port}: "
                            f"{_describe(exc)}") from None
        client = cls(reader, writer, command_timeout=command_timeout, data_timeout=data_timeout)
        client.tls = tls == "implicit"
        try:
            await client._open(helo, tls, context, server_name or address)
        except BaseException:
            client.close()
            raise
        return client

    async def _open(self, helo: str, tls: TlsMode, context: ssl.SSLContext,
                    server_name: str) -> None:
        # RFC 5321 §4.5.3.2.1: wait 5 minutes for the greeting.
        self.greeting = await self._reply()
        if self.greeting.code != 220:
            raise SmtpError(f"greeting: {self.greeting}", self.greeting)
        await self._hello(helo)
        if self.tls or tls == "none":
            return
        if "STARTTLS" not in self.extensions:
            if tls == "starttls":
                raise SmtpError("the server does not offer STARTTLS, which is required")
            return
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            if tls == "starttls":
                raise SmtpError(f"STARTTLS: {reply}", reply)
            return
        try:
            await asyncio.wait_for(
                self.writer.start_tls(context, server_hostname=server_name),
                self.command_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.broken = True
            raise SmtpError(f"TLS handshake failed: {_describe(exc)}") from None
        self.tls = True
        self.extensions = {}
        await self._hello(helo)  # RFC 3207 §4.2: forget what was learnt before TLS

    async def _hello(self, helo: str) -> None:
        reply = await self.command(f"EHLO {helo}")
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                self.extensions[keyword.upper()] = params
            return
        reply = await self.command(f"HELO {helo}")
        if reply.code != 250:
            raise SmtpError(f"HELO: {reply}", reply)
        self.extensions = {}

    @property
    def max_size(self) -> int:
        try:
            return int(self.extensions.get("SIZE", "0") or 0)
        except ValueError:
            return 0

    async def login(self, username: str, password: str) -> None:
        """AUTH PLAIN (RFC 4616), or LOGIN when that is all the server offers."""
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or not mechanisms:
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            reply = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN")
            for value in (username, password):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(value.encode()).decode())
        else:
            raise SmtpError(f"no usable AUTH mechanism among {mechanisms}")
        if reply.code != 235:
            raise SmtpError(f"AUTH: {reply}", reply)

    async def send(self, mail_from: str, rcpt_to: list[str], wire: bytes, *,
                   smtputf8: bool = False) -> Transaction:
        """One transaction: MAIL, RCPT for each recipient, DATA (pipelined when offered)."""
        if self._dirty:
            await self.command("RSET")
            self._dirty = False
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(wire)}")
        if "8BITMIME" in self.extensions and not wire.isascii():
            params.append("BODY=8BITMIME")
        if smtputf8:
            params.append("SMTPUTF8")
        mail_cmd = " ".join([f"MAIL FROM:<{mail_from}>", *params])
        rcpt_cmds = [f"RCPT TO:<{rcpt}>" for rcpt in rcpt_to]
        self._dirty = True
        if "PIPELINING" in self.extensions:
            # RFC 2920 §3.1: DATA may end the group; read every reply in order afterwards.
            await self._write("".join(f"{c}\r\n" for c in [mail_cmd, *rcpt_cmds, "DATA"]))
            transaction = Transaction(await self._reply())
            for rcpt in rcpt_to:
                transaction.rcpt[rcpt] = await self._reply()
            data_reply = await self._reply()
        else:
            transaction = Transaction(await self.command(mail_cmd))
            if not transaction.mail.ok:
                return transaction
            for rcpt, cmd in zip(rcpt_to, rcpt_cmds, strict=True):
                transaction.rcpt[rcpt] = await self.command(cmd)
            if not any(r.ok for r in transaction.rcpt.values()):
                return transaction
            data_reply = await self.command("DATA")
        accepted = transaction.mail.ok and any(r.ok for r in transaction.rcpt.values())
        if data_reply.code != 354:
            if accepted:
                transaction.data = data_reply
            return transaction
        if not accepted:
            # RFC 2920 §3.1: DATA was accepted though no recipient was; send an empty message
            # end so the server rejects the transaction.
            await self._write(".\r\n")
            await self._reply(self.data_timeout)
            return transaction
        self.writer.write(dot_stuff(wire))
        try:
            await asyncio.wait_for(self.writer.drain(), self.data_timeout)
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise SmtpError(f"sending the message failed: {_describe(exc)}") from None
        transaction.data = await self._reply(self.data_timeout)
        self._dirty = False
        return transaction

    async def noop(self) -> bool:
        try:
            return (await self.command("NOOP")).code == 250
        except SmtpError:
            return False

    async def quit(self) -> None:
        try:
            if not self.broken:
                await asyncio.wait_for(self.command("QUIT"), 5.0)
        except (SmtpError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        self.writer.close()

    async def command(self, line: str) -> Reply:
        await self._write(line + "\r\n")
        return await self._reply()

    async def _write(self, text: str) -> None:
        if self.broken:
            raise SmtpError("the connection is closed")
        self.writer.write(text.encode("utf-8"))
        try:
            await asyncio.wait_for(self.writer.drain(), self.command_timeout)
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise SmtpError(f"write failed: {_describe(exc)}") from None

    async def _reply(self, wait: float | None = None) -> Reply:
        lines: list[str] = []
        code = 0
        try:
            while True:
                raw = await asyncio.wait_for(self.reader.readline(),
                                             wait or self.command_timeout)
                if not raw.endswith(b"\n"):
                    raise SmtpError("the server closed the connection"
                                    + (f" after {lines[-1]!r}" if lines else ""))
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                    raise SmtpError(f"malformed reply {line[:100]!r}")
                this = int(line[:3])
                if lines and this != code:
                    raise SmtpError(f"reply codes differ within one reply: {line[:100]!r}")
                code = this
                lines.append(line[4:])
                if line[3:4] != "-":
                    return Reply(code, tuple(lines))
                if len(lines) > _MAX_REPLY_LINES:
                    raise SmtpError("reply too long")
        except SmtpError:
            self.broken = True
            raise
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            self.broken = True
            raise SmtpError(f"reading the reply failed: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
