"""`[delivery] source_address`: outbound SMTP connections leave from the configured local IP."""

from __future__ import annotations

import asyncio

from postroom.mailflow.smtp_client import SmtpClient


async def test_connection_leaves_from_source_address() -> None:
    peers: list[str] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.write(b"220 peer.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250-peer.test\r\n250 8BITMIME\r\n")
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for source, seen in (("127.0.0.7", "127.0.0.7"), ("", "127.0.0.1")):
            client = await SmtpClient.connect("127.0.0.1", port, helo="mx.example.test",
                                              tls="none", source_address=source)
            await client.quit()
            assert peers[-1] == seen
    finally:
        server.close()
        await server.wait_closed()
