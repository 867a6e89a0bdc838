"""postroom.core.message: parsing real-world and malformed mail without ever raising."""

from __future__ import annotations

import base64
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.core.message import (
    Attachment,
    AttachmentInfo,
    ParsedMessage,
    attachment_part,
    decode_bytes,
    decode_header_text,
    html_to_text,
    make_snippet,
    parse_message,
)
from postroom.core.models import HeaderSummary


def crlf(text: str) -> bytes:
    """Test messages are written with \\n for readability and sent with CRLF, as on the wire."""
    return text.replace("\n", "\r\n").encode("utf-8")


def assert_storable(parsed: ParsedMessage) -> None:
    """Every string can be encoded as UTF-8 and stored in PostgreSQL (no NUL)."""
    h = parsed.headers
    strings = [parsed.text, parsed.html, parsed.snippet, h.from_, h.to, h.cc, h.bcc, h.subject,
               h.message_id, h.in_reply_to, *h.references]
    strings += [s for item in parsed.header_items for s in item]
    strings += [a.filename for a in parsed.attachments] + [a.content_id for a in parsed.attachments]
    for s in strings:
        s.encode("utf-8")
        assert "\x00" not in s


PLAIN = crlf("""\
From: Alice Example <alice@example.com>
To: "Doe, John" <john@example.org>, bob@example.net
Cc: Carol <carol@example.com>
Subject: Lunch on Friday?
Date: Fri, 05 Jan 2024 12:30:00 +0100
Message-ID: <lunch-1@example.com>
In-Reply-To: <earlier@example.org>
References: <root@example.org>
 <earlier@example.org>
X-Mailer: Test

Hi John,

Are we still on for lunch?   Let me know.
--
Alice
""")


def test_plain_message() -> None:
    parsed = parse_message(PLAIN)
    assert parsed.headers == HeaderSummary(
        from_="Alice Example <alice@example.com>",
        to='"Doe, John" <john@example.org>, bob@example.net',
        cc="Carol <carol@example.com>",
        bcc="",
        subject="Lunch on Friday?",
        date=1704454200.0,
        message_id="<lunch-1@example.com>",
        in_reply_to="<earlier@example.org>",
        references=("<root@example.org>", "<earlier@example.org>"),
    )
    assert parsed.text.startswith("Hi John,\n\nAre we still on for lunch?")
    assert "\r" not in parsed.text
    assert parsed.html == ""
    assert parsed.attachments == ()
    assert not parsed.has_attachments
    assert parsed.snippet == "Hi John, Are we still on for lunch? Let me know. -- Alice"


def test_header_items_keep_order_and_decode() -> None:
    parsed = parse_message(PLAIN)
    names = [name for name, _ in parsed.header_items]
    assert names == ["From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To",
                     "References", "X-Mailer"]
    items = dict(parsed.header_items)
    assert items["References"] == "<root@example.org> <earlier@example.org>"  # unfolded
    assert items["X-Mailer"] == "Test"


ALTERNATIVE = crlf("""\
From: news@example.com
To: you@example.org
Subject: Alternative
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 is open =
today.
--alt
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

""") + base64.encodebytes(
    "<html><head><title>T</title><style>p {color: red}</style></head>"
    "<body><p>Café is <b>open</b> today.</p><script>alert(1)</script></body></html>".encode()
) + crlf("""
--alt--
""")


def test_multipart_alternative() -> None:
    parsed = parse_message(ALTERNATIVE)
    assert parsed.text == "Café is open today."
    assert "<b>open</b>" in parsed.html and "<script>" in parsed.html  # unsanitised
    assert parsed.snippet == "Café is open today."
    assert parsed.attachments == ()
    assert not parsed.has_attachments


def test_html_only_leaves_text_empty_and_snippets_the_html() -> None:
    raw = crlf("""\
Subject: html only
Content-Type: text/html; charset=iso-8859-1

<html><head><style>body {x: y}</style></head><body><p>Caf\xe9 &amp; cr&egrave;me</p>
<script>var x = "<p>not text</p>";</script><div>second   line</div></body></html>
""")
    raw = raw.decode("utf-8").encode("latin-1")
    parsed = parse_message(raw)
    assert parsed.text == ""
    assert "Café" in parsed.html
    assert parsed.snippet == "Café & crème second line"


MIXED = crlf("""\
From: =?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.de>
To: team@example.com
Subject: =?iso-8859-1?q?R=E9sum=E9?= and =?utf-8?B?8J+Ukg==?= files
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="mixed"

This is a multi-part message in MIME format.
--mixed
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset="utf-8"

See the attached files.
--alt
Content-Type: multipart/related; boundary="rel"; type="text/html"

--rel
Content-Type: text/html; charset="utf-8"

<p>See the <b>attached</b> files.<img src="cid:logo@example.de"></p>
--rel
Content-Type: image/png
Content-ID: <logo@example.de>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--rel--
--alt--
--mixed
Content-Type: application/pdf; name="report.pdf"
Content-Disposition: attachment; filename*=utf-8''R%C3%A9sum%C3%A9%20%E2%82%AC.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--mixed
Content-Type: text/plain; charset=utf-8; name="notes.txt"
Content-Disposition: attachment; filename*0*=utf-8''long%20na; filename*1*=me%20%C3%A9.txt

some notes
--mixed
Content-Type: message/rfc822

From: someone@example.org
Subject: Forwarded =?utf-8?q?caf=C3=A9?=

The forwarded body.
--mixed
Content-Type: application/octet-stream
Content-Disposition: attachment; filename="=?utf-8?b?w6l0w6kuYmlu?="
Content-Transfer-Encoding: base64

AAEC
--mixed--
""")


def test_nested_mixed_with_attachments() -> None:
    parsed = parse_message(MIXED)
    assert parsed.headers.from_ == "Jürgen Müller <juergen@example.de>"
    assert parsed.headers.subject == "Résumé and 🔒 files"
    assert parsed.text == "See the attached files."
    assert "cid:logo@example.de" in parsed.html
    assert parsed.has_attachments
    assert parsed.attachments == (
        AttachmentInfo(0, "", "image/png", 8, "logo@example.de", "inline"),
        AttachmentInfo(1, "Résumé €.pdf", "application/pdf", 9, "", "attachment"),
        AttachmentInfo(2, "long name é.txt", "text/plain", 10, "", "attachment"),
        AttachmentInfo(3, "Forwarded café.eml", "message/rfc822", 90, "", "attachment"),
        AttachmentInfo(4, "été.bin", "application/octet-stream", 3, "", "attachment"),
    )


def test_attachment_part_returns_decoded_bytes_in_the_same_numbering() -> None:
    logo = attachment_part(MIXED, 0)
    assert logo == Attachment("", "image/png", b"\x89PNG\r\n\x1a\n", "logo@example.de", "inline")
    pdf = attachment_part(MIXED, 1)
    assert pdf is not None and pdf.data == b"%PDF-1.4\n" and pdf.filename == "Résumé €.pdf"
    notes = attachment_part(MIXED, 2)
    assert notes is not None and notes.data == b"some notes"
    forwarded = attachment_part(MIXED, 3)
    assert forwarded is not None
    assert forwarded.data.startswith(b"From: someone@example.org\r\nSubject: Forwarded")
    assert forwarded.data.endswith(b"\r\n\r\nThe forwarded body.")
    assert parse_message(forwarded.data).text == "The forwarded body."
    binary = attachment_part(MIXED, 4)
    assert binary is not None and binary.data == b"\x00\x01\x02"
    for info in parse_message(MIXED).attachments:
        part = attachment_part(MIXED, info.index)
        assert part is not None and len(part.data) == info.size
    assert attachment_part(MIXED, 5) is None
    assert attachment_part(MIXED, -1) is None
    assert attachment_part(b"", 0) is None


def test_forwarded_message_without_subject_and_with_forbidden_base64() -> None:
    raw = crlf("""\
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain

see below
--b
Content-Type: message/rfc822

From: x@example.com

no subject here
--b
Content-Type: message/rfc822
Content-Transfer-Encoding: base64

U3ViamVjdDogZW5jb2RlZAoKYm9keQo=
--b--
""")
    parsed = parse_message(raw)
    assert [a.filename for a in parsed.attachments] == ["message.eml", "encoded.eml"]
    encoded = attachment_part(raw, 1)
    assert encoded is not None and encoded.data == b"Subject: encoded\n\nbody\n"


def test_inline_image_alone_is_not_an_attachment_for_the_paperclip() -> None:
    raw = crlf("""\
Content-Type: multipart/related; boundary=r

--r
Content-Type: text/html

<img src="cid:a@b">
--r
Content-Type: image/gif
Content-ID: <a@b>
Content-Disposition: inline

R0lGODlh
--r--
""")
    parsed = parse_message(raw)
    assert [(a.content_type, a.disposition) for a in parsed.attachments] == [
        ("image/gif", "inline")
    ]
    assert not parsed.has_attachments


def test_non_text_leaf_with_filename_counts_as_attachment() -> None:
    raw = crlf("""\
Content-Type: multipart/mixed; boundary=m

--m
Content-Type: text/plain

body
--m
Content-Type: image/jpeg; name=photo.jpg
Content-Disposition: inline

/9j/
--m--
""")
    parsed = parse_message(raw)
    assert parsed.has_attachments
    assert parsed.attachments[0].filename == "photo.jpg"
    assert parsed.attachments[0].disposition == "inline"


def test_related_root_chosen_by_start_parameter() -> None:
    raw = crlf("""\
Content-Type: multipart/related; boundary=r; start="<root@x>"

--r
Content-Type: image/png
Content-ID: <img@x>

x
--r
Content-Type: text/html
Content-ID: <root@x>

<p>root</p>
--r--
""")
    parsed = parse_message(raw)
    assert parsed.html == "<p>root</p>"
    assert [a.content_id for a in parsed.attachments] == ["img@x"]


def test_sequential_inline_text_parts_are_joined() -> None:
    raw = crlf("""\
Content-Type: multipart/mixed; boundary=m

--m
Content-Type: text/plain

first
--m
Content-Type: text/plain

list footer
--m--
""")
    assert parse_message(raw).text == "first\nlist footer"


def test_text_calendar_without_filename_is_listed() -> None:
    raw = crlf("""\
Content-Type: multipart/alternative; boundary=a

--a
Content-Type: text/plain

invite
--a
Content-Type: text/calendar; method=REQUEST

BEGIN:VCALENDAR
END:VCALENDAR
--a--
""")
    parsed = parse_message(raw)
    assert parsed.text == "invite"
    assert [a.content_type for a in parsed.attachments] == ["text/calendar"]


def test_whole_message_is_one_attachment() -> None:
    raw = crlf("""\
Content-Type: application/pdf
Content-Disposition: attachment; filename=only.pdf
Content-Transfer-Encoding: base64

JVBERg==
""")
    parsed = parse_message(raw)
    assert parsed.text == "" and parsed.html == ""
    assert parsed.attachments == (
        AttachmentInfo(0, "only.pdf", "application/pdf", 4, "", "attachment"),
    )


def test_filenames_are_names_not_paths() -> None:
    raw = (b"Content-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename=\"..\\\\..\\\\evil\x01\tname.exe\"\r\n"
           b"\r\nx")
    assert parse_message(raw).attachments[0].filename == "evil name.exe"


def test_filename_quoting() -> None:
    raw = (b'Content-Type: application/octet-stream; name="<angle>"\r\n'
           b"Content-Disposition: attachment\r\n\r\nx")
    assert parse_message(raw).attachments[0].filename == "<angle>"
    raw = (b"Content-Type: application/octet-stream\r\n"
           b'Content-Disposition: attachment; filename="say \\"hi\\".txt"\r\n\r\nx')
    assert parse_message(raw).attachments[0].filename == 'say "hi".txt'


def test_encoded_word_subjects() -> None:
    raw = (b"Subject: =?utf-8?b?w6l0w6kgaGVsbG8=?= =?utf-8?b?IHdvcmxk?=\r\n"
           b"Cc: =?iso-8859-1?q?Fran=E7ois?= <f@example.fr>\r\n\r\n")
    parsed = parse_message(raw)
    assert parsed.headers.subject == "été hello world"
    assert parsed.headers.cc == "François <f@example.fr>"
    assert parse_message(b"Subject: =?iso-8859-1?q?caf=E9_cr=E8me?=\r\n\r\n").headers.subject \
        == "café crème"


def test_raw_8bit_headers_latin1_and_utf8() -> None:
    raw = (b"From: J\xfcrgen <j@example.de>\r\n"
           b"To: Bj\xc3\xb6rk <b@example.is>\r\n"
           b"Subject: caf\xe9 \xe0 la cr\xe8me\r\n"
           b"X-Utf8: \xe2\x82\xac 5\r\n\r\nbody\r\n")
    parsed = parse_message(raw)
    assert parsed.headers.from_ == "Jürgen <j@example.de>"
    assert parsed.headers.to == "Björk <b@example.is>"
    assert parsed.headers.subject == "café à la crème"
    assert dict(parsed.header_items)["X-Utf8"] == "€ 5"
    assert_storable(parsed)


def test_raw_8bit_filename() -> None:
    raw = (b"Content-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename=\"\xc3\xa9t\xc3\xa9.pdf\"\r\n\r\nx")
    assert parse_message(raw).attachments[0].filename == "été.pdf"


def test_unknown_and_odd_charsets_fall_back() -> None:
    raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xc3\xa9\r\n"
    assert parse_message(raw).text == "café\n"
    raw = b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xe9\r\n"
    assert parse_message(raw).text == "café\n"
    # Codecs that exist but are not mail charsets, or raise on the replace handler.
    for charset in (b"rot13", b"base64", b"zlib", b"idna", b"punycode", b"unicode_escape"):
        raw = b"Content-Type: text/plain; charset=" + charset + b"\r\n\r\nabc \xe9\xff\\ud800\r\n"
        parsed = parse_message(raw)
        assert parsed.text.startswith("abc")
        assert_storable(parsed)
    # Declared UTF-8 but invalid: replacement characters, not an exception.
    raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\nbad \xff byte"
    assert parse_message(raw).text == "bad \ufffd byte"
    # Unknown charset in an encoded word.
    assert parse_message(b"Subject: =?x-unknown?q?caf=E9?=\r\n\r\n").headers.subject == "café"


def test_broken_base64_body() -> None:
    raw = crlf("""\
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

aGVsbG8gd29y!!bGQ
--b
Content-Type: application/pdf; name=x.pdf
Content-Transfer-Encoding: base64

%%%not base64 at all%%%
--b--
""")
    parsed = parse_message(raw)
    assert parsed.text == "hello world"
    assert len(parsed.attachments) == 1
    assert attachment_part(raw, 0) is not None


def test_headers_only_no_body() -> None:
    parsed = parse_message(b"From: a@example.com\r\nSubject: nothing\r\n")
    assert parsed.headers.subject == "nothing"
    assert parsed.headers.from_ == "a@example.com"
    assert (parsed.text, parsed.html, parsed.snippet, parsed.attachments) == ("", "", "", ())


def test_empty_input() -> None:
    parsed = parse_message(b"")
    assert parsed.headers == HeaderSummary()
    assert (parsed.text, parsed.html, parsed.snippet) == ("", "", "")
    assert parsed.attachments == () and parsed.header_items == ()
    assert not parsed.has_attachments


def test_header_with_form_feed_falls_back_to_raw_value() -> None:
    # The stdlib's header registry raises (IndexError) reading these two fields.
    raw = b"Message-ID: <>a>\x0c\r\nFrom: ,\x0c\r\n <\r\nSubject: still here\r\n\r\nbody\r\n"
    parsed = parse_message(raw)
    assert parsed.headers.from_ == ",\x0c <"
    assert parsed.headers.message_id == ""
    assert parsed.headers.subject == "still here"
    assert parsed.text == "body\n"
    assert ("Message-ID", "<>a>\x0c") in parsed.header_items


def test_content_type_that_makes_the_stdlib_parser_raise() -> None:
    # BytesParser with email.policy.default raises IndexError on this Content-Type while
    # parsing; the tolerant policy reads it as a plain string instead.
    raw = b"Subject: ok\r\nContent-Type: );Q*\r\n\r\nbody text\r\n"
    parsed = parse_message(raw)
    assert parsed.headers.subject == "ok"
    assert parsed.text == "body text\n"


def test_malformed_address_headers() -> None:
    raw = (b'To: "unterminated <a@b.c>\r\nCc: :;,<@>\r\nFrom: a@[ \r\n'
           b"Bcc: hidden@example.com\r\n\r\n")
    parsed = parse_message(raw)
    assert parsed.headers.bcc == "hidden@example.com"
    assert "a@b.c" in parsed.headers.to
    assert_storable(parsed)


def test_garbage_bytes() -> None:
    garbage = bytes(range(256)) * 4 + b"\r\n\r\n\x00\xff\xfe" + bytes(reversed(range(256)))
    parsed = parse_message(garbage)
    assert_storable(parsed)
    parsed = parse_message(b"\x00" * 1000)
    assert_storable(parsed)


def test_missing_boundary_is_read_as_text() -> None:
    raw = b"Content-Type: multipart/mixed\r\n\r\njust text\r\n"
    assert parse_message(raw).text == "just text\n"
    raw = b"Content-Type: multipart/mixed; boundary=nowhere\r\n\r\njust text\r\n"
    assert "just text" in parse_message(raw).text


def test_deep_nesting_does_not_raise() -> None:
    raw = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(1500)
    ) + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    assert_storable(parse_message(raw))


def test_many_parts_and_long_headers_stay_fast() -> None:
    many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(
        b"--b\r\nContent-Type: application/x; " + b'a=";' * 400 + b"\r\n\r\nx\r\n"
        for _ in range(300)
    ) + b"--b--\r\n"
    addresses = b"To: " + b", ".join(b"U %d <u%d@example.com>" % (i, i) for i in range(20000))
    quotes = b"".join(b"To: " + b'"' * 5000 + b"\r\n" for _ in range(50))
    for raw in (many, addresses + b"\r\n\r\nx", quotes + b"\r\nx"):
        start = time.perf_counter()
        parse_message(raw)
        assert time.perf_counter() - start < 5


def test_dates() -> None:
    def date(value: str) -> float | None:
        return parse_message(f"Date: {value}\r\n\r\n".encode()).headers.date

    assert date("Thu, 01 Jan 1970 00:00:00 +0000") == 0.0
    assert date("Mon, 1 Jan 2024 10:00:00 +0100") == 1704099600.0
    assert date("1 Jan 2024 09:00:00 GMT") == 1704099600.0
    assert date("Mon, 01 Jan 2024 09:00:00 -0000") == 1704099600.0
    assert date("Mon, 01 Jan 2024 09:00:00") == 1704099600.0  # no zone: read as UTC
    assert date("Mon, 01 Jan 24 09:00:00 +0000") == 1704099600.0  # obsolete 2-digit year
    assert date("yesterday") is None
    assert date("Mon, 01 Jan 99999999999 09:00:00 +0000") is None
    assert parse_message(b"Subject: x\r\n\r\n").headers.date is None


def test_message_ids() -> None:
    raw = crlf("""\
Message-ID: bare-id@example.com
In-Reply-To: Your message of Monday <parent@example.com>
References: <a@example.com> <b@example.com>
 <a@example.com> garbage <c@ex
 ample.com>

""")
    h = parse_message(raw).headers
    assert h.message_id == "<bare-id@example.com>"
    assert h.in_reply_to == "<parent@example.com>"
    assert h.references == ("<a@example.com>", "<b@example.com>", "<a@example.com>",
                            "<c@example.com>")


def test_references_are_bounded() -> None:
    refs = " ".join(f"<r{i}@example.com>" for i in range(500))
    h = parse_message(f"References: {refs}\r\n\r\n".encode()).headers
    assert len(h.references) == 100
    assert h.references[-1] == "<r499@example.com>"


def test_snippet_is_bounded_and_collapsed() -> None:
    body = ("word \t\n " * 200).encode()
    parsed = parse_message(b"Subject: s\r\n\r\n" + body)
    assert len(parsed.snippet) <= 200
    assert "  " not in parsed.snippet and "\n" not in parsed.snippet
    assert make_snippet("  a\n\n b  ") == "a b"
    assert make_snippet("x" * 500) == "x" * 200


def test_html_to_text() -> None:
    html = (
        "<!DOCTYPE html><html><head><title>Title</title><style>p{}</style></head><body>"
        "<!-- a comment --><p>One &amp; two</p><script>if (a < b) {}</script>"
        "<a href='x>y' title=\"q'\">link</a><br>next<table><tr><td>a</td><td>b</td></tr></table>"
        "3 < 4</body></html>"
    )
    assert html_to_text(html) == "One & two\nlink\nnext\n\na b\n\n3 < 4"
    assert html_to_text("") == ""
    assert html_to_text("<![if !mso]>x<![endif]>") == "x"
    assert html_to_text("text <b unclosed") == "text"


def test_html_to_text_is_linear_on_hostile_input() -> None:
    for hostile in ("<!--" * 100_000, "<a" * 200_000, "</" * 200_000, "<a b='" * 50_000,
                    "<script>" * 50_000, "&#" * 200_000):
        start = time.perf_counter()
        html_to_text(hostile)
        assert time.perf_counter() - start < 2


def test_decode_helpers() -> None:
    assert decode_bytes("café".encode("cp1252"), "iso-8859-1") == "café"
    assert decode_bytes(b"\x80", "latin-1") == "€"  # labelled Latin-1, sent as Windows-1252
    assert decode_bytes("日本".encode("shift_jis"), "shift_jis") == "日本"
    assert decode_bytes("中文".encode("gb18030"), "gb2312") == "中文"
    assert decode_bytes(b"caf\xc3\xa9", None) == "café"
    assert decode_bytes(b"caf\xe9", "us-ascii") == "café"
    assert decode_header_text("=?utf-8?b?w6k?= =?utf-8?q?_x?=") == "é x"
    assert decode_header_text("=?utf-8?b?!!!?=") == ""
    assert decode_header_text("plain\r\n text") == "plain text"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_parse_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    parsed = parse_message(raw)
    assert_storable(parsed)
    for info in parsed.attachments:
        part = attachment_part(raw, info.index)
        assert part is not None and len(part.data) == info.size


_HEADER_NAMES = st.sampled_from([
    "From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "In-Reply-To", "References",
    "Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "Content-ID",
    "MIME-Version", "Reply-To", "Sender", "X-Anything",
])
_HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.sampled_from([
        "multipart/mixed; boundary=b", "multipart/alternative; boundary=b", "message/rfc822",
        "text/plain; charset=utf-8", "text/html; charset=x-unknown", "base64",
        "quoted-printable", "attachment; filename*=utf-8''%C3%A9", '"unterminated <a@b>',
        "=?utf-8?b?w6k=?=", "=?bogus?q?=ZZ?=", "<a@b> <c@d>", "Mon, 1 Jan 2024 00:00:00 +0000",
    ]),
)
_BODY_LINES = st.lists(
    st.one_of(st.text(max_size=60), st.sampled_from(["--b", "--b--", "", "=C3=A9", "aGVsbG8="])),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=10),
    body=_BODY_LINES,
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
)
def test_parse_never_raises_on_assembled_messages(
    headers: list[tuple[str, str]], body: list[str], encoding: str
) -> None:
    text = "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n" + "\r\n".join(body)
    raw = text.encode(encoding, "replace")
    parsed = parse_message(raw)
    assert_storable(parsed)
    assert len(parsed.snippet) <= 200
    for info in parsed.attachments:
        part = attachment_part(raw, info.index)
        assert part is not None and len(part.data) == info.size


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=500))
def test_html_to_text_never_raises(html: str) -> None:
    text = html_to_text(html)
    text.encode("utf-8")
    if "<" not in html and "&" not in html:
        assert text.split() == html.replace("\x00", "").split()


def _registry_address(value: str) -> str:
    """What _addresses showed before its shortcut: the header registry's rendering."""
    from postroom.core import message as m

    try:
        text = str(m._POLICY.header_fetch_parse("to", value))
    except Exception:
        text = m.decode_header_text(value)
    return m._clean(text).strip()


_ADDRESS_PIECES = st.sampled_from(
    ["a", "Zb", "'", "!", "-", ".", "@", "<", ">", " ", "\t", '"', "(", ")", ",", ";", ":",
     "=?", "?=", "x.y", "@ex.org", "+tag", "=?utf-8?q?J=C3=B6?="])


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ADDRESS_PIECES, min_size=1, max_size=12).map("".join))
def test_simple_address_shortcut_matches_the_registry(value: str) -> None:
    from postroom.core.message import _simple_address

    simple = _simple_address(value)
    if simple is not None:
        assert simple == _registry_address(value)


def test_simple_address_shortcut_covers_the_common_forms() -> None:
    from postroom.core.message import _simple_address

    for value, shown in [
        ("bob@example.org", "bob@example.org"),
        (" Bob Smith <bob.smith@example.org> ", "Bob Smith <bob.smith@example.org>"),
        ("O'Neil <o'neil+x@mail.example.org>", "O'Neil <o'neil+x@mail.example.org>"),
    ]:
        assert _simple_address(value) == shown == _registry_address(value)
    # anything else is left to the registry: quotes, comments, groups, encoded words, lists
    for value in ['"Smith, Bob" <b@x.org>', "b@x.org (Bob)", "g: a@x.org;", "a@x.org, b@x.org",
                  "=?utf-8?q?J=C3=B6?= <j@x.org>", "Bob  Smith <b@x.org>", "J. Bob <b@x.org>"]:
        assert _simple_address(value) is None
