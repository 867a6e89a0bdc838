"""IMAP's limits on a server configured with small ones: the autologout timer (IDLE exempt, RFC
3501 §5.4), connections per user and commands per second, each refused in the protocol while
the server and the other sessions carry on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.imap_helpers import RawImap, quote
from tests.e2e.server import ServerProcess

ALICE = "alice@example.test"
IDLE_TIMEOUT = 3.0
CONNECTIONS_PER_USER = 3
COMMANDS_PER_SECOND = 20


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("postroom-limits")
    srv = ServerProcess(base / "data", env={
        "POSTROOM_IMAP__IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "POSTROOM_IMAP__CONNECTIONS_PER_USER": str(CONNECTIONS_PER_USER),
        "POSTROOM_IMAP__COMMANDS_PER_SECOND": str(COMMANDS_PER_SECOND),
    })
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", ALICE, "--password", PASSWORD_A)
    srv.start()
    yield srv
    srv.stop()


def _login(server: ServerProcess) -> RawImap:
    raw = RawImap(server.imap_port)
    raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
    return raw


def test_a_silent_session_is_logged_out_but_an_idling_one_is_not(limited: ServerProcess) -> None:
    silent = _login(limited)
    idling = _login(limited)
    idling.ok("SELECT INBOX")
    idling.send(b"i1 IDLE\r\n")
    assert idling.line().startswith(b"+")
    started = time.monotonic()
    bye = silent.line()
    assert bye.startswith(b"* BYE") and b"idle" in bye.lower(), bye
    assert time.monotonic() - started < IDLE_TIMEOUT + 5
    assert silent.closed()
    time.sleep(IDLE_TIMEOUT + 0.5)  # the IDLE outlives the autologout time
    idling.send(b"DONE\r\n")
    _, tagged = idling.until("i1")
    assert tagged.startswith(b"OK"), tagged
    idling.ok("NOOP")
    idling.ok("LOGOUT")


def test_the_autologout_timer_counts_from_the_last_command(limited: ServerProcess) -> None:
    """A client that speaks now and then outlives the autologout time in total, and is logged
    out once it falls silent, a literal it announced and never sent counting as silence."""
    talking = _login(limited)
    started = time.monotonic()
    while time.monotonic() - started < IDLE_TIMEOUT * 1.6:
        talking.ok("NOOP")
        time.sleep(IDLE_TIMEOUT / 4)
    talking.ok("NOOP")
    silent_from = time.monotonic()  # the wait for the next command begins
    talking.send(b"a1 APPEND INBOX {10}\r\n")
    assert talking.line().startswith(b"+")
    bye = talking.line()
    assert bye.startswith(b"* BYE") and b"idle" in bye.lower(), bye
    assert IDLE_TIMEOUT - 0.5 < time.monotonic() - silent_from < IDLE_TIMEOUT + 5
    assert talking.closed()


def test_connections_per_user(limited: ServerProcess) -> None:
    sessions = [_login(limited) for _ in range(CONNECTIONS_PER_USER)]
    extra = RawImap(limited.imap_port)
    _, tagged = extra.command(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
    assert tagged.startswith(b"NO [LIMIT]"), tagged
    sessions.pop().ok("LOGOUT")
    deadline = time.monotonic() + 10
    while True:  # the server counts the connection gone once it has closed it
        _, tagged = extra.command(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
        if tagged.startswith(b"OK") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert tagged.startswith(b"OK"), tagged
    extra.ok("NOOP")
    for raw in [*sessions, extra]:
        raw.ok("LOGOUT")


def test_commands_per_second(limited: ServerProcess) -> None:
    raw = _login(limited)
    burst = COMMANDS_PER_SECOND * 3
    raw.send(b"".join(b"n%d NOOP\r\n" % n for n in range(burst)))
    answers = [raw.until(f"n{n}")[1] for n in range(burst)]
    refused = [a for a in answers if a.startswith(b"NO [LIMIT]")]
    assert refused and len(refused) <= burst - COMMANDS_PER_SECOND + 1, answers
    assert all(a.startswith(b"OK") or a.startswith(b"NO [LIMIT]") for a in answers)
    time.sleep(1.1)
    raw.ok("NOOP")  # a new second: the session carries on
    raw.ok("LOGOUT")
