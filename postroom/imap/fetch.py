"""FETCH data items (RFC 3501 §6.4.5, MODSEQ of RFC 7162): parsing and building the data.

Every body section is a slice of the raw bytes as stored (see `mime`), so what a client
fetches is exactly what was received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postroom.core.models import MessageRecord
from postroom.imap import mime
from postroom.imap.parser import Cursor, ParseError
from postroom.imap.response import flag_list, internal_date, literal

_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE = {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
           "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ"}
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")
_CONTENT = {"ENVELOPE", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "BODY", "BODYSTRUCTURE"}


@dataclass
class Item:
    name: str  # FLAGS, BODY, BODY.PEEK, RFC822.TEXT, ...
    section: bool = False  # BODY[...] rather than BODY
    path: list[int] = field(default_factory=list)
    text: str = ""  # "", HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME
    fields: list[str] = field(default_factory=list)
    partial: tuple[int, int] | None = None

    @property
    def needs_content(self) -> bool:
        return self.section or self.name in _CONTENT

    @property
    def sets_seen(self) -> bool:
        return (self.section and self.name == "BODY") or self.name in ("RFC822", "RFC822.TEXT")

    def label(self) -> bytes:
        if not self.section:
            return self.name.encode()
        spec = ".".join(str(n) for n in self.path)
        if self.text:
            spec = f"{spec}.{self.text}" if spec else self.text
        if self.fields:
            spec += " (" + " ".join(self.fields) + ")"
        out = f"BODY[{spec}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out.encode("utf-8")


@dataclass
class Request:
    items: list[Item]
    changedsince: int | None = None
    vanished: bool = False  # QRESYNC: report uids expunged since changedsince (RFC 7162 §3.2.6)

    @property
    def needs_content(self) -> bool:
        return any(i.needs_content for i in self.items)

    @property
    def sets_seen(self) -> bool:
        return any(i.sets_seen for i in self.items)

    def has(self, name: str) -> bool:
        return any(i.name == name and not i.section for i in self.items)


def parse_request(cur: Cursor) -> Request:
    """fetch-att / "(" fetch-att *(SP fetch-att) ")" / macro, then CONDSTORE modifiers."""
    items: list[Item] = []
    if cur.maybe(b"("):
        while True:
            items.append(_item(cur))
            if cur.maybe(b")"):
                break
            cur.sp()
    else:
        word = _name(cur)
        if word in _MACROS:
            items = [Item(n) for n in _MACROS[word]]
        else:
            items = [_item(cur, word)]
    request = Request(items)
    if not cur.at_end():
        cur.sp()
        cur.expect(b"(")
        while True:
            modifier = cur.keyword()
            if modifier == "CHANGEDSINCE":
                cur.sp()
                request.changedsince = cur.number64()
            elif modifier == "VANISHED":
                request.vanished = True
            else:
                raise ParseError(f"unknown FETCH modifier {modifier[:30]}")
            if cur.maybe(b")"):
                break
            cur.sp()
        if request.vanished and request.changedsince is None:
            raise ParseError("VANISHED needs CHANGEDSINCE")
    return request


def _name(cur: Cursor) -> str:
    line = cur.line
    start = cur.pos
    while cur.pos < len(line) and line[cur.pos] in _NAME_CHARS:
        cur.pos += 1
    if cur.pos == start:
        raise ParseError(f"expected a FETCH data item {cur._where()}")
    return line[start : cur.pos].decode("ascii").upper()


def _item(cur: Cursor, name: str | None = None) -> Item:
    word = name if name is not None else _name(cur)
    if word in ("BODY", "BODY.PEEK") and cur.peek() == 0x5B:
        item = Item(word, section=True)
        cur.expect(b"[")
        _section(cur, item)
        cur.expect(b"]")
        if cur.maybe(b"<"):
            start = cur.number()
            cur.expect(b".")
            length = cur.number(nonzero=True)
            cur.expect(b">")
            item.partial = (start, length)
        return item
    if word in _SIMPLE:
        return Item(word)
    if word in _MACROS:
        raise ParseError(f"{word} cannot be combined with other data items")
    raise ParseError(f"unknown FETCH data item {word[:30]}")


def _section(cur: Cursor, item: Item) -> None:
    while cur.peek() is not None and 0x30 <= cur.peek() <= 0x39:  # type: ignore[operator]
        item.path.append(cur.number(nonzero=True))
        if not cur.maybe(b"."):
            return
    if cur.peek() == 0x5D:
        if item.path:
            raise ParseError("a section number cannot end with a dot")
        return
    text = _name(cur)
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        cur.sp()
        item.fields = cur.paren_list(cur.astring_text)
        if not item.fields:
            raise ParseError("HEADER.FIELDS needs at least one field name")
    elif text == "MIME":
        if not item.path:
            raise ParseError("MIME needs a part number")
    elif text not in ("HEADER", "TEXT"):
        raise ParseError(f"unknown section text {text[:30]}")
    item.text = text


def section_bytes(raw: bytes, root: mime.Part, item: Item) -> bytes | None:
    """The octets of BODY[section] (None when the section does not exist)."""
    part = mime.find_part(root, item.path) if item.path else root
    if part is None:
        return None
    if item.text == "MIME":
        return raw[part.start : part.body_start]
    if item.text:
        message = root if not item.path else part.message
        if message is None:
            return None
        if item.text == "HEADER":
            return raw[message.start : message.body_start]
        if item.text == "TEXT":
            return raw[message.body_start : message.end]
        return mime.header_fields(raw, message, item.fields, item.text.endswith(".NOT"))
    if not item.path:
        return raw
    if part.children and part is not root:
        return raw[part.body_start : part.end]
    return raw[part.body_start : part.end]


def build(
    item: Item,
    record: MessageRecord,
    raw: bytes | None,
    root: mime.Part | None,
    recent: bool,
) -> bytes:
    """One `name value` pair of a FETCH response."""
    name = item.name
    if not item.section:
        if name == "FLAGS":
            return b"FLAGS " + flag_list(record.flags, recent)
        if name == "UID":
            return b"UID %d" % record.uid
        if name == "INTERNALDATE":
            return b"INTERNALDATE " + internal_date(record.internal_date)
        if name == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % record.size
        if name == "MODSEQ":
            return b"MODSEQ (%d)" % record.modseq
        assert raw is not None and root is not None
        if name == "ENVELOPE":
            return b"ENVELOPE " + mime.envelope(root)
        if name == "BODYSTRUCTURE":
            return b"BODYSTRUCTURE " + mime.bodystructure(raw, root, extended=True)
        if name == "BODY":
            return b"BODY " + mime.bodystructure(raw, root, extended=False)
        if name == "RFC822":
            return b"RFC822 " + literal(raw)
        if name == "RFC822.HEADER":
            return b"RFC822.HEADER " + literal(raw[root.start : root.body_start])
        if name == "RFC822.TEXT":
            return b"RFC822.TEXT " + literal(raw[root.body_start : root.end])
        raise ParseError(f"unknown FETCH data item {name}")
    assert raw is not None and root is not None
    data = section_bytes(raw, root, item)
    if data is None:
        data = b""
    if item.partial is not None:
        start, length = item.partial
        data = data[start : start + length]
    return item.label() + b" " + literal(data)
