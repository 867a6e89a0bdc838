"""Reading and parsing IMAP commands (RFC 3501 §9 grammar, LITERAL+ of RFC 7888).

A command arrives as lines and literals: a line ending in `{n}` announces n octets that follow
(after the server's "+" continuation for a synchronising literal, at once for `{n+}`). The
reader keeps the pieces apart, lines in even slots and literal octets in odd ones, so a large
APPEND literal is read once into one bytes object and handed on as it is, never copied into a
joined command line.

`Cursor` walks those pieces with one method per grammar rule (atom, astring, string,
sequence-set, flag list, date...). Every violation raises `ParseError`, which the session turns
into a tagged BAD with the reason; the connection survives.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# atom-specials (RFC 3501 §9): ( ) { SP CTL % * " \ ]
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
ATOM_CHARS = frozenset(c for c in range(0x21, 0x7F) if c not in _ATOM_SPECIALS)
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
TAG_CHARS = ASTRING_CHARS - {ord("+")}
LIST_CHARS = ATOM_CHARS | {ord("%"), ord("*"), ord("]")}
_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n?$")
_DIGITS = re.compile(rb"\d+")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {m.lower(): i + 1 for i, m in enumerate(MONTHS)}
_DATE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_DATE_TIME = re.compile(
    r"^([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$"
)
MAX_UINT32 = 4294967295


class ParseError(Exception):
    """The command does not follow the grammar: answered BAD with this reason."""


class LineTooLong(Exception):
    """A command line over the limit; its rest has been read and dropped."""


class LiteralTooLarge(Exception):
    """A literal over the limit; it has been read and dropped (or refused, if synchronising)."""

    def __init__(self, size: int, limit: int, tag: str) -> None:
        super().__init__(f"literal of {size} octets exceeds the limit of {limit}")
        self.size = size
        self.limit = limit
        self.tag = tag


@dataclass(frozen=True, slots=True)
class RawCommand:
    """One command as received: lines (without CRLF) and literal octets, alternating."""

    pieces: tuple[bytes, ...]

    @property
    def tag(self) -> str:
        """The tag as far as it can be read (for a BAD reply), or "*"."""
        return tag_of(self.pieces[0])


def tag_of(line: bytes) -> str:
    end = 0
    while end < len(line) and line[end] in TAG_CHARS:
        end += 1
    return line[:end].decode("ascii") if end else "*"


async def read_command(
    reader: asyncio.StreamReader,
    send_continuation: Callable[[], Awaitable[None]],
    *,
    max_line: int,
    max_literal: int,
    max_total: int,
) -> RawCommand | None:
    """The next complete command, or None at end of stream.

    A synchronising literal gets the continuation request only when it fits; one over the
    limit is refused before the client sends it (RFC 7888 §4 lets the client then see the
    tagged NO). A non-synchronising literal over the limit is read and dropped.
    """
    pieces: list[bytes] = []
    total = 0
    while True:
        line = await _read_line(reader, max_line)
        if line is None:
            if pieces:
                raise asyncio.IncompleteReadError(b"", None)
            return None
        body = line.rstrip(b"\r\n") if line.endswith(b"\n") else line
        match = _LITERAL_AT_END.search(body)
        if match is None:
            pieces.append(body)
            return RawCommand(tuple(pieces))
        size = int(match.group(1))
        sync = not match.group(2)
        total += len(body) + size
        if size > max_literal or total > max_total:
            tag = tag_of(pieces[0] if pieces else body)
            if not sync:
                await _discard(reader, size)
                await _drain_command(reader, max_line, max_literal)
            raise LiteralTooLarge(size, max_literal if size > max_literal else max_total, tag)
        pieces.append(body[: match.start()] + b"{" + match.group(1) + b"}")
        if sync:
            await send_continuation()
        pieces.append(await reader.readexactly(size))


async def _read_line(reader: asyncio.StreamReader, max_line: int) -> bytes | None:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    except asyncio.LimitOverrunError as exc:
        await reader.readexactly(exc.consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as more:
                await reader.readexactly(more.consumed)
        raise LineTooLong from None
    if len(line) > max_line:
        raise LineTooLong
    return line


async def _discard(reader: asyncio.StreamReader, size: int) -> None:
    while size > 0:
        chunk = await reader.read(min(size, 65536))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", size)
        size -= len(chunk)


async def _drain_command(reader: asyncio.StreamReader, max_line: int, max_literal: int) -> None:
    """Drop the rest of a refused command: its lines and any further non-sync literals."""
    while True:
        line = await _read_line(reader, max_line)
        if line is None:
            return
        match = _LITERAL_AT_END.search(line.rstrip(b"\r\n"))
        if match is None or not match.group(2):
            return
        await _discard(reader, int(match.group(1)))


@dataclass(frozen=True, slots=True)
class SeqRange:
    """`a:b` of a sequence set; None stands for `*` (the largest number in use)."""

    start: int | None
    end: int | None


SequenceSet = tuple[SeqRange, ...]


class Cursor:
    """A position in a RawCommand, with a method per grammar rule."""

    def __init__(self, command: RawCommand) -> None:
        self.pieces = command.pieces
        self.index = 0  # always an even index: a line
        self.pos = 0

    # -- low level

    @property
    def line(self) -> bytes:
        return self.pieces[self.index]

    def peek(self) -> int | None:
        line = self.line
        return line[self.pos] if self.pos < len(line) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self.index == len(self.pieces) - 1

    def end(self) -> None:
        if not self.at_end():
            rest = self.line[self.pos : self.pos + 30].decode("ascii", "replace")
            raise ParseError(f"unexpected characters at the end of the command: {rest!r}")

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            raise ParseError(f"expected {char.decode()!r} {self._where()}")
        self.pos += 1

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise ParseError(f"expected a space {self._where()}")
        self.pos += 1

    def maybe(self, char: bytes) -> bool:
        if self.peek() == char[0]:
            self.pos += 1
            return True
        return False

    def _where(self) -> str:
        rest = self.line[self.pos : self.pos + 20]
        if not rest:
            return "at the end of the line"
        return f"at {rest.decode('ascii', 'replace')!r}"

    def _run(self, allowed: frozenset[int]) -> bytes:
        line = self.line
        start = self.pos
        end = start
        while end < len(line) and line[end] in allowed:
            end += 1
        self.pos = end
        return line[start:end]

    # -- grammar rules

    def tag(self) -> str:
        word = self._run(TAG_CHARS)
        if not word:
            raise ParseError("missing or invalid tag")
        return word.decode("ascii")

    def atom(self) -> str:
        word = self._run(ATOM_CHARS)
        if not word:
            raise ParseError(f"expected an atom {self._where()}")
        return word.decode("ascii")

    def keyword(self) -> str:
        return self.atom().upper()

    def number(self, *, nonzero: bool = False) -> int:
        match = _DIGITS.match(self.line, self.pos)
        if match is None:
            raise ParseError(f"expected a number {self._where()}")
        self.pos = match.end()
        # (int() refuses over 4,300 digits: a ValueError, not the BAD this deserves)
        value = int(match.group()) if match.end() - match.start() <= 20 else MAX_UINT32 + 1
        if value > MAX_UINT32 or (nonzero and value == 0):
            raise ParseError(f"number out of range: {match.group().decode()[:20]}")
        return value

    def number64(self) -> int:
        """mod-sequence-value (RFC 7162): up to 2^63 - 1."""
        match = _DIGITS.match(self.line, self.pos)
        if match is None:
            raise ParseError(f"expected a number {self._where()}")
        self.pos = match.end()
        value = int(match.group()) if match.end() - match.start() <= 20 else 2**63
        if value >= 2**63:
            raise ParseError("mod-sequence value out of range")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        line = self.line
        out = bytearray()
        i = self.pos
        while i < len(line):
            c = line[i]
            if c == 0x22:
                self.pos = i + 1
                return bytes(out)
            if c == 0x5C:
                i += 1
                if i >= len(line) or line[i] not in (0x22, 0x5C):
                    raise ParseError("invalid escape in a quoted string")
                c = line[i]
            elif c in (0x0D, 0x0A):
                break
            out.append(c)
            i += 1
        raise ParseError("unterminated quoted string")

    def literal(self) -> bytes:
        line = self.line
        close = line.find(b"}", self.pos)
        if self.peek() != 0x7B or close != len(line) - 1:
            raise ParseError(f"invalid literal {self._where()}")
        if self.index + 1 >= len(self.pieces):
            raise ParseError("literal without its data")
        data = self.pieces[self.index + 1]
        self.index += 2
        self.pos = 0
        return data

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise ParseError(f"expected a string {self._where()}")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        word = self._run(ASTRING_CHARS)
        if not word:
            raise ParseError(f"expected an atom or string {self._where()}")
        return word

    def astring_text(self) -> str:
        return _utf8(self.astring())

    def nstring_or_nil(self) -> bytes | None:
        if self.line[self.pos : self.pos + 3].upper() == b"NIL":
            self.pos += 3
            return None
        return self.string()

    def mailbox(self) -> str:
        """A mailbox name as sent (modified UTF-7 is decoded by the caller)."""
        return _utf8(self.astring())

    def list_mailbox(self) -> str:
        c = self.peek()
        if c in (0x22, 0x7B):
            return _utf8(self.string())
        word = self._run(LIST_CHARS)
        if not word:
            raise ParseError(f"expected a mailbox pattern {self._where()}")
        return word.decode("ascii")

    def sequence_set(self) -> SequenceSet:
        ranges: list[SeqRange] = []
        while True:
            first = self._seq_number()
            if self.maybe(b":"):
                ranges.append(SeqRange(first, self._seq_number()))
            else:
                ranges.append(SeqRange(first, first))
            if not self.maybe(b","):
                return tuple(ranges)

    def is_sequence_set_next(self) -> bool:
        c = self.peek()
        return c is not None and (0x30 <= c <= 0x39 or c == 0x2A or c == 0x24)

    def _seq_number(self) -> int | None:
        if self.maybe(b"*"):
            return None
        return self.number(nonzero=True)

    def flag(self) -> str:
        if self.maybe(b"\\"):
            if self.maybe(b"*"):
                return "\\*"
            return "\\" + self.atom()
        return self.atom()

    def flag_list(self) -> list[str]:
        self.expect(b"(")
        flags: list[str] = []
        if self.maybe(b")"):
            return flags
        while True:
            flags.append(self.flag())
            if self.maybe(b")"):
                return flags
            self.sp()

    def flags_or_list(self) -> list[str]:
        """STORE's flag argument: a parenthesised list or flags separated by spaces."""
        if self.peek() == 0x28:
            return self.flag_list()
        flags = [self.flag()]
        while self.peek() == 0x20 and not self.at_end():
            self.sp()
            flags.append(self.flag())
        return flags

    def date(self) -> datetime.date:
        """date = date-text / DQUOTE date-text DQUOTE (RFC 3501 §9)."""
        text = (_utf8(self.quoted()) if self.peek() == 0x22
                else self._run(ATOM_CHARS).decode("ascii"))
        match = _DATE.match(text)
        if match is None or match.group(2).lower() not in _MONTH_NUMBER:
            raise ParseError(f"invalid date {text[:30]!r} (expected dd-Mon-yyyy)")
        try:
            return datetime.date(int(match.group(3)), _MONTH_NUMBER[match.group(2).lower()],
                                 int(match.group(1)))
        except ValueError:
            raise ParseError(f"invalid date {text[:30]!r}") from None

    def date_time(self) -> float:
        """date-time (RFC 3501 §9): "dd-Mon-yyyy hh:mm:ss +zzzz" as a UNIX time."""
        text = _utf8(self.quoted())
        match = _DATE_TIME.match(text)
        if match is None or match.group(2).lower() not in _MONTH_NUMBER:
            raise ParseError(f"invalid date-time {text[:40]!r}")
        day, _, year, hh, mm, ss, sign, zh, zm = match.groups()
        offset = datetime.timedelta(hours=int(zh), minutes=int(zm))
        try:
            value = datetime.datetime(
                int(year), _MONTH_NUMBER[match.group(2).lower()], int(day), int(hh), int(mm),
                int(ss), tzinfo=datetime.timezone(offset if sign == "+" else -offset))
        except ValueError:
            raise ParseError(f"invalid date-time {text[:40]!r}") from None
        return value.timestamp()

    def paren_list(self, item: Callable[[], str]) -> list[str]:
        self.expect(b"(")
        out: list[str] = []
        if self.maybe(b")"):
            return out
        while True:
            out.append(item())
            if self.maybe(b")"):
                return out
            self.sp()


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("string is not valid UTF-8") from None


def resolve(seq: SequenceSet, largest: int) -> list[tuple[int, int]]:
    """Ranges as (low, high) with `*` replaced by `largest` (RFC 3501 §9: a:b equals b:a)."""
    out: list[tuple[int, int]] = []
    for r in seq:
        a = largest if r.start is None else r.start
        b = largest if r.end is None else r.end
        out.append((a, b) if a <= b else (b, a))
    return out
