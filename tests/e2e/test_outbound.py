"""Outbound delivery end to end: a real `postroom serve` sends through a real DNS (dnsmasq) to
real receiving MTAs on loopback: a second Postroom instance and a throwaway Postfix.

    127.0.0.1      the sending Postroom (a.test, alice) and dnsmasq
    127.0.0.2:P    the receiving Postroom's SMTP (b.test, prio.test, amx.test)
    127.0.0.3:P    Postfix (pf.test, into one Maildir)
    127.0.0.4:P    nothing: the preferred MX of prio.test and the only one of down.test
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

from postroom.mailflow.dkim import DkimKeys
from tests.e2e.outbound_peers import Dnsmasq, PostfixPeer, shared_port
from tests.e2e.server import ServerProcess
from tests.e2e.smtp_helpers import api, folder_messages, wait_for_subject

ALICE = ("alice@a.test", "alice-secret-1")
BOB = ("bob@b.test", "bob-secret-22")
CAROL = ("carol@prio.test", "carol-secret-3")
DAVE = ("dave@amx.test", "dave-secret-44")
RITA = ("rita@relay.test", "rita-secret-55")
WAIT = 60.0  # generous: the machine is shared by parallel test runs


@dataclass
class Net:
    dns: Dnsmasq
    sender: ServerProcess
    receiver: ServerProcess
    postfix: PostfixPeer
    port: int
    relayed: ServerProcess


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base: Path = tmp_path_factory.mktemp("outbound")
    port = shared_port(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    sender = ServerProcess(base / "sender", extra_args=["--hostname", "mx.a.test"])
    sender.cli("domain", "add", "a.test")
    sender.cli("user", "add", ALICE[0], "--password", ALICE[1])
    generated = sender.cli("dkim", "generate", "a.test", "--selector", "s1").stdout
    assert "s1._domainkey.a.test. IN TXT" in generated
    key = DkimKeys(base / "sender" / "dkim").active("a.test")
    assert key is not None and key.selector == "s1"

    dns = Dnsmasq(base, mx=[
        ("b.test", "mx.b.test", 10),
        ("prio.test", "down.prio.test", 10), ("prio.test", "mx.b.test", 20),
        ("null.test", ".", 0),
        ("pf.test", "mx.pf.test", 10),
        ("down.test", "down.prio.test", 10),
    ], hosts=[
        ("mx.b.test", "127.0.0.2"), ("down.prio.test", "127.0.0.4"),
        ("amx.test", "127.0.0.2"), ("mx.pf.test", "127.0.0.3"),
    ], txt=[("s1._domainkey.a.test", key.txt_strings()),
            ("a.test", ["v=spf1 ip4:127.0.0.1 -all"]),
            ("_dmarc.a.test", ["v=DMARC1; p=reject; adkim=s; aspf=s"])])
    dns.start()
    env = {"POSTROOM_DNS__SERVERS": f"127.0.0.1:{dns.port}",
           "POSTROOM_DELIVERY__PORT": str(port),
           "POSTROOM_DELIVERY__SCHEDULE": "1s,2s",
           "POSTROOM_DELIVERY__CONNECT_TIMEOUT": "5"}
    sender.env.update(env, POSTROOM_HOSTNAME="mx.a.test", POSTROOM_DELIVERY__IDLE_TIMEOUT="3")
    receiver = ServerProcess(base / "receiver", env=dict(env),
                             extra_args=["--hostname", "mx.b.test", "--smtp", f"127.0.0.2:{port}"])
    for domain in ("b.test", "prio.test", "amx.test", "relay.test"):
        receiver.cli("domain", "add", domain)
    for address, password in (BOB, CAROL, DAVE, RITA):
        receiver.cli("user", "add", address, "--password", password)
    # A second sender that relays everything through the receiver's submission port (AUTH).
    relayed = ServerProcess(base / "relayed", extra_args=["--hostname", "mx.relay.test"],
                            env={"POSTROOM_DELIVERY__SMARTHOST":
                                 f"127.0.0.1:{receiver.submission_port}",
                                 "POSTROOM_DELIVERY__SMARTHOST_USERNAME": RITA[0],
                                 "POSTROOM_DELIVERY__SMARTHOST_PASSWORD": RITA[1],
                                 "POSTROOM_DELIVERY__SCHEDULE": "1s"})
    relayed.cli("domain", "add", "relay.test")
    relayed.cli("user", "add", RITA[0], "--password", RITA[1])
    postfix = PostfixPeer("127.0.0.3", port, "pf.test",
                          defer={"later@pf.test": "451 4.7.1 Try again later"})
    started: list[Any] = []
    try:
        for part in (receiver, postfix, sender, relayed):
            part.start()
            started.append(part)
        yield Net(dns, sender, receiver, postfix, port, relayed)
    finally:
        for part in reversed(started):
            part.stop()
        dns.stop()


def send(net: Net, to: list[str], subject: str, text: str = "hello") -> dict[str, Any]:
    with api(net.sender, *ALICE) as alice:
        r = alice.post("/v1/messages", json={"to": to, "subject": subject, "text": text})
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    assert sorted(body["queued"]) == sorted(to)
    return body


def arrived(server: ServerProcess, auth: tuple[str, str], subject: str) -> dict[str, Any]:
    """The message as filed at the receiving Postroom: INBOX, or Junk if its spam filter, which
    knows nothing of this sender yet, so decides (arriving is what delivery promises)."""
    with api(server, *auth) as c:
        def find() -> list[dict[str, Any]]:
            return [m for folder in ("INBOX", "Junk") for m in folder_messages(c, folder)
                    if m["subject"] == subject]
        found: list[dict[str, Any]] = until(find, f"{subject!r} at {auth[0]}")
    assert len(found) == 1, found
    return found[0]


def raw(server: ServerProcess, auth: tuple[str, str], message_id: str) -> bytes:
    with api(server, *auth) as c:
        r = c.get(f"/v1/messages/{message_id}/raw")
        assert r.status_code == 200
        return r.content


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def queue_rows(net: Net) -> list[dict[str, Any]]:
    out = net.sender.cli("queue", "list", "--topic", "outgoing", "--json").stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def row_for(net: Net, rcpt: str) -> dict[str, Any] | None:
    for row in queue_rows(net):
        if rcpt in row["to"]:
            return row
    return None


def dkim_verifies(net: Net, message: bytes) -> bool:
    assert b"DKIM-Signature:" in message
    return bool(dkim.verify(message, dnsfunc=net.dns.txt_lookup))


def bounce_for(net: Net, subject: str) -> email.message.EmailMessage:
    """The DSN in alice's INBOX about the message with this subject, parsed."""
    with api(net.sender, *ALICE) as alice:
        def find() -> list[dict[str, Any]]:
            return [m for m in folder_messages(alice, "INBOX")
                    if m["subject"] == "Undelivered Mail Returned to Sender"
                    and subject.encode() in raw(net.sender, ALICE, m["id"])]
        found = until(find, f"a bounce of {subject!r}")
    assert len(found) == 1, found
    data = raw(net.sender, ALICE, found[0]["id"])
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def report_fields(dsn: email.message.EmailMessage,
                  status_type: str = "message/delivery-status") -> list[dict[str, str]]:
    """The per-message and per-recipient field groups of a multipart/report (RFC 3464)."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = list(dsn.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", status_type]
    assert parts[2].get_content_type() in ("text/rfc822-headers", "message/global-headers")
    if status_type == "message/delivery-status":  # the stdlib parses it into field groups
        return [{k.lower(): str(v) for k, v in block.items()}
                for block in parts[1].get_payload()]
    # message/global-delivery-status (RFC 6533): UTF-8 fields, read as text
    text = parts[1].as_bytes().decode().replace("\r\n", "\n").split("\n\n", 1)[1]
    return [dict((k.strip().lower(), v.strip()) for k, _, v in
                 (line.partition(":") for line in block.splitlines() if line))
            for block in re.split(r"\r?\n\r?\n", text.strip())]


def test_mail_to_another_postroom_arrives_dkim_signed(net: Net) -> None:
    send(net, [BOB[0]], "to another postroom")
    summary = arrived(net.receiver, BOB, "to another postroom")
    message = raw(net.receiver, BOB, summary["id"])
    signature = re.search(rb"DKIM-Signature:.*?(?=\r\n\S)", message, re.S)
    assert signature is not None
    assert b"d=a.test" in signature.group(0) and b"s=s1" in signature.group(0)
    assert dkim_verifies(net, message)
    until(lambda: row_for(net, BOB[0]) is None, "the item to leave the queue")


def test_mail_to_postfix_arrives_over_starttls_dkim_signed(net: Net) -> None:
    send(net, ["x@pf.test"], "to postfix")
    messages = until(lambda: [m for m in net.postfix.raw_messages() if b"Subject: to postfix"
                              in m], "the message in Postfix's Maildir")
    assert len(messages) == 1
    assert dkim_verifies(net, messages[0])
    parsed = email.message_from_bytes(messages[0], policy=email.policy.default)
    assert "using TLS" in str(parsed["Received"])  # opportunistic STARTTLS was used


def test_lowest_preference_mx_when_the_preferred_is_down(net: Net) -> None:
    send(net, [CAROL[0]], "via the backup mx")
    arrived(net.receiver, CAROL, "via the backup mx")
    log = net.sender.log()
    tried = log.index("down.prio.test[127.0.0.4]")
    assert tried >= 0  # the preferred MX (10) was tried first, then the one at 20 took it


def test_fallback_to_the_address_record_without_mx(net: Net) -> None:
    send(net, [DAVE[0]], "implicit mx")
    arrived(net.receiver, DAVE, "implicit mx")


def test_null_mx_bounces_at_once(net: Net) -> None:
    send(net, ["nobody@null.test"], "to a null mx")
    dsn = bounce_for(net, "to a null mx")
    groups = report_fields(dsn)
    assert groups[1]["final-recipient"] == "rfc822; nobody@null.test"
    assert groups[1]["action"] == "failed" and groups[1]["status"] == "5.1.10"
    assert until(lambda: row_for(net, "nobody@null.test") is None, "the item to go")


def test_5xx_bounce_is_a_parseable_report_and_others_still_get_it(net: Net) -> None:
    send(net, [BOB[0], "nosuchuser@b.test"], "half bounced")
    arrived(net.receiver, BOB, "half bounced")
    dsn = bounce_for(net, "half bounced")
    assert ALICE[0] in str(dsn["To"]) and dsn["Auto-Submitted"] == "auto-replied"
    groups = report_fields(dsn)
    assert groups[0]["reporting-mta"] == "dns; mx.a.test"
    assert len(groups) == 2  # only the failed recipient is reported
    rcpt = groups[1]
    assert rcpt["final-recipient"] == "rfc822; nosuchuser@b.test"
    assert rcpt["action"] == "failed" and rcpt["status"] == "5.1.1"
    assert rcpt["remote-mta"] == "dns; mx.b.test"
    assert rcpt["diagnostic-code"].startswith("smtp; 550")
    headers = list(dsn.iter_parts())[2].get_content()
    assert "Subject: half bounced" in headers
    assert until(lambda: row_for(net, "nosuchuser@b.test") is None, "the item to go")


def test_connections_are_reused_for_the_next_message(net: Net) -> None:
    for n in range(3):
        send(net, ["reuse@pf.test"], f"reuse {n}")
        until(lambda n=n: [m for m in net.postfix.raw_messages()  # type: ignore[misc]
                           if f"Subject: reuse {n}".encode() in m], f"message {n} at Postfix")
    # The sender quits idle connections after 3 s; Postfix then logs each session's commands.
    # Wait until every accepted transaction ("client=") belongs to a finished session.
    def finished_sessions() -> list[int] | None:
        log = net.postfix.log()
        sessions = [int(m) for m in re.findall(r"disconnect from .* mail=(\d+)", log)]
        return sessions if sum(sessions) >= len(re.findall(r": client=", log)) else None

    sessions = until(finished_sessions, "Postfix to log the end of every session")
    assert max(sessions) >= 2, sessions  # one session carried several transactions


def test_smarthost_with_auth_replaces_mx_routing(net: Net) -> None:
    with api(net.relayed, *RITA) as rita:
        r = rita.post("/v1/messages", json={"to": [BOB[0]], "subject": "via the smarthost",
                                           "text": "relayed"})
        assert r.status_code in (200, 201), r.text
    summary = arrived(net.receiver, BOB, "via the smarthost")
    message = raw(net.receiver, BOB, summary["id"])
    assert b"ESMTPSA" in message  # the receiver saw an authenticated, TLS session
    with api(net.receiver, *RITA) as rita_b:  # submission filed her Sent copy there too
        wait_for_subject(rita_b, "via the smarthost", folder="Sent", timeout=WAIT)


def test_4xx_is_retried_until_it_succeeds(net: Net) -> None:
    send(net, ["later@pf.test"], "deferred first")
    row = until(lambda: (r := row_for(net, "later@pf.test")) and r["attempts"] >= 1 and r,
                "a first, deferred attempt")
    shown = net.sender.cli("queue", "show", row["first_id"]).stdout
    assert "451 4.7.1" in shown and "deferred" in shown
    assert "451 4.7.1" in net.sender.cli("queue", "list").stdout
    net.postfix.stop_deferring()
    until(lambda: [m for m in net.postfix.raw_messages() if b"Subject: deferred first" in m],
          "the retried message at Postfix")
    until(lambda: row_for(net, "later@pf.test") is None, "the item to leave the queue")


def test_many_recipients_at_one_domain_share_one_transaction(net: Net) -> None:
    rcpts = [f"r{n}@pf.test" for n in range(7)]
    send(net, rcpts, "one transaction")
    until(lambda: len([m for m in net.postfix.raw_messages()
                       if b"Subject: one transaction" in m]) == 7, "seven copies at Postfix")
    # Postfix logs one queue entry per accepted transaction, with its recipient count.
    log = net.postfix.log()
    from_alice = re.findall(r"from=<alice@a\.test>, size=\d+, nrcpt=(\d+)", log)
    assert "7" in from_alice, from_alice


def test_queue_commands_show_retry_and_delete(net: Net) -> None:
    send(net, ["someone@down.test"], "never arrives")
    row = until(lambda: (r := row_for(net, "someone@down.test")) and r["attempts"] >= 1 and r,
                "an attempt to the dead host")
    detail = json.loads(net.sender.cli("queue", "show", row["first_id"], "--json").stdout)
    results = detail["history"][0]["results"]
    assert results[0]["outcome"] == "deferred" and "127.0.0.4" in results[0]["reply"]
    before = detail["attempts"]
    net.sender.cli("queue", "retry", "--all")
    until(lambda: (r := row_for(net, "someone@down.test")) and r["attempts"] > before,
          "another attempt")
    current = row_for(net, "someone@down.test")
    assert current is not None
    deleted = net.sender.cli("queue", "delete", current["first_id"], check=False)
    if deleted.returncode != 0:  # rescheduled under a new id meanwhile: delete that one
        current = row_for(net, "someone@down.test")
        assert current is not None
        net.sender.cli("queue", "delete", current["id"])
    until(lambda: row_for(net, "someone@down.test") is None, "the item to be deleted",
          timeout=10)
    missing = net.sender.cli("queue", "show", "no-such-id", check=False)
    assert missing.returncode == 2 and "no queued item" in missing.stderr
    with api(net.sender, *ALICE) as alice:  # a deleted item is not bounced
        assert not [m for m in folder_messages(alice, "INBOX") if "never arrives" in
                    raw(net.sender, ALICE, m["id"]).decode(errors="replace")]


def test_utf8_address_fails_when_the_server_lacks_smtputf8(net: Net) -> None:
    net.postfix.reconfigure(smtputf8_enable="no")
    try:
        send(net, ["jörg@pf.test", "ascii@pf.test"], "utf8 envelope")
        dsn = bounce_for(net, "utf8 envelope")
        groups = report_fields(dsn, status_type="message/global-delivery-status")
        assert [g.get("final-recipient") for g in groups[1:]] == ["utf-8; jörg@pf.test"]
        assert groups[1]["status"] == "5.6.7"
        # The recipient that needs no SMTPUTF8 still gets the message.
        until(lambda: [m for m in net.postfix.raw_messages() if b"Subject: utf8 envelope" in m],
              "the ASCII recipient's copy")
    finally:
        net.postfix.reconfigure(smtputf8_enable="yes")


def test_dns_records_and_dkim_commands(net: Net) -> None:
    out = net.sender.cli("dns-records", "a.test").stdout
    assert "a.test. IN MX 10 mx.a.test." in out
    assert '"v=spf1 mx -all"' in out and "_dmarc.a.test. IN TXT" in out
    assert "s1._domainkey.a.test. IN TXT" in out
    again = net.sender.cli("dkim", "generate", "a.test", "--selector", "s1", check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = net.sender.cli("dkim", "generate", "a.test", "--selector", "bad selector!",
                         check=False)
    assert bad.returncode == 2 and "invalid DKIM selector" in bad.stderr


def test_unrelated_api_still_works(net: Net) -> None:
    with httpx.Client(base_url=net.sender.base_url) as c:
        assert c.get("/healthz").status_code == 200
