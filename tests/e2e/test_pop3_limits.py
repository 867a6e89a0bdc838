"""POP3 connection limits against a real `postroom serve`: per client address and in all, with
`-ERR [SYS/TEMP]` (RFC 3206) to the connection over the limit, and slots freed at QUIT."""

from __future__ import annotations

import poplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess
from tests.e2e.test_pop3 import Pop3From


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("pop3-limits")
    server = ServerProcess(base / "data", env={"POSTROOM_POP3__MAX_CONNECTIONS": "3",
                                               "POSTROOM_POP3__MAX_CONNECTIONS_PER_IP": "2"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connect(server: ServerProcess, source: str) -> poplib.POP3:
    return Pop3From("127.0.0.1", server.pop3_port, source)


def connect_soon(server: ServerProcess, source: str) -> poplib.POP3:
    """Connect once the server has ended a session just quit (it frees the slot after +OK)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return connect(server, source)
        except poplib.error_proto:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def refused(server: ServerProcess, source: str) -> str:
    with pytest.raises(poplib.error_proto) as exc:
        connect(server, source)
    return str(exc.value.args[0], "utf-8", "replace")


def test_per_address_and_total_limits(limited: ServerProcess) -> None:
    first = [connect(limited, "127.0.0.1"), connect(limited, "127.0.0.1")]
    try:
        assert refused(limited, "127.0.0.1").startswith("-ERR [SYS/TEMP] too many connections")
        other = connect(limited, "127.0.0.2")  # another address still gets in
        try:
            assert refused(limited, "127.0.0.3").startswith("-ERR [SYS/TEMP]")  # total of 3
            assert "UIDL" in other.capa()  # the sessions admitted are unaffected
        finally:
            other.quit()
        third = connect_soon(limited, "127.0.0.3")  # a slot was freed at QUIT
        assert "UIDL" in third.capa()
        third.quit()
    finally:
        for conn in first:
            conn.quit()
    again = connect_soon(limited, "127.0.0.1")
    assert "UIDL" in again.capa()
    again.quit()
