"""POP3 with real clients (Python's poplib, curl) against a real `postroom serve` process.

Mail is put into the users' INBOXes by a second process on the same data dir, calling
MailService.deliver as the incoming queue worker does, with CRLF line ends as SMTP carries them.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server import ServerProcess

PASSWORD = "pop3-secret-99"

LOADER = r"""
import asyncio, base64, json, sys
from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import Envelope

async def main() -> None:
    job = json.load(sys.stdin)
    settings = load_settings(None, data_dir=job["data_dir"])
    async with Postroom(settings) as node:
        service = node.service
        if not await service.is_local_domain(job["domain"]):
            await service.add_domain(job["domain"])
        for address, password in job["users"]:
            await service.add_user(address, password)
        for rcpt, raw in job["messages"]:
            await service.deliver(Envelope("sender@example.org", (rcpt,), "192.0.2.1"),
                                  base64.b64decode(raw))

asyncio.run(main())
"""


def load_mail(server: ServerProcess, users: list[str], messages: list[tuple[str, bytes]],
              password: str = PASSWORD) -> None:
    """Create `users` (on example.test) and deliver `messages` [(recipient, raw)] to them."""
    job = {
        "data_dir": str(server.data_dir),
        "domain": "example.test",
        "users": [[u, password] for u in users],
        "messages": [[rcpt, base64.b64encode(raw).decode()] for rcpt, raw in messages],
    }
    result = subprocess.run([sys.executable, "-c", LOADER], input=json.dumps(job), text=True,
                            capture_output=True, env=server._env(), timeout=120)
    assert result.returncode == 0, result.stderr


def crlf(raw: bytes) -> bytes:
    """The message as SMTP carries it: every line ended by CRLF."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def sample(n: int, subject: str, extra: bytes = b"") -> bytes:
    return crlf(
        f"From: Sender <sender@example.org>\nTo: someone@example.test\n"
        f"Subject: {subject}\nMessage-ID: <{subject.replace(' ', '.')}.{n}@example.org>\n"
        f"\nLine one of {subject}\n".encode()
        + b".a line starting with a dot\n..two dots\n.\nend\n" + extra
    )


def user(name: str) -> str:
    return f"{name}@example.test"


USERS = ["basic", "top", "dele", "drop", "inuse", "tls", "sasl", "errors", "curl", "api",
         "smtp"]
MESSAGES = {name: [sample(i, f"{name} message {i}") for i in range(1, 4)]
            for name in USERS if name != "smtp"}  # smtp gets its mail over SMTP


@pytest.fixture(scope="module")
def pop(server: ServerProcess) -> Iterator[ServerProcess]:
    load_mail(server, [user(u) for u in USERS],
              [(user(u), raw) for u, raws in MESSAGES.items() for raw in raws])
    yield server


class Pop3From(poplib.POP3):
    """poplib from a chosen loopback source address (each has its own login throttle)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def connect(server: ServerProcess, source: str = "127.0.0.1") -> poplib.POP3:
    return Pop3From("127.0.0.1", server.pop3_port, source)


def login(server: ServerProcess, name: str) -> poplib.POP3:
    conn = connect(server)
    conn.user(user(name))
    conn.pass_(PASSWORD)
    return conn


def retr(conn: poplib.POP3, which: int) -> bytes:
    _, lines, _ = conn.retr(which)
    return b"".join(line + b"\r\n" for line in lines)


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def err(exc: pytest.ExceptionInfo[poplib.error_proto]) -> str:
    return str(exc.value.args[0], "utf-8", "replace")


def test_capabilities(pop: ServerProcess) -> None:
    conn = connect(pop)
    assert conn.getwelcome().startswith(b"+OK")
    caps = conn.capa()
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER", "STLS"):
        assert cap in caps, caps
    assert caps["SASL"] == ["PLAIN"]
    conn.user(user("basic"))
    conn.pass_(PASSWORD)
    after = conn.capa()  # in TRANSACTION: no more login or STLS
    assert "STLS" not in after and "USER" not in after and "UIDL" in after
    conn.quit()


def test_retrieve_exact_bytes_list_stat_uidl(pop: ServerProcess) -> None:
    conn = login(pop, "basic")
    stored = MESSAGES["basic"]
    count, size = conn.stat()
    assert (count, size) == (3, sum(len(m) for m in stored))
    _, listing, _ = conn.list()
    assert listing == [f"{i + 1} {len(m)}".encode() for i, m in enumerate(stored)]
    assert conn.list(2).split()[1:] == [b"2", str(len(stored[1])).encode()]
    for i, raw in enumerate(stored):
        assert retr(conn, i + 1) == raw  # byte for byte, dot-stuffing undone by the client
    _, uidl, _ = conn.uidl()
    uids = [line.split()[1] for line in uidl]
    assert len(set(uids)) == 3 and all(1 <= len(u) <= 70 for u in uids)
    assert conn.uidl(3).split()[2] == uids[2]
    conn.quit()
    again = login(pop, "basic")  # stable across sessions
    _, uidl2, _ = again.uidl()
    assert [line.split()[1] for line in uidl2] == uids
    again.quit()


def test_top(pop: ServerProcess) -> None:
    conn = login(pop, "top")
    raw = MESSAGES["top"][0]
    head = raw.split(b"\r\n\r\n", 1)[0]
    _, lines, _ = conn.top(1, 0)
    assert b"\r\n".join(lines) == head + b"\r\n"
    _, lines, _ = conn.top(1, 2)
    assert lines[-2:] == [b"Line one of top message 1", b".a line starting with a dot"]
    _, lines, _ = conn.top(1, 1000)
    assert b"".join(line + b"\r\n" for line in lines) == raw
    conn.quit()


def test_dele_takes_effect_only_at_quit(pop: ServerProcess) -> None:
    conn = login(pop, "dele")
    assert conn.dele(1).startswith(b"+OK")
    assert conn.stat()[0] == 2
    with pytest.raises(poplib.error_proto) as exc:
        conn.retr(1)
    assert "deleted" in err(exc)
    _, listing, _ = conn.list()
    assert [line.split()[0] for line in listing] == [b"2", b"3"]
    assert conn.rset().startswith(b"+OK")
    assert conn.stat()[0] == 3
    conn.dele(2)
    _, uidl, _ = conn.uidl()
    assert [line.split()[0] for line in uidl] == [b"1", b"3"]
    uids = {int(line.split()[0]): line.split()[1] for line in uidl}
    assert conn.quit().startswith(b"+OK")
    after = login(pop, "dele")
    assert after.stat()[0] == 2
    _, uidl2, _ = after.uidl()
    assert [line.split()[1] for line in uidl2] == [uids[1], uids[3]]
    assert retr(after, 2) == MESSAGES["dele"][2]  # renumbered from 1 in the new session
    after.quit()


def test_dropped_connection_deletes_nothing(pop: ServerProcess) -> None:
    conn = login(pop, "drop")
    conn.dele(1)
    conn.dele(2)
    conn.sock.close()  # no QUIT: no UPDATE state
    conn.file.close()
    for _ in range(50):  # the server notices the close and releases the maildrop lock
        try:
            again = login(pop, "drop")
            break
        except poplib.error_proto as exc:
            assert b"IN-USE" in exc.args[0]
            time.sleep(0.05)
    assert again.stat()[0] == 3
    again.quit()


def test_second_session_gets_in_use(pop: ServerProcess) -> None:
    first = login(pop, "inuse")
    second = connect(pop)
    second.user(user("inuse"))
    with pytest.raises(poplib.error_proto) as exc:
        second.pass_(PASSWORD)
    assert err(exc).startswith("-ERR [IN-USE]")
    implicit = poplib.POP3_SSL("127.0.0.1", pop.pop3s_port, context=client_tls(), timeout=30)
    implicit.user(user("inuse"))  # the lock is per user, across both listeners
    with pytest.raises(poplib.error_proto):
        implicit.pass_(PASSWORD)
    implicit.quit()
    first.quit()  # the refused session stays in AUTHORIZATION and may try again
    second.user(user("inuse"))
    second.pass_(PASSWORD)
    assert second.stat()[0] == 3
    second.quit()


def test_stls_and_implicit_tls(pop: ServerProcess) -> None:
    conn = connect(pop)
    assert conn.stls(client_tls()).startswith(b"+OK")
    assert "STLS" not in conn.capa()
    conn.user(user("tls"))
    conn.pass_(PASSWORD)
    assert retr(conn, 1) == MESSAGES["tls"][0]
    conn.quit()
    implicit = poplib.POP3_SSL("127.0.0.1", pop.pop3s_port, context=client_tls(), timeout=30)
    assert "STLS" not in implicit.capa()
    with pytest.raises(poplib.error_proto) as exc:
        implicit._shortcmd("STLS")
    assert "already" in err(exc)
    implicit.user(user("tls"))
    implicit.pass_(PASSWORD)
    assert implicit.stat()[0] == 3
    implicit.quit()


def plain(authcid: str, password: str, authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def test_auth_plain(pop: ServerProcess) -> None:
    conn = connect(pop)
    resp = conn._shortcmd("AUTH PLAIN " + plain(user("sasl"), PASSWORD))
    assert resp.startswith(b"+OK")
    assert conn.stat()[0] == 3
    conn.quit()
    # Without an initial response: the server asks with "+ " (RFC 5034 §4).
    conn = connect(pop)
    conn._putcmd("AUTH PLAIN")
    assert conn._getline()[0].startswith(b"+")
    conn._putcmd(plain(user("sasl"), PASSWORD, authzid=user("sasl")))
    assert conn._getresp().startswith(b"+OK")
    conn.quit()
    conn = connect(pop)
    conn._putcmd("AUTH PLAIN")
    conn._getline()
    conn._putcmd("*")
    with pytest.raises(poplib.error_proto) as exc:
        conn._getresp()
    assert "cancelled" in err(exc)
    _, mechanisms, _ = conn._longcmd("AUTH")
    assert mechanisms == [b"PLAIN"]
    conn.quit()


def expect_err(conn: poplib.POP3, command: str, *words: str) -> None:
    with pytest.raises(poplib.error_proto) as exc:
        conn._shortcmd(command)
    text = err(exc)
    assert text.startswith("-ERR "), text
    for word in words:
        assert word in text, text


def test_every_bad_input_gets_err_and_the_connection_survives(pop: ServerProcess) -> None:
    conn = connect(pop, source="127.0.0.3")
    expect_err(conn, "STAT", "AUTHORIZATION")
    expect_err(conn, "RETR 1", "AUTHORIZATION")
    expect_err(conn, "NOOP", "AUTHORIZATION")
    expect_err(conn, "PASS " + PASSWORD, "USER")
    expect_err(conn, "XYZZY", "unknown command")
    expect_err(conn, "RETRIEVE 1", "unknown command")
    expect_err(conn, "USER", "user name")
    expect_err(conn, "APOP someone 0123456789abcdef", "APOP")
    expect_err(conn, "AUTH CRAM-MD5", "unsupported")
    expect_err(conn, "AUTH PLAIN !!!notbase64", "base64")
    expect_err(conn, "AUTH PLAIN " + base64.b64encode(b"no-nuls").decode(), "malformed")
    expect_err(conn, "AUTH PLAIN " + plain(user("errors"), PASSWORD, authzid=user("basic")),
               "[AUTH]")
    expect_err(conn, "AUTH PLAIN " + plain(user("errors"), "wrong-password"), "[AUTH]")
    conn.user(user("errors"))
    expect_err(conn, "PASS wrong-password", "[AUTH]")
    conn.user("nobody@example.test")
    expect_err(conn, "PASS " + PASSWORD, "[AUTH]")
    conn._putline(b"\xff\xfe\xfd")
    with pytest.raises(poplib.error_proto) as exc:
        conn._getresp()
    assert "UTF-8" in err(exc)
    conn._putline(b"NOOP " + b"x" * 10_000)
    with pytest.raises(poplib.error_proto) as exc:
        conn._getresp()
    assert "too long" in err(exc)
    conn.user(user("errors"))
    conn.pass_(PASSWORD)  # still the same connection, now logged in
    expect_err(conn, "USER someone", "TRANSACTION")
    expect_err(conn, "STLS", "TRANSACTION")
    expect_err(conn, "RETR", "message number")
    expect_err(conn, "RETR x", "invalid message number")
    expect_err(conn, "RETR -1", "invalid message number")
    expect_err(conn, "RETR 0", "no such message")
    expect_err(conn, "RETR 4", "no such message")
    expect_err(conn, "RETR 99999999999999999999", "no such message")
    expect_err(conn, "RETR 1 2", "message number")
    expect_err(conn, "LIST 9", "no such message")
    expect_err(conn, "UIDL 0", "no such message")
    expect_err(conn, "TOP 1", "line count")
    expect_err(conn, "TOP 1 x", "invalid line count")
    expect_err(conn, "TOP 1 -2", "invalid line count")
    expect_err(conn, "DELE", "message number")
    expect_err(conn, "STAT 1", "no arguments")
    conn.dele(3)
    expect_err(conn, "DELE 3", "already deleted")
    expect_err(conn, "TOP 3 0", "already deleted")
    expect_err(conn, "LIST 3", "already deleted")
    expect_err(conn, "FOO", "unknown command")
    assert conn.noop().startswith(b"+OK")
    conn.rset()
    assert conn.stat()[0] == 3
    conn.quit()


def test_failed_logins_are_throttled(pop: ServerProcess) -> None:
    conn = connect(pop, source="127.0.0.4")
    replies = []
    for _ in range(12):
        conn.user("victim@example.test")
        with pytest.raises(poplib.error_proto) as exc:
            conn.pass_("not-the-password")
        replies.append(err(exc))
    assert all(r.startswith("-ERR [AUTH]") for r in replies)
    assert "too many" in replies[-1]
    assert conn.capa()  # still connected
    conn.quit()


def folders_of(server: ServerProcess, name: str) -> dict[str, dict[str, list[str]]]:
    """What the REST API (so webmail) shows in the user's INBOX and Trash: id -> flags."""
    with httpx.Client(base_url=server.base_url, auth=(user(name), PASSWORD), timeout=30) as api:
        out = {}
        for folder in ("INBOX", "Trash"):
            r = api.get(f"/v1/folders/{folder}/messages", params={"limit": 500})
            assert r.status_code == 200, r.text
            out[folder] = {m["id"]: m["flags"] for m in r.json()["messages"]}
        return out


def test_deleted_over_pop3_is_gone_for_every_other_client(pop: ServerProcess) -> None:
    before = folders_of(pop, "api")
    assert len(before["INBOX"]) == 3
    conn = login(pop, "api")
    _, uidl, _ = conn.uidl()
    uids = [line.split()[1].decode() for line in uidl]
    assert sorted(uids) == sorted(before["INBOX"])  # the UIDL is the message id
    conn.retr(2)
    conn.dele(1)
    assert folders_of(pop, "api") == before  # nothing happens before QUIT
    conn.quit()
    after = folders_of(pop, "api")
    assert sorted(after["INBOX"]) == sorted(uids[1:])
    assert "\\Seen" in after["INBOX"][uids[1]]  # a downloaded message counts as read
    assert "\\Seen" not in after["INBOX"][uids[2]]
    assert after["Trash"] == {}  # the default delete action expunges
    with httpx.Client(base_url=pop.base_url, auth=(user("api"), PASSWORD), timeout=30) as api:
        assert api.get(f"/v1/messages/{uids[0]}").status_code == 404
        assert api.get(f"/v1/messages/{uids[1]}").status_code == 200
    imap = imaplib.IMAP4("127.0.0.1", pop.imap_port, timeout=30)
    imap.login(user("api"), PASSWORD)
    status, data = imap.select("INBOX", readonly=True)
    assert status == "OK" and data == [b"2"]
    imap.logout()


def curl(server: ServerProcess, *args: str) -> bytes:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-u", f"{user('curl')}:{PASSWORD}", *args],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(pop: ServerProcess) -> None:
    url = f"pop3://127.0.0.1:{pop.pop3_port}"
    stored = MESSAGES["curl"]
    listing = curl(pop, f"{url}/")
    assert listing == b"".join(f"{i + 1} {len(m)}\r\n".encode() for i, m in enumerate(stored))
    assert curl(pop, f"{url}/2") == stored[1]
    uidl = curl(pop, "-X", "UIDL", f"{url}/").split(b"\r\n")
    assert [line.split()[0] for line in uidl if line] == [b"1", b"2", b"3"]
    top = curl(pop, "-X", "TOP 1 0", f"{url}/")
    assert top == stored[0].split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    # Over STLS too, with curl's own TLS.
    assert curl(pop, "--ssl-reqd", "-k", f"{url}/3") == stored[2]
    assert curl(pop, "-k", f"pop3s://127.0.0.1:{pop.pop3s_port}/1") == stored[0]


def test_mail_received_over_smtp_comes_back_exactly(pop: ServerProcess) -> None:
    sent = crlf(b"From: Carol <carol@remote.test>\nTo: smtp@example.test\n"
                b"Subject: over SMTP and back\nMessage-ID: <smtp-and-back@remote.test>\n\n"
                b".leading dot\n..two\n.\n\n" + b"x" * 990 + b"\n  trailing space  \nend\n")
    with smtplib.SMTP("127.0.0.1", pop.smtp_port, timeout=10) as smtp:
        assert smtp.sendmail("carol@remote.test", [user("smtp")], sent) == {}
    deadline = time.monotonic() + 20
    while True:  # the incoming worker delivers in the background
        conn = login(pop, "smtp")
        if conn.stat()[0] or time.monotonic() > deadline:
            break
        conn.quit()
        time.sleep(0.1)
    assert conn.stat()[0] == 1
    got = retr(conn, 1)
    uid = conn.uidl(1).split()[2].decode()
    conn.quit()
    with httpx.Client(base_url=pop.base_url, auth=(user("smtp"), PASSWORD), timeout=30) as api:
        stored = api.get(f"/v1/messages/{uid}/raw")
    assert stored.status_code == 200, stored.text
    assert got == stored.content  # exactly the bytes received, trace fields included
    assert got.endswith(b"\r\n" + sent) and got.startswith(b"Return-Path: <carol@remote.test>")
