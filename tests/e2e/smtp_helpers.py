"""Helpers for the SMTP end-to-end tests: a raw SMTP socket and mailbox look-ups over REST."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from tests.e2e.server import ServerProcess


class RawSmtp:
    """A plain socket speaking SMTP by hand, for what smtplib will not send (smuggling,
    pipelined batches, BDAT)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its text lines joined."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def api(server: ServerProcess, user: str, password: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, auth=(user, password), timeout=30)


def folder_messages(c: httpx.Client, folder: str = "INBOX") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        r = c.get(f"/v1/folders/{folder}/messages", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        out.extend(body["messages"])
        cursor = body["next_cursor"]
        if not cursor:
            return out


def wait_for_subject(c: httpx.Client, subject: str, folder: str = "INBOX",
                     timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in folder_messages(c, folder) if m["subject"] == subject]
        if found:
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no message {subject!r} in {folder}")
        time.sleep(0.05)


def subjects(c: httpx.Client, folder: str = "INBOX") -> list[str]:
    return [m["subject"] for m in folder_messages(c, folder)]


def trace_prefix_ok(stored: bytes, sent: bytes) -> bool:
    """True if stored is sent with only trace headers (Return-Path, Received) and the spam
    filter's (Authentication-Results, X-Spam-Score, X-Spam-Status) before it."""
    if not stored.endswith(sent):
        return False
    prefix = stored[: len(stored) - len(sent)].decode()
    fields = [line for line in prefix.split("\r\n") if line and line[0] not in " \t"]
    return prefix.endswith("\r\n") and all(
        f.split(":", 1)[0].lower() in ("return-path", "received", "authentication-results",
                                       "x-spam-score", "x-spam-status") for f in fields)
