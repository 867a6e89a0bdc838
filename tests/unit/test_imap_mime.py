"""BODYSTRUCTURE, ENVELOPE and body sections on real mail (the SpamAssassin corpus).

The expected values come from Python's email package (compat32, which keeps raw header values
and payload octets), walked here in the test; the server's values come from postroom.imap and
are read back with the test's own IMAP data reader.
"""

from __future__ import annotations

import email
import email.utils
import re
from email.message import Message
from email.policy import compat32

import pytest

from postroom.imap import fetch, mime
from postroom.imap.parser import Cursor, RawCommand
from tests import corpus
from tests.imap_sexp import Value, parse


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value).strip(" \t\r\n")


def _clean(msg: Message) -> bool:
    """Messages whose structure the email package itself reads without complaint."""
    if any(p.defects for p in msg.walk()):
        return False
    for p in msg.walk():
        if p.get_content_maintype() == "multipart" and not p.is_multipart():
            return False
        if p.get("content-type") and "/" not in p.get("content-type", ""):
            return False
    return True


def _payload_bytes(part: Message) -> bytes:
    # the stored payload string (bytes decoded as ASCII with surrogateescape by BytesParser);
    # get_payload() would re-decode 8-bit text with the part's charset
    payload = part._payload  # type: ignore[attr-defined]
    assert isinstance(payload, str)
    return payload.encode("ascii", "surrogateescape")


def _lines(data: bytes) -> int:
    if not data:
        return 0
    return len(data.split(b"\n")) - (1 if data.endswith(b"\n") else 0)


def _s(v: Value) -> str:
    assert isinstance(v, bytes), v
    return v.decode("ascii", "surrogateescape")


def check_structure(part: Message, got: Value) -> None:
    assert isinstance(got, list)
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        children = part.get_payload()
        assert isinstance(children, list)
        assert len(got) >= len(children) + 1
        for child, sub in zip(children, got[: len(children)], strict=True):
            check_structure(child, sub)
        assert _s(got[len(children)]).lower() == part.get_content_subtype()
        return
    assert _s(got[0]).lower() == part.get_content_maintype()
    assert _s(got[1]).lower() == part.get_content_subtype()
    params = got[2]
    charset = part.get_param("charset")
    if isinstance(charset, str) and params is not None:
        assert isinstance(params, list)
        pairs = {_s(params[i]).lower(): _s(params[i + 1]) for i in range(0, len(params), 2)}
        assert pairs.get("charset") == charset
    encoding = (part.get("content-transfer-encoding") or "7bit").strip()
    assert _s(got[5]).lower() == encoding.lower()
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        assert isinstance(inner, list) and len(inner) == 1
        check_structure(inner[0], got[8])
        return
    if not isinstance(part._payload, str):  # type: ignore[attr-defined]
        return  # message/delivery-status and kin: the email package splits them up
    body = _payload_bytes(part)
    assert got[6] == len(body)
    if part.get_content_maintype() == "text":
        assert got[7] == _lines(body)


def _addr_specs(v: Value) -> list[str]:
    if v is None:
        return []
    assert isinstance(v, list)
    out = []
    for addr in v:
        assert isinstance(addr, list) and len(addr) == 4
        if addr[3] is None:
            continue  # group markers
        out.append(f"{_s(addr[2])}@{_s(addr[3])}".lower())
    return out


def check_envelope(msg: Message, got: Value) -> None:
    assert isinstance(got, list) and len(got) == 10
    raw_items = [(k.lower(), str(v)) for k, v in msg.raw_items()]
    for index, name in ((0, "date"), (1, "subject"), (8, "in-reply-to"), (9, "message-id")):
        raw = next((v for k, v in raw_items if k == name), None)
        if raw is None:
            assert got[index] is None
        else:
            assert _s(got[index]) == _unfold(raw)
    for index, name in ((2, "from"), (5, "to"), (6, "cc")):
        values = msg.get_all(name)
        if not values:
            assert got[index] is None
            continue
        if len(values) > 1:
            continue
        value = _unfold(str(values[0]))
        if re.search(r"@[^<>,\"]*<", value):
            continue  # an unquoted "@" in a display name: parsers legitimately differ
        expected = email.utils.getaddresses([value])
        specs = [a.lower() for _, a in expected]
        if not all(re.fullmatch(r"[\w.+=-]+@[\w.-]+", a) for a in specs):
            continue  # odd addresses: parsers legitimately differ
        assert _addr_specs(got[index]) == specs
        for (name_, _), addr in zip(expected, got[index] or [], strict=False):  # type: ignore[arg-type]
            if re.fullmatch(r"[A-Za-z][A-Za-z .]*", name_ or "") and isinstance(addr, list):
                assert _s(addr[0]) == name_


def test_bodystructure_and_envelope_match_the_email_package() -> None:
    messages = corpus.messages()
    picked = messages[::5]  # ~1,200 messages spread over every group
    checked = multipart = rfc822 = 0
    for name, raw in picked:
        msg = email.message_from_bytes(raw, policy=compat32)
        if not _clean(msg):
            continue
        root = mime.parse(raw)
        structure = parse(mime.bodystructure(raw, root))
        try:
            check_structure(msg, structure)
            check_envelope(msg, parse(mime.envelope(root)))
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
        checked += 1
        multipart += msg.is_multipart()
        rfc822 += any(p.get_content_type() == "message/rfc822" for p in msg.walk())
    assert checked > 800 and multipart > 60


def _item(text: str) -> fetch.Item:
    request = fetch.parse_request(Cursor(RawCommand((text.encode(),))))
    return request.items[0]


def test_sections_are_slices_of_the_raw_parts() -> None:
    """BODY[n] of every leaf equals the payload the email package finds there."""
    seen = 0
    for name, raw in corpus.messages()[::3]:
        msg = email.message_from_bytes(raw, policy=compat32)
        if not _clean(msg) or not msg.is_multipart():
            continue
        root = mime.parse(raw)

        def walk(part: Message, path: list[int], raw: bytes = raw, root: mime.Part = root,
                 name: str = name) -> None:
            nonlocal seen
            if part.is_multipart() and part.get_content_maintype() == "multipart":
                children = part.get_payload()
                assert isinstance(children, list)
                for i, child in enumerate(children, 1):
                    walk(child, [*path, i])
                return
            if part.get_content_maintype() == "message":
                return
            item = _item("BODY[" + ".".join(map(str, path)) + "]")
            assert fetch.section_bytes(raw, root, item) == _payload_bytes(part), (name, path)
            mime_item = _item("BODY[" + ".".join(map(str, path)) + ".MIME]")
            header = fetch.section_bytes(raw, root, mime_item)
            assert header is not None
            for key in part.keys():
                assert key.lower().encode() in header.lower()
            seen += 1

        walk(msg, [])
    assert seen > 150


def test_header_fields_and_text() -> None:
    raw = (b"From: a@example.org\r\nSubject: one\r\n two\r\nX-A: 1\r\n"
           b"subject: again\r\n\r\nbody line\r\n")
    root = mime.parse(raw)
    got = fetch.section_bytes(raw, root, _item("BODY[HEADER.FIELDS (SUBJECT)]"))
    assert got == b"Subject: one\r\n two\r\nsubject: again\r\n\r\n"
    got = fetch.section_bytes(raw, root, _item("BODY[HEADER.FIELDS.NOT (subject x-a)]"))
    assert got == b"From: a@example.org\r\n\r\n"
    assert fetch.section_bytes(raw, root, _item("BODY[TEXT]")) == b"body line\r\n"
    assert fetch.section_bytes(raw, root, _item("BODY[1]")) == b"body line\r\n"
    assert fetch.section_bytes(raw, root, _item("BODY[2]")) is None


NESTED = (
    b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    b"preamble\r\n--outer\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: b@example.org\r\nSubject: inner\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
    b"--inner\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
    b"--inner\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--inner--\r\n"
    b"--outer\r\nContent-Type: application/octet-stream;\r\n name*0=\"long\";"
    b" name*1=\"name.bin\"\r\nContent-Disposition: attachment;\r\n"
    b" filename*=utf-8''%E2%82%AC.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"AAEC\r\n--outer--\r\nepilogue\r\n"
)


def test_nested_message_and_encoded_parameters() -> None:
    root = mime.parse(NESTED)
    got = parse(mime.bodystructure(NESTED, root))
    assert isinstance(got, list)
    text, message, attachment, subtype = got[0], got[1], got[2], got[3]
    assert subtype == b"mixed"
    assert isinstance(text, list) and text[:3] == [b"text", b"plain", [b"charset", b"utf-8"]]
    assert isinstance(message, list) and message[:2] == [b"message", b"rfc822"]
    envelope = message[7]
    assert isinstance(envelope, list) and envelope[1] == b"inner"
    inner = message[8]
    assert isinstance(inner, list) and inner[2] == b"alternative"
    assert isinstance(attachment, list)
    assert attachment[2] == [b"name", b"longname.bin"]
    assert attachment[5] == b"base64" and attachment[6] == 4
    assert attachment[8] == [b"attachment", [b"filename*", b"utf-8''%E2%82%AC.bin"]]
    section = fetch.section_bytes
    assert section(NESTED, root, _item("BODY[2.HEADER.FIELDS (SUBJECT)]")) == \
        b"Subject: inner\r\n\r\n"
    assert section(NESTED, root, _item("BODY[2.1]")) == b"plain"
    assert section(NESTED, root, _item("BODY[2.2]")) == b"<p>html</p>"
    assert section(NESTED, root, _item("BODY[3]")) == b"AAEC"
    assert section(NESTED, root, _item("BODY[1]")) == b"hello"
    assert section(NESTED, root, _item("BODY[4]")) is None
    whole = section(NESTED, root, _item("BODY[2]"))
    assert whole is not None and whole.startswith(b"From: b@example.org") \
        and whole.endswith(b"--inner--")


@pytest.mark.parametrize(("value", "expected"), [
    (b'"Doe, John" <john@example.org>', [("Doe, John", "john", "example.org")]),
    (b"a@b.c, Bee <b@c.d>", [(None, "a", "b.c"), ("Bee", "b", "c.d")]),
    (b"undisclosed-recipients:;", [(None, None, "undisclosed-recipients", None),
                                   (None, None, None, None)]),
    (b"team: x@y.z, w@y.z;", [(None, None, "team", None), (None, "x", "y.z"),
                              (None, "w", "y.z"), (None, None, None, None)]),
    (b"john@example.org (John Doe)", [(None, "john", "example.org")]),
])
def test_address_lists(value: bytes, expected: list[tuple[str | None, ...]]) -> None:
    got = mime.parse_addresses(value)
    flat = []
    for a in got:
        if a.host is None:
            flat.append((None, None, a.mailbox, None) if a.mailbox is not None
                        else (None, None, None, None))
        else:
            flat.append((a.name, a.mailbox, a.host))
    norm = [tuple(e) for e in expected]
    assert flat == [tuple(x) if len(x) == 4 else x for x in norm] or \
        [f[-2:] for f in flat] == [e[-2:] for e in norm]
