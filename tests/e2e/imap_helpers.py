"""Helpers for the IMAP end-to-end tests: a raw IMAP socket for exact protocol exchanges."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable

_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class RawImap:
    """Speaks IMAP by hand: sends lines and reads responses, literals included."""

    def __init__(self, port: int, timeout: float = 30.0, tls: bool = False) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        self.sock: socket.socket = sock
        self.buffer = b""
        self.counter = 0
        self.greeting = self.line()

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError(f"connection closed; buffered {self.buffer[:200]!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        """One response line with any literals it carries (CRLF of the line removed)."""
        out = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            head, self.buffer = self.buffer.split(b"\r\n", 1)
            out += head + b"\r\n"
            match = _LITERAL.search(out)
            if match is None:
                return out[:-2]
            size = int(match.group(1))
            while len(self.buffer) < size:
                self._fill()
            out += self.buffer[:size]
            self.buffer = self.buffer[size:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def tag(self) -> str:
        self.counter += 1
        return f"t{self.counter}"

    def command(self, text: str | bytes) -> tuple[list[bytes], bytes]:
        """Send `TAG text` and read to the tagged response: (untagged lines, tagged line)."""
        tag = self.tag()
        data = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            line = self.line()
            if line.startswith(tag.encode() + b" "):
                return untagged, line[len(tag) + 1 :]
            untagged.append(line)

    def ok(self, text: str | bytes) -> list[bytes]:
        untagged, tagged = self.command(text)
        assert tagged.startswith(b"OK"), (text, untagged, tagged)
        return untagged

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def idle_wakes(port: int, user: str, password: str, trigger: Callable[[], None], *,
               exact: bool) -> None:
    """On the IMAP server at `port`: LOGIN, SELECT INBOX, IDLE; then `trigger()` (mail sent,
    maybe to another node), and the IDLE must wake with a larger EXISTS (one more when
    `exact`; other tests' mail may land too otherwise), end with DONE and LOGOUT."""
    raw = RawImap(port)
    raw.ok(f"LOGIN {quote(user)} {quote(password)}")
    untagged = raw.ok("SELECT INBOX")
    exists = next(int(u.split()[1]) for u in untagged if u.endswith(b"EXISTS"))
    tag = raw.tag()
    raw.send(f"{tag} IDLE\r\n".encode())
    assert raw.line().startswith(b"+")
    trigger()
    raw.sock.settimeout(30)
    line = raw.line()
    assert line.startswith(b"* ") and line.endswith(b" EXISTS"), line
    if exact:
        assert line == f"* {exists + 1} EXISTS".encode(), line
    else:
        assert int(line.split()[1]) > exists
    raw.send(b"DONE\r\n")
    _, tagged = raw.until(tag)
    assert tagged.startswith(b"OK")
    raw.ok("LOGOUT")
