"""IMAP load benchmark: C clients for T seconds of a busy mail client population's commands.

Each client logs in and loops over LIST, STATUS, SELECT, FETCH of flags, FETCH of a whole body,
STORE, SEARCH, APPEND, EXPUNGE and now and then LOGOUT + LOGIN, counting completed commands per
command. The same load runs against Postroom and, when Dovecot (Debian dovecot-imapd) is
installed and we are root, against a throwaway Dovecot on loopback, and the ratio is printed.
Then an APPEND-only run, and the server's RSS with N concurrent IDLE connections.

    .venv/bin/python -m bench.imap_load -c 10 -t 30 --idle 10000

Not a test: run it by hand; figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import scaleout

PASSWORD = "bench-password-1"
DOMAIN = "example.test"
SEED_MESSAGES = 50
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def sample_message(n: int) -> bytes:
    body = "".join(f"line {i} of a message body with some words in it, number {n}\r\n"
                   for i in range(40))
    return (f"From: Sender {n} <sender{n}@example.org>\r\nTo: bench@{DOMAIN}\r\n"
            f"Subject: benchmark message {n}\r\nMessage-ID: <{n}.{time.time_ns()}@bench>\r\n"
            f"Date: Tue, 05 Mar 2024 10:00:00 +0000\r\n\r\n{body}").encode()


class Client:
    """A minimal asyncio IMAP client: one command at a time, literals read whole."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.n = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        client = cls(reader, writer)
        await client.line()
        return client

    async def line(self) -> bytes:
        out = await self.reader.readuntil(b"\r\n")
        while (m := _LITERAL.search(out)) is not None:
            out += await self.reader.readexactly(int(m.group(1)))
            out += await self.reader.readuntil(b"\r\n")
        return out

    async def command(self, text: bytes, literal: bytes | None = None) -> list[bytes]:
        self.n += 1
        tag = b"b%d" % self.n
        if literal is None:
            self.writer.write(tag + b" " + text + b"\r\n")
        else:
            self.writer.write(tag + b" " + text + b" {%d}\r\n" % len(literal))
            await self.writer.drain()
            cont = await self.line()
            if not cont.startswith(b"+"):
                raise RuntimeError(f"no continuation: {cont!r}")
            self.writer.write(literal + b"\r\n")
        await self.writer.drain()
        lines: list[bytes] = []
        while True:
            line = await self.line()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise RuntimeError(f"{text[:60]!r} failed: {line!r}")
                return lines
            lines.append(line)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


@dataclass
class Target:
    name: str
    port: int
    pid: Callable[[], list[int]]
    users: list[str] = field(default_factory=list)


async def seed(target: Target) -> None:
    async def one(user: str) -> None:
        c = await Client.connect(target.port)
        await c.command(f'LOGIN "{user}" "{PASSWORD}"'.encode())
        for n in range(SEED_MESSAGES):
            await c.command(b"APPEND INBOX", sample_message(n))
        await c.command(b"LOGOUT")
        await c.close()

    await asyncio.gather(*(one(u) for u in target.users))


async def mixed(target: Target, clients: int, seconds: float, append_only: bool = False
                ) -> Counter[str]:
    counts: Counter[str] = Counter()
    spent: Counter[str] = Counter()  # seconds waited for each command's answer, by command
    deadline = time.monotonic() + seconds

    async def run(user: str, rng: random.Random) -> None:
        c = await Client.connect(target.port)

        async def do(name: str, text: bytes, literal: bytes | None = None) -> list[bytes]:
            started = time.monotonic()
            lines = await c.command(text, literal)
            spent[name] += time.monotonic() - started
            counts[name] += 1
            return lines

        await do("LOGIN", f'LOGIN "{user}" "{PASSWORD}"'.encode())
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if append_only:
                await do("APPEND", b"APPEND INBOX", sample_message(n))
                continue
            await do("LIST", b'LIST "" "*"')
            await do("STATUS", b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)")
            lines = await do("SELECT", b"SELECT INBOX")
            exists = next((int(x.split()[1]) for x in lines if x.endswith(b"EXISTS\r\n")), 0)
            await do("FETCH flags", b"FETCH 1:* (UID FLAGS)")
            if exists:
                k = rng.randint(1, exists)
                await do("FETCH body", b"FETCH %d (BODY.PEEK[])" % k)
                await do("STORE", b"STORE %d +FLAGS (\\Seen)" % k)
            await do("SEARCH", b"SEARCH UNSEEN")
            await do("APPEND", b"APPEND INBOX", sample_message(n))
            if exists > SEED_MESSAGES:  # keep the mailbox near its seeded size
                await do("STORE", b"STORE %d +FLAGS (\\Deleted)" % exists)
                await do("EXPUNGE", b"EXPUNGE")
            await do("NOOP", b"NOOP")
            if n % 5 == 0:
                await do("LOGOUT", b"LOGOUT")
                await c.close()
                c = await Client.connect(target.port)
                await do("LOGIN", f'LOGIN "{user}" "{PASSWORD}"'.encode())
        await c.command(b"LOGOUT")
        await c.close()

    users = target.users
    pids = with_children(target.pid())  # Postroom's analysis processes count too
    cpu_before, loop_before = cpu_seconds(pids), loop_seconds(target.pid())
    await asyncio.gather(*(run(users[i % len(users)], random.Random(i)) for i in range(clients)))
    commands = max(1, sum(counts.values()))
    CPU_MS[target.name] = (cpu_seconds(pids) - cpu_before) * 1000 / commands
    LOOP_MS[target.name] = (loop_seconds(target.pid()) - loop_before) * 1000 / commands
    LATENCY[target.name] = Counter({name: spent[name] / counts[name] for name in counts})
    return counts


# mean client-side latency (seconds) per command of the last run against each target
LATENCY: dict[str, Counter[str]] = {}


def cpu_seconds(pids: list[int], stat: str = "/proc/{pid}/stat") -> float:
    """User + system CPU time so far of the processes (all their threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(stat.format(pid=pid)).read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


def loop_seconds(pids: list[int]) -> float:
    """CPU time so far of each process's main thread: a Postroom node's event loop."""
    return cpu_seconds(pids, "/proc/{pid}/task/{pid}/stat")


def with_children(pids: list[int]) -> list[int]:
    """The processes and their descendants (Linux: /proc/PID/task/TID/children, of every
    thread: a node starts its worker processes from helper threads)."""
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        with contextlib.suppress(FileNotFoundError, ValueError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ValueError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


# server CPU milliseconds per command of the last run against each target (Postroom only:
# Dovecot's per-connection processes take their CPU time with them when they exit)
CPU_MS: dict[str, float] = {}
LOOP_MS: dict[str, float] = {}  # of that, the event loop thread's


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


async def idle_rss(target: Target, count: int) -> tuple[int, int, float]:
    """RSS before and with `count` IDLE connections, and how long a delivery took to wake one."""
    before = rss_kib(target.pid())
    clients: list[Client] = []
    watchers: list[Client] = []  # the IDLE connections of user 0
    sem = asyncio.Semaphore(200)

    async def open_one(i: int) -> None:
        async with sem:
            c = await Client.connect(target.port)
            await c.command(f'LOGIN "{target.users[i % len(target.users)]}" "{PASSWORD}"'
                            .encode())
            await c.command(b"SELECT INBOX")
            c.n += 1
            c.writer.write(b"i%d IDLE\r\n" % c.n)
            await c.writer.drain()
            await c.line()  # "+ idling"
            clients.append(c)
            if i % len(target.users) == 0:
                watchers.append(c)

    await asyncio.gather(*(open_one(i) for i in range(count)))
    await asyncio.sleep(2)
    during = rss_kib(target.pid())
    # wake one IDLE by an APPEND from another connection of the same user
    watcher = watchers[0]
    other = await Client.connect(target.port)
    await other.command(f'LOGIN "{target.users[0]}" "{PASSWORD}"'.encode())
    started = time.monotonic()
    await other.command(b"APPEND INBOX", sample_message(0))
    line = await asyncio.wait_for(watcher.line(), 30)
    woke = time.monotonic() - started
    assert b"EXISTS" in line, line
    await other.close()
    for c in clients:
        c.writer.close()
    return before, during, woke


# ------------------------------------------------------------------------------ servers

def start_postroom(
    work: Path, users: int, nodes: int = 1, shared: str = "siblings"
) -> tuple[list[subprocess.Popen[bytes]], Target]:
    """One node, or `nodes` nodes on one data dir (SQLite + files) sharing the IMAP port
    (SO_REUSEPORT), with events and cache between them `shared` through siblings:///DIR (the
    machine's sockets and shared memory) or the machine's Redis under a prefix of the run."""
    data = work / "postroom"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["POSTROOM_IMAP__CONNECTIONS_PER_USER"] = "100000"
    env["POSTROOM_IMAP__COMMANDS_PER_SECOND"] = "100000"
    env.update(scaleout.ACTIVE)  # --scale: the scale-out engines
    if nodes > 1:
        env["POSTROOM_IMAP__REUSE_PORT"] = "true"
        if shared == "redis" and not scaleout.ACTIVE:  # --scale brings its own Redis URLs
            prefix = f"imapbench_{os.getpid()}_{time.time_ns()}:"
            env["POSTROOM_STORAGE__EVENTS"] = f"{scaleout.REDIS}?prefix={prefix}"
            env["POSTROOM_STORAGE__CACHE"] = f"{scaleout.REDIS}?prefix={prefix}"
        elif not scaleout.ACTIVE:
            env["POSTROOM_STORAGE__EVENTS"] = f"siblings://{data}/siblings"
            env["POSTROOM_STORAGE__CACHE"] = f"siblings://{data}/siblings"
    cli = [sys.executable, "-m", "postroom.cli", "--data-dir", str(data)]
    subprocess.run([*cli, "domain", "add", DOMAIN], check=True, env=env, capture_output=True)
    names = [f"user{i}@{DOMAIN}" for i in range(users)]
    for name in names:
        subprocess.run([*cli, "user", "add", name, "--password", PASSWORD], check=True,
                       env=env, capture_output=True)
    port = free_port()
    flags = []
    for listener in ("smtp", "submission", "submissions", "imaps", "pop3", "pop3s"):
        flags += [f"--{listener}", f"127.0.0.1:{free_port()}"]
    procs = [subprocess.Popen(
        [*cli, "serve", "--http", f"127.0.0.1:{free_port()}", "--imap", f"127.0.0.1:{port}",
         *flags], env=env, stdout=subprocess.DEVNULL, stderr=open(work / "postroom.log", "wb"))]
    wait_port(port)
    for n in range(2, nodes + 1):
        procs.append(subprocess.Popen(
            [*cli, "serve", "--roles", "imap", "--imap", f"127.0.0.1:{port}"], env=env,
            stdout=subprocess.DEVNULL, stderr=open(work / f"postroom-{n}.log", "wb")))
    if nodes > 1:
        time.sleep(3)  # the other nodes open the same files and join the port
    return procs, Target("Postroom", port, lambda: [p.pid for p in procs], names)


def have_dovecot() -> bool:
    return os.path.exists("/usr/lib/dovecot/imap") and shutil.which("dovecot") is not None \
        and os.geteuid() == 0


def start_dovecot(work: Path, users: int) -> tuple[Path, Target]:
    dv = work / "dovecot"
    (dv / "run").mkdir(parents=True)
    home = dv / "home"
    home.mkdir()
    shutil.chown(home, "mail", "mail")
    names = [f"user{i}@{DOMAIN}" for i in range(users)]
    (dv / "passwd").write_text("".join(f"{n}:{{PLAIN}}{PASSWORD}::::::\n" for n in names))
    port = free_port()
    conf = dv / "dovecot.conf"
    conf.write_text(f"""
base_dir = {dv}/run
protocols = imap
listen = 127.0.0.1
log_path = {dv}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = always
passdb {{
  driver = passwd-file
  args = {dv}/passwd
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={home}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_limit = 20000
  client_limit = 20000
  service_count = 0
}}
service imap {{
  process_limit = 20000
}}
default_client_limit = 40000
default_vsz_limit = 0
mail_max_userip_connections = 100000
""")
    subprocess.run(["dovecot", "-c", str(conf)], check=True)
    wait_port(port)

    def pids() -> list[int]:
        out = subprocess.run(["pgrep", "-f", str(dv / "run")], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    return conf, Target("Dovecot", port, pids, names)


# ------------------------------------------------------------------------------- main

def report(title: str, ours: Counter[str], anchor: Counter[str] | None, seconds: float) -> None:
    print(f"\n{title} ({seconds:.0f} s)")
    names = sorted(set(ours) | set(anchor or {}))
    print(f"{'command':<14}{'Postroom/s':>12}{'Dovecot/s':>12}{'ms each':>10}{'Dovecot ms':>12}")
    ours_ms, anchor_ms = LATENCY.get("Postroom", Counter()), LATENCY.get("Dovecot", Counter())
    for name in names:
        a = f"{anchor[name] / seconds:12.1f}" if anchor is not None else f"{'-':>12}"
        ms = f"{ours_ms[name] * 1000:10.2f}"
        ms += f"{anchor_ms[name] * 1000:12.2f}" if anchor is not None else f"{'-':>12}"
        print(f"{name:<14}{ours[name] / seconds:12.1f}{a}{ms}")
    total = sum(ours.values()) / seconds
    line = f"{'total':<14}{total:12.1f}"
    if anchor is not None:
        anchor_total = sum(anchor.values()) / seconds
        line += f"{anchor_total:12.1f}   ratio {total / anchor_total:.2f}x"
    print(line)
    if "Postroom" in CPU_MS:
        print(f"Postroom server CPU: {CPU_MS['Postroom']:.3f} ms per command, of which the "
              f"event loop thread {LOOP_MS['Postroom']:.3f} ms")


async def run_all(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.idle * 2 + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    with tempfile.TemporaryDirectory(prefix="imap-bench-") as tmp, \
            contextlib.ExitStack() as engines:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if args.scale:
            engines.enter_context(scaleout.engines(work))
        print(f"Postroom on {scaleout.describe()} engines"
              + (f", {args.nodes} nodes sharing the IMAP port, events and cache through"
                 f" {args.shared}" if args.nodes > 1 else ""),
              flush=True)
        procs, ours = start_postroom(work, args.users, args.nodes, args.shared)
        dv_conf: Path | None = None
        anchor: Target | None = None
        try:
            if have_dovecot() and not args.no_anchor:
                dv_conf, anchor = start_dovecot(work, args.users)
            else:
                print("(Dovecot not installed or not root: anchor skipped)")
            for target in (ours, anchor):
                if target is not None:
                    await seed(target)
            if not args.append_only:
                results = {}
                for target in (ours, anchor):
                    if target is not None:
                        results[target.name] = await mixed(target, args.clients, args.seconds)
                report(f"mixed workload, {args.clients} clients", results["Postroom"],
                       results.get("Dovecot"), args.seconds)
            appends = {}
            append_seconds = args.seconds if args.append_only else args.seconds / 2
            for target in (ours, anchor):
                if target is not None:
                    appends[target.name] = await mixed(target, args.clients, append_seconds,
                                                       append_only=True)
            report(f"APPEND only, {args.clients} clients", appends["Postroom"],
                   appends.get("Dovecot"), append_seconds)
            if args.idle:
                before, during, woke = await idle_rss(ours, args.idle)
                print(f"\nPostroom with {args.idle} IDLE connections: RSS {before / 1024:.0f} MiB"
                      f" idle-less, {during / 1024:.0f} MiB with them "
                      f"({(during - before) / args.idle:.1f} KiB per connection); "
                      f"an APPEND woke an IDLE in {woke * 1000:.1f} ms")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if dv_conf is not None:
                await asyncio.to_thread(subprocess.run, ["doveadm", "-c", str(dv_conf), "stop"],
                                        capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("-c", "--clients", type=int, default=10)
    parser.add_argument("-t", "--seconds", type=float, default=30.0)
    parser.add_argument("-u", "--users", type=int, default=10)
    parser.add_argument("--idle", type=int, default=10000, help="IDLE connections (0: skip)")
    parser.add_argument("--no-anchor", action="store_true", help="skip Dovecot")
    parser.add_argument("--append-only", action="store_true",
                        help="only the APPEND phase, for the whole --seconds")
    parser.add_argument("--nodes", type=int, default=1,
                        help="Postroom nodes on one data dir sharing the IMAP port")
    parser.add_argument("--shared", choices=("siblings", "redis"), default="siblings",
                        help="with --nodes: events and cache between the nodes through the"
                             " machine (siblings:///DIR) or Redis")
    parser.add_argument("--scale", action="store_true",
                        help="Postroom on PostgreSQL + S3 + NATS + Redis (bench/scaleout.py)")
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.run(run_all(args))
    except ImportError:
        asyncio.run(run_all(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
