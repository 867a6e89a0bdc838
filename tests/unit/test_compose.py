"""postroom.core.compose: building outgoing mail, and reading it back with core.message."""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.core.compose import ComposeError, compose_message, make_message_id
from postroom.core.message import attachment_part, parse_message

DATE = 1704099600.0  # Mon, 01 Jan 2024 09:00:00 UTC


def compose(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "from_addr": "alice@example.com",
        "from_name": "Alice Example",
        "to": ["bob@example.org"],
        "cc": [],
        "bcc": [],
        "subject": "Hello",
        "text": "Hi Bob,\nhow are you?\n",
        "html": None,
        "attachments": [],
        "in_reply_to": None,
        "references": [],
        "message_id": "<m1@example.com>",
        "date": DATE,
        "include_bcc": False,
    }
    args.update(overrides)
    return compose_message(**args)


def as_message(raw: bytes) -> EmailMessage:
    return BytesParser(policy=default).parsebytes(raw)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_plain_text_message() -> None:
    raw = compose()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert raw.isascii()  # 7bit on the wire
    msg = as_message(raw)
    assert msg["From"] == "Alice Example <alice@example.com>"
    assert msg["To"] == "bob@example.org"
    assert msg["Subject"] == "Hello"
    assert msg["Date"] == "Mon, 01 Jan 2024 09:00:00 -0000"
    assert msg["Message-ID"] == "<m1@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert "In-Reply-To" not in msg and "References" not in msg and "Bcc" not in msg
    parsed = parse_message(raw)
    assert parsed.text == "Hi Bob,\nhow are you?\n"
    assert parsed.headers.date == DATE


def test_mime_version_appears_once() -> None:
    raw = compose(html="<p>x</p>", attachments=[("a.txt", "text/plain", b"a")])
    assert raw.count(b"MIME-Version:") == 1


def test_non_ascii_text_is_quoted_printable_or_base64() -> None:
    raw = compose(subject="Grüße aus Köln", text="Schöne Grüße\n" * 3)
    assert raw.isascii()
    msg = as_message(raw)
    assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert b"=?utf-8?" in header_block(raw)
    parsed = parse_message(raw)
    assert parsed.headers.subject == "Grüße aus Köln"
    assert parsed.text == "Schöne Grüße\n" * 3


def test_text_and_html_make_multipart_alternative() -> None:
    raw = compose(text="plain version", html="<p>rich <b>version</b></p>")
    msg = as_message(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    parsed = parse_message(raw)
    assert parsed.text == "plain version\n"
    assert parsed.html == "<p>rich <b>version</b></p>\n"


def test_html_only() -> None:
    raw = compose(text=None, html="<p>only html</p>")
    assert as_message(raw).get_content_type() == "text/html"
    parsed = parse_message(raw)
    assert parsed.text == "" and parsed.snippet == "only html"


def test_no_body_at_all_is_an_empty_text_part() -> None:
    msg = as_message(compose(text=None, html=None))
    assert msg.get_content_type() == "text/plain"


def test_attachments_make_multipart_mixed() -> None:
    pdf = b"%PDF-1.4\x00\xff binary"
    raw = compose(
        text="see attached",
        html="<p>see attached</p>",
        attachments=[("résumé.pdf", "application/pdf", pdf), ("notes.txt", "text/plain", b"n")],
    )
    msg = as_message(raw)
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "multipart/alternative", "application/pdf", "text/plain",
    ]
    parsed = parse_message(raw)
    assert parsed.has_attachments
    assert [(a.filename, a.content_type, a.size) for a in parsed.attachments] == [
        ("résumé.pdf", "application/pdf", len(pdf)),
        ("notes.txt", "text/plain", 1),
    ]
    got = attachment_part(raw, 0)
    assert got is not None and got.data == pdf


def test_forwarded_message_attachment() -> None:
    inner = b"From: x@example.com\r\nSubject: old news\r\n\r\nthe old body\r\n"
    raw = compose(attachments=[("old.eml", "message/rfc822", inner)])
    parsed = parse_message(raw)
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("old.eml", "message/rfc822")
    ]
    got = attachment_part(raw, 0)
    assert got is not None and parse_message(got.data).headers.subject == "old news"
    # Raw 8-bit bytes cannot travel as message/rfc822 in a 7bit message: sent as a file.
    inner_8bit = inner.replace(b"old news", "café".encode())
    raw = compose(attachments=[("old.eml", "message/rfc822", inner_8bit)])
    assert raw.isascii()
    got = attachment_part(raw, 0)
    assert got is not None and got.data == inner_8bit
    assert got.content_type == "application/octet-stream"


def test_attachment_filenames_are_not_paths() -> None:
    raw = compose(attachments=[("C:\\Users\\me\\report.pdf", "application/pdf", b"x"),
                               ("", "", b"y")])
    parsed = parse_message(raw)
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("report.pdf", "application/pdf"), ("attachment", "application/octet-stream"),
    ]


def test_bcc_only_in_the_sent_copy() -> None:
    sent = compose(bcc=["secret@example.net"], include_bcc=True)
    delivered = compose(bcc=["secret@example.net"], include_bcc=False)
    assert as_message(sent)["Bcc"] == "secret@example.net"
    assert parse_message(sent).headers.bcc == "secret@example.net"
    assert b"secret@example.net" not in delivered
    assert "Bcc" not in as_message(delivered)


def test_bcc_only_recipients_get_undisclosed_to() -> None:
    raw = compose(to=[], bcc=["secret@example.net"])
    assert as_message(raw)["To"] == "undisclosed-recipients:;"
    assert b"secret" not in raw


def test_addresses_with_names_quotes_and_idn() -> None:
    raw = compose(
        from_name="Doe, Jürgen",
        to=['"Smith, Bob" <Bob@Example.ORG>', "Carol <carol@bücher.de>"],
        cc=["<dave@example.net>"],
    )
    assert raw.isascii()
    h = parse_message(raw).headers
    assert h.from_ == '"Doe, Jürgen" <alice@example.com>'
    assert h.to == '"Smith, Bob" <bob@example.org>, Carol <carol@xn--bcher-kva.de>'
    assert h.cc == "dave@example.net"


def test_non_ascii_local_part_uses_smtputf8() -> None:
    raw = compose(from_addr="jürgen@example.de", from_name="")
    assert "From: jürgen@example.de\r\n".encode() in raw
    assert parse_message(raw).headers.from_ == "jürgen@example.de"


def test_reply_headers() -> None:
    raw = compose(
        subject="Re: Hello",
        in_reply_to="<parent@example.org>",
        references=["<root@example.org>", "<parent@example.org>"],
    )
    msg = as_message(raw)
    assert msg["In-Reply-To"] == "<parent@example.org>"
    assert msg["References"] == "<root@example.org> <parent@example.org>"
    h = parse_message(raw).headers
    assert h.in_reply_to == "<parent@example.org>"
    assert h.references == ("<root@example.org>", "<parent@example.org>")


def test_sloppy_parent_ids_are_mended_or_left_out() -> None:
    raw = compose(in_reply_to="parent@example.org", references=["<ok@x>", "<bad id>", "<é@x>"])
    msg = as_message(raw)
    assert msg["In-Reply-To"] == "<parent@example.org>"
    assert msg["References"] == "<ok@x>"


def test_many_references_are_folded() -> None:
    refs = [f"<ref{i}@example.org>" for i in range(40)]
    raw = compose(references=refs)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert parse_message(raw).headers.references == tuple(refs)


def test_subject_edge_whitespace_is_dropped() -> None:
    assert parse_message(compose(subject="  padded\t ")).headers.subject == "padded"


def test_make_message_id() -> None:
    first, second = make_message_id("mail.example.com"), make_message_id("Mail.Example.COM")
    assert re.fullmatch(r"<[0-9a-f]{32}@mail\.example\.com>", first)
    assert first != second
    assert make_message_id("bücher.de").endswith("@xn--bcher-kva.de>")
    raw = compose(message_id=first)
    assert parse_message(raw).headers.message_id == first
    for bad in ("", "bad host", "a\r\nb", "-x.com"):
        with pytest.raises(ComposeError):
            make_message_id(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"to": [], "cc": [], "bcc": []}, "recipient"),
        ({"subject": "Hi\r\nBcc: victim@example.com"}, "Subject"),
        ({"subject": "Hi\nthere"}, "Subject"),
        ({"subject": "Hi\u2028there"}, "Subject"),
        ({"subject": "nul\x00"}, "Subject"),
        ({"to": ["bob@example.org\r\nBcc: victim@example.com"]}, "To"),
        ({"cc": ["Eve\n <eve@example.com>"]}, "Cc"),
        ({"bcc": ["not an address"]}, "Bcc"),
        ({"to": ["bob@"]}, "To"),
        ({"to": ["@example.org"]}, "To"),
        ({"to": ["a..b@example.org"]}, "To"),
        ({"from_addr": "nobody"}, "From"),
        ({"from_name": "Alice\r\nX-Injected: yes"}, "From"),
        ({"message_id": "no-brackets@example.com"}, "Message-ID"),
        ({"message_id": "<a@b>\r\nX: y"}, "Message-ID"),
        ({"in_reply_to": "<p@x>\r\nX: y"}, "In-Reply-To"),
        ({"references": ["<p@x>\nX: y"]}, "References"),
        ({"attachments": [("a\r\n.txt", "text/plain", b"")]}, "filename"),
        ({"attachments": [("a.txt", "text/plain\r\nX: y", b"")]}, "content type"),
        ({"attachments": [("a.txt", "nonsense", b"")]}, "content type"),
        ({"attachments": [("a", "multipart/mixed", b"")]}, "multipart"),
        ({"text": "lone \ud800 surrogate"}, "text"),
        ({"html": "\udfff"}, "html"),
        ({"subject": "\ud800"}, "Subject"),
    ],
)
def test_bad_input_raises_compose_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ComposeError, match=message):
        compose(**overrides)


def test_compose_error_is_a_value_error() -> None:
    assert issubclass(ComposeError, ValueError)


_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_header_text = st.text(max_size=120).filter(lambda s: not _FORBIDDEN.search(s))
_body_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=400
)
_filenames = _header_text.filter(lambda s: bool(s.strip()) and "/" not in s and "\\" not in s)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=_header_text,
    name=_header_text,
    text=_body_text,
    html=st.one_of(st.none(), _body_text),
    files=st.lists(
        st.tuples(
            _filenames,
            st.sampled_from(["application/pdf", "text/plain", "image/png", "text/csv"]),
            st.binary(max_size=300),
        ),
        max_size=3,
    ),
)
def test_compose_parse_round_trip(
    subject: str, name: str, text: str, html: str | None, files: list[tuple[str, str, bytes]]
) -> None:
    raw = compose(
        subject=subject, from_name=name, to=["Bob <bob@example.org>", "carol@example.net"],
        text=text, html=html, attachments=files,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    parsed = parse_message(raw)
    assert parsed.headers.subject == subject.strip()
    assert parsed.headers.to == "Bob <bob@example.org>, carol@example.net"
    assert "<alice@example.com>" in parsed.headers.from_ or parsed.headers.from_ == (
        "alice@example.com"
    )

    def lines(s: str) -> str:  # line breaks travel as CRLF and come back as \n
        return re.sub(r"\r\n?", "\n", s).rstrip("\n")

    assert lines(parsed.text) == lines(text)
    if html is not None:
        assert lines(parsed.html) == lines(html)
    assert [(a.filename, a.content_type, a.size) for a in parsed.attachments] == [
        (fn.replace("\t", " ").strip(), ctype, len(data)) for fn, ctype, data in files
    ]
    for info, (_, _, data) in zip(parsed.attachments, files, strict=True):
        part = attachment_part(raw, info.index)
        assert part is not None and part.data == data
