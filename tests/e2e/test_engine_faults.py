"""A running `postroom serve` on the scale-out engines while each engine is restarted mid-load.

The engines are throwaway ones of this test's own (never the machine's shared services): a
PostgreSQL cluster made with initdb and run as the postgres user, a nats-server with JetStream,
a redis-server; blobs on the session's SeaweedFS. Senders stream mail over SMTP the whole time.
While an engine is down:

- PostgreSQL (metadata): SMTP answers 451 4.3.0 at RCPT, IMAP answers NO [UNAVAILABLE], the
  REST API 503 with a JSON error body;
- NATS (queues): SMTP answers 451 4.3.0 at the end of DATA (the message cannot be made
  durable), while IMAP and the API, which do not need the queue, keep answering;
- Redis (cache and events): nothing needs it for correctness; everything keeps answering.

SMTP never says 250 for what it could not make durable, everything resumes by itself once the
engine is back, and every message that got a 250 is in the mailbox exactly once.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.imap_helpers import RawImap, quote
from tests.e2e.server import ServerProcess, free_port
from tests.engines import S3Server, unique_name

ALICE = "alice@example.test"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _wait_port(port: int, up: bool, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not come {'up' if up else 'down'}")


class PgCluster:
    """A PostgreSQL cluster of our own, run as the postgres user (it refuses root)."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL server binaries are not installed in {PG_BIN}")
        try:
            self.owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("there is no postgres user to run a throwaway PostgreSQL cluster")
        self.root = Path(tempfile.mkdtemp(prefix="postroom-faults-pg-"))
        self.port = free_port()
        for path in (self.root, self.root / "sock"):
            path.mkdir(exist_ok=True)
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.root / "data"), "-A", "trust",
                          "-U", "postgres", "--no-sync")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        prefix = [] if os.getuid() == self.owner.pw_uid else ["su", "postgres", "-c"]
        argv = [*prefix, shlex.join(command)] if prefix else list(command)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-l",
            str(self.root / "log"), "-w", "-o",
            f"-p {self.port} -k {self.root / 'sock'} -c listen_addresses=127.0.0.1", "start")
        _wait_port(self.port, up=True)

    def crash(self) -> None:
        """Stop without a shutdown checkpoint, as a crash would (recovery on start)."""
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                          "immediate", "-w", "stop")
        _wait_port(self.port, up=False)

    def remove(self) -> None:
        try:
            self.crash()
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class Process:
    """A nats-server or redis-server of our own, killed and started again on its port."""

    def __init__(self, name: str, command: list[str], port: int, log: Path) -> None:
        self.name, self.command, self.port, self.log = name, command, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        _wait_port(self.port, up=True)

    def crash(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        _wait_port(self.port, up=False)


@dataclass
class Engines:
    pg: PgCluster
    nats: Process
    redis: Process


@dataclass
class Node:
    server: ServerProcess
    engines: Engines


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Node]:
    nats_bin, redis_bin = shutil.which("nats-server"), shutil.which("redis-server")
    if nats_bin is None or redis_bin is None:
        pytest.skip("nats-server and redis-server are needed for the engine fault tests")
    base = tmp_path_factory.mktemp("faults")
    pg = PgCluster()
    nats_port, redis_port = free_port(), free_port()
    nats = Process("nats", [nats_bin, "-js", "-p", str(nats_port), "-a", "127.0.0.1", "-sd",
                            str(base / "jetstream")], nats_port, base / "nats.log")
    redis = Process("redis", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], redis_port, base / "redis.log")
    server: ServerProcess | None = None
    try:
        pg.start()
        nats.start()
        redis.start()
        prefix = unique_name("f")
        env = {
            **s3_server.env(),
            "POSTROOM_STORAGE__METADATA": pg.dsn,
            "POSTROOM_STORAGE__BLOBS": s3_server.url(prefix.lower()),
            "POSTROOM_STORAGE__QUEUE": f"nats://127.0.0.1:{nats_port}?stream_prefix={prefix}"
                                       "&ack_wait=5&request_timeout=2",
            "POSTROOM_STORAGE__CACHE": f"redis://127.0.0.1:{redis_port}/0?prefix={prefix}:",
            "POSTROOM_STORAGE__EVENTS": f"redis://127.0.0.1:{redis_port}/0?prefix={prefix}:",
        }
        server = ServerProcess(base / "node", env=env)
        server.cli("domain", "add", "example.test")
        server.cli("user", "add", ALICE, "--password", PASSWORD_A)
        server.start()
        yield Node(server, Engines(pg, nats, redis))
    finally:
        if server is not None and server.proc is not None and server.proc.poll() is None:
            server.stop()
        for process in (nats, redis):
            process.crash()
        pg.remove()


def _message(subject: str) -> bytes:
    return (f"From: Carol <carol@example.org>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 05 Mar 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\n"
            f"Body of {subject}.\r\n").encode()


@dataclass
class Load:
    """Senders streaming mail into the node; they record what got 250 and every refusal."""

    port: int
    run: str
    acknowledged: list[str] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, senders: int = 2) -> None:
        for n in range(senders):
            thread = threading.Thread(target=self._send, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def _send(self, worker: int) -> None:
        n = 0
        smtp: smtplib.SMTP | None = None
        while not self.stop.is_set():
            subject = f"load {self.run} {worker}-{n}"
            n += 1
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                smtp.sendmail("carol@example.org", [ALICE], _message(subject))
            except smtplib.SMTPRecipientsRefused as exc:
                self._refused(*next(iter(exc.recipients.values())))
                smtp = self._reset(smtp)
                continue
            except smtplib.SMTPResponseException as exc:
                self._refused(exc.smtp_code, exc.smtp_error)
                smtp = self._reset(smtp)
                continue
            except (smtplib.SMTPException, OSError):
                smtp = self._reset(smtp, close=True)
                time.sleep(0.1)
                continue
            with self.lock:
                self.acknowledged.append(subject)
        if smtp is not None:
            self._reset(smtp, close=True)

    def _refused(self, code: int, text: bytes | str) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        with self.lock:
            self.refusals.append((code, text))
        time.sleep(0.05)

    @staticmethod
    def _reset(smtp: smtplib.SMTP | None, close: bool = False) -> smtplib.SMTP | None:
        if smtp is None:
            return None
        try:
            if close:
                smtp.close()
                return None
            smtp.rset()
            return smtp
        except (smtplib.SMTPException, OSError):
            smtp.close()
            return None


def _smtp_probe(port: int) -> tuple[int, str]:
    """One message by hand: the first refusal's code and text, or (250, ...)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("probe.example.org")
        for verb, arg in (("mail", "carol@example.org"), ("rcpt", ALICE)):
            code, text = getattr(smtp, verb)(arg)
            if code != 250:
                return code, text.decode()
        code, text = smtp.data(_message(f"probe {uuid.uuid4().hex[:8]}"))
        return code, text.decode()


def _subjects(base_url: str, run: str) -> list[str]:
    out: list[str] = []
    with httpx.Client(base_url=base_url, auth=(ALICE, PASSWORD_A), timeout=30) as api:
        folders = api.get("/v1/folders")
        folders.raise_for_status()
        for folder in folders.json()["folders"]:
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                page = api.get(f"/v1/folders/{folder['id']}/messages", params=params)
                page.raise_for_status()
                body = page.json()
                out.extend(m["subject"] for m in body["messages"]
                           if m["subject"].startswith(f"load {run} "))
                cursor = body["next_cursor"]
                if not cursor:
                    break
    return out


def _eventually(check: Any, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            return check()
        except (AssertionError, httpx.HTTPError, OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("engine", ["postgres", "nats", "redis"])
def test_engine_restart_mid_load(node: Node, engine: str) -> None:
    server = node.server
    targets: dict[str, PgCluster | Process] = {
        "postgres": node.engines.pg, "nats": node.engines.nats, "redis": node.engines.redis}
    target = targets[engine]
    run = uuid.uuid4().hex[:6]
    imap = RawImap(server.imap_port)
    imap.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
    load = Load(server.smtp_port, run)
    load.start()
    try:
        _eventually(lambda: _at_least(load, 10))
        target.crash()
        with load.lock:
            acked_before = len(load.acknowledged)
        down_since = time.monotonic()

        # While it is down: the replies each protocol owes its clients.
        if engine in ("postgres", "nats"):
            _eventually(lambda: _assert_451(_smtp_probe(server.smtp_port)), 10)
        else:
            assert _smtp_probe(server.smtp_port)[0] == 250
        _, tagged = imap.command("SELECT INBOX")
        with httpx.Client(base_url=server.base_url, auth=(ALICE, PASSWORD_A),
                          timeout=30) as api:
            folders = api.get("/v1/folders")
        if engine == "postgres":
            assert tagged.startswith(b"NO [UNAVAILABLE]"), tagged
            assert folders.status_code == 503, folders.text
            assert folders.json()["error"]["code"] == "unavailable"
        else:
            assert tagged.startswith(b"OK"), tagged
            assert folders.status_code == 200, folders.text
        time.sleep(max(0.0, 2.0 - (time.monotonic() - down_since)))
        target.start()

        # Back: everything resumes by itself, mail keeps flowing.
        _eventually(lambda: _assert_250(_smtp_probe(server.smtp_port)), 30)
        _eventually(lambda: _assert_ok(imap.command("SELECT INBOX")[1]), 30)
        _eventually(lambda: _at_least(load, acked_before + 10), 30)
    finally:
        load.finish()
        imap.close()

    with load.lock:
        wanted = set(load.acknowledged)
        refusals = list(load.refusals)
    assert all(code == 451 and text.startswith("4.3.0") for code, text in refusals), \
        refusals[:5]
    if engine in ("postgres", "nats"):
        assert refusals, "no sender was refused while the engine was down"

    def all_delivered() -> list[str]:
        found = _subjects(server.base_url, run)
        assert wanted <= set(found), f"{len(wanted - set(found))} acknowledged not delivered"
        return found

    found = _eventually(all_delivered, 60)
    duplicates = {s for s in found if found.count(s) > 1}
    assert not duplicates, sorted(duplicates)[:5]


def _assert_250(reply: tuple[int, str]) -> None:
    assert reply[0] == 250, reply


def _assert_ok(tagged: bytes) -> None:
    assert tagged.startswith(b"OK"), tagged


def _assert_451(reply: tuple[int, str]) -> None:
    assert (reply[0], reply[1][:5]) == (451, "4.3.0"), reply


def _at_least(load: Load, count: int) -> None:
    assert load.count() >= count, f"{load.count()} of {count} acknowledged"
