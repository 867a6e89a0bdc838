"""SMTP framing and command parsing: DATA end, dot-unstuffing, bare newlines, BDAT, paths."""

from __future__ import annotations

import asyncio

import pytest

from postroom.smtp.commands import (
    CommandError,
    check_address,
    check_mail_params,
    check_rcpt_params,
    decode_xtext,
    parse_params,
    parse_path,
    split_command,
)
from postroom.smtp.data import (
    LineTooLong,
    SmtpReader,
    has_bare_newline,
    longest_line_exceeds,
    unstuff,
)
from postroom.smtp.trace import received_header, with_protocol


def reader_of(*chunks: bytes) -> SmtpReader:
    stream = asyncio.StreamReader()
    for chunk in chunks:
        stream.feed_data(chunk)
    stream.feed_eof()
    return SmtpReader(stream)


async def test_data_ends_only_on_crlf_dot_crlf() -> None:
    r = reader_of(b"Subject: a\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n")
    result = await r.read_data(1000, 1000, 5)
    assert result.message == b"Subject: a\r\n\r\n.dot\r\nbody\r\n"
    assert await r.read_line(512, 5) == b"QUIT"


async def test_data_split_across_reads_and_empty_message() -> None:
    r = reader_of(b"a\r\n", b".", b"\r", b"\n", b".\r\nNOOP\r\n")
    assert (await r.read_data(1000, 1000, 5)).message == b"a\r\n"
    assert (await r.read_data(1000, 1000, 5)).message == b""
    assert await r.read_line(512, 5) == b"NOOP"


@pytest.mark.parametrize("smuggled", [
    b"a\r\n\n.\nMAIL FROM:<x@evil>\r\n",  # <LF>.<LF>
    b"a\r\n.\nMAIL FROM:<x@evil>\r\n",  # <CRLF>.<LF>
    b"a\n.\r\nMAIL FROM:<x@evil>\r\n",  # <LF>.<CRLF>
    b"a\r\n\r.\r\nMAIL FROM:<x@evil>\r\n",  # <CR>.<CRLF>
    b"bare\nline\r\n",
    b"lone\rcr\r\n",
])
async def test_bare_newlines_are_flagged(smuggled: bytes) -> None:
    r = reader_of(smuggled + b".\r\nQUIT\r\n")
    result = await r.read_data(10_000, 1000, 5)
    assert result.bare_newline and result.message == b""
    assert await r.read_line(512, 5) == b"QUIT"


async def test_oversize_data_is_drained_in_step() -> None:
    body = b"x" * 70 + b"\r\n"
    r = reader_of(body * 10_000 + b".\r\nQUIT\r\n")
    result = await r.read_data(50_000, 1000, 5)
    assert result.oversize and result.message == b""
    assert await r.read_line(512, 5) == b"QUIT"


async def test_long_lines() -> None:
    r = reader_of(b"x" * 2000 + b"\r\n.\r\n")
    assert (await r.read_data(100_000, 1000, 5)).long_line
    r = reader_of(b"y" * 3000 + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        await r.read_line(512, 5)
    assert await r.read_line(512, 5) == b"NOOP"


async def test_bdat_exact_reads() -> None:
    r = reader_of(b"abc\ndefBDAT 0 LAST\r\n")
    assert await r.read_exact(7, 5) == b"abc\ndef"
    assert await r.read_line(512, 5) == b"BDAT 0 LAST"


def test_helpers() -> None:
    assert unstuff(b".a\r\n..b\r\n") == b"a\r\n.b\r\n"
    assert not has_bare_newline(b"a\r\nb\r\n") and has_bare_newline(b"a\nb")
    assert longest_line_exceeds(b"a" * 20 + b"\r\n", 10)
    assert not longest_line_exceeds(b"a" * 8 + b"\r\n" + b"b" * 8 + b"\r\n", 10)
    assert decode_xtext("a+2Bb") == "a+b"


def test_commands() -> None:
    assert split_command("mail FROM:<a@b.test> SIZE=10") == ("MAIL", "FROM:<a@b.test> SIZE=10")
    assert parse_path("FROM:<a@b.test> SIZE=10", "FROM", allow_null=True) == (
        "a@b.test", "SIZE=10")
    assert parse_path("FROM: <>", "FROM", allow_null=True) == ("", "")
    assert parse_path("TO:<@relay.test:u@b.test>", "TO", allow_null=False)[0] == "u@b.test"
    for bad in ("FROM:a@b.test", "FROM <a@b>", "TO:<a@b"):
        with pytest.raises(CommandError):
            parse_path(bad, bad[:4].strip(": <").upper()[:4], allow_null=True)
    with pytest.raises(CommandError) as exc:
        parse_path("TO:<>", "TO", allow_null=False)
    assert exc.value.code == 501
    assert parse_params("SIZE=10 body=8bitmime SMTPUTF8") == {
        "SIZE": "10", "BODY": "8bitmime", "SMTPUTF8": ""}
    with pytest.raises(CommandError) as exc:
        check_mail_params({"SIZE": "100"}, 10)
    assert (exc.value.code, exc.value.status) == (552, "5.3.4")
    with pytest.raises(CommandError) as exc:
        check_mail_params({"XFOO": "1"}, 10)
    assert exc.value.code == 555
    check_mail_params({"RET": "HDRS", "ENVID": "abc", "BODY": "7BIT"}, 10)
    check_rcpt_params({"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.test"})
    with pytest.raises(CommandError):
        check_rcpt_params({"NOTIFY": "NEVER,SUCCESS"})
    with pytest.raises(CommandError) as exc:
        check_address("üser@example.test", smtputf8=False)
    assert exc.value.status == "5.6.7"
    assert check_address("üser@example.test", smtputf8=True) == "üser@example.test"


def test_trace_headers() -> None:
    assert with_protocol(esmtp=True, tls=True, auth=True, utf8=False) == "ESMTPSA"
    header = received_header(helo="client\r\nX-Evil: 1", client_ip="127.0.0.1",
                             hostname="mx.test", protocol="ESMTP", queue_id="abc",
                             recipient="a@b.test", timestamp=0)
    assert header.startswith(b"Received: from client??X-Evil:?1 ([127.0.0.1])\r\n")
    assert header.endswith(b"\r\n") and b"\r\n\r\n" not in header
