"""Outbound durability: kill -9 a `postroom serve` while it streams outgoing mail to a second
Postroom, restart it, and check every message submitted arrives at least once (a duplicate is
allowed, a loss is not), and that an item held by a delivery at the kill is due again within
the short outgoing lease instead of half an hour later.

    127.0.0.1      the sending Postroom (a.test) and dnsmasq
    127.0.0.2:P    the receiving Postroom (b.test)
    127.0.0.5:P    a peer in this test that stalls in DATA until told to answer (slow.test)
"""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.outbound_peers import Dnsmasq, shared_port, wait_port
from tests.e2e.server import ServerProcess
from tests.e2e.smtp_helpers import api, folder_messages

ALICE = ("alice@a.test", "alice-secret-1")
BOB = ("bob@b.test", "bob-secret-22")
LEASE = 2.0


class StallingPeer:
    """An MTA that reads DATA and answers only once `answer` is set (then 250)."""

    def __init__(self, address: str, port: int) -> None:
        self.answer = threading.Event()
        self.data_seen = threading.Event()
        self.accepted: list[float] = []  # monotonic times of each 250 after DATA
        self.sock = socket.create_server((address, port))
        self.sock.settimeout(0.5)
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            try:
                conn.sendall(b"220 slow.test ESMTP\r\n")
                while line := rfile.readline():
                    verb = line.strip().upper()
                    if verb.startswith(b"EHLO"):
                        conn.sendall(b"250-slow.test\r\n250 8BITMIME\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        while rfile.readline() not in (b".\r\n", b""):
                            pass
                        self.data_seen.set()
                        while not self.answer.wait(0.2):
                            if self.closed:
                                return
                        self.accepted.append(time.monotonic())
                        conn.sendall(b"250 2.0.0 taken\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")
            except OSError:
                return  # the sender was killed mid-session

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def stream(port: int, sent: list[str], stop: threading.Event) -> None:
    """Submit messages one after another until the server dies; note each one accepted."""
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("mua.test")
            s.login(*ALICE)
            while not stop.is_set():
                subject = f"crash-{n}"
                s.sendmail(ALICE[0], [BOB[0]], (f"From: {ALICE[0]}\r\nTo: {BOB[0]}\r\n"
                                                f"Subject: {subject}\r\n\r\nhello\r\n").encode())
                sent.append(subject)
                n += 1
                time.sleep(0.01)
    except (OSError, smtplib.SMTPException):
        return


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess, StallingPeer]]:
    port = shared_port(["127.0.0.2", "127.0.0.5"])
    dns = Dnsmasq(tmp_path, mx=[("b.test", "mx.b.test", 10), ("slow.test", "mx.slow.test", 10)],
                  hosts=[("mx.b.test", "127.0.0.2"), ("mx.slow.test", "127.0.0.5")])
    dns.start()
    env = {"POSTROOM_DNS__SERVERS": f"127.0.0.1:{dns.port}",
           "POSTROOM_DELIVERY__PORT": str(port), "POSTROOM_DELIVERY__SCHEDULE": "1s",
           "POSTROOM_DELIVERY__LEASE": f"{LEASE}s", "POSTROOM_SPAM__ENABLED": "false"}
    sender = ServerProcess(tmp_path / "sender", env=dict(env),
                           extra_args=["--hostname", "mx.a.test"])
    sender.cli("domain", "add", "a.test")
    sender.cli("user", "add", ALICE[0], "--password", ALICE[1])
    receiver = ServerProcess(tmp_path / "receiver", env=dict(env),
                             extra_args=["--hostname", "mx.b.test", "--smtp",
                                         f"127.0.0.2:{port}"])
    receiver.cli("domain", "add", "b.test")
    receiver.cli("user", "add", BOB[0], "--password", BOB[1])
    slow = StallingPeer("127.0.0.5", port)
    started: list[ServerProcess] = []
    try:
        for server in (receiver, sender):
            server.start()
            started.append(server)
        wait_port("127.0.0.2", port)
        yield sender, receiver, slow
    finally:
        slow.close()
        for server in reversed(started):
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
        dns.stop()


def arrived(receiver: ServerProcess) -> Counter[str]:
    with api(receiver, *BOB) as bob:
        return Counter(m["subject"] for folder in ("INBOX", "Junk")
                       for m in folder_messages(bob, folder))


def test_sigkill_mid_delivery_loses_nothing_and_retries_promptly(
        parts: tuple[ServerProcess, ServerProcess, StallingPeer]) -> None:
    sender, receiver, slow = parts
    # One message that a delivery worker holds at the kill: the peer stalls after its DATA.
    with smtplib.SMTP("127.0.0.1", sender.submission_port, timeout=10) as s:
        s.login(*ALICE)
        s.sendmail(ALICE[0], ["x@slow.test"],
                   f"From: {ALICE[0]}\r\nTo: x@slow.test\r\nSubject: stalled\r\n\r\nhi\r\n"
                   .encode())
    assert slow.data_seen.wait(30), sender.log()

    sent: list[str] = []
    stop = threading.Event()
    streamer = threading.Thread(target=stream, args=(sender.submission_port, sent, stop))
    streamer.start()
    deadline = time.monotonic() + 30
    while (len(sent) < 60 or sum(arrived(receiver).values()) < 10) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    sender.stop(signal.SIGKILL)  # mid-stream: deliveries in flight, items leased
    stop.set()
    streamer.join(15)
    assert len(sent) >= 60 and sum(arrived(receiver).values()) >= 10, "too little went on"
    slow.answer.set()  # the stalled peer now answers, but the session it held is gone

    restarted = time.monotonic()
    sender.start()
    deadline = restarted + 90
    while True:
        counts = arrived(receiver)
        missing = [s for s in sent if counts[s] == 0]
        if (not missing and slow.accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert not missing, f"{len(missing)} of {len(sent)} submitted messages lost: {missing[:5]}"
    # The item leased at the kill came back within a few leases (the old lease: 30 minutes).
    assert slow.accepted and slow.accepted[0] - restarted < 30 * LEASE, sender.log()
    out = sender.cli("queue", "list", "--topic", "outgoing", "--json").stdout.strip()
    deadline = time.monotonic() + 30
    while out not in ("[]", "") and time.monotonic() < deadline:
        time.sleep(0.3)
        out = sender.cli("queue", "list", "--topic", "outgoing", "--json").stdout.strip()
    assert out in ("[]", ""), out
