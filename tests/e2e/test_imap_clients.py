"""Real IMAP clients against a real `postroom serve`: curl, mbsync (isync) and offlineimap.

An account of 1,000 SpamAssassin corpus messages, delivered as SMTP carries them (CRLF line
ends), is synchronised into a Maildir by each client, and every message must arrive as it was
delivered. Maildir stores lines with LF, so the comparison is on LF-normalised bytes; mbsync
adds an `X-TUID:` header and offlineimap rewrites empty header fields (`X-Nil:` becomes
`X-Nil: `; more generally it writes one space after every field's colon), which the
comparison allows for (see NOTES.md). Then a message written into the
Maildir is synchronised back and must arrive on the server the same way.
"""

from __future__ import annotations

import base64
import email
import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from email.generator import BytesGenerator
from email.policy import compat32
from pathlib import Path

import pytest

from tests import corpus
from tests.e2e.server import ServerProcess

USER = "sync@example.test"
PASSWORD = "sync-secret-42"
COUNT = 1000

_DELIVER = r"""
import asyncio, base64, json, sys
from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import Envelope

async def main() -> None:
    job = json.load(sys.stdin)
    async with Postroom(load_settings(None, data_dir=job["data_dir"])) as node:
        for raw in job["messages"]:
            await node.service.deliver(Envelope("corpus@example.org", (job["rcpt"],)),
                                       base64.b64decode(raw))

asyncio.run(main())
"""


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def deliver(server: ServerProcess, rcpt: str, messages: list[bytes]) -> None:
    job = {"data_dir": str(server.data_dir), "rcpt": rcpt,
           "messages": [base64.b64encode(m).decode() for m in messages]}
    result = subprocess.run([sys.executable, "-c", _DELIVER], input=json.dumps(job), text=True,
                            capture_output=True, env=server._env(), timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess,
                                                                         list[bytes]]]:
    base = tmp_path_factory.mktemp("imap-clients")
    srv = ServerProcess(base / "data")
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", USER, "--password", PASSWORD)
    srv.cli("user", "add", "mb@example.test", "--password", PASSWORD)
    srv.cli("user", "add", "oi@example.test", "--password", PASSWORD)
    picked = [crlf(raw) for _, raw in corpus.messages()[:: 6][:COUNT]]
    assert len(picked) == COUNT
    for rcpt in (USER, "mb@example.test", "oi@example.test"):
        deliver(srv, rcpt, picked if rcpt != USER else picked[:20])
    srv.start()
    yield srv, picked
    srv.stop()


def maildir_messages(folder: Path) -> list[bytes]:
    return [p.read_bytes() for sub in ("cur", "new") for p in sorted((folder / sub).iterdir())]


def _without_tuid(raw: bytes) -> bytes:
    return re.sub(rb"(?m)^X-TUID: [^\n]*\n", b"", raw, count=1)


def _empty_fields_padded(raw: bytes) -> bytes:
    """offlineimap re-serialises header fields with exactly one space after the colon."""
    head, sep, body = raw.partition(b"\n\n")
    return re.sub(rb"(?m)^([!-9;-~]+):[ \t]*", rb"\1: ", head) + sep + body


def _regenerated(raw: bytes) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=compat32).flatten(
        email.message_from_bytes(raw, policy=compat32))
    return _empty_fields_padded(out.getvalue())


def _first_difference(want: bytes, got: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
              min(len(want), len(got)))
    return f"first difference at {at}: want {want[at - 60 : at + 60]!r}, got " \
           f"{got[at - 60 : at + 60]!r}"


def test_curl_list_fetch_search_append(account: tuple[ServerProcess, list[bytes]],
                                       tmp_path: Path) -> None:
    server, picked = account
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    url = f"imap://127.0.0.1:{server.imap_port}"

    def curl(*args: str) -> bytes:
        result = subprocess.run(["curl", "-sS", "--max-time", "60", "-u", f"{USER}:{PASSWORD}",
                                 *args], capture_output=True, timeout=90)
        assert result.returncode == 0, result.stderr
        return result.stdout

    listing = curl(f"{url}/")
    assert b'"/" "INBOX"' in listing and b"\\Sent" in listing
    assert curl(f"{url}/INBOX;UID=3") == picked[2]
    assert curl(f"{url}/INBOX;UID=4;SECTION=HEADER") == picked[3].split(b"\r\n\r\n")[0] + \
        b"\r\n\r\n"
    subject = re.search(rb"(?m)^Subject: ([A-Za-z]{5,})", picked[5])
    assert subject is not None
    found = curl(f"{url}/INBOX?SUBJECT%20{subject.group(1).decode()}")
    assert found.startswith(b"* SEARCH") and b" 6" in found + b" "
    upload = tmp_path / "up.eml"
    body = b"From: curl@example.org\r\nSubject: via curl\r\n\r\nuploaded\r\n"
    upload.write_bytes(body)
    curl("-T", str(upload), f"{url}/Drafts")
    assert curl(f"{url}/Drafts;UID=1") == body


def test_mbsync_both_ways(account: tuple[ServerProcess, list[bytes]], tmp_path: Path) -> None:
    server, picked = account
    if shutil.which("mbsync") is None:
        pytest.skip("mbsync (Debian package isync) is not installed")
    maildir = tmp_path / "mail"
    maildir.mkdir()
    cert = server.data_dir / "tls" / "selfsigned.crt"
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount postroom
Host 127.0.0.1
Port {server.imaps_port}
User mb@example.test
Pass {PASSWORD}
SSLType IMAPS
CertificateFile {cert}
AuthMechs PLAIN
PipelineDepth 50

IMAPStore remote
Account postroom

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns INBOX
Create Both
Expunge Both
SyncState *
""")

    def run() -> None:
        result = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    started = time.monotonic()
    run()
    took = time.monotonic() - started
    got = sorted(_without_tuid(m) for m in maildir_messages(maildir / "INBOX"))
    assert len(got) == COUNT
    assert got == sorted(lf(m) for m in picked)
    assert took < 60, f"mbsync took {took:.1f}s for {COUNT} messages"
    # the other way: a message written into the Maildir reaches the server as it was written
    note = b"From: me@example.test\nSubject: written locally\n\nnear side text\n"
    (maildir / "INBOX" / "new" / f"{int(time.time())}.local1.host").write_bytes(note)
    run()
    fetched = subprocess.run(
        ["curl", "-sS", "-u", f"mb@example.test:{PASSWORD}",
         f"imap://127.0.0.1:{server.imap_port}/INBOX;UID={COUNT + 1}"],
        capture_output=True, timeout=60).stdout
    assert lf(_without_tuid(lf(fetched))) == note
    run()  # a second pass with nothing to do changes nothing
    assert len(maildir_messages(maildir / "INBOX")) == COUNT + 1


def test_offlineimap_both_ways(account: tuple[ServerProcess, list[bytes]],
                               tmp_path: Path) -> None:
    server, picked = account
    if shutil.which("offlineimap") is None:
        pytest.skip("offlineimap is not installed")
    maildir = tmp_path / "mail"
    rc = tmp_path / "offlineimaprc"
    rc.write_text(f"""
[general]
accounts = postroom
metadata = {tmp_path}/meta
ui = basic

[Account postroom]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {maildir}

[Repository remote]
type = IMAP
remotehost = 127.0.0.1
remoteport = {server.imap_port}
remoteuser = oi@example.test
remotepass = {PASSWORD}
ssl = no
starttls = no
folderfilter = lambda name: name == "INBOX"
maxconnections = 2
""")

    def run() -> None:
        result = subprocess.run(["offlineimap", "-c", str(rc), "-o", "-u", "basic"],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "ERROR" not in result.stdout + result.stderr, result.stdout[-3000:]

    started = time.monotonic()
    run()
    took = time.monotonic() - started
    by_uid = {int(m.group(1)): p.read_bytes()
              for sub in ("cur", "new") for p in (maildir / "INBOX" / sub).iterdir()
              if (m := re.search(r",U=(\d+)", p.name))}
    assert sorted(by_uid) == list(range(1, COUNT + 1))
    exact = 0
    for uid, raw in by_uid.items():
        want = _empty_fields_padded(lf(picked[uid - 1]))
        if _empty_fields_padded(raw) == want:
            exact += 1
            continue
        # offlineimap passes some messages through Python's email generator (which, for
        # one, closes an unterminated multipart): compare through the same generator
        assert _regenerated(raw) == _regenerated(want), _first_difference(want, raw)
    assert exact > COUNT * 0.9
    assert took < 60, f"offlineimap took {took:.1f}s for {COUNT} messages"
    note = b"From: me@example.test\nSubject: from offlineimap\n\nnear side text\n"
    (maildir / "INBOX" / "new" / f"{int(time.time())}_1.2.host:2,").write_bytes(note)
    run()
    fetched = subprocess.run(
        ["curl", "-sS", "-u", f"oi@example.test:{PASSWORD}",
         f"imap://127.0.0.1:{server.imap_port}/INBOX;UID={COUNT + 1}"],
        capture_output=True, timeout=60).stdout
    assert lf(fetched) == note
