"""SMTP ingest benchmark: N messages of S KB over C sessions into the MX port, until every one is
in the recipient's mailbox. Prints accepted/s and delivered/s for Postroom and, when Postfix and
Dovecot are installed, for a throwaway Postfix -> LMTP -> Dovecot on loopback under the same load
(the anchor), with the ratio.

    .venv/bin/python -m bench.smtp_ingest -n 2000 -s 50 -c 20

The load generator is Postfix's `smtp-source` when installed (the same C client for both
servers), else a small asyncio client. Not a test: run it by hand; figures go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import scaleout

DOMAIN = "example.test"
RCPT = f"bench@{DOMAIN}"
PASSWORD = "bench-password-1"
SMTP_SOURCE = shutil.which("smtp-source") or (
    "/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None)


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


@dataclass
class Result:
    name: str
    accepted_s: float
    delivered_s: float
    count: int
    cpu_s: float = 0.0  # CPU (user + system) of the server's processes during the run
    load: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load average, start/end

    @property
    def accepted_rate(self) -> float:
        return self.count / self.accepted_s

    @property
    def delivered_rate(self) -> float:
        return self.count / self.delivered_s


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, with reaped children's) of these processes and every
    process below them, from /proc; a process that ended and was reaped counts in its
    parent's children figures."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo += children.get(pid, [])
    return total


def load_average() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------ load

def message_body(size_kb: int, n: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, size_kb * 1024 // len(line))
    return (f"From: load@remote.test\r\nTo: {RCPT}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench.{n}.{time.time_ns()}@remote.test>\r\n\r\n").encode() + body


async def _session(port: int, jobs: asyncio.Queue[int], size_kb: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> int:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    await reply()
    writer.write(b"EHLO load.test\r\n")
    await reply()
    while True:
        try:
            n = jobs.get_nowait()
        except asyncio.QueueEmpty:
            break
        # PIPELINING: MAIL, RCPT and DATA in one write (RFC 2920).
        writer.write(f"MAIL FROM:<load@remote.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
        codes = [await reply() for _ in range(3)]
        if codes != [250, 250, 354]:
            raise RuntimeError(f"unexpected replies {codes}")
        writer.write(message_body(size_kb, n) + b".\r\n")
        if (code := await reply()) != 250:
            raise RuntimeError(f"DATA refused: {code}")
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()


async def _python_load(port: int, count: int, size_kb: int, sessions: int) -> None:
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        jobs.put_nowait(n)
    await asyncio.gather(*(_session(port, jobs, size_kb) for _ in range(sessions)))


def send_load(port: int, count: int, size_kb: int, sessions: int) -> float:
    """Seconds until the last message got its 250."""
    started = time.monotonic()
    if SMTP_SOURCE:
        subprocess.run([SMTP_SOURCE, "-m", str(count), "-s", str(sessions),
                        "-l", str(size_kb * 1024), "-f", "load@remote.test", "-t", RCPT,
                        "-M", "load.test", f"127.0.0.1:{port}"], check=True)
    else:
        asyncio.run(_python_load(port, count, size_kb, sessions))
    return time.monotonic() - started


def wait_delivered(count_fn: Callable[[], int], count: int, started: float,
                   timeout: float = 600) -> float:
    while True:
        if count_fn() >= count:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"only {count_fn()} of {count} delivered after {timeout}s")
        # Postroom is asked over HTTP (its folder counts, ~1-2 ms of its CPU per look): often
        # enough to time a run of seconds to 1 %, seldom enough not to load the server.
        time.sleep(0.05)


# --------------------------------------------------------------------------- Postroom

def run_postroom(work: Path, count: int, size_kb: int, sessions: int, workers: int) -> Result:
    data = work / "postroom"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env["POSTROOM_MAIL__WORKERS"] = str(workers)
    env["POSTROOM_LOG_LEVEL"] = "warning"
    env["POSTROOM_SMTP__CONNECTIONS_PER_IP"] = str(max(50, sessions * 2))
    env.update(scaleout.ACTIVE)  # --scale: the scale-out engines
    cmd = [sys.executable, "-m", "postroom.cli", "--data-dir", str(data)]
    subprocess.run([*cmd, "domain", "add", DOMAIN], check=True, env=env, capture_output=True)
    subprocess.run([*cmd, "user", "add", RCPT, "--password", PASSWORD], check=True, env=env,
                   capture_output=True)
    http, smtp = free_port(), free_port()
    server = subprocess.Popen(
        [*cmd, "serve", "--http", f"127.0.0.1:{http}", "--smtp", f"127.0.0.1:{smtp}",
         "--submission", f"127.0.0.1:{free_port()}", "--submissions", f"127.0.0.1:{free_port()}",
         "--pop3", "", "--pop3s", "", "--imap", "", "--imaps", ""],
        env=env, stdout=subprocess.DEVNULL, stderr=open(work / "postroom.log", "wb"))
    try:
        wait_port(smtp)
        wait_port(http)
        client = httpx.Client(base_url=f"http://127.0.0.1:{http}", auth=(RCPT, PASSWORD))

        def delivered() -> int:
            # INBOX or Junk: the spam filter's verdict picks the folder, both are delivered.
            folders = client.get("/v1/folders").json()["folders"]
            return sum(int(f["total"]) for f in folders if f["name"] in ("INBOX", "Junk"))

        delivered()  # warm the login cache before the clock starts
        load = load_average()
        cpu = tree_cpu([server.pid])
        started = time.monotonic()
        accepted = send_load(smtp, count, size_kb, sessions)
        done = wait_delivered(delivered, count, started)
        return Result("Postroom", accepted, done, count, tree_cpu([server.pid]) - cpu,
                      (load, load_average()))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


# ------------------------------------------------------------------ Postfix + Dovecot

def have_postfix_dovecot() -> bool:
    return all(os.path.exists(p) for p in ("/usr/sbin/postfix", "/usr/sbin/dovecot")) \
        and os.path.isdir("/usr/lib/dovecot") and os.geteuid() == 0


def run_postfix_dovecot(work: Path, count: int, size_kb: int, sessions: int) -> Result:
    base = work / "anchor"
    smtp_port, lmtp_port = free_port(), free_port()
    # Dovecot: LMTP only, one static virtual user, Maildir owned by `mail`.
    dv = base / "dovecot"
    (dv / "run").mkdir(parents=True)
    mail_home = dv / "home"
    mail_home.mkdir()
    shutil.chown(mail_home, "mail", "mail")
    dv_conf = dv / "dovecot.conf"
    dv_conf.write_text(f"""
base_dir = {dv}/run
protocols = lmtp
listen = 127.0.0.1
log_path = {dv}/dovecot.log
ssl = no
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_fsync = always
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={mail_home}/%u
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
lmtp_rcpt_check_quota = no
""")
    # Postfix: its own config, queue and data directories; everything on loopback.
    pf = base / "postfix"
    conf, queue, data = pf / "conf", pf / "queue", pf / "data"
    for d in (conf, queue, data):
        d.mkdir(parents=True)
    shutil.chown(data, "postfix", "postfix")
    master = Path("/etc/postfix/master.cf").read_text().splitlines()
    master = [ln for ln in master if not ln.startswith("smtp      inet")]
    master.append(f"127.0.0.1:{smtp_port} inet n - n - - smtpd")
    (conf / "master.cf").write_text("\n".join(master) + "\n")
    (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = anchor.bench.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = static:yes
virtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = {pf}/maillog
maillog_file_prefixes = {base}, /var
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_connection_rate_limit = 0
in_flow_delay = 0
smtputf8_enable = no
""")
    subprocess.run(["dovecot", "-c", str(dv_conf)], check=True)
    subprocess.run(["postfix", "-c", str(conf), "start"], check=True, capture_output=True)
    try:
        wait_port(smtp_port)
        wait_port(lmtp_port)
        new_dir = mail_home / RCPT / "Maildir" / "new"

        def delivered() -> int:
            try:
                return len(os.listdir(new_dir))
            except FileNotFoundError:
                return 0

        masters = [int(path.read_text().split()[0])
                   for path in (queue / "pid" / "master.pid", dv / "run" / "master.pid")]
        load = load_average()
        cpu = tree_cpu(masters)
        started = time.monotonic()
        accepted = send_load(smtp_port, count, size_kb, sessions)
        done = wait_delivered(delivered, count, started)
        return Result("Postfix -> LMTP -> Dovecot", accepted, done, count,
                      tree_cpu(masters) - cpu, (load, load_average()))
    finally:
        subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True)
        subprocess.run(["doveadm", "-c", str(dv_conf), "stop"], capture_output=True)


# ------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("-s", "--size-kb", type=int, default=50)
    parser.add_argument("-c", "--sessions", type=int, default=20)
    parser.add_argument("-w", "--workers", type=int, default=4,
                        help="Postroom incoming workers ([mail] workers)")
    parser.add_argument("--no-anchor", action="store_true", help="skip Postfix + Dovecot")
    parser.add_argument("--scale", action="store_true",
                        help="Postroom on PostgreSQL + S3 + NATS + Redis (bench/scaleout.py)")
    args = parser.parse_args(argv)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="smtp-ingest-") as tmp, \
            contextlib.ExitStack() as engines:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if args.scale:
            engines.enter_context(scaleout.engines(work))
        print(f"Postroom on {scaleout.describe()} engines", flush=True)
        results.append(run_postroom(work, args.messages, args.size_kb, args.sessions,
                                    args.workers))
        print(f"Postroom: accepted {results[0].accepted_rate:.0f}/s, "
              f"delivered {results[0].delivered_rate:.0f}/s", flush=True)
        if not args.no_anchor:
            if have_postfix_dovecot():
                results.append(run_postfix_dovecot(work, args.messages, args.size_kb,
                                                   args.sessions))
            else:
                print("(Postfix + Dovecot not installed or not root: anchor skipped)")
    load = "smtp-source" if SMTP_SOURCE else "asyncio client"
    print(f"\n{args.messages} messages x {args.size_kb} KB, {args.sessions} sessions, "
          f"load from {load}, {os.cpu_count()} CPUs")
    print(f"{'server':30} {'accepted/s':>12} {'delivered/s':>12} {'CPU ms/msg':>11} "
          f"{'load avg':>12}")
    for r in results:
        print(f"{r.name:30} {r.accepted_rate:12.0f} {r.delivered_rate:12.0f} "
              f"{r.cpu_s * 1000 / r.count:11.2f} {r.load[0]:5.1f} -> {r.load[1]:4.1f}")
    if len(results) == 2:
        ratio = results[0].delivered_rate / results[1].delivered_rate
        print(f"{'ratio Postroom / anchor':30} "
              f"{results[0].accepted_rate / results[1].accepted_rate:12.2f} {ratio:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
