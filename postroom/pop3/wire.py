"""How a stored message goes on the POP3 wire, and how command lines are read.

RFC 1939 §3 sends a message as CRLF-terminated lines, each starting with "." stuffed with a
second ".", and ends it with a line holding a single ".". Stored messages keep exactly the bytes
that were received: CRLF as sent over SMTP, but a message appended or imported from a Unix file
may use bare LF. The presentation rule is one line per stored line: a line ending in CRLF or in a
bare LF is sent with CRLF, and a last line without any ending gets one (the wire needs it).
So a client that keeps the wire's line endings (poplib, a Maildir written with CRLF) gets the
stored CRLF message back byte for byte, and a client that writes local LF files (fetchmail,
getmail) gets exactly what a Unix mail store would hold. A lone CR inside a line is data.

Sizes (STAT, LIST, the RETR reply) count that CRLF form without the dot-stuffing, as RFC 1939
§11 asks ("the size of the message ... as it would be transmitted", less the stuffing).
"""

from __future__ import annotations

from dataclasses import dataclass

TERMINATOR = b".\r\n"


def crlf_size(raw: bytes) -> int:
    """Octets of the message with every line ended by CRLF, before dot-stuffing."""
    size = len(raw) + raw.count(b"\n") - raw.count(b"\r\n")
    if raw and not raw.endswith(b"\n"):
        size += 2
    return size


def _lf_lines(raw: bytes) -> bytes:
    """The message with LF line ends (a CR before LF dropped) and a final LF."""
    text = raw.replace(b"\r\n", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text


def _to_wire(text: bytes) -> bytes:
    """LF-ended lines -> dot-stuffed CRLF lines plus the terminating "." line."""
    stuffed = text.replace(b"\n.", b"\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed.replace(b"\n", b"\r\n") + TERMINATOR


def wire_message(raw: bytes) -> bytes:
    """The multi-line RETR body for a stored message, terminator included."""
    return _to_wire(_lf_lines(raw))


def wire_top(raw: bytes, lines: int) -> bytes:
    """The TOP body: the header, the blank line after it, and `lines` lines of the body.

    RFC 1939 §7: a message without a body (no blank line) is all header.
    """
    text = _lf_lines(raw)
    if text.startswith(b"\n"):
        split = 1
    else:
        blank = text.find(b"\n\n")
        split = len(text) if blank < 0 else blank + 2
    head, body = text[:split], text[split:]
    if lines <= 0:
        return _to_wire(head)
    end = 0
    for _ in range(lines):
        nl = body.find(b"\n", end)
        if nl < 0:
            end = len(body)
            break
        end = nl + 1
    return _to_wire(head + body[:end])


def multiline(lines: list[str]) -> bytes:
    """A multi-line response body of short text lines (LIST, UIDL, CAPA), terminator included."""
    out = bytearray()
    for line in lines:
        data = line.encode()
        if data.startswith(b"."):
            data = b"." + data
        out += data + b"\r\n"
    out += TERMINATOR
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: its keyword in upper case, its arguments and the raw remainder."""

    keyword: str
    args: tuple[str, ...]
    rest: str  # everything after "KEYWORD ", for PASS, whose password may hold spaces


class CommandError(ValueError):
    """A command line that cannot be read; the message is the -ERR reason."""


def parse_command(line: bytes) -> Command:
    """Parse a command line (without its line ending). RFC 1939 §3: keywords are
    case-insensitive, three or four characters, arguments up to 40 characters each; the
    arguments of USER and PASS are taken leniently (any length, PASS with spaces)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("command line is not valid UTF-8") from None
    if any(ord(c) < 0x20 and c != "\t" for c in text) or "\x7f" in text:
        raise CommandError("command line contains control characters")
    keyword, _, rest = text.partition(" ")
    if not keyword:
        raise CommandError("empty command")
    if not keyword.isascii() or not keyword.isalpha() or len(keyword) > 4:
        shown = keyword[:20] if keyword.isascii() else ascii(keyword[:20])
        raise CommandError(f"unknown command {shown}")
    return Command(keyword.upper(), tuple(rest.split()), rest)
