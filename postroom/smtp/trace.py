"""Trace headers (RFC 5321 §4.4): Return-Path on final delivery and a Received line per hop."""

from __future__ import annotations

import email.utils
import re

# Characters a client may put in HELO that must not reach a header verbatim.
_UNSAFE = re.compile(r"[^\x21-\x7e\u0080-\uffff]")


def with_protocol(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    """The `with` keyword of Received (RFC 3848, RFC 6531 §3.7.3)."""
    if not esmtp:
        return "SMTP"
    word = ("UTF8SMTP" if utf8 else "ESMTP") + ("S" if tls else "") + ("A" if auth else "")
    return word


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls_version: str | None = None,
    timestamp: float | None = None,
) -> bytes:
    helo_text = _UNSAFE.sub("?", helo)[:255] or "unknown"
    lines = [f"Received: from {helo_text} ([{client_ip}])"]
    by = f"\tby {hostname} (Postroom) with {protocol} id {queue_id}"
    if tls_version:
        by += f"\r\n\t(using {tls_version})"
    lines.append(by)
    when = email.utils.formatdate(timestamp, localtime=False)
    lines.append(f"\tfor <{recipient}>; {when}" if recipient else f"\t; {when}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def return_path_header(mail_from: str) -> bytes:
    return f"Return-Path: <{mail_from}>\r\n".encode("utf-8", "surrogateescape")
