"""Message framing: reading command lines, DATA (dot-stuffed, RFC 5321 §4.5.2) and BDAT chunks
(RFC 3030), with the checks that stop SMTP smuggling.

A bare LF or a lone CR anywhere in DATA is refused, as Postfix's `smtpd_forbid_bare_newline`
does: a server that took `<LF>.<LF>` or `<CR>.<CR>` as the end of data while another hop did
not would let a second message be smuggled in behind the first. Only `<CRLF>.<CRLF>` ends DATA.

All scanning is done with bytes methods (`find`, `count`, `replace`) so a 50 KB message is
checked in C, not line by line in Python.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

_END = b"\r\n.\r\n"
READ_SIZE = 256 * 1024


class LineTooLong(Exception):
    pass


class ConnectionLost(Exception):
    pass


@dataclass(frozen=True, slots=True)
class DataResult:
    """A DATA payload: the message (dot-unstuffed) unless it broke a rule."""

    message: bytes
    oversize: bool = False
    bare_newline: bool = False
    long_line: bool = False


class SmtpReader:
    """A buffered reader over an asyncio stream: lines, DATA and exact byte counts.

    Our own buffer (not the StreamReader's) so the session can see and throw away anything a
    client pipelined before STARTTLS (CVE-2011-0411 style command injection).
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = bytearray()

    async def _fill(self, idle: float) -> None:
        async with asyncio.timeout(idle):  # a scope: wait_for would make a task per read
            chunk = await self.reader.read(READ_SIZE)
        if not chunk:
            raise ConnectionLost()
        self.buffer += chunk

    def discard_buffered(self) -> int:
        n = len(self.buffer)
        self.buffer.clear()
        return n

    async def read_line(self, max_length: int, idle: float) -> bytes:
        """One line without its line ending (CRLF, or a bare LF from a sloppy client).

        A line longer than max_length raises LineTooLong once its end has been read (the
        excess is skipped, so the session stays in step).
        """
        start = 0
        too_long = False
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                break
            if len(self.buffer) > max_length:
                too_long = True
                del self.buffer[:-1]  # keep a possible trailing CR
            start = len(self.buffer)
            await self._fill(idle)
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        if too_long or len(line) > max_length:
            raise LineTooLong()
        return line[:-1] if line.endswith(b"\r") else line

    async def read_data(self, max_size: int, max_line: int, idle: float) -> DataResult:
        """Everything up to `<CRLF>.<CRLF>`, dot-unstuffed, checked for bare newlines.

        The buffer is searched with a leading CRLF in mind, so an empty message (`.` on the
        first line) ends DATA too. Past max_size the data is read and thrown away up to the
        end marker, so the reply comes in step with the client.
        """
        start = 0
        dropped = 0  # bytes thrown away because the message was already too big
        while True:
            if not dropped and self.buffer.startswith(b".\r\n"):  # an empty message
                del self.buffer[:3]
                return DataResult(b"")
            end = self.buffer.find(_END, start)
            if end >= 0:
                break
            # Keep searching from just before the end (the marker may straddle two reads).
            start = max(len(self.buffer) - len(_END) + 1, 0)
            if dropped + len(self.buffer) > max_size + len(_END) and len(self.buffer) > 8:
                dropped += len(self.buffer) - 8
                del self.buffer[:-8]
                start = 0
            await self._fill(idle)
        body = bytes(self.buffer[:end + 2])  # the last line's CRLF belongs to the message
        del self.buffer[:end + len(_END)]
        if dropped:
            return DataResult(b"", oversize=True)
        if _has_bare_newline(body):
            return DataResult(b"", bare_newline=True)
        message = unstuff(body)
        if len(message) > max_size:
            return DataResult(b"", oversize=True)
        if longest_line_exceeds(message, max_line):
            return DataResult(b"", long_line=True)
        return DataResult(message)

    async def read_exact(self, count: int, idle: float) -> bytes:
        """Exactly count octets (a BDAT chunk): binary, no framing, no unstuffing."""
        while len(self.buffer) < count:
            await self._fill(idle)
        chunk = bytes(self.buffer[:count])
        del self.buffer[:count]
        return chunk

    async def skip_exact(self, count: int, idle: float) -> None:
        """Read and drop count octets (a BDAT chunk refused for its size)."""
        while count > 0:
            if not self.buffer:
                await self._fill(idle)
            n = min(count, len(self.buffer))
            del self.buffer[:n]
            count -= n


def _has_bare_newline(data: bytes) -> bool:
    """True if a LF is not preceded by CR, or a CR is not followed by LF."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def has_bare_newline(data: bytes) -> bool:
    return _has_bare_newline(data)


def unstuff(body: bytes) -> bytes:
    """RFC 5321 §4.5.2: drop the leading dot of every line that starts with one."""
    if b"\r\n." not in body and not body.startswith(b"."):
        return body
    return (b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:]


def longest_line_exceeds(message: bytes, max_line: int) -> bool:
    """True if some line is longer than max_line octets, CRLF included.

    (A regex like `[^\r\n]{N}` backtracks at every offset and cost more than the whole rest
    of the session in the profile; splitting is one pass in C.)
    """
    limit = max_line - 2
    if len(message) <= limit:
        return False
    return max(map(len, message.split(b"\r\n"))) > limit
