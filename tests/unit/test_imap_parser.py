"""The IMAP command reader and grammar: literals, LITERAL+, sequence sets, dates, errors."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from postroom.imap.parser import (
    Cursor,
    LineTooLong,
    LiteralTooLarge,
    ParseError,
    RawCommand,
    SeqRange,
    read_command,
    resolve,
)
from postroom.imap.response import decode_mailbox, encode_mailbox, string


async def _read(data: bytes, max_literal: int = 1000, max_line: int = 200) -> tuple[
        RawCommand | None, int, asyncio.StreamReader]:
    reader = asyncio.StreamReader(limit=max_line + 10)
    reader.feed_data(data)
    reader.feed_eof()
    continuations = 0

    async def cont() -> None:
        nonlocal continuations
        continuations += 1

    command = await read_command(reader, cont, max_line=max_line, max_literal=max_literal,
                                 max_total=max_literal * 2)
    return command, continuations, reader


async def test_literal_is_kept_apart_and_continued() -> None:
    body = b"From: a@b\r\n\r\nhi\r\n"
    command, conts, _ = await _read(b"a1 APPEND INBOX (\\Seen) {%d}\r\n" % len(body) + body
                                    + b"\r\n")
    assert command is not None and conts == 1
    assert command.pieces[1] is not None and command.pieces[1] == body
    cur = Cursor(command)
    assert cur.tag() == "a1"
    cur.sp()
    assert cur.keyword() == "APPEND"
    cur.sp()
    assert cur.mailbox() == "INBOX"
    cur.sp()
    assert cur.flag_list() == ["\\Seen"]
    cur.sp()
    assert cur.literal() == body
    cur.end()


async def test_non_synchronising_literal_gets_no_continuation() -> None:
    command, conts, _ = await _read(b"a2 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
    assert command is not None and conts == 0
    cur = Cursor(command)
    cur.tag()
    cur.sp()
    cur.keyword()
    cur.sp()
    assert cur.astring_text() == "alice"
    cur.sp()
    assert cur.astring_text() == "secret"
    cur.end()


async def test_oversized_literal_is_refused_and_the_stream_stays_usable() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"t1 APPEND INBOX {50+}\r\n" + b"x" * 50 + b"\r\nt2 NOOP\r\n")
    reader.feed_eof()

    async def cont() -> None:
        raise AssertionError("no continuation for a refused literal")

    with pytest.raises(LiteralTooLarge) as info:
        await read_command(reader, cont, max_line=100, max_literal=10, max_total=20)
    assert info.value.tag == "t1"
    nxt = await read_command(reader, cont, max_line=100, max_literal=10, max_total=20)
    assert nxt is not None and nxt.pieces == (b"t2 NOOP",)


async def test_synchronising_oversized_literal_is_refused_before_sending() -> None:
    with pytest.raises(LiteralTooLarge):
        await _read(b"t1 APPEND INBOX {5000}\r\n", max_literal=10)


async def test_long_line_is_dropped() -> None:
    reader = asyncio.StreamReader(limit=64)
    reader.feed_data(b"a " + b"x" * 500 + b"\r\nb NOOP\r\n")
    reader.feed_eof()

    async def cont() -> None:
        pass

    with pytest.raises(LineTooLong):
        await read_command(reader, cont, max_line=60, max_literal=10, max_total=10)
    nxt = await read_command(reader, cont, max_line=60, max_literal=10, max_total=10)
    assert nxt is not None and nxt.pieces == (b"b NOOP",)


def cursor(line: bytes) -> Cursor:
    return Cursor(RawCommand((line,)))


def test_quoted_strings_and_escapes() -> None:
    cur = cursor(b'"a \\"quoted\\" \\\\ string" rest')
    assert cur.astring() == b'a "quoted" \\ string'
    with pytest.raises(ParseError):
        cursor(b'"unterminated').astring()
    with pytest.raises(ParseError):
        cursor(b'"bad \\x escape"').astring()


def test_sequence_sets() -> None:
    seq = cursor(b"1:3,7,*,9:*").sequence_set()
    assert seq == (SeqRange(1, 3), SeqRange(7, 7), SeqRange(None, None), SeqRange(9, None))
    assert resolve(seq, 12) == [(1, 3), (7, 7), (12, 12), (9, 12)]
    assert resolve(cursor(b"5:2").sequence_set(), 9) == [(2, 5)]
    for bad in (b"0", b"1:", b",1", b"4294967296"):
        with pytest.raises(ParseError):
            cur = cursor(bad)
            cur.sequence_set()
            cur.end()


def test_dates() -> None:
    assert cursor(b"1-Feb-2024").date() == datetime.date(2024, 2, 1)
    assert cursor(b'"01-feb-2024"').date() == datetime.date(2024, 2, 1)
    ts = cursor(b'"17-Jul-1996 02:44:25 -0700"').date_time()
    assert ts == datetime.datetime(1996, 7, 17, 9, 44, 25, tzinfo=datetime.UTC).timestamp()
    for bad in (b"31-Feb-2024", b"1-Foo-2024", b"2024-02-01"):
        with pytest.raises(ParseError):
            cursor(bad).date()


def test_flags() -> None:
    assert cursor(b"(\\Seen $Junk foo)").flag_list() == ["\\Seen", "$Junk", "foo"]
    assert cursor(b"\\Seen \\Deleted").flags_or_list() == ["\\Seen", "\\Deleted"]
    with pytest.raises(ParseError):
        cursor(b"(\\Seen").flag_list()


def test_trailing_garbage_is_an_error() -> None:
    cur = cursor(b"a1 NOOP extra")
    cur.tag()
    cur.sp()
    cur.keyword()
    with pytest.raises(ParseError):
        cur.end()


@pytest.mark.parametrize("name", ["INBOX", "Entwürfe", "日本語/メール", "a&b", "Sent & Co"])
def test_modified_utf7_round_trip(name: str) -> None:
    encoded = encode_mailbox(name)
    assert encoded.isascii()
    assert decode_mailbox(encoded) == name


def test_modified_utf7_known_value() -> None:
    # RFC 3501 §5.1.3's example
    assert encode_mailbox("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    with pytest.raises(ParseError):
        decode_mailbox("&Jjo!")


def test_strings_become_literals_when_needed() -> None:
    assert string("plain") == b'"plain"'
    assert string('say "hi"') == b'"say \\"hi\\""'
    assert string("line\r\nbreak") == b"{11}\r\nline\r\nbreak"
    assert string("é".encode()) == b"{2}\r\n\xc3\xa9"
