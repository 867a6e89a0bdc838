"""Run a real `postroom serve` process against a real data directory, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and never handed out before in this test run.

    The kernel may give the same ephemeral port to two binds in a row once the first socket is
    closed; a server given one port for two listeners would fail to start.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def postroom_cmd() -> list[str]:
    return [sys.executable, "-m", "postroom.cli"]


@dataclass
class ServerProcess:
    data_dir: Path
    http_port: int = field(default_factory=free_port)
    pop3_port: int = field(default_factory=free_port)
    pop3s_port: int = field(default_factory=free_port)
    imap_port: int = field(default_factory=free_port)
    imaps_port: int = field(default_factory=free_port)
    smtp_port: int = field(default_factory=free_port)
    submission_port: int = field(default_factory=free_port)
    submissions_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        # Outbound delivery must never ask the machine's (non-loopback) resolver: unless a test
        # brings its own DNS, lookups go to a closed loopback port and fail at once.
        env["POSTROOM_DNS__SERVERS"] = "127.0.0.1:9"
        env.update(self.env)
        return env

    def cli(self, *args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """Run a management command against the same data dir, as an operator would."""
        result = subprocess.run(
            [*postroom_cmd(), "--data-dir", str(self.data_dir), *args],
            input=input, capture_output=True, text=True, env=self._env(), timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"postroom {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.http_port}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*postroom_cmd(), "--data-dir", str(self.data_dir), "serve",
             "--http", f"127.0.0.1:{self.http_port}", "--hostname", "mx.example.test",
             "--pop3", f"127.0.0.1:{self.pop3_port}", "--pop3s", f"127.0.0.1:{self.pop3s_port}",
             "--imap", f"127.0.0.1:{self.imap_port}", "--imaps", f"127.0.0.1:{self.imaps_port}",
             "--smtp", f"127.0.0.1:{self.smtp_port}",
             "--submission", f"127.0.0.1:{self.submission_port}",
             "--submissions", f"127.0.0.1:{self.submissions_port}",
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored signal {sig}:\n{self.log()}") from None
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextlib.contextmanager
def running_nodes(*nodes: ServerProcess, user: str, password: str,
                  domain: str = "example.test") -> Iterator[None]:
    """Nodes sharing their storage: the domain and the user made through the first, every node
    started in turn, and each one still running stopped at the end."""
    try:
        nodes[0].cli("domain", "add", domain)
        nodes[0].cli("user", "add", user, "--password", password)
        for node in nodes:
            node.start()
        yield
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


def message_to(rcpt: str, subject: str) -> bytes:
    """A plain message from carol@example.org with a unique Message-ID; its body names the
    subject."""
    return (f"From: Carol <carol@example.org>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 05 Mar 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\n"
            f"Body of {subject}.\r\n").encode()
