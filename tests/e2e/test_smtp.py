"""SMTP MX and submission against a real `postroom serve` process, with real clients:
smtplib (STARTTLS, AUTH, PIPELINING, SMTPUTF8, BDAT), swaks and curl's smtp://, and raw sockets
for what no polite client sends (smuggling, oversize, limits)."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ServerProcess
from tests.e2e.smtp_helpers import (
    RawSmtp,
    api,
    folder_messages,
    subjects,
    trace_prefix_ok,
    wait_for_subject,
)

ALICE = ("alice@example.test", "alice-secret-1")
BOB = ("bob@example.test", "bob-secret-22")
MAX_SIZE = 200_000
MAX_RCPT = 5
MAX_LINE = 2000
JUNK = 15
PER_IP = 40


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("smtp")
    server = ServerProcess(base / "data", env={
        "POSTROOM_MAIL__MAX_MESSAGE_BYTES": str(MAX_SIZE),
        "POSTROOM_SMTP__MAX_RECIPIENTS": str(MAX_RCPT),
        "POSTROOM_SMTP__MAX_LINE_LENGTH": str(MAX_LINE),
        "POSTROOM_SMTP__MAX_JUNK_COMMANDS": str(JUNK),
        "POSTROOM_SMTP__CONNECTIONS_PER_IP": str(PER_IP),
        "POSTROOM_SMTP__COMMAND_TIMEOUT": "2",
    })
    server.cli("domain", "add", "example.test")
    server.cli("user", "add", ALICE[0], "--password", ALICE[1])
    server.cli("user", "add", BOB[0], "--password", BOB[1])
    server.cli("alias", "add", "jörg@example.test", ALICE[0])
    server.cli("alias", "add", "info@example.test", BOB[0])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alice(srv: ServerProcess) -> Iterator[httpx.Client]:
    with api(srv, *ALICE) as c:
        yield c


@pytest.fixture(scope="module")
def bob(srv: ServerProcess) -> Iterator[httpx.Client]:
    with api(srv, *BOB) as c:
        yield c


def message(subject: str, sender: str = "carol@remote.test", to: str = ALICE[0],
            body: str = "Hello.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}").encode()


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ------------------------------------------------------------------------------------- MX


def test_mx_message_comes_back_byte_for_byte(srv: ServerProcess, alice: httpx.Client) -> None:
    sent = message("done when", body="Line one.\r\n.leading dot\r\n\r\nÜmlaut 8bit\r\n")
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        _, text = s.ehlo("client.remote.test")
        features = text.decode()
        for ext in ("PIPELINING", f"SIZE {MAX_SIZE}", "8BITMIME", "SMTPUTF8",
                    "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "STARTTLS"):
            assert ext in features
        assert "AUTH" not in features  # the MX never relays, so it offers no login
        refused = s.sendmail("carol@remote.test", [ALICE[0]], sent,
                             mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=abc+2B1"],
                             rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;alice@example.test"])
        assert refused == {}
    found = wait_for_subject(alice, "done when")
    raw = alice.get(f"/v1/messages/{found['id']}/raw").content
    assert trace_prefix_ok(raw, sent), raw[:400]
    assert raw.startswith(b"Return-Path: <carol@remote.test>\r\nReceived: from client.remote.test")


def test_mx_recipient_policy(srv: ServerProcess, bob: httpx.Client) -> None:
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.ehlo("relay.test")
        assert s.mail("spammer@remote.test")[0] == 250
        code, text = s.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = s.docmd("DATA")
        assert (code, text[:5]) == (554, b"5.5.1")
        s.rset()
        # Aliases and subaddresses reach their user.
        s.sendmail("carol@remote.test", ["info@example.test", "bob+lists@example.test"],
                   message("to alias", to="info@example.test"))
    wait_for_subject(bob, "to alias")  # one copy although two addresses reach bob
    assert "relay" not in " ".join(subjects(bob))


def test_smtputf8_addresses(srv: ServerProcess, alice: httpx.Client) -> None:
    sent = ("From: josé@remote.test\r\nTo: jörg@example.test\r\nSubject: utf8 mail\r\n\r\n"
            "Grüße\r\n").encode()
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.send("MAIL FROM:<josé@remote.test>\r\n".encode())  # no SMTPUTF8 parameter
        code, text = s.getreply()
        assert (code, text[:5]) == (553, b"5.6.7")
        s.sendmail("josé@remote.test", ["jörg@example.test"], sent, mail_options=["SMTPUTF8"])
    found = wait_for_subject(alice, "utf8 mail")
    raw = alice.get(f"/v1/messages/{found['id']}/raw").content
    assert trace_prefix_ok(raw, sent)
    assert b"with UTF8SMTP" in raw


def test_pipelining_in_one_write(srv: ServerProcess, alice: httpx.Client) -> None:
    c = RawSmtp(srv.smtp_port)
    assert c.reply()[0] == 220
    batch = (b"EHLO pipe.test\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
             b"RCPT TO:<ghost@example.test>\r\nDATA\r\n")
    c.send(batch)
    assert c.reply()[0] == 250
    assert c.reply() == (250, "2.1.0 Ok")
    assert c.reply() == (250, "2.1.5 Ok")
    assert c.reply()[0:1] == (550,)
    assert c.reply()[0] == 354
    c.send(message("pipelined") + b".\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<alice@example.test>"
           b"\r\nDATA\r\n")
    assert c.reply()[1].startswith("2.0.0 Ok: queued as")
    assert c.reply()[0] == 250 and c.reply()[0] == 250 and c.reply()[0] == 354
    c.send(message("pipelined two") + b".\r\nQUIT\r\n")
    assert c.reply()[0] == 250 and c.reply()[0] == 221
    c.close()
    wait_for_subject(alice, "pipelined")
    wait_for_subject(alice, "pipelined two")


def test_bdat_chunks(srv: ServerProcess, alice: httpx.Client) -> None:
    sent = message("chunked", body="part one, part two\r\n")
    c = RawSmtp(srv.smtp_port)
    c.reply()
    c.cmd("EHLO chunk.test")
    assert c.cmd("MAIL FROM:<c@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    c.send(b"BDAT 20\r\n" + sent[:20])
    assert c.reply()[1] == "2.0.0 20 octets received"
    rest = sent[20:]
    c.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
    code, text = c.reply()
    assert code == 250 and "queued" in text
    # DATA after BDAT is out of sequence.
    c.cmd("MAIL FROM:<c@remote.test>")
    c.cmd("RCPT TO:<alice@example.test>")
    c.send(b"BDAT 4\r\nab\nc")
    assert c.reply()[0] == 250
    assert c.cmd("DATA")[0] == 503
    code, text = c.cmd(b"BDAT 0 LAST")  # a bare LF is refused in BDAT too
    assert (code, text[:5]) == (554, "5.6.0")
    c.close()
    found = wait_for_subject(alice, "chunked")
    assert trace_prefix_ok(alice.get(f"/v1/messages/{found['id']}/raw").content, sent)


def test_bdat_with_smtplib_docmd(srv: ServerProcess, alice: httpx.Client) -> None:
    sent = message("smtplib bdat")
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.ehlo("lib.test")
        assert s.has_extn("chunking")
        s.mail("lib@remote.test")
        s.rcpt(ALICE[0])
        s.send(b"BDAT %d LAST\r\n" % len(sent) + sent)
        code, _ = s.getreply()
        assert code == 250
    wait_for_subject(alice, "smtplib bdat")


def test_smuggling_is_refused_and_nothing_stored(srv: ServerProcess, alice: httpx.Client,
                                                 bob: httpx.Client) -> None:
    for ending in (b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"):
        c = RawSmtp(srv.smtp_port)
        c.reply()
        c.cmd("EHLO smuggler.test")
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<alice@example.test>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: outer\r\n\r\nhello" + ending +
               b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
        code, text = c.reply()
        assert code == 521 and text.startswith("5.5.2"), (ending, code, text)
        assert c.closed()
        c.close()
    time.sleep(0.3)
    assert "smuggled" not in subjects(bob)
    assert "outer" not in subjects(alice) and "smuggled" not in subjects(alice)


def test_oversize_refused(srv: ServerProcess, alice: httpx.Client) -> None:
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.ehlo("big.test")
        code, text = s.docmd(f"MAIL FROM:<big@remote.test> SIZE={MAX_SIZE + 1}")
        assert (code, text[:5]) == (552, b"5.3.4")
        s.mail("big@remote.test")
        s.rcpt(ALICE[0])
        code, text = s.data(message("too big", body="x" * 70 + "\r\n") * (MAX_SIZE // 60))
        assert (code, text[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250  # the session is still in step
        s.mail("big@remote.test")
        s.rcpt(ALICE[0])
        code, text = s.data(message("long line", body="y" * (MAX_LINE + 10) + "\r\n"))
        assert (code, text[:5]) == (554, b"5.6.0")
    c = RawSmtp(srv.smtp_port)
    c.reply()
    c.cmd("EHLO big.test")
    c.cmd("MAIL FROM:<big@remote.test>")
    c.cmd("RCPT TO:<alice@example.test>")
    c.send(b"BDAT %d LAST\r\n" % (MAX_SIZE + 1) + b"z" * (MAX_SIZE + 1))
    code, text = c.reply()
    assert (code, text[:5]) == (552, "5.3.4")
    assert c.cmd("NOOP")[0] == 250
    # sizes no number type should take: a digit that is not ASCII, a thousand digits
    code, text = c.cmd("MAIL FROM:<big@remote.test> SIZE=\u00b2")
    assert (code, text[:5]) == (501, "5.5.4")  # (was 421 "internal error" and a hang-up)
    code, text = c.cmd("MAIL FROM:<big@remote.test> SIZE=" + "9" * 1000)
    assert (code, text[:5]) == (552, "5.3.4")
    c.cmd("MAIL FROM:<big@remote.test>")
    c.cmd("RCPT TO:<alice@example.test>")
    code, text = c.cmd("BDAT " + "1" * 1000)  # a chunk too big to read through: hang up
    assert (code, text[:5]) == (552, "5.3.4") and c.closed()
    time.sleep(0.3)
    assert not {"too big", "long line"} & set(subjects(alice))


def test_limits(srv: ServerProcess) -> None:
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=10) as s:
        s.ehlo("many.test")
        s.mail("m@remote.test")
        for _ in range(MAX_RCPT):
            assert s.rcpt(ALICE[0])[0] == 250  # duplicates count: a cheap way to hit the limit
        s.rset()
        s.mail("m@remote.test")
        for n in range(MAX_RCPT):
            s.rcpt(f"alice+{n}@example.test")
        code, text = s.rcpt("bob@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        code, text = s.docmd("X" * 3000)
        assert (code, text[:5]) == (500, b"5.5.2")
        code, text = s.docmd("FROB")
        assert (code, text[:5]) == (500, b"5.5.2")
    # Commands that never lead to mail end the session.
    c = RawSmtp(srv.smtp_port)
    c.reply()
    for _ in range(JUNK):
        assert c.cmd("NOOP")[0] == 250
    assert c.cmd("NOOP")[0] == 421
    assert c.closed()
    # An idle client is dropped after the command timeout (2 s here).
    c = RawSmtp(srv.smtp_port)
    c.reply()
    started = time.monotonic()
    code, text = c.reply()
    assert (code, text[:5]) == (421, "4.4.2") and time.monotonic() - started < 5
    # Connections per client address.
    held = [socket.create_connection(("127.0.0.1", srv.smtp_port)) for _ in range(PER_IP)]
    for sock in held:
        assert sock.recv(100).startswith(b"220")
    extra = RawSmtp(srv.smtp_port)
    code, text = extra.reply()
    assert (code, text[:5]) == (421, "4.7.0")
    for sock in [*held, extra.sock]:
        sock.close()


def test_swaks_and_curl(srv: ServerProcess, alice: httpx.Client, tmp_path: Path) -> None:
    swaks, curl = shutil.which("swaks"), shutil.which("curl")
    if swaks is None or curl is None:
        pytest.skip("swaks and curl are needed (scripts/debian-packages.txt)")
    run = subprocess.run([swaks, "--server", f"127.0.0.1:{srv.smtp_port}", "--to", ALICE[0],
                          "--from", "swaks@remote.test", "--header", "Subject: via swaks",
                          "--body", "sent by swaks"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run([swaks, "--server", f"127.0.0.1:{srv.smtp_port}",
                          "--to", "ghost@example.test", "--from", "swaks@remote.test"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "<** 550 5.1.1" in run.stdout
    found = wait_for_subject(alice, "via swaks")
    raw = alice.get(f"/v1/messages/{found['id']}/raw").content
    assert b"sent by swaks" in raw
    # STARTTLS through swaks too.
    run = subprocess.run([swaks, "--server", f"127.0.0.1:{srv.smtp_port}", "--tls",
                          "--to", ALICE[0], "--from", "swaks@remote.test",
                          "--header", "Subject: swaks over tls"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    assert b"with ESMTPS" in alice.get(
        f"/v1/messages/{wait_for_subject(alice, 'swaks over tls')['id']}/raw").content

    sent = message("via curl", sender="curl@remote.test")
    path = tmp_path / "curl.eml"
    path.write_bytes(sent)
    run = subprocess.run([curl, "-sS", f"smtp://127.0.0.1:{srv.smtp_port}/curl.test",
                          "--mail-from", "curl@remote.test", "--mail-rcpt", ALICE[0],
                          "-T", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    found = wait_for_subject(alice, "via curl")
    assert trace_prefix_ok(alice.get(f"/v1/messages/{found['id']}/raw").content, sent)
    run = subprocess.run([curl, "-sS", f"smtp://127.0.0.1:{srv.smtp_port}/curl.test",
                          "--mail-from", "curl@remote.test", "--mail-rcpt", "x@elsewhere.test",
                          "-T", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "550" in run.stderr


# ------------------------------------------------------------------------------ submission


def test_submission_starttls_auth_delivers_and_files_sent(
        srv: ServerProcess, alice: httpx.Client, bob: httpx.Client) -> None:
    sent = message("submitted", sender=ALICE[0], to=BOB[0])
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
        s.ehlo("mua.test")
        assert s.has_extn("starttls")
        code, _ = s.mail(ALICE[0])
        assert code == 530  # authentication first
        s.rset()
        s.starttls(context=insecure())
        s.ehlo("mua.test")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login(ALICE[0], "wrong-password")
        assert exc.value.smtp_code == 535 and exc.value.smtp_error[:5] == b"5.7.8"
        s.login(*ALICE)
        code, text = s.mail(BOB[0])
        assert (code, text[:5]) == (553, b"5.7.1")  # not alice's address
        s.rset()
        s.mail(ALICE[0])
        s.rcpt(BOB[0])
        s.rcpt("friend@elsewhere.test")  # remote: relayed for an authenticated user
        code, text = s.data(sent)
        assert code == 250, text
        # From: must be alice's too.
        forged = message("forged from", sender=BOB[0], to=BOB[0])
        s.mail(ALICE[0])
        s.rcpt(BOB[0])
        code, text = s.data(forged)
        assert (code, text[:5]) == (553, b"5.7.1")
    found = wait_for_subject(bob, "submitted")
    raw = bob.get(f"/v1/messages/{found['id']}/raw").content
    assert raw.endswith(sent) and b"with ESMTPSA" in raw
    wait_for_subject(alice, "submitted", folder="Sent")
    assert "forged from" not in subjects(bob)


def test_submission_login_mechanism_and_alias_sender(srv: ServerProcess,
                                                     alice: httpx.Client) -> None:
    # Loopback counts as secure ([auth] plaintext_on_loopback), so AUTH is offered in clear.
    with smtplib.SMTP("127.0.0.1", srv.submission_port, timeout=10) as s:
        s.ehlo("mua.test")
        assert "LOGIN" in s.esmtp_features["auth"]
        s.user, s.password = BOB
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235
        s.sendmail("info@example.test", [ALICE[0]],
                   message("from bobs alias", sender="Info <info@example.test>"))
    wait_for_subject(alice, "from bobs alias")


def test_submissions_implicit_tls(srv: ServerProcess, bob: httpx.Client) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", srv.submissions_port, timeout=10,
                          context=insecure()) as s:
        s.ehlo("mua.test")
        assert not s.has_extn("starttls")
        s.login(*ALICE)
        s.sendmail(ALICE[0], [BOB[0]], message("over 465", sender=ALICE[0], to=BOB[0]))
    wait_for_subject(bob, "over 465")


def test_nothing_left_in_the_incoming_queue(srv: ServerProcess, alice: httpx.Client) -> None:
    deadline = time.monotonic() + 10
    while True:
        listing = srv.cli("queue", "list", "--topic", "incoming").stdout
        if listing.strip().endswith("0 item(s)") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert listing.strip().endswith("0 item(s)"), listing
    assert len(folder_messages(alice)) >= 5
