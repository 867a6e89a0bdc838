"""Start an IMAP listener: `imap` (plaintext with STARTTLS) or `imaps` (implicit TLS)."""

from __future__ import annotations

import asyncio
import logging

from postroom.app import Postroom
from postroom.config import parse_hostport
from postroom.imap.hub import hub_for
from postroom.imap.mime import StructureCache
from postroom.imap.session import ImapSession, Limits
from postroom.listeners import ending_quietly
from postroom.tls import server_context

log = logging.getLogger(__name__)

_STRUCTURES: dict[int, StructureCache] = {}


async def start_imap(node: Postroom, address: str, *, implicit_tls: bool) -> asyncio.Server:
    """Listen on `address` (HOST:PORT); every connection runs an ImapSession over node.service."""
    settings = node.settings
    host, port = parse_hostport(address)
    context = server_context(settings)
    hub = hub_for(node.events)
    hub.start()
    structures = _STRUCTURES.setdefault(id(node), StructureCache())
    imap = settings.imap
    limits = Limits(
        max_line=imap.max_line_length,
        max_literal=settings.mail.max_message_bytes,
        commands_per_second=imap.commands_per_second,
        idle_timeout=imap.idle_timeout,
        connections_per_user=imap.connections_per_user,
    )
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if imap.max_connections and active >= imap.max_connections:
            writer.write(b"* BYE too many connections; try again later\r\n")
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (OSError, TimeoutError):
                pass
            writer.close()
            return
        active += 1
        try:
            session = ImapSession(
                node.service, hub, reader, writer,
                tls_context=None if implicit_tls else context, tls_active=implicit_tls,
                plaintext_on_loopback=settings.auth.plaintext_on_loopback,
                limits=limits, structures=structures,
            )
            await session.run()
        finally:
            active -= 1

    server = await asyncio.start_server(
        ending_quietly(handle), host, port, limit=max(imap.max_line_length, 65536) + 1024,
        ssl=context if implicit_tls else None,
        ssl_handshake_timeout=30 if implicit_tls else None,
        reuse_address=True, reuse_port=imap.reuse_port or None, backlog=4096,
    )
    log.info("IMAP%s listening on %s:%d", "S" if implicit_tls else "", host, port)
    return server
