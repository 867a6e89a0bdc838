"""Address lists from headers anyone can write: what the standard library reads, and an
answer instead of RecursionError where it recurses once per "(" of a comment."""

from __future__ import annotations

from email.utils import getaddresses

from postroom.core.address import parse_address_list, safe_getaddresses
from postroom.smtp.session import from_addresses
from postroom.spam.auth import _from_domains


def test_as_the_standard_library_reads_ordinary_headers() -> None:
    for value in ['"Doe, J" <j@example.org>, k@example.org (Kay)', "a@b.c", "",
                  "Group: x@y.z, w@v.u;", "(comment) <c@d.e>", '"(not a comment)" <f@g.h>']:
        assert safe_getaddresses([value]) == getaddresses([value]), value


def test_nested_comments_are_dropped_instead_of_recursed_into() -> None:
    deep = "(" * 600 + "x" + ")" * 600 + " eve@example.org"
    assert safe_getaddresses([deep]) == [("", "eve@example.org")]
    # an unclosed comment runs to the end: no address, as getaddresses reads one
    assert parse_address_list(["(" * 600 + "eve@example.org"]) == []
    # quoted strings and escapes keep their parentheses
    assert safe_getaddresses(['"((" <q@example.org> ' + "(" * 600 + ")" * 600]) == [
        ("((", "q@example.org")]


def test_the_dmarc_and_submission_checks_read_such_a_from() -> None:
    raw = ("From: " + "(" * 600 + ")" * 600 + " eve@evil.example\r\nTo: b@example.test\r\n"
           "\r\nbody\r\n").encode()
    assert _from_domains(raw) == ["evil.example"]
    assert from_addresses(raw) == ["eve@evil.example"]
