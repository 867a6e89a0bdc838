"""Spam filtering end to end: a real server, real SMTP, dnsmasq as its DNS.

Corpus spam lands in Junk and ham in INBOX; feedback (moving into Junk, reporting not-spam)
changes the next verdict for the same sender (REST and IMAP MOVE); a sender the user wrote to
is trusted; DMARC p=reject refuses at SMTP time; banned
senders are refused at RCPT; the outbound limit answers 451 4.7.1.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier
from tests.corpus import messages
from tests.e2e.server import ServerProcess
from tests.e2e.smtp_helpers import api, wait_for_subject
from tests.spam_dns import dnsmasq

ALICE = ("alice@example.test", "alice-secret-1")
BOB = ("bob@example.test", "bob-secret-22")
RECORDS = {
    "good.test": "v=spf1 ip4:127.0.0.1 -all",
    "forged.test": "v=spf1 ip4:192.0.2.1 -all",
    "_dmarc.forged.test": "v=DMARC1; p=reject",
    "partner.test": "v=spf1 ip4:127.0.0.1 -all",
    "weekly.test": "v=spf1 ip4:127.0.0.1 -all",
    "elsewhere.test": "v=spf1 ip4:192.0.2.9 -all",  # no DMARC: SPF fail only adds to the score
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("spam")
    with dnsmasq(base, RECORDS) as dns_port:
        srv = ServerProcess(base / "data", env={
            "POSTROOM_DNS__SERVERS": f"127.0.0.1:{dns_port}",
            "POSTROOM_DNS__TIMEOUT": "3",
            "POSTROOM_SPAM__TRUSTED_NETWORKS": "",  # loopback is "the internet" here
            "POSTROOM_SPAM__MESSAGES_PER_HOUR": "3",
        })
        srv.cli("domain", "add", "example.test")
        srv.cli("user", "add", ALICE[0], "--password", ALICE[1])
        srv.cli("user", "add", BOB[0], "--password", BOB[1])
        srv.start()
        yield srv
        srv.stop()


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def with_subject(raw: bytes, subject: str) -> bytes:
    head, sep, body = crlf(raw).partition(b"\r\n\r\n")
    head = re.sub(rb"(?im)^subject:.*(\r\n[ \t].*)*\r\n", b"", head + b"\r\n")
    return head + f"Subject: {subject}\r\n".encode() + sep + body


def pick(group: str, low: float, high: float) -> bytes:
    """The first corpus message of the group whose shipped-model score is in [low, high]."""
    classifier = ContentClassifier.default()
    for _, raw in messages(group):
        if low <= classifier.score(parse_message(raw)).logit <= high:
            return raw
    raise AssertionError(f"no message of {group} scores in [{low}, {high}]")


def send_mx(server: ServerProcess, mail_from: str, rcpt: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        s.sendmail(mail_from, [rcpt], raw)


def test_corpus_spam_to_junk_and_ham_to_inbox(server: ServerProcess) -> None:
    spam = with_subject(pick("spam-2", 4.0, 99.0), "corpus spam one")
    ham = with_subject(pick("easy-ham-2", -99.0, -4.0), "corpus ham one")
    send_mx(server, "offers@promo-mailer.test", ALICE[0], spam)
    send_mx(server, "friend@lists.example.org", ALICE[0], ham)
    with api(server, *ALICE) as alice:
        junk = wait_for_subject(alice, "corpus spam one", folder="Junk")
        inbox = wait_for_subject(alice, "corpus ham one", folder="INBOX")
        stored = alice.get(f"/v1/messages/{junk['id']}/raw").content
        assert b"\r\nX-Spam-Status: Yes, score=" in stored
        assert b"\r\nAuthentication-Results: mx.example.test;" in stored
        assert b"X-Spam-Status: No, score=" in alice.get(
            f"/v1/messages/{inbox['id']}/raw").content


def test_feedback_changes_the_next_verdict(server: ServerProcess) -> None:
    base = pick("easy-ham-2", -2.5, -0.3)  # mildly hammy: feedback must be able to flip it
    sender = "news@good.test"  # SPF passes for 127.0.0.1
    with api(server, *BOB) as bob:
        send_mx(server, sender, BOB[0], with_subject(base, "feedback one"))
        first = wait_for_subject(bob, "feedback one", folder="INBOX")
        r = bob.patch(f"/v1/messages/{first['id']}", json={"folder": "Junk"})
        assert r.status_code == 200, r.text
        send_mx(server, sender, BOB[0], with_subject(base, "feedback two"))
        second = wait_for_subject(bob, "feedback two", folder="Junk")
        r = bob.post(f"/v1/messages/{second['id']}/not-spam")
        assert r.status_code == 200, r.text
        assert wait_for_subject(bob, "feedback two", folder="INBOX")
        r = bob.post(f"/v1/messages/{first['id']}/not-spam")
        assert r.status_code in (200, 404), r.text  # moved before: its id may have changed
        send_mx(server, sender, BOB[0], with_subject(base, "feedback three"))
        wait_for_subject(bob, "feedback three", folder="INBOX")


def imap_move(server: ServerProcess, user: tuple[str, str], subject: str, source: str,
              target: str) -> None:
    """Move the message with this subject as a mail client does (UID MOVE, RFC 6851)."""
    with imaplib.IMAP4("127.0.0.1", server.imap_port) as imap:
        imap.login(*user)
        assert imap.select(source)[0] == "OK"
        typ, data = imap.uid("SEARCH", "SUBJECT", f'"{subject}"')
        assert typ == "OK" and data[0], f"{subject!r} is not in {source}"
        assert imap.uid("MOVE", data[0].decode(), target)[0] == "OK"


def test_feedback_over_imap_moves_changes_the_next_verdict(server: ServerProcess) -> None:
    dana = ("dana@example.test", "dana-secret-333")
    server.cli("user", "add", dana[0], "--password", dana[1])
    base = pick("easy-ham-2", -2.5, -0.3)  # mildly hammy: one report must be able to flip it
    sender = "digest@weekly.test"  # SPF passes for 127.0.0.1
    with api(server, *dana) as client:
        send_mx(server, sender, dana[0], with_subject(base, "imap feedback one"))
        wait_for_subject(client, "imap feedback one", folder="INBOX")
        imap_move(server, dana, "imap feedback one", "INBOX", "Junk")  # "this is spam"
        send_mx(server, sender, dana[0], with_subject(base, "imap feedback two"))
        wait_for_subject(client, "imap feedback two", folder="Junk")
        imap_move(server, dana, "imap feedback two", "Junk", "INBOX")  # "not spam"
        imap_move(server, dana, "imap feedback one", "Junk", "INBOX")
        send_mx(server, sender, dana[0], with_subject(base, "imap feedback three"))
        wait_for_subject(client, "imap feedback three", folder="INBOX")


def test_a_sender_the_user_wrote_to_is_trusted(server: ServerProcess) -> None:
    erin = ("erin@example.test", "erin-secret-4444")
    server.cli("user", "add", erin[0], "--password", erin[1])
    spammy = pick("spam-2", 2.0, 5.0)  # Junk on its own; a contact's -6 brings it under
    with api(server, *erin) as client:
        send_mx(server, "stranger@partner.test", erin[0], with_subject(spammy, "contact one"))
        wait_for_subject(client, "contact one", folder="Junk")
        r = client.post("/v1/messages", json={"to": ["partner@partner.test"],
                                              "subject": "Our meeting", "text": "See you!"})
        assert r.status_code in (200, 201, 202), r.text
        send_mx(server, "partner@partner.test", erin[0], with_subject(spammy, "contact two"))
        wait_for_subject(client, "contact two", folder="INBOX")  # erin wrote to them
        send_mx(server, "stranger@partner.test", erin[0], with_subject(spammy, "contact three"))
        wait_for_subject(client, "contact three", folder="Junk")  # the domain alone is not


def test_clearly_bad_mail_is_refused_at_smtp(server: ServerProcess) -> None:
    """Content score at the ±15 clip plus an SPF fail reaches reject_threshold (15): 550."""
    worst = with_subject(pick("spam-2", 15.0, 999.0), "clearly bad")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("promo@elsewhere.test", [ALICE[0]], worst)
    assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error
    with api(server, *ALICE) as alice:  # stored nowhere
        for folder in ("INBOX", "Junk"):
            page = alice.get(f"/v1/folders/{folder}/messages", params={"limit": 500}).json()
            assert all(m["subject"] != "clearly bad" for m in page["messages"])


def test_dmarc_reject_policy_refused_at_smtp(server: ServerProcess) -> None:
    raw = (b"From: CEO <ceo@forged.test>\r\nTo: alice@example.test\r\nSubject: wire money\r\n"
           b"Message-ID: <1@forged.test>\r\n\r\nPlease wire the money today.\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("ceo@forged.test", [ALICE[0]], raw)
    assert refused.value.smtp_code == 550
    assert b"5.7.1" in refused.value.smtp_error and b"DMARC" in refused.value.smtp_error


def test_dmarc_reject_policy_filed_to_junk_when_configured(tmp_path: Path) -> None:
    """`[spam] dmarc_reject = "junk"`: the failing message is taken and filed to Junk, with
    the reasons in its headers."""
    with dnsmasq(tmp_path, RECORDS) as dns_port:
        srv = ServerProcess(tmp_path / "data", env={
            "POSTROOM_DNS__SERVERS": f"127.0.0.1:{dns_port}",
            "POSTROOM_SPAM__TRUSTED_NETWORKS": "",
            "POSTROOM_SPAM__DMARC_REJECT": "junk",
        })
        srv.cli("domain", "add", "example.test")
        srv.cli("user", "add", ALICE[0], "--password", ALICE[1])
        srv.start()
        try:
            raw = (b"From: CEO <ceo@forged.test>\r\nTo: alice@example.test\r\n"
                   b"Subject: wire money now\r\nMessage-ID: <2@forged.test>\r\n\r\n"
                   b"Please wire the money today.\r\n")
            send_mx(srv, "ceo@forged.test", ALICE[0], raw)  # taken: no 550 this time
            with api(srv, *ALICE) as alice:
                junk = wait_for_subject(alice, "wire money now", folder="Junk")
                stored = alice.get(f"/v1/messages/{junk['id']}/raw").content
            assert b"dmarc=fail (p=reject) header.from=forged.test" in stored
            assert re.search(rb"\r\nX-Spam-Score: -?\d+\.\d+\r\n", stored)
            assert b"\r\nX-Spam-Status: Yes, score=" in stored
        finally:
            srv.stop()


def test_banned_senders_refused_at_rcpt(server: ServerProcess) -> None:
    server.cli("spam", "block", "spammer.test")
    assert "block\tspammer.test" in server.cli("spam", "lists").stdout
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail("anyone@mail.spammer.test")
        code, text = s.rcpt(ALICE[0])
        assert code == 550 and b"5.7.1" in text
        s.rset()
    with api(server, *ALICE) as alice:
        r = alice.put("/v1/spam/lists/Pest@Annoying.test", json={"action": "block"})
        assert r.status_code == 200 and r.json()["value"] == "pest@annoying.test"
        assert alice.get("/v1/spam/lists").json() == {"block": ["pest@annoying.test"],
                                                      "allow": []}
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail("pest@annoying.test")
        assert s.rcpt(ALICE[0])[0] == 550  # alice blocked them
        assert s.rcpt(BOB[0])[0] == 250  # bob did not
        s.rset()
    server.cli("spam", "unlist", "spammer.test")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.remote.test")
        s.mail("anyone@mail.spammer.test")
        assert s.rcpt(ALICE[0])[0] == 250
        s.rset()


def test_outbound_limit_answers_451(server: ServerProcess) -> None:
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as s:
        s.ehlo("client.example.test")
        s.login(*ALICE)
        for n in range(3):
            msg = (f"From: {ALICE[0]}\r\nTo: {BOB[0]}\r\nSubject: limit {n}\r\n\r\nhi\r\n")
            assert s.sendmail(ALICE[0], [BOB[0]], msg) == {}
        with pytest.raises(smtplib.SMTPDataError) as limited:
            s.sendmail(ALICE[0], [BOB[0]], f"From: {ALICE[0]}\r\nTo: {BOB[0]}\r\n"
                                           "Subject: limit 3\r\n\r\nhi\r\n")
    assert limited.value.smtp_code == 451 and b"4.7.1" in limited.value.smtp_error
    with api(server, *ALICE) as alice:
        r = alice.post("/v1/messages", json={"to": [BOB[0]], "subject": "x", "text": "y"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
