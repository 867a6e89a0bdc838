"""getmail6 and fetchmail (Debian packages) download 500 SpamAssassin corpus messages over POP3.

The messages arrive over SMTP (smtplib to the MX listener), so what the server stores is what
was received: the corpus message with CRLF line ends behind the Return-Path and Received fields
the MX adds. Each client runs twice against its mailbox: first keeping the mail on the server,
then fetching everything again and deleting it, and what it delivers is compared with the stored
bytes:
- fetchmail (with `no stripcr`, `invisible`, `no rewrite`) hands each message to an MDA that
  writes it to a file: those files are the stored bytes exactly.
- getmail writes a Maildir with Unix line ends after re-serialising each message with the
  standard library's `email` (it refolds long header lines, see NOTES.md, and rewrites
  Return-Path): its files are compared with exactly what that re-serialisation makes of the
  stored bytes, and most are the stored bytes themselves.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import corpus
from tests.e2e.server import ServerProcess
from tests.e2e.test_pop3 import PASSWORD, crlf, load_mail

COUNT = 500
GETMAIL_USER = "getmail@example.test"
FETCHMAIL_USER = "fetchmail@example.test"


def corpus_sample() -> list[bytes]:
    """500 messages spread over every corpus group, with CRLF line ends as SMTP carries them."""
    every = corpus.messages()
    step = len(every) / COUNT
    return [crlf(every[int(i * step)][1]) for i in range(COUNT)]


STORED = r"""
import asyncio, base64, json, sys
from postroom.app import Postroom
from postroom.config import load_settings

async def main() -> None:
    job = json.load(sys.stdin)
    out = {}
    async with Postroom(load_settings(None, data_dir=job["data_dir"])) as node:
        service = node.service
        for address in job["users"]:
            user = await service.authenticate(address, job["password"])
            snapshot = await service.mailbox_snapshot(user)
            out[address] = [base64.b64encode(await service.raw_message(user, m.message_id))
                            .decode() for m in snapshot.messages]
    print(json.dumps(out))

asyncio.run(main())
"""


def stored_messages(server: ServerProcess, users: list[str]) -> dict[str, list[bytes]]:
    """The raw bytes MailService holds in each user's INBOX (what IMAP and the API serve)."""
    job = {"data_dir": str(server.data_dir), "users": users, "password": PASSWORD}
    result = subprocess.run([sys.executable, "-c", STORED], input=json.dumps(job), text=True,
                            capture_output=True, env=server._env(), timeout=180)
    assert result.returncode == 0, result.stderr
    found: dict[str, list[str]] = json.loads(result.stdout)
    return {address: [base64.b64decode(raw) for raw in raws] for address, raws in found.items()}


Loaded = tuple[ServerProcess, dict[str, list[bytes]]]


@pytest.fixture(scope="module")
def loaded(server: ServerProcess) -> Iterator[Loaded]:
    """The sample sent over SMTP to both users; each user's stored messages."""
    sample = corpus_sample()
    users = [GETMAIL_USER, FETCHMAIL_USER]
    load_mail(server, users, [])
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.ehlo("corpus.remote.test")
        for raw in sample:
            assert smtp.sendmail("corpus@remote.test", users, raw) == {}
    deadline = time.monotonic() + 180
    while mailbox_size(server, FETCHMAIL_USER) < COUNT or \
            mailbox_size(server, GETMAIL_USER) < COUNT:  # the incoming worker delivers
        assert time.monotonic() < deadline, "the sample was not delivered in time"
        time.sleep(0.2)
    stored = stored_messages(server, users)
    for user in users:  # what was received: the MX's trace fields, then the sample's bytes
        assert len(stored[user]) == COUNT
        left = list(sample)
        for raw in stored[user]:
            sent = next(s for s in left if raw.endswith(s))
            left.remove(sent)
            assert raw[:-len(sent)].startswith(b"Return-Path: <corpus@remote.test>\r\n"
                                               b"Received: from corpus.remote.test")
    yield server, stored


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory other users can traverse: getmail delivers as `mail`, never as root."""
    path = Path(tempfile.mkdtemp(prefix="postroom-pop3-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def need(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (Debian package, see scripts/debian-packages.txt)")


# ------------------------------------------------------------------------------------ getmail


# getmail 6.18 forks a child for every Maildir delivery and installs its SIGCHLD handler only
# after fork(): on a busy machine the child can exit first, the signal is lost, and getmail
# gives up with "waiting child pid N timed out". This runs the packaged getmail unchanged except
# that the handler goes in before the fork.
GETMAIL_RACE_FIX = r"""
import os, runpy, sys
from types import SimpleNamespace
from getmailcore import baseclasses

def forkchild(self, childfun, with_out=True):
    self.child = child = SimpleNamespace()
    child.stdout = baseclasses.TemporaryFile23()
    child.stderr = baseclasses.TemporaryFile23()
    self._prepare_child()
    child.childpid = os.fork()
    if child.childpid != 0:
        child.exitcode = self._wait_for_child(child.childpid)
        child.stderr.seek(0)
        child.err = child.stderr.read().strip().decode()
        child.stdout.seek(0)
        if with_out:
            child.out = child.stdout.read().strip()
        return child
    childfun(child.stdout, child.stderr)

baseclasses.ForkingBase.forkchild = forkchild
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_getmail(server: ServerProcess, workdir: Path, *, delete: bool, ssl: bool) -> list[Path]:
    maildir = workdir / ("maildir-delete" if delete else "maildir-keep")
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    as_root = os.geteuid() == 0
    if as_root:
        for path in (maildir, *(maildir / s for s in ("cur", "new", "tmp"))):
            shutil.chown(path, "mail", "mail")
    state = workdir / ("getmail-state-delete" if delete else "getmail-state-keep")
    state.mkdir()
    retriever = "SimplePOP3SSLRetriever" if ssl else "SimplePOP3Retriever"
    port = server.pop3s_port if ssl else server.pop3_port
    rc = state / "getmailrc"
    rc.write_text(f"""[retriever]
type = {retriever}
server = 127.0.0.1
port = {port}
username = {GETMAIL_USER}
password = {PASSWORD}

[destination]
type = Maildir
path = {maildir}/
{"user = mail" if as_root else ""}

[options]
verbose = 0
read_all = true
delete = {"true" if delete else "false"}
delivered_to = false
received = false
message_log_syslog = false
""")
    getmail = shutil.which("getmail")
    assert getmail is not None
    result = subprocess.run(["/usr/bin/python3", "-c", GETMAIL_RACE_FIX, getmail,
                             "--rcfile", str(rc), "--getmaildir", str(state)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted((maildir / "new").iterdir())


def as_getmail_writes(raw: bytes) -> tuple[bytes, bytes]:
    """What getmail makes of a message, as (envelope sender, the rest of the file).

    getmail parses the message with the standard library's `email` (compat32), takes the
    envelope sender from the first Return-Path (else Sender, else "unknown"), deletes every
    Return-Path field, writes its own `Return-Path: <sender>` first and then `as_bytes()` with
    Unix line ends, which refolds long header lines and re-serialises some MIME structure
    (closing boundaries it was missing, say).
    """
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    sender = str(message["Return-Path"] or message["Sender"] or "unknown")
    if "<" in sender:
        sender = sender.split("<")[1].split(">")[0]
    del message["Return-Path"]
    rest = message.as_bytes(policy=email.policy.compat32.clone(linesep="\n"))
    return " ".join(sender.split()).encode(), rest


def split_return_path(raw: bytes) -> tuple[bytes, bytes]:
    """A getmail file as (the address of its first Return-Path field, the rest)."""
    assert raw.startswith(b"Return-Path:"), raw[:200]
    end = 0
    while True:
        end = raw.index(b"\n", end) + 1
        if raw[end:end + 1] not in (b" ", b"\t"):
            break
    value = b" ".join(raw[len(b"Return-Path:"):end].split())
    return value.removeprefix(b"<").removesuffix(b">"), raw[end:]


def without_return_paths(raw: bytes) -> bytes:
    """The message with every Return-Path field of its header removed, bytes otherwise kept."""
    head, sep, body = raw.partition(b"\n\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(b"return-path:")
        if not dropping:
            kept.append(line)
    return b"\n".join(kept) + sep + body


def match_getmail(delivered: list[bytes], stored: list[bytes]) -> int:
    """Every stored message delivered exactly once, as exactly what getmail's own
    re-serialisation makes of the stored bytes; how many files are the stored bytes themselves
    but for getmail's Return-Path (with Unix line ends)."""
    assert len(delivered) == len(stored)
    expected: dict[tuple[bytes, bytes], list[int]] = {}
    untouched: set[tuple[bytes, bytes]] = set()
    for n, raw in enumerate(stored):
        lf = raw.replace(b"\r\n", b"\n")
        sender, rest = as_getmail_writes(lf)
        expected.setdefault((sender, rest), []).append(n)
        untouched.add((sender, without_return_paths(lf)))
    left = set(range(len(stored)))
    exact = 0
    for got in delivered:
        key = split_return_path(got)
        candidates = [n for n in expected.get(key, []) if n in left]
        assert candidates, f"delivered message not stored as such:\n{got[:800]!r}"
        left.remove(candidates[0])
        exact += key in untouched
    return exact


def mailbox_size(server: ServerProcess, address: str) -> int:
    import poplib

    conn = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    conn.user(address)
    conn.pass_(PASSWORD)
    count = conn.stat()[0]
    conn.quit()
    return count


@pytest.mark.timeout(600)  # two full downloads; generous for a loaded CI machine
def test_getmail_keep_then_delete(loaded: Loaded, workdir: Path) -> None:
    need("getmail")
    server, stored = loaded
    sample = stored[GETMAIL_USER]
    kept = run_getmail(server, workdir, delete=False, ssl=False)
    exact = match_getmail([p.read_bytes() for p in kept], sample)
    # How many getmail left as they were depends on the header fields the MX adds (long
    # folded ones are refolded): informative, not a property of the POP3 server.
    print(f"getmail wrote {exact} of {COUNT} messages without re-serialising them")
    assert mailbox_size(server, GETMAIL_USER) == COUNT
    taken = run_getmail(server, workdir, delete=True, ssl=True)
    match_getmail([p.read_bytes() for p in taken], sample)
    assert mailbox_size(server, GETMAIL_USER) == 0


# ---------------------------------------------------------------------------------- fetchmail


MDA = """#!/bin/sh
exec cat > "$(mktemp "{out}/msg.XXXXXXXXXX")"
"""


def run_fetchmail(server: ServerProcess, workdir: Path, *, keep: bool) -> list[Path]:
    home = workdir / ("fetchmail-keep" if keep else "fetchmail-delete")
    out = home / "out"
    out.mkdir(parents=True)
    home.chmod(0o700)
    mda = home / "mda.sh"
    mda.write_text(MDA.format(out=out))
    mda.chmod(stat.S_IRWXU)
    rc = home / "fetchmailrc"
    rc.write_text(f"""set no syslog
set no bouncemail
set invisible
poll 127.0.0.1 protocol pop3 port {server.pop3_port} uidl
  user "{FETCHMAIL_USER}" there with password "{PASSWORD}"
  {"keep" if keep else "nokeep"} fetchall no rewrite no stripcr no mimedecode
  sslproto "TLS1.2+" no sslcertck
  mda "{mda}"
""")
    rc.chmod(0o600)  # fetchmail refuses a readable rc file
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    env.update(HOME=str(home), FETCHMAILHOME=str(home))
    result = subprocess.run(["fetchmail", "-v", "-f", str(rc), "--nodetach"],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "POP3> STLS" in result.stdout + result.stderr  # it upgraded to TLS by itself
    return sorted(out.iterdir())


@pytest.mark.timeout(600)
def test_fetchmail_keep_then_delete(loaded: Loaded, workdir: Path) -> None:
    need("fetchmail")
    server, stored = loaded
    sample = stored[FETCHMAIL_USER]
    kept = run_fetchmail(server, workdir, keep=True)
    assert sorted(p.read_bytes() for p in kept) == sorted(sample)  # byte for byte
    assert mailbox_size(server, FETCHMAIL_USER) == COUNT
    taken = run_fetchmail(server, workdir, keep=False)
    assert sorted(p.read_bytes() for p in taken) == sorted(sample)
    assert mailbox_size(server, FETCHMAIL_USER) == 0
