"""postroom.core.models, core.address and core.ids: the small pure pieces."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.core import ids
from postroom.core.address import (
    AddressError,
    domain_of,
    format_address,
    normalize_address,
    normalize_domain,
    parse_address_list,
)
from postroom.core.ids import is_id, new_id
from postroom.core.models import (
    DEFAULT_FOLDERS,
    Flag,
    FlagError,
    Flags,
    Folder,
    FolderNameError,
    FolderRole,
    normalize_folder_name,
)

# --- flags -----------------------------------------------------------------------------------


def test_flags_parse_system_and_keywords() -> None:
    flags = Flags.parse(["\\Seen", "\\flagged", "$Label1", "Work", "$Junk"])
    assert flags.system == Flag.SEEN | Flag.FLAGGED | Flag.JUNK
    assert flags.keywords == ("$Label1", "Work")
    assert Flag.SEEN in flags and Flag.DELETED not in flags


def test_flags_parse_is_case_insensitive_for_system_flags_and_dedupes_keywords() -> None:
    assert Flags.parse(["\\SEEN", "\\seen"]) == Flags(Flag.SEEN)
    assert Flags.parse(["b", "a", "b"]).keywords == ("a", "b")
    assert Flags.parse([]) == Flags()
    assert Flags.parse(("\\Draft",)).system == Flag.DRAFT


@pytest.mark.parametrize(
    "bad",
    ["\\Recent", "\\Custom", "", "two words", "(paren", "quote\"", "brace{", "pct%", "star*",
     "back\\slash", "bracket]", "tab\t", "é", "x" * 101],
)
def test_flags_parse_refuses_invalid_names(bad: str) -> None:
    with pytest.raises(FlagError):
        Flags.parse([bad])
    assert issubclass(FlagError, ValueError)


def test_flags_names_in_canonical_order() -> None:
    flags = Flags.parse(["zeta", "\\Draft", "\\Seen", "$NotJunk", "alpha", "\\Answered"])
    assert flags.names() == ["\\Seen", "\\Answered", "\\Draft", "$NotJunk", "alpha", "zeta"]
    assert Flags().names() == []
    assert Flags.parse(Flags.parse(["\\Deleted", "k"]).names()) == Flags(Flag.DELETED, ("k",))


def test_flags_union_and_difference() -> None:
    a = Flags.parse(["\\Seen", "one", "two"])
    b = Flags.parse(["\\Flagged", "\\Seen", "two", "three"])
    assert a.union(b) == Flags(Flag.SEEN | Flag.FLAGGED, ("one", "three", "two"))
    assert a.difference(b) == Flags(Flag(0), ("one",))
    assert b.difference(a) == Flags(Flag.FLAGGED, ("three",))
    assert a.difference(a) == Flags()
    assert a.union(Flags()) == a


_flag_names = st.lists(
    st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Junk",
                     "$NotJunk", "k1", "k2", "$Forwarded"]),
    max_size=8,
)


@settings(max_examples=200)
@given(_flag_names, _flag_names)
def test_flags_algebra(x: list[str], y: list[str]) -> None:
    a, b = Flags.parse(x), Flags.parse(y)
    assert set(a.union(b).names()) == set(a.names()) | set(b.names())
    assert set(a.difference(b).names()) == set(a.names()) - set(b.names())
    assert a.union(b) == b.union(a)
    assert Flags.parse(a.names()) == a


# --- folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normal"),
    [
        ("INBOX", "INBOX"),
        ("inbox", "INBOX"),
        ("Inbox/Receipts", "INBOX/Receipts"),
        ("Inboxes", "Inboxes"),
        ("Archive/2024/Q1", "Archive/2024/Q1"),
        ("Müll", "Müll"),
        ("x" * 500, "x" * 500),
    ],
)
def test_normalize_folder_name(name: str, normal: str) -> None:
    assert normalize_folder_name(name) == normal


@pytest.mark.parametrize(
    "bad", ["", "x" * 501, "/lead", "trail/", "a//b", " padded", "padded ", "a/ b", "a*",
            "a%", "tab\tname", "nul\x00", "del\x7f"],
)
def test_normalize_folder_name_refuses(bad: str) -> None:
    with pytest.raises(FolderNameError):
        normalize_folder_name(bad)


def test_folder_parent_and_defaults() -> None:
    folder = Folder("u", "f", "Archive/2024", None, 1, 1, 0)
    assert folder.parent == "Archive"
    assert Folder("u", "f", "INBOX", FolderRole.INBOX, 1, 1, 0).parent is None
    assert DEFAULT_FOLDERS[0] == ("INBOX", FolderRole.INBOX)
    assert {role for _, role in DEFAULT_FOLDERS} == set(FolderRole)


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "normal"),
    [
        ("John.Doe@Example.COM", "john.doe@example.com"),
        ("  <alice@example.com>  ", "alice@example.com"),
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
        ("JÜRGEN@example.de", "jürgen@example.de"),  # SMTPUTF8 local part
        ("a+tag@example.com", "a+tag@example.com"),
        ("root@localhost", "root@localhost"),
        ("x@example.com.", "x@example.com"),
    ],
)
def test_normalize_address(address: str, normal: str) -> None:
    assert normalize_address(address) == normal


@pytest.mark.parametrize(
    "bad",
    ["", "plain", "@example.com", "user@", "a..b@example.com", ".a@example.com",
     "a.@example.com", "a b@example.com", 'a"b@example.com', "a<b@example.com",
     "a@-example.com", "a@example-.com", "a@exa_mple.com", "a@exa mple.com",
     "a@[127.0.0.1]", "x" * 65 + "@example.com", "a@" + "a." * 127 + "com",
     "a@" + "a" * 64 + ".com", "a\r\n@example.com", "a@example..com"],
)
def test_normalize_address_refuses(bad: str) -> None:
    with pytest.raises(AddressError):
        normalize_address(bad)
    assert issubclass(AddressError, ValueError)


def test_normalize_domain() -> None:
    assert normalize_domain("Example.COM.") == "example.com"
    assert normalize_domain(" münchen.de ") == "xn--mnchen-3ya.de"
    assert normalize_domain("xn--mnchen-3ya.de") == "xn--mnchen-3ya.de"
    assert normalize_domain("日本.jp") == "xn--wgv71a.jp"
    for bad in ("", ".", "a..b", "-a.com", "a-.com", "a_b.com", "a" * 64 + ".com",
                "a b.com", "[1.2.3.4]", "é" * 70 + ".com"):
        with pytest.raises(AddressError):
            normalize_domain(bad)


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_normalize_address_raises_only_address_error(text: str) -> None:
    try:
        result = normalize_address(text)
    except AddressError:
        return
    assert result == normalize_address(result)  # normal form is a fixed point
    assert "@" in result
    assert not any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in result)


def test_address_list_and_format() -> None:
    assert parse_address_list(["Ann <ann@x.org>, bob@y.org", "undisclosed-recipients:;"]) == [
        ("Ann", "ann@x.org"), ("", "bob@y.org"),
    ]
    assert format_address("Doe, John", "john@x.org") == '"Doe, John" <john@x.org>'
    assert format_address("", "john@x.org") == "john@x.org"
    assert domain_of("a@b.example") == "b.example"


# --- ids -------------------------------------------------------------------------------------


def test_new_id_shape_and_order() -> None:
    first = new_id(1_700_000_000.0)
    later = new_id(1_700_000_000.5)
    assert len(first) == 26 and is_id(first) and is_id(later)
    assert first < later  # time-ordered
    assert len({new_id() for _ in range(1000)}) == 1000
    assert not set(new_id()) & set("ILOU")  # Crockford base32


@given(st.integers(0, 2**48 - 1), st.binary(min_size=10, max_size=10))
def test_new_id_digits_are_the_time_then_the_random_bits(ms: int, random: bytes) -> None:
    value = (ms << 80) | int.from_bytes(random, "big")
    expected = ""
    for _ in range(26):  # base32 digits, least significant first
        value, digit = divmod(value, 32)
        expected = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"[digit] + expected
    with mock.patch.object(ids.os, "urandom", lambda n: random[:n]):
        assert new_id((ms + 0.5) / 1000) == expected


def test_is_id_refuses_other_strings() -> None:
    assert not is_id("")
    assert not is_id("0" * 25)
    assert not is_id("0" * 27)
    assert not is_id(new_id().lower())
    assert not is_id("U" * 26)


def test_flag_names_for_every_combination_of_system_flags() -> None:
    from itertools import combinations

    from postroom.core.models import FLAG_NAMES, Flag, Flags
    from postroom.imap.response import flag_list

    every = list(FLAG_NAMES)
    for n in range(len(every) + 1):
        for chosen in combinations(every, n):
            system = Flag(0)
            for flag in chosen:
                system |= flag
            flags = Flags(system, ("$Label1", "work"))
            expected = [FLAG_NAMES[f] for f in FLAG_NAMES if f in system] + ["$Label1", "work"]
            assert flags.names() == expected
            assert all((f in flags) == (f in system) for f in every)
            assert (system in flags) and (Flag(0) in flags)
            assert flag_list(flags) == ("(" + " ".join(expected) + ")").encode()
            assert flag_list(flags, recent=True) == \
                ("(" + " ".join([*expected, "\\Recent"]) + ")").encode()
