"""Start a POP3 listener: `pop3` (plaintext with STLS, RFC 2595) or `pop3s` (implicit TLS)."""

from __future__ import annotations

import asyncio
import logging

from postroom.app import Postroom
from postroom.config import parse_hostport
from postroom.listeners import ending_quietly
from postroom.pop3.limits import limits_for
from postroom.pop3.locks import locks_for
from postroom.pop3.session import MAX_LINE, Pop3Session
from postroom.tls import server_context

log = logging.getLogger(__name__)


async def start_pop3(node: Postroom, address: str, *, implicit_tls: bool) -> asyncio.Server:
    """Listen on `address` (HOST:PORT); every connection runs a Pop3Session over node.service."""
    settings = node.settings
    host, port = parse_hostport(address)
    context = server_context(settings)
    locks = locks_for(node.service)
    limits = limits_for(node.service, settings.pop3.max_connections,
                        settings.pop3.max_connections_per_ip)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        refused = limits.admit(client)
        if refused:
            log.warning("POP3 connection from %s refused: %s", client, refused)
            try:
                writer.write(f"-ERR [SYS/TEMP] {refused}\r\n".encode())
                await writer.drain()
                writer.close()
            except (OSError, ConnectionError):
                pass
            return
        try:
            await _serve(reader, writer)
        finally:
            limits.release(client)

    async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Pop3Session(
            node.service, locks, reader, writer,
            tls_context=context, tls_active=implicit_tls,
            plaintext_on_loopback=settings.auth.plaintext_on_loopback,
            delete_action=settings.pop3.delete_action,
            idle_timeout=settings.pop3.idle_timeout,
        )
        await session.run()

    server = await asyncio.start_server(
        ending_quietly(handle), host, port, limit=MAX_LINE,
        ssl=context if implicit_tls else None,
        ssl_handshake_timeout=30 if implicit_tls else None,
    )
    log.info("POP3%s listening on %s:%d", "S" if implicit_tls else "", host, port)
    return server
