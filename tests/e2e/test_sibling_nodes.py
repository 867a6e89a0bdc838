"""Two `postroom serve` processes on one data dir (SQLite + files), their events and cache
through `siblings:///DIR` (Unix datagram sockets and a shared memory map): the way to use more
than one core of one machine without Redis.

Node A runs every role; node B runs `--roles http,imap`. Mail that A takes in over SMTP wakes
an IMAP IDLE on B; a flag change made over IMAP on A shows in B's very next (cached) API
listing and in B's IMAP session; and when A is killed, B goes on, its messages to A's socket
answered by removing the dead process's file.
"""

from __future__ import annotations

import signal
import smtplib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.imap_helpers import RawImap, idle_wakes, quote
from tests.e2e.server import ServerProcess, message_to, running_nodes

ALICE = "alice@example.test"


@dataclass
class Pair:
    node_a: ServerProcess
    node_b: ServerProcess
    sockets: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    data = tmp_path_factory.mktemp("siblings") / "data"
    sockets = data / "siblings"
    env = {"POSTROOM_STORAGE__EVENTS": f"siblings://{sockets}",
           "POSTROOM_STORAGE__CACHE": f"siblings://{sockets}",
           "POSTROOM_SPAM__ENABLED": "false"}
    node_a = ServerProcess(data, env=env)
    node_b = ServerProcess(data, env=env, extra_args=["--roles", "http,imap"])
    with running_nodes(node_a, node_b, user=ALICE, password=PASSWORD_A):
        yield Pair(node_a, node_b, sockets)


def _send(node: ServerProcess, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [ALICE], message_to(ALICE, subject))


def _listed(api: httpx.Client) -> dict[str, Any]:
    page = api.get("/v1/folders/INBOX/messages", params={"limit": 50})
    assert page.status_code == 200, page.text
    return {m["subject"]: m for m in page.json()["messages"]}


def test_both_processes_joined_the_group(pair: Pair) -> None:
    members = sorted(p.name for p in pair.sockets.iterdir() if not p.name.startswith("."))
    assert len(members) == 2
    assert {name.split("-")[0] for name in members} == {
        str(pair.node_a.proc.pid), str(pair.node_b.proc.pid)}  # type: ignore[union-attr]


def test_idle_on_b_wakes_for_mail_taken_by_a(pair: Pair) -> None:
    idle_wakes(pair.node_b.imap_port, ALICE, PASSWORD_A,
               lambda: _send(pair.node_a, f"idle {uuid.uuid4().hex[:8]}"), exact=True)


def test_a_change_on_a_shows_on_b_at_once(pair: Pair) -> None:
    """B's API caches the listing; B's IMAP session has the folder selected. A STORE over IMAP
    on A must show in B's very next listing, with no waiting, and reach B's session."""
    subject = f"flags {uuid.uuid4().hex[:8]}"
    _send(pair.node_a, subject)
    with httpx.Client(base_url=pair.node_b.base_url, auth=(ALICE, PASSWORD_A),
                      timeout=30) as api:
        deadline = time.monotonic() + 30
        while subject not in _listed(api):
            assert time.monotonic() < deadline, "never delivered"
            time.sleep(0.1)
        watcher = RawImap(pair.node_b.imap_port)
        watcher.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
        watcher.ok("SELECT INBOX")
        raw = RawImap(pair.node_a.imap_port)
        raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
        raw.ok("SELECT INBOX")
        search = raw.ok(f"UID SEARCH SUBJECT {quote(subject)}")
        uid = next(u for u in search if u.startswith(b"* SEARCH")).split()[-1].decode()
        for _ in range(5):  # each round: B has the listing cached, A changes it, B lists
            assert "\\Seen" not in _listed(api)[subject]["flags"]
            raw.ok(f"UID STORE {uid} +FLAGS (\\Seen \\Flagged)")
            assert set(_listed(api)[subject]["flags"]) >= {"\\Seen", "\\Flagged"}
            raw.ok(f"UID STORE {uid} -FLAGS (\\Seen \\Flagged)")
        assert "\\Seen" not in _listed(api)[subject]["flags"]
        raw.ok(f"UID STORE {uid} +FLAGS (\\Answered)")
        deadline = time.monotonic() + 5
        while True:  # B's session hears of it through the bus, told at its next command
            told = [u for u in watcher.ok("NOOP") if b"FETCH" in u and b"\\Answered" in u]
            if told or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert told, "B's IMAP session was not told of A's change"
        raw.ok("LOGOUT")
        watcher.ok("LOGOUT")


def test_b_goes_on_when_a_is_killed(pair: Pair) -> None:
    node_a = pair.node_a
    assert node_a.proc is not None
    name = next(p.name for p in pair.sockets.iterdir()
                if p.name.startswith(f"{node_a.proc.pid}-"))
    node_a.stop(signal.SIGKILL)
    assert (pair.sockets / name).exists()  # a killed process leaves its socket file
    raw = RawImap(pair.node_b.imap_port)
    raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
    raw.ok("SELECT INBOX")
    message = message_to(ALICE, "after")
    raw.ok(b"APPEND INBOX {%d+}\r\n%b" % (len(message), message))
    raw.ok("LOGOUT")
    assert not (pair.sockets / name).exists()  # B's event to it was refused: file removed
    with httpx.Client(base_url=pair.node_b.base_url, auth=(ALICE, PASSWORD_A),
                      timeout=30) as api:
        assert "after" in _listed(api)


def test_the_default_lets_the_cli_reach_a_running_server(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With the default configuration, mail that `postroom import` files while the server runs
    wakes the server's IDLE sessions and shows in its (cached) listings at once."""
    server = ServerProcess(tmp_path_factory.mktemp("default") / "data")
    server.cli("domain", "add", "example.test")
    server.cli("user", "add", ALICE, "--password", PASSWORD_A)
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, auth=(ALICE, PASSWORD_A),
                          timeout=30) as api:
            assert _listed(api) == {}  # now cached, empty
            raw = RawImap(server.imap_port)
            raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
            raw.ok("SELECT INBOX")
            tag = raw.tag()
            raw.send(f"{tag} IDLE\r\n".encode())
            assert raw.line().startswith(b"+")
            mbox = server.data_dir.parent / "old.mbox"
            mbox.write_bytes(b"From carol@example.org Tue Mar  5 10:00:00 2024\n"
                             + message_to(ALICE, "imported").replace(b"\r\n", b"\n"))
            server.cli("import", "mbox", str(mbox), "--user", ALICE)
            raw.sock.settimeout(10)
            assert raw.line() == b"* 1 EXISTS"  # woken by the CLI's process
            raw.send(b"DONE\r\n")
            raw.until(tag)
            raw.ok("LOGOUT")
            assert list(_listed(api)) == ["imported"]  # the cached listing was dropped
    finally:
        server.stop()
