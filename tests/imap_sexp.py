"""A small reader for IMAP response data (lists, strings, literals, NIL, numbers) for tests.

Kept apart from postroom.imap so that tests read the server's answers with their own code.
"""

from __future__ import annotations

Value = bytes | int | None | list["Value"]


def parse(data: bytes) -> Value:
    value, _pos = _value(data, 0)
    return value


def parse_all(data: bytes) -> list[Value]:
    out: list[Value] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 1] == b" ":
            pos += 1
            continue
        value, pos = _value(data, pos)
        out.append(value)
    return out


def _value(data: bytes, pos: int) -> tuple[Value, int]:
    c = data[pos : pos + 1]
    if c == b"(":
        items: list[Value] = []
        pos += 1
        while True:
            while data[pos : pos + 1] == b" ":
                pos += 1
            if data[pos : pos + 1] == b")":
                return items, pos + 1
            item, pos = _value(data, pos)
            items.append(item)
    if c == b'"':
        out = bytearray()
        pos += 1
        while data[pos : pos + 1] != b'"':
            if data[pos : pos + 1] == b"\\":
                pos += 1
            out += data[pos : pos + 1]
            pos += 1
        return bytes(out), pos + 1
    if c == b"{":
        close = data.index(b"}", pos)
        size = int(data[pos + 1 : close])
        start = close + 3  # }\r\n
        return data[start : start + size], start + size
    end = pos
    while end < len(data) and data[end : end + 1] not in (b" ", b")", b"("):
        end += 1
    word = data[pos:end]
    if word.upper() == b"NIL":
        return None, end
    if word.isdigit():
        return int(word), end
    return word, end
