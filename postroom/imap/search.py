"""SEARCH keys (RFC 3501 §6.4.4, MODSEQ of RFC 7162) parsed into a tree and evaluated.

Text keys (TEXT, BODY, SUBJECT, FROM, TO, CC, BCC, HEADER) are exact, case-insensitive substring
matches on the decoded text: RFC 2047 words in header fields, transfer encodings and charsets in
bodies. No tokenizer sits in between, so "ello" finds "hello". Dates compare by day in UTC, the
zone INTERNALDATE is given in.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

from postroom.core.message import decode_bytes, decode_header_text
from postroom.core.models import Flag, MessageRecord
from postroom.imap import mime
from postroom.imap.parser import Cursor, ParseError, SequenceSet, resolve

CHARSETS = ("UTF-8", "US-ASCII")
# Search keys inside parentheses, OR and NOT, at most this deep: each level is a call here and
# in every walk of the keys (matching, the search index), which Python caps at ~1,000 deep.
MAX_DEPTH = 100


class BadCharset(Exception):
    pass


@dataclass
class Candidate:
    """One message as a search sees it; `content` is filled in when a key needs the bytes."""

    msn: int
    record: MessageRecord
    recent: bool
    raw: bytes | None = None
    part: mime.Part | None = None
    _texts: dict[str, str] = field(default_factory=dict)

    def header_text(self, name: str) -> str:
        key = "h:" + name
        if key not in self._texts:
            assert self.raw is not None and self.part is not None
            values = [decode_header_text(f.value.decode("utf-8", "surrogateescape"))
                      for f in self.part.fields if f.name == name]
            self._texts[key] = "\n".join(values).casefold()
        return self._texts[key]

    def all_headers(self) -> str:
        if "headers" not in self._texts:
            assert self.part is not None
            values = [f.name + ": " + decode_header_text(
                f.value.decode("utf-8", "surrogateescape")) for f in self.part.fields]
            self._texts["headers"] = "\n".join(values).casefold()
        return self._texts["headers"]

    def body_text(self) -> str:
        if "body" not in self._texts:
            assert self.raw is not None and self.part is not None
            chunks: list[str] = []
            for leaf in mime.text_leaves(self.part):
                chunks.append(decode_bytes(mime.decoded_body(self.raw, leaf),
                                           leaf.param("charset")))
            # the undecoded body too, so a search for markup or an encoded form still finds it
            chunks.append(self.raw[self.part.body_start :].decode("utf-8", "replace"))
            self._texts["body"] = "\n".join(chunks).casefold()
        return self._texts["body"]


@dataclass
class Context:
    largest_msn: int
    largest_uid: int


class Key:
    needs_content = False

    def match(self, c: Candidate, ctx: Context) -> bool:
        raise NotImplementedError


@dataclass
class All(Key):
    keys: list[Key]

    def __post_init__(self) -> None:
        self.needs_content = any(k.needs_content for k in self.keys)

    def match(self, c: Candidate, ctx: Context) -> bool:
        return all(k.match(c, ctx) for k in self.keys)


@dataclass
class Or(Key):
    a: Key
    b: Key

    def __post_init__(self) -> None:
        self.needs_content = self.a.needs_content or self.b.needs_content

    def match(self, c: Candidate, ctx: Context) -> bool:
        return self.a.match(c, ctx) or self.b.match(c, ctx)


@dataclass
class Not(Key):
    key: Key

    def __post_init__(self) -> None:
        self.needs_content = self.key.needs_content

    def match(self, c: Candidate, ctx: Context) -> bool:
        return not self.key.match(c, ctx)


@dataclass
class Test(Key):
    """A key decided from the record alone."""

    fn: Callable[[Candidate, Context], bool]

    def match(self, c: Candidate, ctx: Context) -> bool:
        return self.fn(c, ctx)


@dataclass
class Text(Key):
    """A substring key on the message text (needs the bytes)."""

    where: str  # header name, "" for body, "*" for whole text
    needle: str
    header_name: str = ""

    needs_content = True

    def match(self, c: Candidate, ctx: Context) -> bool:
        if self.where == "":
            return self.needle in c.body_text()
        if self.where == "*":
            return self.needle in c.all_headers() or self.needle in c.body_text()
        if not self.needle:  # HEADER field "": any message with the field
            return c.part is not None and c.part.header(self.where) is not None
        return self.needle in c.header_text(self.where)


def _day(ts: float | None) -> datetime.date | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).date()


def _in_set(value: int, seq: SequenceSet, largest: int) -> bool:
    return any(lo <= value <= hi for lo, hi in resolve(seq, largest))


def _flag_test(flag: Flag, present: bool) -> Test:
    return Test(lambda c, _ctx: (flag in c.record.flags) == present)


@dataclass
class Program:
    key: Key
    uses_modseq: bool = False


def parse_program(cur: Cursor) -> Program:
    """search-key *(SP search-key), optionally after CHARSET (the caller handles RETURN)."""
    keys: list[Key] = []
    state = {"modseq": False}
    if cur.line[cur.pos : cur.pos + 8].upper() == b"CHARSET ":
        cur.atom()
        cur.sp()
        charset = cur.astring_text().upper()
        if charset not in CHARSETS:
            raise BadCharset(charset)
        cur.sp()
    while True:
        keys.append(_key(cur, state))
        if cur.at_end() or cur.peek() == 0x29:
            break
        cur.sp()
    return Program(keys[0] if len(keys) == 1 else All(keys), state["modseq"])


def _string(cur: Cursor) -> str:
    try:
        return cur.astring().decode("utf-8").casefold()
    except UnicodeDecodeError:
        raise ParseError("search string is not valid UTF-8") from None


def _key(cur: Cursor, state: dict[str, bool], depth: int = 0) -> Key:
    if depth > MAX_DEPTH:
        raise ParseError(f"search keys nested more than {MAX_DEPTH} deep")
    if cur.maybe(b"("):
        keys = [_key(cur, state, depth + 1)]
        while not cur.maybe(b")"):
            cur.sp()
            keys.append(_key(cur, state, depth + 1))
        return All(keys)
    if cur.is_sequence_set_next():
        seq = cur.sequence_set()
        return Test(lambda c, ctx: _in_set(c.msn, seq, ctx.largest_msn))
    word = cur.keyword()
    simple = _SIMPLE.get(word)
    if simple is not None:
        return simple
    if word in _FLAG_ARGS:
        flag, present = _FLAG_ARGS[word]
        return _flag_test(flag, present)
    if word in ("BCC", "CC", "FROM", "SUBJECT", "TO"):
        cur.sp()
        return Text(word.lower(), _string(cur))
    if word == "BODY":
        cur.sp()
        return Text("", _string(cur))
    if word == "TEXT":
        cur.sp()
        return Text("*", _string(cur))
    if word == "HEADER":
        cur.sp()
        name = cur.astring_text().lower()
        cur.sp()
        return Text(name, _string(cur))
    if word in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
        cur.sp()
        day = cur.date()
        sent = word.startswith("SENT")
        op = word[4:] if sent else word

        def by_date(c: Candidate, _ctx: Context) -> bool:
            when = _day(c.record.headers.date if sent else c.record.internal_date)
            if when is None:
                return False
            return when < day if op == "BEFORE" else when == day if op == "ON" else when >= day

        return Test(by_date)
    if word in ("KEYWORD", "UNKEYWORD"):
        cur.sp()
        name = cur.flag()
        present = word == "KEYWORD"
        lowered = name.lower()

        def by_keyword(c: Candidate, _ctx: Context) -> bool:
            names = [n.lower() for n in c.record.flags.names()]
            return (lowered in names) == present

        return Test(by_keyword)
    if word in ("LARGER", "SMALLER"):
        cur.sp()
        size = cur.number()
        if word == "LARGER":
            return Test(lambda c, _ctx: c.record.size > size)
        return Test(lambda c, _ctx: c.record.size < size)
    if word == "NOT":
        cur.sp()
        return Not(_key(cur, state, depth + 1))
    if word == "OR":
        cur.sp()
        a = _key(cur, state, depth + 1)
        cur.sp()
        return Or(a, _key(cur, state, depth + 1))
    if word == "UID":
        cur.sp()
        seq = cur.sequence_set()
        return Test(lambda c, ctx: _in_set(c.record.uid, seq, ctx.largest_uid))
    if word == "MODSEQ":
        cur.sp()
        if cur.peek() == 0x22:  # entry-name entry-type-req (ignored: one modseq per message)
            cur.quoted()
            cur.sp()
            cur.atom()
            cur.sp()
        value = cur.number64()
        state["modseq"] = True
        return Test(lambda c, _ctx: c.record.modseq >= value)
    raise ParseError(f"unknown search key {word[:30]}")


_SIMPLE: dict[str, Key] = {
    "ALL": Test(lambda _c, _ctx: True),
    "NEW": Test(lambda c, _ctx: c.recent and Flag.SEEN not in c.record.flags),
    "OLD": Test(lambda c, _ctx: not c.recent),
    "RECENT": Test(lambda c, _ctx: c.recent),
}

_FLAG_ARGS: dict[str, tuple[Flag, bool]] = {
    "ANSWERED": (Flag.ANSWERED, True),
    "DELETED": (Flag.DELETED, True),
    "DRAFT": (Flag.DRAFT, True),
    "FLAGGED": (Flag.FLAGGED, True),
    "SEEN": (Flag.SEEN, True),
    "UNANSWERED": (Flag.ANSWERED, False),
    "UNDELETED": (Flag.DELETED, False),
    "UNDRAFT": (Flag.DRAFT, False),
    "UNFLAGGED": (Flag.FLAGGED, False),
    "UNSEEN": (Flag.SEEN, False),
}


def sequence_text(numbers: list[int]) -> str:
    """A compact sequence set for ESEARCH ALL and COPYUID: 1:3,7,9:10."""
    if not numbers:
        return ""
    nums = sorted(numbers)
    out: list[str] = []
    start = prev = nums[0]
    for n in nums[1:]:
        if n == prev + 1:
            prev = n
            continue
        out.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = n
    out.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(out)
