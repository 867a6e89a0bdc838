"""DSN bounces (RFC 3464): the report parses with the standard library as a receiver's would."""

from __future__ import annotations

import email
import email.message
import email.policy

from postroom.mailflow.dsn import RecipientStatus, build_dsn

ORIGINAL = (b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: Lunch?\r\n"
            b"Message-ID: <orig-1@a.test>\r\n\r\nsecret body text\r\n")


def parse(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def test_report_structure_and_fields() -> None:
    data = build_dsn(
        reporting_mta="mx.a.test", sender="alice@a.test", original=ORIGINAL,
        recipients=[
            RecipientStatus("bob@b.test", "5.1.1", "failed", "550 5.1.1 no such user\r\nX: y",
                            "mx.b.test", 1_700_000_000.0),
            RecipientStatus("carol@c.test", "5.1.10", "failed", "null MX"),
        ], arrival=1_699_999_000.0, now=1_700_000_100.0)
    dsn = parse(data)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["In-Reply-To"] == "<orig-1@a.test>"
    assert "alice@a.test" in str(dsn["To"])
    human, status, headers = dsn.iter_parts()
    assert "bob@b.test" in human.get_content() and "Lunch?" in human.get_content()
    groups = [{k.lower(): str(v) for k, v in g.items()} for g in status.get_payload()]
    assert groups[0]["reporting-mta"] == "dns; mx.a.test"
    assert groups[1]["final-recipient"] == "rfc822; bob@b.test"
    assert groups[1]["status"] == "5.1.1" and groups[1]["action"] == "failed"
    assert groups[1]["remote-mta"] == "dns; mx.b.test"
    # A remote reply's line breaks cannot inject fields into the report.
    assert groups[1]["diagnostic-code"] == "smtp; 550 5.1.1 no such user  X: y"
    assert "x" not in groups[1]
    assert groups[2]["final-recipient"] == "rfc822; carol@c.test"
    assert "remote-mta" not in groups[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: Lunch?" in headers.get_content()
    assert b"secret body text" not in data  # only the header section is returned


def test_utf8_addresses_use_the_global_types() -> None:
    data = build_dsn(reporting_mta="mx.a.test", sender="jörg@a.test",
                     original="Subject: Grüße\r\n\r\nx\r\n".encode(),
                     recipients=[RecipientStatus("δοκιμή@b.test", "5.6.7", "failed", "no utf8")],
                     arrival=0.0)
    dsn = parse(data)
    types = [p.get_content_type() for p in dsn.iter_parts()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "utf-8; δοκιμή@b.test" in data.decode()


def test_delayed_notice_wording() -> None:
    data = build_dsn(reporting_mta="mx.a.test", sender="a@a.test", original=ORIGINAL,
                     recipients=[RecipientStatus("b@b.test", "4.4.1", "delayed", "timed out")],
                     arrival=0.0)
    dsn = parse(data)
    assert dsn["Subject"].startswith("Delayed Mail")
    assert "Action: delayed" in data.decode()
