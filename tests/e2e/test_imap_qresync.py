"""QRESYNC (RFC 7162 §3.2): VANISHED instead of EXPUNGE, SELECT (QRESYNC ...) and
UID FETCH (CHANGEDSINCE n VANISHED); SORT and THREAD=REFERENCES (RFC 5256); against a real
server over a raw connection."""

from __future__ import annotations

import imaplib
import re
import time

from tests.e2e.imap_helpers import quote
from tests.e2e.server import ServerProcess
from tests.e2e.test_imap import append, box, message, raw_login  # noqa: F401 (fixture)


def _number(lines: list[bytes], pattern: bytes) -> int:
    for line in lines:
        found = re.search(pattern, line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"{pattern!r} not in {lines!r}")


def test_qresync(server: ServerProcess, box: tuple[imaplib.IMAP4, str]) -> None:  # noqa: F811
    client, name = box
    uids = [append(client, name, message(f"qr {i}")) for i in range(5)]
    plain = raw_login(server)
    assert plain.command(f"SELECT {quote(name)} (QRESYNC (1 1))")[1].startswith(b"BAD")
    plain.ok("LOGOUT")

    a = raw_login(server)
    assert a.ok("ENABLE QRESYNC") == [b"* ENABLED QRESYNC"]
    untagged = a.ok(f"SELECT {quote(name)}")
    validity = _number(untagged, rb"UIDVALIDITY (\d+)")
    before = _number(untagged, rb"HIGHESTMODSEQ (\d+)")

    # another session flags one message and expunges another
    client.noop()
    assert client.uid("STORE", str(uids[1]), "+FLAGS", "(\\Seen)")[0] == "OK"
    assert client.uid("STORE", str(uids[3]), "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert client.expunge()[0] == "OK"

    untagged = a.ok("NOOP")
    assert f"* VANISHED {uids[3]}".encode() in untagged, untagged
    assert not any(line.endswith(b"EXPUNGE") for line in untagged)
    untagged = a.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {before} VANISHED)")
    assert untagged[0] == f"* VANISHED (EARLIER) {uids[3]}".encode(), untagged
    assert len(untagged) == 2 and f"UID {uids[1]}".encode() in untagged[1]
    assert a.command(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {before} VANISHED)")[1].startswith(b"BAD")

    # a client coming back with what it last saw
    c = raw_login(server)
    c.ok("ENABLE QRESYNC")
    untagged = c.ok(f"SELECT {quote(name)} (QRESYNC ({validity} {before}))")
    assert f"* VANISHED (EARLIER) {uids[3]}".encode() in untagged, untagged
    changed = [line for line in untagged if b" FETCH " in line]
    assert len(changed) == 1 and f"UID {uids[1]}".encode() in changed[0]
    assert b"\\Seen" in changed[0] and b"MODSEQ (" in changed[0]
    untagged = c.ok(f"EXAMINE {quote(name)} (QRESYNC ({validity} {before} {uids[0]}:{uids[2]}))")
    assert not any(b"VANISHED" in line for line in untagged)  # uid 4 is not among the known
    untagged = c.ok(f"EXAMINE {quote(name)} (QRESYNC ({validity} {before} 1:* (1:3 "
                    f"{uids[0]}:{uids[2]})))")
    assert any(b"VANISHED (EARLIER)" in line for line in untagged)
    untagged = c.ok(f"EXAMINE {quote(name)} (QRESYNC ({validity + 1} {before}))")
    assert not any(b"VANISHED" in line or b" FETCH " in line for line in untagged)
    c.ok("LOGOUT")

    # its own expunge is reported as VANISHED too
    a.ok(f"UID STORE {uids[0]} +FLAGS.SILENT (\\Deleted)")
    untagged = a.ok("EXPUNGE")
    assert untagged == [f"* VANISHED {uids[0]}".encode()], untagged
    a.ok("LOGOUT")


def test_sort_and_thread(server: ServerProcess, box: tuple[imaplib.IMAP4, str]) -> None:  # noqa: F811
    client, name = box

    def mail(subject: str, mid: str, sender: str, parent: str = "", day: int = 1) -> bytes:
        reply = f"In-Reply-To: {parent}\r\nReferences: {parent}\r\n" if parent else ""
        return (f"From: {sender}\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
                f"Message-ID: {mid}\r\nDate: 0{day} Mar 2024 10:00:00 +0000\r\n{reply}\r\n"
                "body\r\n").encode()

    uids = [append(client, name, mail("Lunch", "<l1@x>", "zoe@example.org", day=3)),
            append(client, name, mail("Re: Lunch", "<l2@x>", "adam@example.org", "<l1@x>", 4)),
            append(client, name, mail("Budget", "<b1@x>", "mia@example.org", day=1))]
    a = raw_login(server)
    a.ok(f"SELECT {quote(name)}")
    assert a.ok("SORT (SUBJECT) UTF-8 ALL") == [b"* SORT 3 1 2"]
    assert a.ok("SORT (REVERSE DATE) UTF-8 ALL") == [b"* SORT 2 1 3"]
    assert a.ok("UID SORT (FROM) US-ASCII ALL") == [
        f"* SORT {uids[1]} {uids[2]} {uids[0]}".encode()]
    assert a.ok("SORT (SIZE) UTF-8 SUBJECT lunch")[0].startswith(b"* SORT ")
    assert a.command("SORT (BOGUS) UTF-8 ALL")[1].startswith(b"BAD")
    assert a.command("SORT (DATE) KOI8-R ALL")[1].startswith(b"NO [BADCHARSET")
    assert a.ok("THREAD REFERENCES UTF-8 ALL") == [b"* THREAD (3)(1 2)"]
    assert a.ok("UID THREAD REFERENCES UTF-8 ALL") == [
        f"* THREAD ({uids[2]})({uids[0]} {uids[1]})".encode()]
    assert a.command("THREAD ORDEREDSUBJECT UTF-8 ALL")[1].startswith(b"BAD")
    a.ok("LOGOUT")


def test_sort_of_hostile_headers(
    server: ServerProcess, box: tuple[imaplib.IMAP4, str]  # noqa: F811
) -> None:
    """A From: of nested comments (the standard library's address parser recursed once per
    "(" and failed every SORT FROM of the mailbox) and a subject of 20,000 list tags (each step
    of the base subject re-read the rest: half a minute of the event loop per SORT)."""
    client, name = box
    hostile = (f"From: {'(' * 600}{')' * 600} eve@example.org\r\nTo: alice@example.com\r\n"
               f"Subject: {'[a] ' * 20_000}tail\r\n\r\nbody\r\n").encode()
    plain = b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: zz\r\n\r\nbody\r\n"
    append(client, name, hostile)
    append(client, name, plain)
    a = raw_login(server)
    a.ok(f"SELECT {quote(name)}")
    started = time.monotonic()
    assert a.ok("SORT (SUBJECT) UTF-8 ALL") == [b"* SORT 1 2"]  # TAIL < ZZ
    assert a.ok("SORT (FROM) UTF-8 ALL") == [b"* SORT 2 1"]  # BOB < EVE
    assert a.ok("SORT (DISPLAYFROM) UTF-8 ALL") == [b"* SORT 2 1"]
    assert a.ok("THREAD REFERENCES UTF-8 ALL") == [b"* THREAD (1)(2)"]
    assert time.monotonic() - started < 10
    a.ok("LOGOUT")
