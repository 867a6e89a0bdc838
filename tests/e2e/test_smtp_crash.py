"""Durability: kill -9 the server while clients stream messages into the MX port, restart it,
and check that every message that got its 250 is in the mailbox exactly once."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess
from tests.e2e.smtp_helpers import api, subjects

ALICE = ("alice@example.test", "alice-secret-1")


def stream(port: int, prefix: str, acked: list[str], stop: threading.Event) -> None:
    """Send messages one after another until the server dies; note each one that got 250."""
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("streamer.test")
            while not stop.is_set():
                subject = f"{prefix}-{n}"
                body = (f"From: s@remote.test\r\nTo: {ALICE[0]}\r\nSubject: {subject}\r\n\r\n"
                        + "payload line\r\n" * 400).encode()
                s.sendmail("s@remote.test", [ALICE[0]], body)
                acked.append(subject)
                n += 1
    except (OSError, smtplib.SMTPException):
        return  # the server was killed mid-conversation


def test_sigkill_mid_stream_loses_nothing_acknowledged(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base: Path = tmp_path_factory.mktemp("crash")
    srv = ServerProcess(base / "data", env={"POSTROOM_AUTH__PLAINTEXT_ON_LOOPBACK": "false"})
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", ALICE[0], "--password", ALICE[1])
    srv.start()
    try:
        # With plaintext_on_loopback off, AUTH waits for TLS even from 127.0.0.1.
        with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
            s.ehlo("mua.test")
            assert not s.has_extn("auth")
            code, text = s.docmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQtMQ==")
            assert (code, text[:6]) == (538, b"5.7.11")

        acked: list[list[str]] = [[] for _ in range(4)]
        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(srv.smtp_port, f"m{i}", acked[i], stop))
                   for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while sum(map(len, acked)) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(15)
        sent = [subject for per_client in acked for subject in per_client]
        assert len(sent) >= 150, "the clients did not get far enough before the kill"

        srv.start()
        with api(srv, *ALICE) as alice:
            deadline = time.monotonic() + 60
            while True:
                counts = Counter(subjects(alice))
                missing = [s for s in sent if counts[s] == 0]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert not missing, f"{len(missing)} acknowledged messages lost: {missing[:5]}"
            duplicates = {s: c for s, c in counts.items() if c > 1}
            assert not duplicates, duplicates
    finally:
        srv.stop()
