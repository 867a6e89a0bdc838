"""The POP3 wire presentation: CRLF lines, dot-stuffing, sizes, TOP, command parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.pop3.wire import (
    CommandError,
    crlf_size,
    multiline,
    parse_command,
    wire_message,
    wire_top,
)


def unstuff(wire: bytes) -> bytes:
    """What a client reassembles from a multi-line response (RFC 1939 §3)."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")[:-2]  # drop the "." line and the empty tail
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def test_crlf_message_round_trips_exactly() -> None:
    raw = b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    wire = wire_message(raw)
    assert wire == b"Subject: hi\r\n\r\n..leading dot\r\n...two\r\nend\r\n.\r\n"
    assert unstuff(wire) == raw
    assert crlf_size(raw) == len(raw)


def test_bare_lf_lines_go_out_as_crlf() -> None:
    raw = b"Subject: hi\n\nbody\n.\n"
    assert wire_message(raw) == b"Subject: hi\r\n\r\nbody\r\n..\r\n.\r\n"
    assert crlf_size(raw) == len(raw.replace(b"\n", b"\r\n"))


def test_missing_final_newline_and_empty_message() -> None:
    assert wire_message(b"Subject: x\r\n\r\nno end") == b"Subject: x\r\n\r\nno end\r\n.\r\n"
    assert crlf_size(b"Subject: x\r\n\r\nno end") == len(b"Subject: x\r\n\r\nno end\r\n")
    assert wire_message(b"") == b".\r\n"
    assert crlf_size(b"") == 0


def test_lone_cr_is_data() -> None:
    raw = b"A: b\r\n\r\nx\ry\r\r\n"
    assert unstuff(wire_message(raw)) == raw


def test_top() -> None:
    raw = b"From: a\r\nSubject: s\r\n\r\nl1\r\n.l2\r\nl3\r\n"
    assert wire_top(raw, 0) == b"From: a\r\nSubject: s\r\n\r\n.\r\n"
    assert wire_top(raw, 2) == b"From: a\r\nSubject: s\r\n\r\nl1\r\n..l2\r\n.\r\n"
    assert wire_top(raw, 99) == wire_message(raw)
    assert wire_top(b"From: a\nSubject: s\n", 3) == b"From: a\r\nSubject: s\r\n.\r\n"
    assert wire_top(b"\nbody\nmore\n", 1) == b"\r\nbody\r\n.\r\n"


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")))
def test_lf_messages_round_trip_as_crlf(body: bytes) -> None:
    crlf = body.replace(b"\n", b"\r\n")
    expected = crlf if not crlf or crlf.endswith(b"\r\n") else crlf + b"\r\n"
    assert unstuff(wire_message(body)) == expected
    assert unstuff(wire_message(crlf)) == expected
    assert crlf_size(body) == len(expected)


def test_multiline_stuffs_dots() -> None:
    assert multiline(["1 10", ".x"]) == b"1 10\r\n..x\r\n.\r\n"
    assert multiline([]) == b".\r\n"


def test_parse_command() -> None:
    cmd = parse_command(b"pass my secret  pw")
    assert cmd.keyword == "PASS"
    assert cmd.rest == "my secret  pw"
    assert cmd.args == ("my", "secret", "pw")
    assert parse_command(b"top 1 10").args == ("1", "10")
    for bad in (b"", b" ", b"RETRIEVE 1", b"R3TR 1", b"\xff\xfe", b"LIST\x00"):
        with pytest.raises(CommandError):
            parse_command(bad)


def test_crlf_sizes_memo_is_bounded_lru() -> None:
    from postroom.pop3.sizes import CrlfSizes

    memo = CrlfSizes(max_entries=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recent
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
