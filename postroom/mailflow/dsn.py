"""Delivery status notifications (bounces): RFC 3464 multipart/report, RFC 6533 for UTF-8.

A DSN has three parts (RFC 6522): a human-readable explanation, the machine-readable
`message/delivery-status`, and the original message's header section. It is sent with an empty
envelope sender and `Auto-Submitted: auto-replied` (RFC 3834), so nothing answers it, and it is
never itself bounced.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postroom.core.compose import make_message_id


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What happened to one recipient, in the words of RFC 3464 §2.3."""

    address: str
    status: str  # RFC 3463 code, e.g. 5.1.1
    action: str = "failed"  # failed | delayed
    diagnostic: str = ""  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str = ""  # the host that gave it
    last_attempt: float = 0.0


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


def _original_headers(original: bytes) -> bytes:
    text = original.replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    head = text if end < 0 else text[: end + 1]
    return head.replace(b"\n", b"\r\n")


def _header_value(headers: bytes, name: str) -> str:
    lines = headers.decode("utf-8", "replace").split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line.split(":", 1)[1]
            for more in lines[i + 1:]:
                if more[:1] not in (" ", "\t"):
                    break
                value += more
            return value.strip()
    return ""


def _clean(text: str) -> str:
    """One header-safe line: no CR/LF or other control characters from a remote reply."""
    return "".join(c if c.isprintable() else " " for c in text).strip()[:900]


def build_dsn(
    *,
    reporting_mta: str,
    sender: str,
    original: bytes,
    recipients: Sequence[RecipientStatus],
    arrival: float,
    now: float | None = None,
) -> bytes:
    """The DSN message for `recipients` of `original`, addressed to `sender`."""
    now = time.time() if now is None else now
    headers = _original_headers(original)
    failed = any(r.action == "failed" for r in recipients)
    utf8 = not sender.isascii() or any(not r.address.isascii() for r in recipients) \
        or not headers.isascii()
    boundary = f"=_postroom_dsn_{secrets.token_hex(12)}"
    subject = ("Undelivered Mail Returned to Sender" if failed
               else "Delayed Mail (still being retried)")
    original_id = _header_value(headers, "Message-ID")
    original_subject = _clean(_header_value(headers, "Subject"))

    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        ("Your message could not be delivered to the recipients below. This is a permanent"
         " error; the message will not be retried." if failed else
         "Your message has not been delivered yet to the recipients below. It will be"
         " retried; you need not send it again."),
        "",
    ]
    if original_subject:
        human += [f"Subject: {original_subject}", ""]
    for r in recipients:
        human.append(f"<{r.address}>: {_clean(r.diagnostic) or r.status}"
                     + (f" (from {r.remote_mta})" if r.remote_mta else ""))
    human.append("")

    address_type = "utf-8" if utf8 else "rfc822"
    status = [f"Reporting-MTA: dns; {reporting_mta}", f"Arrival-Date: {_date(arrival)}", ""]
    for r in recipients:
        status.append(f"Final-Recipient: {address_type}; {r.address}")
        status.append(f"Action: {r.action}")
        status.append(f"Status: {r.status}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.diagnostic:
            status.append(f"Diagnostic-Code: smtp; {_clean(r.diagnostic)}")
        status.append(f"Last-Attempt-Date: {_date(r.last_attempt or now)}")
        status.append("")

    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if not headers.isascii() else "text/rfc822-headers"
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {make_message_id(reporting_mta)}",
    ]
    if original_id:
        top += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    top += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit" if utf8 else "Content-Transfer-Encoding: 7bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "Content-Transfer-Encoding: 8bit",
        "",
        *human,
        f"--{boundary}",
        f"Content-Type: {status_type}",
        "Content-Description: Delivery report",
        "",
        *status,
        f"--{boundary}",
        f"Content-Type: {headers_type}",
        "Content-Description: Undelivered message headers",
        "",
    ]
    body = "\r\n".join(top).encode("utf-8") + b"\r\n" + headers
    if not headers.endswith(b"\r\n"):
        body += b"\r\n"
    return body + f"\r\n--{boundary}--\r\n".encode()
