"""Build an outgoing RFC 5322 / MIME message from what a person typed."""

from __future__ import annotations

import re
import secrets
from email.headerregistry import Address, Group
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import formatdate

from postroom.core.address import AddressError, normalize_address, normalize_domain

__all__ = ["ComposeError", "compose_message", "make_message_id"]

# 7bit transfer: non-ASCII bodies go out as quoted-printable or base64, whichever the stdlib
# finds shorter, so the message survives any relay, 8BITMIME or not.
_POLICY = SMTP.clone(cte_type="7bit")
# A non-ASCII local part can only be written in a header as raw UTF-8 (RFC 6532); such a
# message needs SMTPUTF8 all the way (RFC 6531).
_POLICY_UTF8 = SMTPUTF8.clone(cte_type="7bit")

_NAMED_ADDRESS = re.compile(r"^(.*?)\s*<([^<>]*)>$", re.DOTALL)
_MSG_ID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_PARENT_ID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]+>$")  # printable ASCII but < and >
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Any of these in a header value would start a new line (str.splitlines) or is a control
# character no header should carry; CR and LF are the classic header injection.
_FORBIDDEN_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


class ComposeError(ValueError):
    """What the person asked for cannot be sent as a message."""


def make_message_id(hostname: str) -> str:
    """A new globally unique Message-ID (RFC 5322 §3.6.4): `<random@hostname>`."""
    try:
        host = normalize_domain(hostname)
    except AddressError as exc:
        raise ComposeError(f"invalid hostname for Message-ID: {exc}") from None
    return f"<{secrets.token_hex(16)}@{host}>"


def _check_unicode(field: str, value: str) -> str:
    # JSON allows "\ud800"; such a string cannot be written in any charset.
    if _SURROGATE.search(value):
        raise ComposeError(f"{field} is not valid Unicode (lone surrogate)")
    return value


def _check_header_text(field: str, value: str) -> str:
    if _FORBIDDEN_IN_HEADER.search(value):
        raise ComposeError(f"{field} contains a line break or control character")
    return _check_unicode(field, value)


def _address(field: str, value: str) -> Address:
    """`a@b` or `Name <a@b>` -> Address, validated."""
    _check_header_text(field, value)
    value = value.strip()
    name = ""
    match = _NAMED_ADDRESS.match(value)
    if match:
        name, value = match.group(1).strip(), match.group(2)
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return _make_address(field, name, value)


def _make_address(field: str, name: str, addr: str) -> Address:
    _check_header_text(field, name)
    try:
        normal = normalize_address(addr)
    except AddressError as exc:
        raise ComposeError(f"invalid address in {field}: {exc}") from None
    local, _, domain = normal.rpartition("@")
    try:
        return Address(display_name=name.strip(), username=local, domain=domain)
    except (ValueError, IndexError) as exc:
        raise ComposeError(f"invalid address in {field}: {addr!r}: {exc}") from None


def _msg_id(field: str, value: str) -> str:
    """Our own Message-ID: strictly `<left@right>` (RFC 5322 §3.6.4)."""
    value = _check_header_text(field, value).strip()
    if not _MSG_ID.match(value):
        raise ComposeError(f"invalid message id in {field}: {value!r}")
    return value


def _parent_id(field: str, value: str) -> str | None:
    """An id we reply to came from someone else's mail and may be sloppy: a line break is
    refused as injection, an id that cannot be written is left out (threading is advisory)."""
    value = _check_header_text(field, value).strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    return value if _PARENT_ID.match(value) else None


def _filename(name: str) -> str:
    """A file's name, never a path (readers drop directories anyway)."""
    name = _check_header_text("attachment filename", name)
    name = name.replace("\t", " ").replace("\\", "/").rsplit("/", 1)[-1]
    return name.strip() or "attachment"


def _attachment_type(filename: str, content_type: str) -> tuple[str, str]:
    _check_header_text("attachment filename", filename)
    content_type = (content_type or "application/octet-stream").strip().lower()
    content_type = content_type.split(";", 1)[0].strip()
    if not _CONTENT_TYPE.match(content_type):
        raise ComposeError(f"invalid content type for attachment {filename!r}: {content_type!r}")
    maintype, subtype = content_type.split("/")
    if maintype == "multipart":
        raise ComposeError(f"attachment {filename!r}: a multipart entity cannot be attached")
    return maintype, subtype


def _attach_message(msg: EmailMessage, filename: str, subtype: str, data: bytes) -> None:
    """A forwarded message, attached as itself when it can travel that way.

    RFC 2046 §5.2.1 allows only 7bit, 8bit or binary for message/* bodies, and the stdlib
    can only write 7bit ones verbatim; anything else (raw 8-bit bytes, lines over the SMTP
    limit) goes as an opaque base64 file, which every client still opens as .eml.
    """
    lines = _LINE_END.sub(b"\r\n", data)
    if data.isascii() and all(len(line) <= 998 for line in lines.split(b"\r\n")):
        msg.add_attachment(
            lines, maintype="message", subtype=subtype, filename=filename, cte="7bit"
        )
    else:
        msg.add_attachment(
            data, maintype="application", subtype="octet-stream", filename=filename
        )


def compose_message(
    *,
    from_addr: str,
    from_name: str,
    to: list[str],
    cc: list[str],
    bcc: list[str],
    subject: str,
    text: str | None,
    html: str | None,
    attachments: list[tuple[str, str, bytes]],
    in_reply_to: str | None,
    references: list[str],
    message_id: str,
    date: float,
    include_bcc: bool,
) -> bytes:
    """The message's bytes, CRLF line endings, ready for the queue or the Sent folder.

    text and html together become multipart/alternative; attachments wrap that in
    multipart/mixed. Bcc is written only when `include_bcc` (the sender's Sent copy): the
    copies the recipients get must not reveal it (RFC 5322 §3.6.3).
    """
    if not (to or cc or bcc):
        raise ComposeError("a message needs at least one recipient")
    sender = _make_address("From", from_name, from_addr)
    to_addrs = [_address("To", a) for a in to]
    cc_addrs = [_address("Cc", a) for a in cc]
    bcc_addrs = [_address("Bcc", a) for a in bcc]
    if text is not None:
        _check_unicode("text", text)
    if html is not None:
        _check_unicode("html", html)
    # Edge whitespace cannot survive a header (RFC 5322 §2.2.3 unfolding): drop it here.
    subject = _check_header_text("Subject", subject).strip()
    mid = _msg_id("Message-ID", message_id)
    parent = _parent_id("In-Reply-To", in_reply_to) if in_reply_to else None
    refs = [r for r in (_parent_id("References", ref) for ref in references) if r]
    files = [
        (_filename(name), _attachment_type(name, ctype), data)
        for name, ctype, data in attachments
    ]

    shown = [sender, *to_addrs, *cc_addrs, *(bcc_addrs if include_bcc else [])]
    utf8 = any(not a.username.isascii() for a in shown)
    policy = _POLICY_UTF8 if utf8 else _POLICY

    msg = EmailMessage(policy=policy)
    try:
        msg["From"] = sender
        if to_addrs:
            msg["To"] = to_addrs
        elif not cc_addrs:  # Bcc only: say so rather than leave To out (RFC 5322 §3.6.3)
            msg["To"] = Group("undisclosed-recipients")
        if cc_addrs:
            msg["Cc"] = cc_addrs
        if bcc_addrs and include_bcc:
            msg["Bcc"] = bcc_addrs
        msg["Subject"] = subject
        msg["Date"] = formatdate(date, localtime=False)
        msg["Message-ID"] = mid
        if parent:
            msg["In-Reply-To"] = parent
        if refs:
            msg["References"] = " ".join(refs)
        msg["MIME-Version"] = "1.0"

        if html is not None and text is None:
            msg.set_content(html, subtype="html", charset="utf-8")
        else:
            msg.set_content(text or "", subtype="plain", charset="utf-8")
            if html is not None:
                msg.add_alternative(html, subtype="html", charset="utf-8")
        for filename, (maintype, subtype), data in files:
            if maintype == "message":
                _attach_message(msg, filename, subtype, data)
            else:
                msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
        for part in msg.walk():
            if part is not msg:  # the stdlib stamps one on every part it creates
                del part["MIME-Version"]
        return msg.as_bytes(policy=policy)
    except ComposeError:
        raise
    except (ValueError, TypeError, IndexError, LookupError) as exc:
        # The stdlib refuses a few values our checks let through; say so, don't crash.
        raise ComposeError(f"cannot build the message: {exc}") from None
