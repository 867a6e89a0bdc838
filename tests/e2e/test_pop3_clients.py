"""getmail6 and fetchmail (Debian packages) download 500 SpamAssassin corpus messages over POP3.

Each client runs twice against one mailbox: first keeping the mail on the server, then
fetching everything again and deleting it. What each delivers is compared with what the server
stored, which is the corpus message as SMTP would carry it (every line ended by CRLF):
- fetchmail (with `no stripcr`, `invisible`, `no rewrite`) hands each message to an MDA that
  writes it to a file: those files are the stored bytes exactly.
- getmail writes a Maildir with Unix line ends and refolds long header lines (see NOTES.md), so
  its files are compared with LF line ends, body byte for byte, header fields by name and
  unfolded value.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import stat
import subprocess
import tempfile
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
    """500 messages spread over every corpus group, as SMTP would deliver them."""
    every = corpus.messages()
    step = len(every) / COUNT
    return [crlf(every[int(i * step)][1]) for i in range(COUNT)]


@pytest.fixture(scope="module")
def loaded(server: ServerProcess) -> Iterator[tuple[ServerProcess, list[bytes]]]:
    sample = corpus_sample()
    load_mail(server, [GETMAIL_USER, FETCHMAIL_USER],
              [(rcpt, raw) for raw in sample for rcpt in (GETMAIL_USER, FETCHMAIL_USER)])
    yield server, sample


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
    result = subprocess.run(["getmail", "--rcfile", str(rc), "--getmaildir", str(state)],
                            capture_output=True, text=True, timeout=60)
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


def match_getmail(delivered: list[bytes], stored: list[bytes]) -> int:
    """Every stored message delivered exactly once, as exactly what getmail's own
    re-serialisation makes of the stored bytes; how many files equal the stored bytes
    themselves (with Unix line ends)."""
    assert len(delivered) == len(stored)
    expected: dict[tuple[bytes, bytes], list[int]] = {}
    for n, raw in enumerate(stored):
        expected.setdefault(as_getmail_writes(raw.replace(b"\r\n", b"\n")), []).append(n)
    lf_stored = {raw.replace(b"\r\n", b"\n") for raw in stored}
    left = set(range(len(stored)))
    for got in delivered:
        candidates = [n for n in expected.get(split_return_path(got), []) if n in left]
        assert candidates, f"delivered message not stored as such:\n{got[:800]!r}"
        left.remove(candidates[0])
    return sum(got in lf_stored for got in delivered)


def mailbox_size(server: ServerProcess, address: str) -> int:
    import poplib

    conn = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
    conn.user(address)
    conn.pass_(PASSWORD)
    count = conn.stat()[0]
    conn.quit()
    return count


def test_getmail_keep_then_delete(loaded: tuple[ServerProcess, list[bytes]],
                                  workdir: Path) -> None:
    need("getmail")
    server, sample = loaded
    kept = run_getmail(server, workdir, delete=False, ssl=False)
    exact = match_getmail([p.read_bytes() for p in kept], sample)
    assert exact >= COUNT // 4  # the rest differ only by getmail's own refolding
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
    result = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted(out.iterdir())


def test_fetchmail_keep_then_delete(loaded: tuple[ServerProcess, list[bytes]],
                                    workdir: Path) -> None:
    need("fetchmail")
    server, sample = loaded
    kept = run_fetchmail(server, workdir, keep=True)
    assert sorted(p.read_bytes() for p in kept) == sorted(sample)  # byte for byte
    assert mailbox_size(server, FETCHMAIL_USER) == COUNT
    taken = run_fetchmail(server, workdir, keep=False)
    assert sorted(p.read_bytes() for p in taken) == sorted(sample)
    assert mailbox_size(server, FETCHMAIL_USER) == 0
