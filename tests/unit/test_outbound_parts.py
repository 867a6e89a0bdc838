"""The pieces of outbound delivery that need no network: wire format, replies, payload, config,
DKIM keys and signatures (verified by dkimpy against the record we publish)."""

from __future__ import annotations

import json
from pathlib import Path

import dkim
import pytest

from postroom.config import ConfigError, load_settings, parse_duration
from postroom.mailflow.dkim import DkimError, DkimKeys, DkimSigner
from postroom.mailflow.outgoing import OutgoingMessage
from postroom.mailflow.smtp_client import Reply, Transaction, dot_stuff, wire_format
from postroom.store.queue import OUTGOING, QueueItem


def test_wire_format_and_dot_stuffing() -> None:
    assert wire_format(b"a\nb\r\nc") == b"a\r\nb\r\nc\r\n"
    assert dot_stuff(b".start\r\nmid\r\n.\r\n..two\r\n") == (
        b"..start\r\nmid\r\n..\r\n...two\r\n.\r\n")


def test_reply_classes_and_enhanced_codes() -> None:
    assert Reply(550, ("5.1.1 no such user",)).enhanced == "5.1.1"
    assert Reply(550, ("no code here",)).enhanced == "5.0.0"
    assert Reply(451, ("5.1.1 mismatched class",)).enhanced == "4.0.0"
    assert Reply(250, ("ok",)).ok and Reply(554, ()).permanent
    assert str(Reply(421, ("4.3.2 going", "down"))) == "421 4.3.2 going down"


def test_transaction_outcome_per_recipient() -> None:
    t = Transaction(Reply(250), {"a@x": Reply(250), "b@x": Reply(550, ("5.1.1 no",))},
                    Reply(250, ("queued",)))
    assert t.outcome("a@x").code == 250 and t.outcome("b@x").code == 550
    refused = Transaction(Reply(451, ("4.3.0 later",)))
    assert refused.outcome("a@x").code == 451


def test_payload_round_trip_keeps_history() -> None:
    first = {"mail_from": "a@a.test", "rcpt_to": ["b@b.test", "c@c.test"], "blob": "ab" * 32,
             "user_id": "u1", "queued_at": 100.0}
    item = QueueItem("q1", OUTGOING, json.dumps(first).encode(), 1, 100.0, 100.0)
    message = OutgoingMessage.from_item(item)
    assert message.id == "q1" and message.pending == ["b@b.test", "c@c.test"]
    message.delivered["b@b.test"] = {"reply": "250 ok"}
    message.pending = ["c@c.test"]
    message.attempts.append({"at": 1.0, "results": []})
    message.attempt_count = 1
    again = OutgoingMessage.from_item(QueueItem("q1-1", OUTGOING, message.payload(), 1, 1, 1))
    assert again.id == "q1" and again.pending == ["c@c.test"]
    assert again.delivered == message.delivered and again.attempt_count == 1


def test_delivery_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTROOM_DNS__SERVERS", "127.0.0.1:5353, ::1")
    monkeypatch.setenv("POSTROOM_DELIVERY__PORT", "2525")
    monkeypatch.setenv("POSTROOM_DELIVERY__SCHEDULE", '["30s", "5m", 3600]')
    s = load_settings()
    assert s.dns.servers == ["127.0.0.1:5353", "::1"]
    assert s.delivery.port == 2525 and s.delivery.schedule == [30.0, 300.0, 3600.0]
    monkeypatch.setenv("POSTROOM_DELIVERY__SCHEDULE", "1m,4h,5d")
    assert load_settings().delivery.schedule == [60.0, 14400.0, 432000.0]


@pytest.mark.parametrize(("key", "value"), [
    ("POSTROOM_DELIVERY__PORT", "70000"), ("POSTROOM_DELIVERY__SCHEDULE", "soon"),
    ("POSTROOM_DELIVERY__SMARTHOST", "no-port"), ("POSTROOM_DNS__SERVERS", "1.2.3.4:x"),
    ("POSTROOM_DELIVERY__SCHEDULE", "-5s"),
])
def test_bad_delivery_settings_are_clear_errors(monkeypatch: pytest.MonkeyPatch, key: str,
                                                value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError):
        load_settings()


def test_default_schedule_is_the_documented_one() -> None:
    assert load_settings().delivery.schedule == [60, 300, 900, 1800, 3600, 7200, 14400]
    assert parse_duration("5d") == load_settings().delivery.max_age


def test_dkim_key_sign_and_verify(tmp_path: Path) -> None:
    keys = DkimKeys(tmp_path / "dkim")
    key = keys.generate("Example.TEST", "sel1", bits=1024)
    assert (tmp_path / "dkim" / "example.test" / "sel1.pem").stat().st_mode & 0o077 == 0
    assert all(len(s) <= 255 for s in key.txt_strings())
    assert key.zone_line().startswith("sel1._domainkey.example.test. IN TXT")
    with pytest.raises(DkimError, match="exists already"):
        keys.generate("example.test", "sel1")
    with pytest.raises(DkimError, match="invalid DKIM selector"):
        keys.generate("example.test", "no spaces")
    with pytest.raises(DkimError):
        keys.generate("not a domain", "s")

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        return key.txt_value().encode() if name == b"sel1._domainkey.example.test." else None

    message = wire_format(b"From: A <a@example.test>\nTo: b@b.test\nSubject: s\n\nbody\n")
    signed = DkimSigner(keys).sign(message, "bounce@other.test")
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(message)
    assert dkim.verify(signed, dnsfunc=txt)
    assert not dkim.verify(signed.replace(b"body", b"BODY"), dnsfunc=txt)
    # No key for the From: domain nor the envelope's: sent unsigned, unchanged.
    other = wire_format(b"From: x@nokey.test\n\nhi\n")
    assert DkimSigner(keys).sign(other, "x@nokey.test") == other
