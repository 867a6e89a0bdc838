"""IMAP4rev1 end to end: Python's imaplib and a raw socket against a real `postroom serve`."""

from __future__ import annotations

import base64
import imaplib
import re
import smtplib
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A, PASSWORD_B
from tests.e2e.imap_helpers import RawImap, quote
from tests.e2e.server import ServerProcess

ALICE = "alice@example.test"
BOB = "bob@example.test"


def message(subject: str, body: str = "Hello world, this is the body.", sender: str =
            "Carol Example <carol@example.org>", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Date: Tue, 05 Mar 2024 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}"
            f"@example.org>\r\n{extra}\r\n{body}\r\n").encode()


def login(server: ServerProcess, user: str = ALICE, password: str = PASSWORD_A
          ) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=30)
    client.login(user, password)
    return client


def raw_login(server: ServerProcess, user: str = ALICE, password: str = PASSWORD_A) -> RawImap:
    raw = RawImap(server.imap_port)
    raw.ok(f"LOGIN {quote(user)} {quote(password)}")
    return raw


@pytest.fixture
def box(server: ServerProcess) -> Iterator[tuple[imaplib.IMAP4, str]]:
    """alice logged in with a fresh, selected, empty folder of her own."""
    client = login(server)
    name = f"t{time.monotonic_ns()}"
    assert client.create(name)[0] == "OK"
    assert client.select(name)[0] == "OK"
    yield client, name
    try:
        client.close()
        client.delete(name)
        client.logout()
    except (imaplib.IMAP4.error, OSError):
        pass


def append(client: imaplib.IMAP4, folder: str, raw: bytes, flags: str = "") -> int:
    typ, data = client.append(folder, flags or None, None, raw)
    assert typ == "OK", data
    match = re.search(rb"APPENDUID (\d+) (\d+)", data[0] or b"")
    assert match, data
    return int(match.group(2))


def fetch_one(client: imaplib.IMAP4, num: str, items: str, uid: bool = False) -> bytes:
    typ, data = client.uid("FETCH", num, items) if uid else client.fetch(num, items)
    assert typ == "OK", data
    out = b""
    for part in data:
        if isinstance(part, tuple):
            out += part[0] + part[1]
        elif part:
            out += part
    return out


# -- greeting, capabilities, authentication ---------------------------------------------------


def test_greeting_capabilities_and_login(server: ServerProcess) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=30)
    caps = set(client.capabilities)
    for cap in ("IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "CONDSTORE", "ESEARCH", "LITERAL+",
                "SASL-IR", "STARTTLS", "AUTH=PLAIN", "SPECIAL-USE", "LIST-STATUS", "ENABLE",
                "ID", "NAMESPACE", "UNSELECT", "CHILDREN"):
        assert cap in caps
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(ALICE, "wrong-password")
    typ, data = client.login(ALICE, PASSWORD_A)
    assert typ == "OK" and b"CAPABILITY" in data[0]
    assert client.logout()[0] == "BYE"


def test_authenticate_plain_with_and_without_initial_response(server: ServerProcess) -> None:
    token = base64.b64encode(f"\0{BOB}\0{PASSWORD_B}".encode()).decode()
    raw = RawImap(server.imap_port)
    _untagged, tagged = raw.command(f"AUTHENTICATE PLAIN {token}")
    assert tagged.startswith(b"OK"), tagged
    raw.ok("LOGOUT")
    raw = RawImap(server.imap_port)
    tag = raw.tag()
    raw.send(f"{tag} AUTHENTICATE PLAIN\r\n".encode())
    assert raw.line().startswith(b"+")
    raw.send(token.encode() + b"\r\n")
    _, tagged = raw.until(tag)
    assert tagged.startswith(b"OK")
    # cancelled and malformed exchanges are refused, the connection lives on
    raw2 = RawImap(server.imap_port)
    tag = raw2.tag()
    raw2.send(f"{tag} AUTHENTICATE PLAIN\r\n".encode())
    raw2.line()
    raw2.send(b"*\r\n")
    assert raw2.until(tag)[1].startswith(b"BAD")
    assert raw2.command("AUTHENTICATE PLAIN !!!notbase64")[1].startswith(b"BAD")
    assert raw2.command("AUTHENTICATE CRAM-MD5")[1].startswith(b"NO")
    assert raw2.command("NOOP")[1].startswith(b"OK")


def test_starttls_and_implicit_tls(server: ServerProcess) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    client = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=30)
    client.starttls(ssl_context=ctx)
    assert "STARTTLS" not in client.capabilities or client.capability()[0] == "OK"
    caps = client.capability()[1][0].split()
    assert b"STARTTLS" not in caps
    assert client.login(ALICE, PASSWORD_A)[0] == "OK"
    client.logout()
    secure = imaplib.IMAP4_SSL("127.0.0.1", server.imaps_port, ssl_context=ctx, timeout=30)
    assert b"STARTTLS" not in secure.capability()[1][0]
    assert secure.login(BOB, PASSWORD_B)[0] == "OK"
    secure.logout()


def test_commands_in_the_wrong_state_and_bad_syntax(server: ServerProcess) -> None:
    raw = RawImap(server.imap_port)
    assert raw.command("SELECT INBOX")[1].startswith(b"BAD")
    assert raw.command("FROBNICATE")[1].startswith(b"BAD")
    raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
    assert raw.command("FETCH 1 FLAGS")[1].startswith(b"BAD")  # not selected
    raw.ok("SELECT INBOX")
    for bad in ("FETCH", "FETCH 1:x FLAGS", "FETCH 1 (FLAGS", "FETCH 1 BODY[HEADER.FIELDS]",
                "STORE 1 +FLAGS (\\Bogus)", "SEARCH FOO", "UID NOOP", 'LIST "" "INBOX" junk',
                "SEARCH BEFORE 31-Feb-2024", "SELECT \"unterminated",
                "FETCH " + "1" * 5000 + " FLAGS",  # past int()'s 4,300 digits: not a crash
                "FETCH 1 (FLAGS) (CHANGEDSINCE " + "9" * 5000 + ")"):
        _untagged, tagged = raw.command(bad)
        assert tagged.startswith(b"BAD") or tagged.startswith(b"NO"), (bad, tagged)
    # search keys nested past what a parser can recurse into: BAD with the reason (they
    # were NO [SERVERBUG] after a RecursionError)
    for nested in ("(" * 3000 + "ALL" + ")" * 3000, "NOT " * 3000 + "ALL",
                   "OR " * 3000 + "ALL" + " ALL" * 3000):
        assert raw.command("SEARCH " + nested)[1] == b"BAD search keys nested more than 100 deep"
    assert raw.command("SEARCH " + "NOT " * 100 + "ALL")[1].startswith(b"OK")
    # a tag-less line is answered with an untagged BAD, and the session survives
    raw.send(b"\r\n")
    assert raw.line().startswith(b"* BAD")
    raw.ok("NOOP")


def test_line_and_literal_limits(server: ServerProcess) -> None:
    raw = raw_login(server)
    raw.send(b"x1 NOOP " + b"a" * 70_000 + b"\r\n")
    assert b"too long" in raw.line()
    raw.ok("NOOP")
    _untagged, tagged = raw.command("APPEND INBOX {999999999999}")
    assert tagged.startswith(b"NO [TOOBIG]")
    # a non-synchronising literal over the limit is swallowed, then refused
    raw.send(b"x2 APPEND INBOX {60000000+}\r\n")
    raw.send(b"\0" * 60_000_000 + b"\r\n")
    _, tagged = raw.until("x2")
    assert tagged.startswith(b"NO [TOOBIG]")
    raw.ok("NOOP")


# -- folders -----------------------------------------------------------------------------------


def test_list_special_use_children_and_status(server: ServerProcess) -> None:
    client = login(server, BOB, PASSWORD_B)
    assert client.create("Projects/2024/Q1")[0] == "OK"
    typ, data = client.list()
    lines = {re.sub(rb'^.*"/" ', b"", d).strip(b'"'): d for d in data if isinstance(d, bytes)}
    assert b"\\Sent" in lines[b"Sent"] and b"\\Trash" in lines[b"Trash"]
    assert b"\\HasChildren" in lines[b"Projects"]
    assert b"\\HasNoChildren" in lines[b"Projects/2024/Q1"]
    typ, data = client.list('""', "%")
    assert all(b"/" not in re.sub(rb'^.*"/" ', b"", d) for d in data if isinstance(d, bytes))
    typ, data = client.list("Projects/", "*")
    assert {d.split(b'"/" ')[1] for d in data if isinstance(d, bytes)} == \
        {b'"Projects/2024"', b'"Projects/2024/Q1"'}
    raw = raw_login(server, BOB, PASSWORD_B)
    untagged = raw.ok('LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN UIDNEXT))')
    assert any(line.startswith(b'* STATUS "INBOX" (MESSAGES ') for line in untagged)
    untagged = raw.ok('LIST (SPECIAL-USE) "" "*"')
    assert len(untagged) == 5 and all(b"\\HasNoChildren \\" in u for u in untagged)
    assert raw.ok('LIST "" ""') == [b'* LIST (\\Noselect) "/" ""']
    assert client.rename("Projects/2024", "Archive2024")[0] == "OK"
    typ, data = client.list('""', "Archive2024*")
    assert len(data) == 2
    assert client.delete("Archive2024")[0] == "NO"  # still has a child
    assert client.delete("Archive2024/Q1")[0] == "OK"
    assert client.delete("Archive2024")[0] == "OK"
    assert client.delete("INBOX")[0] == "NO"
    assert client.create("INBOX")[0] == "NO"
    typ, data = client.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
    assert typ == "OK" and re.search(rb"UIDVALIDITY \d+", data[0])
    assert client.status("Nope", "(MESSAGES)")[0] == "NO"
    client.logout()


def test_international_names_and_subscriptions(server: ServerProcess) -> None:
    client = login(server, BOB, PASSWORD_B)
    assert client.create("&ZeVnLIqe-")[0] == "OK"  # 日本語 in modified UTF-7
    _typ, data = client.list('""', "&ZeVnLIqe-")
    assert data[0].endswith(b'"&ZeVnLIqe-"')
    with httpx.Client(base_url=server.base_url, auth=(BOB, PASSWORD_B), timeout=30) as api:
        names = [f["name"] for f in api.get("/v1/folders").json()["folders"]]
    assert "日本語" in names
    assert client.unsubscribe("&ZeVnLIqe-")[0] == "OK"
    _typ, data = client.lsub('""', "*")
    assert not any(b"ZeVnLIqe" in d for d in data if isinstance(d, bytes))
    assert client.subscribe("&ZeVnLIqe-")[0] == "OK"
    _typ, data = client.lsub('""', "*")
    assert any(b"ZeVnLIqe" in d for d in data if isinstance(d, bytes))
    assert client.delete("&ZeVnLIqe-")[0] == "OK"
    client.logout()


# -- messages ----------------------------------------------------------------------------------


def test_append_select_and_fetch_items(server: ServerProcess,
                                       box: tuple[imaplib.IMAP4, str]) -> None:
    client, name = box
    raw = message("Fetch me", body="line one\r\nline two")
    uid = append(client, name, raw, "(\\Flagged $Work)")
    client.noop()
    data = fetch_one(client, "1", "(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
    assert f"UID {uid} ".encode() in data
    assert b"\\Flagged" in data and b"$Work" in data and b"\\Recent" in data
    assert f"RFC822.SIZE {len(raw)}".encode() in data
    assert b'"Fetch me"' in data and b'(("Carol Example" NIL "carol" "example.org"))' in data
    # BODY.PEEK leaves \Seen alone; BODY[] sets it and reports FLAGS
    assert fetch_one(client, "1", "(BODY.PEEK[])").endswith(raw + b")")
    assert b"\\Seen" not in fetch_one(client, "1", "FLAGS")
    data = fetch_one(client, "1", "(BODY[TEXT])")
    assert b"line one\r\nline two\r\n" in data and b"\\Seen" in data
    assert fetch_one(client, "1", "(BODY.PEEK[]<6.7>)").endswith(b"BODY[]<6> {7}"
                                                                  + raw[6:13] + b")")
    assert b"RFC822.HEADER" in fetch_one(client, "1", "RFC822.HEADER")
    data = fetch_one(client, "1", "(BODY.PEEK[HEADER.FIELDS (Subject From)])")
    assert data.endswith(b"From: Carol Example <carol@example.org>\r\nSubject: Fetch me"
                         b"\r\n\r\n)")
    data = fetch_one(client, str(uid), "(BODY.PEEK[1] BODY[1.MIME] BODYSTRUCTURE)", uid=True)
    assert b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit"' in data
    for macro in ("ALL", "FAST", "FULL"):
        assert b"RFC822.SIZE" in fetch_one(client, "1", macro)
    # a UID FETCH of a uid that does not exist returns nothing, and OK
    typ, data = client.uid("FETCH", "999999", "FLAGS")
    assert typ == "OK" and data == [None]


def test_a_literal_is_acknowledged_at_once(box: tuple[imaplib.IMAP4, str]) -> None:
    """imaplib sends an APPEND's literal and the CRLF ending the command as two writes; with
    Nagle's algorithm on its side, the CRLF waits until the server acknowledges the literal,
    which Linux delays 40 ms or more when it has nothing to send back. Not a speed target: a
    server that waits for that ACK makes every APPEND of such a client take over 40 ms."""
    client, name = box
    took = []
    for n in range(9):
        started = time.monotonic()
        append(client, name, message(f"quick {n}"))
        took.append(time.monotonic() - started)
    assert sorted(took)[4] < 0.030, took  # the median


def test_store_copy_move_expunge(server: ServerProcess,
                                 box: tuple[imaplib.IMAP4, str]) -> None:
    client, name = box
    uids = [append(client, name, message(f"m{i}")) for i in range(5)]
    client.noop()
    typ, data = client.store("1:2", "+FLAGS", "(\\Deleted \\Answered)")
    assert typ == "OK" and len(data) == 2 and b"\\Deleted" in data[0]
    typ, data = client.store("2", "-FLAGS.SILENT", "(\\Answered)")
    assert typ == "OK" and data == [None]
    typ, data = client.store("3", "FLAGS", "(\\Seen custom)")
    assert data[0] == b"3 (FLAGS (\\Seen custom \\Recent))"
    target = name + "-copy"
    assert client.create(target)[0] == "OK"
    typ, data = client.uid("COPY", f"{uids[2]}:{uids[3]}", target)
    assert typ == "OK"
    _, code = client.response("COPYUID")
    assert code[0] is not None
    _validity, sources, targets = code[0].split()
    assert sources == f"{uids[2]}:{uids[3]}".encode() and targets == b"1:2"
    typ, data = client.copy("1", "NoSuchFolder")
    assert typ == "NO" and b"TRYCREATE" in data[0]
    # MOVE reports COPYUID untagged, then the expunges
    raw = raw_login(server)
    raw.ok(f"SELECT {quote(name)}")
    untagged = raw.ok(f"UID MOVE {uids[4]} {quote(target)}")
    assert untagged[0].startswith(b"* OK [COPYUID ") and untagged[1] == b"* 5 EXPUNGE"
    # the other session hears of it at its next NOOP; EXPUNGE removes 1 and 2
    typ, data = client.noop()
    assert client.response("EXPUNGE")[1] == [b"5"]
    typ, data = client.expunge()
    assert data == [b"2", b"1"], data
    typ, data = client.search(None, "ALL")
    assert data == [b"1 2"]
    typ, data = client.status(target, "(MESSAGES)")
    assert b"MESSAGES 3" in data[0]
    # UID EXPUNGE only removes the named uids
    client.store("1:2", "+FLAGS", "\\Deleted")
    typ, data = client.uid("EXPUNGE", str(uids[2]))
    assert typ == "OK" and client.response("EXPUNGE")[1] == [b"1"]
    typ, data = client.search(None, "ALL")
    assert data == [b"1"]
    assert client.delete(target)[0] == "OK"
    raw.ok("LOGOUT")


def test_search_keys_are_exact_substrings(server: ServerProcess,
                                          box: tuple[imaplib.IMAP4, str]) -> None:
    client, name = box
    append(client, name, message("Quarterly report", body="Say hello to Zoë"), "(\\Seen)")
    append(client, name, message("Lunch?", body="pizza at noon", sender="dave@example.net",
                                 extra="X-Priority: 1\r\n"))
    append(client, name, message("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", body="=C3=A9t=C3=A9",
                                 extra="Content-Transfer-Encoding: quoted-printable\r\n"))
    client.noop()

    def search(*criteria: str) -> list[int]:
        typ, data = client.search(None, *criteria)
        assert typ == "OK", data
        return [int(x) for x in data[0].split()]

    assert search("BODY", "ello") == [1]  # substring, not a token
    assert search("BODY", "HELLO") == [1]  # case-insensitive
    assert search("SUBJECT", "uarter") == [1]
    assert search("FROM", "dave") == [2]
    assert search("FROM", "example") == [1, 2, 3]
    assert search("TEXT", "pizza") == [2]
    assert search("TEXT", "lunch") == [2]  # TEXT covers the header too
    assert search("HEADER", "X-Priority", '""') == [2]
    assert search("UNSEEN") == [2, 3]
    assert search("OR", "SEEN", "FROM", "dave") == [1, 2]
    assert search("NOT", "SEEN", "NOT", "FROM", "dave") == [3]
    assert search("2:*") == [2, 3]
    assert search("LARGER", "1", "SMALLER", "100000") == [1, 2, 3]
    assert search("SENTON", "5-Mar-2024") == [1, 2, 3]
    assert search("SENTBEFORE", "5-Mar-2024") == []
    assert search("SINCE", "1-Jan-2020") == [1, 2, 3]
    assert search("(SEEN", "SUBJECT", "report)") == [1]
    raw = raw_login(server)
    raw.ok(f"SELECT {quote(name)}")
    body = "Grüße".encode()
    tag = raw.tag()
    raw.send(f"{tag} SEARCH CHARSET UTF-8 SUBJECT {{{len(body)}}}\r\n".encode())
    assert raw.line().startswith(b"+")
    raw.send(body + b"\r\n")
    untagged, tagged = raw.until(tag)
    assert untagged == [b"* SEARCH 3"] and tagged.startswith(b"OK")
    body = "été".encode()
    untagged, tagged = raw.command(
        b"SEARCH CHARSET UTF-8 BODY {%d+}\r\n" % len(body) + body)
    assert untagged == [b"* SEARCH 3"]
    untagged, tagged = raw.command("SEARCH CHARSET KOI8-R ALL")
    assert tagged.startswith(b"NO [BADCHARSET")
    untagged = raw.ok("UID SEARCH RETURN (MIN MAX COUNT ALL) ALL")
    assert re.fullmatch(rb'\* ESEARCH \(TAG "t\d+"\) UID MIN \d+ MAX \d+ ALL \S+ COUNT 3',
                        untagged[0]), untagged
    raw.ok("LOGOUT")


def test_users_never_see_each_other(server: ServerProcess) -> None:
    alice = login(server)
    secret = message("alice only", body="private words")
    append(alice, "INBOX", secret)
    bob = login(server, BOB, PASSWORD_B)
    bob.select("INBOX")
    _typ, data = bob.search(None, "BODY", '"private words"')
    assert data == [b""]
    alice.select("INBOX")
    _typ, data = alice.search(None, "BODY", '"private words"')
    assert data[0] != b""
    alice.logout()
    bob.logout()


# -- concurrency: two sessions, IDLE -----------------------------------------------------------


def test_two_sessions_see_each_others_changes(server: ServerProcess,
                                              box: tuple[imaplib.IMAP4, str]) -> None:
    client, name = box
    for i in range(3):
        append(client, name, message(f"shared {i}"))
    a = raw_login(server)
    b = raw_login(server)
    a.ok(f"SELECT {quote(name)}")
    b.ok(f"SELECT {quote(name)}")
    a.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
    untagged = b.ok("NOOP")
    assert any(re.match(rb"\* 2 FETCH \(UID \d+ FLAGS \(\\Flagged", u) for u in untagged)
    a.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    a.ok("EXPUNGE")
    # no EXPUNGE while b answers FETCH: message 1 is still there for b, as a ghost
    untagged = b.ok("FETCH 1:3 (FLAGS)")
    assert not any(b"EXPUNGE" in u for u in untagged)
    assert sum(1 for u in untagged if b" FETCH " in u) == 3
    untagged = b.ok("NOOP")
    assert b"* 1 EXPUNGE" in untagged
    untagged = b.ok("FETCH 1:* (FLAGS)")
    assert sum(1 for u in untagged if b" FETCH " in u) == 2
    # a new message reaches b as EXISTS
    append(client, name, message("shared new"))
    untagged = b.ok("NOOP")
    assert b"* 3 EXISTS" in untagged
    a.ok("LOGOUT")
    b.ok("LOGOUT")


def test_reselect_shows_what_changed_meanwhile(server: ServerProcess,
                                               box: tuple[imaplib.IMAP4, str]) -> None:
    """A SELECT of the folder already selected answers from the session's map brought up
    to date, and must match a fresh session's SELECT exactly."""
    client, name = box
    uids = [append(client, name, message(f"reselect {i}")) for i in range(4)]
    a = raw_login(server)
    b = raw_login(server)
    b.ok(f"SELECT {quote(name)}")
    a.ok(f"SELECT {quote(name)}")
    a.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")
    a.ok("STORE 1 +FLAGS.SILENT (\\Deleted \\Seen)")
    a.ok("EXPUNGE")
    new_uid = append(client, name, message("reselect new"))
    b.ok(f"UID STORE {uids[1]} +FLAGS.SILENT (\\Answered)")  # a change of b's own

    status = f"STATUS {quote(name)} (MESSAGES UNSEEN UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
    fresh_status = raw_login(server).ok(status)  # counted by the store
    assert b"MESSAGES 4 UNSEEN 4" in fresh_status[0]
    assert [u for u in b.ok(status) if u.startswith(b"* STATUS")] == fresh_status  # from b's map

    def summary(raw: RawImap) -> tuple[list[bytes], list[bytes]]:
        untagged = raw.ok(f"SELECT {quote(name)}")
        assert not any(b"EXPUNGE" in u or b"VANISHED" in u for u in untagged), untagged
        fetched = raw.ok("FETCH 1:* (UID FLAGS)")
        return sorted(u for u in untagged if not u.startswith(b"* OK [CLOSED]")), fetched

    again, fresh = summary(b), summary(raw_login(server))
    assert again == fresh
    assert b"* 4 EXISTS" in again[0]
    assert any(b"UIDNEXT %d]" % (new_uid + 1) in u for u in again[0])
    assert [int(m) for m in re.findall(rb"UID (\d+)", b" ".join(again[1]))] \
        == [*uids[1:], new_uid]
    assert re.search(rb"UID %d FLAGS \((\\Answered \\Flagged|\\Flagged \\Answered)\)"
                     % uids[1], b" ".join(again[1]))
    # and a second reselect with nothing new in between
    assert summary(b) == again
    a.ok("LOGOUT")
    b.ok("LOGOUT")


def test_idle_is_woken_by_an_smtp_delivery(server: ServerProcess) -> None:
    raw = raw_login(server, BOB, PASSWORD_B)
    untagged = raw.ok("SELECT INBOX")
    exists = next(int(u.split()[1]) for u in untagged if u.endswith(b"EXISTS"))
    tag = raw.tag()
    raw.send(f"{tag} IDLE\r\n".encode())
    assert raw.line().startswith(b"+")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [BOB], message("wake up"))
    sent = time.monotonic()
    raw.sock.settimeout(30)
    try:
        line = raw.line()
    except TimeoutError:
        raise AssertionError(f"IDLE was not woken:\n{server.log()[-3000:]}") from None
    woke = time.monotonic() - sent
    assert line == b"* %d EXISTS" % (exists + 1), line
    assert raw.line() == b"* 1 RECENT" or True
    raw.send(b"DONE\r\n")
    _, tagged = raw.until(tag)
    assert tagged.startswith(b"OK")
    assert woke < 30
    raw.ok("LOGOUT")


# -- extensions --------------------------------------------------------------------------------


def test_condstore(server: ServerProcess, box: tuple[imaplib.IMAP4, str]) -> None:
    client, name = box
    for i in range(3):
        append(client, name, message(f"cs {i}"))
    raw = raw_login(server)
    assert raw.ok("ENABLE CONDSTORE") == [b"* ENABLED CONDSTORE"]
    untagged = raw.ok(f"SELECT {quote(name)} (CONDSTORE)")
    highest = int(next(re.search(rb"HIGHESTMODSEQ (\d+)", u).group(1)  # type: ignore[union-attr]
                       for u in untagged if b"HIGHESTMODSEQ" in u))
    untagged = raw.ok("FETCH 1:* (MODSEQ)")
    modseqs = [int(re.search(rb"MODSEQ \((\d+)\)", u).group(1))  # type: ignore[union-attr]
               for u in untagged]
    assert len(modseqs) == 3 and max(modseqs) <= highest
    untagged = raw.ok("STORE 1 +FLAGS (\\Seen)")
    new_modseq = int(re.search(rb"MODSEQ \((\d+)\)", untagged[0]).group(1))  # type: ignore
    assert new_modseq > highest
    untagged = raw.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {highest})")
    assert len(untagged) == 1 and untagged[0].startswith(b"* 1 FETCH")
    # UNCHANGEDSINCE: message 1 changed after `highest`, so it is not stored
    untagged, tagged = raw.command(f"STORE 1:2 (UNCHANGEDSINCE {highest}) +FLAGS (\\Flagged)")
    assert tagged.startswith(b"OK [MODIFIED 1]"), tagged
    untagged = raw.ok("FETCH 1:2 (FLAGS)")
    assert b"\\Flagged" not in untagged[0] and b"\\Flagged" in untagged[1]
    untagged = raw.ok(f"SEARCH MODSEQ {new_modseq}")
    assert untagged[0].startswith(b"* SEARCH 1 2 (MODSEQ ")
    raw.ok("LOGOUT")


def test_id_namespace_unselect_and_literal_plus(server: ServerProcess) -> None:
    raw = RawImap(server.imap_port)
    untagged = raw.ok('ID ("name" "pytest")')
    assert untagged[0].startswith(b'* ID ("name" "Postroom"')
    raw.ok(b"LOGIN {%d+}\r\n%s {%d+}\r\n%s" % (len(ALICE), ALICE.encode(), len(PASSWORD_A),
                                              PASSWORD_A.encode()))
    assert raw.ok("NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL']
    raw.ok("EXAMINE INBOX")
    assert raw.command("STORE 1 +FLAGS (\\Seen)")[1].startswith((b"NO", b"BAD"))
    raw.ok("UNSELECT")
    assert raw.command("FETCH 1 FLAGS")[1].startswith(b"BAD")
    raw.ok("LOGOUT")
