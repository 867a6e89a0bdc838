"""The POP3 session in process, over a real MailService (SQLite, blob directory) and real
sockets: the settings-dependent paths and the races that a client alone cannot produce."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import Envelope, FolderRole, User
from postroom.pop3.server import start_pop3
from postroom.pop3.wire import crlf_size

PASSWORD = "pop3-unit-secret"
ADDRESS = "carol@example.test"
MESSAGES = [
    b"From: a@example.org\r\nSubject: one\r\n\r\nfirst\r\n",
    b"From: a@example.org\nSubject: bare LF\n\n.dot\nsecond\n",
    b"From: a@example.org\r\nSubject: three\r\n\r\nthird\r\n",
]


class Client:
    """A minimal POP3 client on asyncio streams, to send exactly the bytes a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def line(self) -> str:
        data = await asyncio.wait_for(self.reader.readline(), 10)
        return data.decode().rstrip("\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, text: str) -> str:
        await self.send(text.encode() + b"\r\n")
        return await self.line()

    async def body(self) -> bytes:
        out = bytearray()
        while True:
            data = await asyncio.wait_for(self.reader.readline(), 10)
            if data == b".\r\n":
                return bytes(out)
            out += data[1:] if data.startswith(b".") else data

    async def login(self) -> str:
        assert (await self.cmd(f"USER {ADDRESS}")).startswith("+OK")
        return await self.cmd(f"PASS {PASSWORD}")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


Connect = Callable[..., Awaitable[Client]]


async def make_node(tmp_path: Path, **overrides: Any) -> tuple[Postroom, User]:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), hostname="mx.example.test",
                             **overrides)
    node = Postroom(settings)
    await node.open()
    await node.service.add_domain("example.test")
    user = await node.service.add_user(ADDRESS, PASSWORD)
    for raw in MESSAGES:
        await node.service.deliver(Envelope("a@example.org", (ADDRESS,)), raw)
    return node, user


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest_asyncio.fixture
async def pop3(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Postroom, User,
                                                                              Connect]]]]:
    """Start a node with settings overrides and a pop3 listener on a free port."""
    nodes: list[Postroom] = []
    servers: list[asyncio.Server] = []
    clients: list[Client] = []

    async def start(**overrides: Any) -> tuple[Postroom, User, Connect]:
        node, user = await make_node(tmp_path, **overrides)
        nodes.append(node)
        server = await start_pop3(node, "127.0.0.1:0", implicit_tls=False)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]

        async def connect() -> Client:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = Client(reader, writer)
            clients.append(client)
            assert (await client.line()).startswith("+OK")
            return client

        return node, user, connect

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    for node in nodes:
        await node.close()


async def test_plaintext_login_needs_tls_when_loopback_is_not_trusted(pop3: Any) -> None:
    _, _, connect = await pop3(**{"auth.plaintext_on_loopback": False})
    c = await connect()
    assert await c.cmd("CAPA") == "+OK capability list follows"
    caps = (await c.body()).decode().split("\r\n")
    assert "STLS" in caps and "USER" not in caps and "SASL PLAIN" not in caps
    assert (await c.cmd(f"USER {ADDRESS}")).startswith("-ERR [AUTH]")
    assert (await c.cmd("AUTH PLAIN AGNhcm9sAHB3")).startswith("-ERR [AUTH]")
    assert await c.cmd("STLS") == "+OK begin TLS negotiation"
    await c.writer.start_tls(client_tls(), server_hostname="localhost")
    assert await c.cmd("CAPA") == "+OK capability list follows"
    caps = (await c.body()).decode().split("\r\n")
    assert "USER" in caps and "SASL PLAIN" in caps and "STLS" not in caps
    assert (await c.cmd("STLS")) == "-ERR already using TLS"
    assert (await c.login()).startswith("+OK maildrop has 3 messages")


async def test_commands_pipelined_after_stls_are_discarded(pop3: Any) -> None:
    _, _, connect = await pop3()
    c = await connect()
    await c.send(f"STLS\r\nUSER {ADDRESS}\r\nPASS {PASSWORD}\r\n".encode())
    assert await c.line() == "+OK begin TLS negotiation"
    await c.writer.start_tls(client_tls(), server_hostname="localhost")
    # Had the injected USER/PASS been read after the handshake, STAT would now succeed.
    assert (await c.cmd("STAT")).startswith("-ERR STAT is not valid in the AUTHORIZATION")


async def test_pipelined_commands_get_their_responses_in_order(pop3: Any) -> None:
    _, _, connect = await pop3()
    c = await connect()
    await c.send(f"USER {ADDRESS}\r\nPASS {PASSWORD}\r\nSTAT\r\nLIST\r\nUIDL 2\r\nBOGUS\r\n"
                 "NOOP\r\nRETR 2\r\n".encode())
    assert (await c.line()).startswith("+OK")
    assert (await c.line()).startswith("+OK maildrop has 3")
    sizes = [crlf_size(m) for m in MESSAGES]
    assert await c.line() == f"+OK 3 {sum(sizes)}"
    assert (await c.line()).startswith("+OK 3 messages")
    assert await c.body() == b"".join(f"{i + 1} {s}\r\n".encode() for i, s in enumerate(sizes))
    assert (await c.line()).startswith("+OK 2 ")
    assert await c.line() == "-ERR unknown command BOGUS"
    assert await c.line() == "+OK"
    # A message stored with bare LF goes out as CRLF lines; its size counts those.
    assert await c.line() == f"+OK {sizes[1]} octets"
    assert await c.body() == MESSAGES[1].replace(b"\n", b"\r\n")


async def test_trash_delete_action_moves_to_trash(pop3: Any) -> None:
    node, user, connect = await pop3(**{"pop3.delete_action": "trash"})
    c = await connect()
    await c.login()
    assert (await c.cmd("UIDL 1")).startswith("+OK 1 ")
    uid = (await c.cmd("UIDL 1")).split()[2]
    assert await c.cmd("DELE 1") == "+OK message 1 deleted"
    assert (await c.cmd("QUIT")).startswith("+OK")
    record = await node.service.get_message(user, uid)
    trash = await node.service.folder_by_role(user, FolderRole.TRASH)
    assert record.folder_id == trash.folder_id
    again = await connect()
    assert (await again.login()).startswith("+OK maildrop has 2 messages")


async def test_dele_leaves_a_message_another_client_moved_meanwhile(pop3: Any) -> None:
    node, user, connect = await pop3()
    c = await connect()
    await c.login()
    moved_id = (await c.cmd("UIDL 1")).split()[2]
    gone_id = (await c.cmd("UIDL 2")).split()[2]
    await c.cmd("DELE 1")
    await c.cmd("DELE 2")
    archive = await node.service.folder_by_role(user, FolderRole.ARCHIVE)
    await node.service.move(user, [moved_id], archive.folder_id)  # an IMAP client, say
    assert (await c.cmd("QUIT")).startswith("+OK")
    assert (await node.service.get_message(user, moved_id)).folder_id == archive.folder_id
    snapshot = await node.service.mailbox_snapshot(user)
    assert [m.message_id for m in snapshot.messages if m.message_id == gone_id] == []
    assert len(snapshot.messages) == 1


async def test_message_whose_bytes_are_gone_gets_err(pop3: Any) -> None:
    node, user, connect = await pop3()
    c = await connect()
    await c.login()
    uid = (await c.cmd("UIDL 3")).split()[2]
    record = await node.service.get_message(user, uid)
    await node.blobs.delete(record.blob_hash)
    assert (await c.cmd("RETR 3")) == "-ERR message 3 was removed by another client"
    assert (await c.cmd("TOP 3 0")) == "-ERR message 3 was removed by another client"
    assert (await c.cmd("RETR 1")).startswith("+OK")
    assert await c.body() == MESSAGES[0]


async def test_autologout_deletes_nothing(pop3: Any) -> None:
    node, user, connect = await pop3(**{"pop3.idle_timeout": 0.3})
    c = await connect()
    await c.login()
    await c.cmd("DELE 1")
    assert (await c.line()).startswith("-ERR autologout")
    assert await c.reader.read() == b""
    await asyncio.sleep(0.05)
    assert len((await node.service.mailbox_snapshot(user)).messages) == 3
    again = await connect()  # and the maildrop lock was released
    assert (await again.login()).startswith("+OK maildrop has 3")


async def test_sasl_continuation_is_bounded_in_time_and_length(pop3: Any) -> None:
    _, _, connect = await pop3(**{"pop3.idle_timeout": 0.5})
    c = await connect()
    assert await c.cmd("AUTH PLAIN") == "+ "
    assert await c.cmd("A" * 5000) == "-ERR line too long (at most 4096 octets)"
    assert await c.cmd("NOOP") == "-ERR NOOP is not valid in the AUTHORIZATION state"
    assert await c.cmd("AUTH PLAIN") == "+ "
    assert (await c.line()).startswith("-ERR autologout")  # no answer to the challenge
    assert await c.reader.read() == b""
