"""Formatting IMAP responses: strings, literals, flags, dates and mailbox names.

Strings go out quoted when they can be (7-bit, no CR/LF, short), otherwise as literals, so a
header with 8-bit octets or a folded line is never mangled. Mailbox names are sent in modified
UTF-7 (RFC 3501 §5.1.3) and read back from it.
"""

from __future__ import annotations

import base64
import datetime
import functools

from postroom.core.models import Flags
from postroom.imap.parser import MONTHS, ParseError

_QUOTABLE = frozenset(range(0x20, 0x7F))
_MAX_QUOTED = 1024


def string(data: bytes | str) -> bytes:
    """A quoted string when possible, else a literal (RFC 3501 §4.3)."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    if len(raw) <= _MAX_QUOTED and all(c in _QUOTABLE for c in raw):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(raw)


def literal(raw: bytes) -> bytes:
    return b"{%d}\r\n" % len(raw) + raw


def nstring(data: bytes | str | None) -> bytes:
    return b"NIL" if data is None else string(data)


def flag_list(flags: Flags, recent: bool = False) -> bytes:
    return _flag_list(flags, recent)  # a folder's messages share a handful of flag sets


@functools.lru_cache(maxsize=4096)
def _flag_list(flags: Flags, recent: bool) -> bytes:
    names = flags.names()
    if recent:
        names.append("\\Recent")
    return ("(" + " ".join(names) + ")").encode("ascii", "replace")


def internal_date(ts: float) -> bytes:
    """date-time: "dd-Mon-yyyy hh:mm:ss +0000" (kept in UTC)."""
    when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return (f'"{when.day:2d}-{MONTHS[when.month - 1]}-{when.year:04d} '
            f'{when.hour:02d}:{when.minute:02d}:{when.second:02d} +0000"').encode("ascii")


# -- modified UTF-7 (RFC 3501 §5.1.3) ---------------------------------------------------------


def _b64_utf16(text: str) -> str:
    encoded = base64.b64encode(text.encode("utf-16-be")).decode("ascii").rstrip("=")
    return encoded.replace("/", ",")


def encode_mailbox(name: str) -> str:
    """A UTF-8 folder name in modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if pending:
                out.append("&" + _b64_utf16("".join(pending)) + "-")
                pending = []
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    if pending:
        out.append("&" + _b64_utf16("".join(pending)) + "-")
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """A modified UTF-7 name as UTF-8; ParseError when it is malformed.

    Names that are already UTF-8 (clients that ignore the encoding) pass through unchanged.
    """
    if "&" not in name:
        return name
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ParseError(f"invalid modified UTF-7 in mailbox name {name[:60]!r}")
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                data = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                text = data.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError):
                raise ParseError(
                    f"invalid modified UTF-7 in mailbox name {name[:60]!r}") from None
            out.append(text)
        i = end + 1
    return "".join(out)


def mailbox(name: str) -> bytes:
    """A folder name as a mailbox argument of LIST, STATUS and the like."""
    return string(encode_mailbox(name))
