"""The SMTP listeners: an asyncio server per address, with connection limits per client."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter

from postroom.config import Settings, parse_hostport
from postroom.listeners import ending_quietly
from postroom.service import MailService
from postroom.smtp.session import Mode, SessionConfig, SmtpSession

log = logging.getLogger(__name__)


class SmtpServer:
    """Accepts connections for one listener and runs a session on each."""

    def __init__(self, service: MailService, config: SessionConfig) -> None:
        self.service = service
        self.config = config
        self.per_ip: Counter[str] = Counter()
        self.total = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else ""
        limits = self.config.limits
        if self.per_ip[ip] >= limits.connections_per_ip or self.total >= limits.max_connections:
            writer.write(b"421 4.7.0 Too many connections from your address, try again later\r\n")
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (OSError, TimeoutError):
                pass
            writer.close()
            return
        self.per_ip[ip] += 1
        self.total += 1
        try:
            await SmtpSession(self.service, self.config, reader, writer).run()
        finally:
            self.total -= 1
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]


async def start_smtp_listener(
    service: MailService,
    settings: Settings,
    mode: Mode,
    address: str,
    *,
    implicit_tls: bool = False,
    tls_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen on address; STARTTLS is offered when a TLS context is given (and not implicit)."""
    host, port = parse_hostport(address)
    config = SessionConfig(
        mode=mode,
        hostname=settings.hostname,
        max_size=settings.mail.max_message_bytes,
        limits=settings.smtp,
        tls_context=None if implicit_tls else tls_context,
        plaintext_on_loopback=settings.auth.plaintext_on_loopback,
    )
    server = SmtpServer(service, config)
    listener = await asyncio.start_server(
        ending_quietly(server.handle), host, port, ssl=tls_context if implicit_tls else None,
        limit=1024 * 1024, reuse_address=True,
    )
    log.info("SMTP %s%s listening on %s:%d", mode.value, " (TLS)" if implicit_tls else "",
             host, port)
    return listener
