"""Starts the protocol listeners (SMTP, IMAP, POP3) that the settings enable.

Each protocol package exposes a `start_*` coroutine returning its asyncio server; a listener whose
address is empty in `[listeners]` is not started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from postroom.app import Postroom
from postroom.config import ConfigError

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

PROTOCOLS = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
# The node role (`postroom serve --roles`, config.ROLES) each listener belongs to.
LISTENER_ROLE = {"smtp": "smtp", "submission": "submission", "submissions": "submission",
                 "imap": "imap", "imaps": "imap", "pop3": "pop3", "pop3s": "pop3"}


def ending_quietly(handle: ConnectionHandler) -> ConnectionHandler:
    """A listener's connection handler that ends normally when the node stops under it.

    On shutdown the runner cancels the handlers of connections still open; Python 3.11's
    stream protocol then asks the cancelled task for its exception, which raises, and asyncio
    logs a traceback as an ERROR for every such connection. The connection is closed either
    way; the handler's own `finally` blocks have run."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except asyncio.CancelledError:
            writer.close()

    return run


async def start_listeners(
    node: Postroom, roles: frozenset[str] | None = None
) -> list[asyncio.Server]:
    """Start the configured listeners of the given roles (all when None)."""
    settings = node.settings
    servers: list[asyncio.Server] = []
    for name in PROTOCOLS:
        address = getattr(settings.listeners, name)
        if not address or (roles is not None and LISTENER_ROLE[name] not in roles):
            continue
        if name in ("imap", "imaps"):
            from postroom.imap.server import start_imap

            servers.append(await start_imap(node, address, implicit_tls=name == "imaps"))
            await node.analysis.start()  # the processes that parse what APPEND stores
            continue
        if name in ("pop3", "pop3s"):
            from postroom.pop3.server import start_pop3

            servers.append(await start_pop3(node, address, implicit_tls=name == "pop3s"))
            continue
        if name in ("smtp", "submission", "submissions"):
            from postroom.smtp.server import start_smtp_listener
            from postroom.smtp.session import Mode
            from postroom.tls import server_context

            servers.append(await start_smtp_listener(
                node.service, settings, Mode.MX if name == "smtp" else Mode.SUBMISSION,
                address, implicit_tls=name == "submissions", tls_context=server_context(settings),
            ))
            if name == "smtp":
                await node.analysis.start()  # the processes that parse and score its mail
            continue
        raise ConfigError(f"the {name} listener is not available in this version")
    return servers
