"""Index documents: the IMAP texts hold everything IMAP SEARCH can find in a message."""

from __future__ import annotations

from postroom.core.message import parse_message
from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.imap import mime
from postroom.imap.search import Candidate
from postroom.search.document import build_document, imap_texts
from tests.corpus import messages

ODD = [
    b"",
    b"Subject: only headers\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nna=EFve =3D caf=E9\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8gd29ybGQ=\r\n--b--\r\n",
    b"Subject: \xff\xfe bad bytes\r\n\r\n\x80\x81 body \xe9\r\n",
]


def _record(raw: bytes) -> MessageRecord:
    return MessageRecord("u", "m", "f", 1, 1, Flags(), 0.0, len(raw), "h", HeaderSummary(),
                         "", False, "t")


def test_every_line_imap_searches_is_in_the_index_texts() -> None:
    sample = [raw for _, raw in messages()][::10] + ODD
    for raw in sample:
        c = Candidate(1, _record(raw), False, raw=raw, part=mime.parse(raw))
        headers, body = imap_texts(raw)
        assert headers == c.all_headers()
        chunks = body.split("\n")
        for line in c.body_text().split("\n"):
            assert line in body and any(line in chunk for chunk in chunks), (raw[:200], line)


def test_decoded_parts_are_indexed_when_they_differ_from_the_raw_body() -> None:
    _, body = imap_texts(ODD[2])
    assert "naïve = café" in body and "na=efve" in body
    _, body = imap_texts(ODD[3])
    assert "hello world" in body and "agvsbg8gd29ybgq=" in body


def test_document_words() -> None:
    raw = (b"From: Ann <ann@example.org>\r\nTo: bo@example.net\r\nSubject: Hi\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/html\r\n\r\n<p>Hello <b>there</b></p>\r\n--b\r\n"
           b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
           b"filename=plan.pdf\r\n\r\nxx\r\n--b--\r\n")
    doc = build_document(_record(raw), raw, parse_message(raw))
    assert doc.from_ == "Ann <ann@example.org>" and doc.subject == "Hi"
    assert doc.body == "Hello there" and doc.filenames == "plan.pdf"
    assert not doc.partial
