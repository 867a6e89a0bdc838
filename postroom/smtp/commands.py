"""SMTP command lines: the verb, the reverse/forward path and the ESMTP parameters.

Pure functions, no I/O. RFC 5321 §4.1.1 (commands), §4.1.2 (paths), RFC 6531 (SMTPUTF8),
RFC 3461 (DSN parameters), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 3030 (BDAT).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from postroom.core.address import AddressError, normalize_address


class CommandError(ValueError):
    """A command that cannot be accepted; carries the full SMTP reply."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text


@dataclass(frozen=True, slots=True)
class Path:
    """A MAIL FROM or RCPT TO argument: the address (empty for the null path) and parameters."""

    address: str
    params: dict[str, str] = field(default_factory=dict)


_PARAM_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_XTEXT = re.compile(r"\+([0-9A-F]{2})")
_DSN_NOTIFY = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


def split_command(line: str) -> tuple[str, str]:
    """`"mail FROM:<a@b>"` -> `("MAIL", "FROM:<a@b>")`."""
    verb, _, rest = line.partition(" ")
    return verb.upper(), rest.strip()


def decode_xtext(value: str) -> str:
    """RFC 3461 §4: `+XX` hex escapes."""
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not value):
            raise CommandError(501, "5.5.4", f"Syntax error in parameter {word!r}")
        key = key.upper()
        if key in params:
            raise CommandError(501, "5.5.4", f"Duplicate parameter {key}")
        params[key] = value
    return params


def parse_path(arg: str, keyword: str, *, allow_null: bool) -> tuple[str, str]:
    """`FROM:<addr> PARAMS` -> (address as given, parameter text). Tolerates a space after
    the colon, as most servers do."""
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise CommandError(501, "5.5.4", f"Syntax: {keyword}:<address>")
    rest = rest.lstrip()
    if not rest.startswith("<"):
        raise CommandError(501, "5.5.4", f"Syntax: {keyword}:<address> (angle brackets)")
    end = rest.find(">")
    if end < 0:
        raise CommandError(501, "5.5.4", "Syntax: missing '>' in path")
    address = rest[1:end]
    if address.startswith("@"):  # a source route (RFC 5321 §4.1.2): ignore it, C.f. §C
        address = address.partition(":")[2]
    if not address and not allow_null:
        raise CommandError(501, "5.1.3", "Null address not allowed here")
    return address, rest[end + 1:].strip()


def check_address(address: str, *, smtputf8: bool) -> str:
    """The normalised address, or a 553 5.1.3 / 553 5.6.7 reply."""
    if not address.isascii() and not smtputf8:
        raise CommandError(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
    try:
        return normalize_address(address)
    except AddressError:
        raise CommandError(553, "5.1.3", f"Bad address syntax <{address}>") from None


def check_mail_params(params: dict[str, str], max_size: int) -> None:
    """The MAIL FROM parameters we advertise: SIZE, BODY, SMTPUTF8, RET, ENVID (and AUTH)."""
    for key, value in params.items():
        if key == "SIZE":
            if not (value.isascii() and value.isdigit()):
                raise CommandError(501, "5.5.4", "SIZE takes a number")
            # (int() refuses over 4,300 digits; no message has a 20-digit size anyway)
            if len(value) > 20 or int(value) > max_size:
                raise CommandError(552, "5.3.4", "Message size exceeds fixed maximum size")
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
        elif key == "SMTPUTF8":
            if value:
                raise CommandError(501, "5.5.4", "SMTPUTF8 takes no value")
        elif key == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                raise CommandError(501, "5.5.4", "RET must be FULL or HDRS")
        elif key == "ENVID":
            if not value or len(value) > 100:
                raise CommandError(501, "5.5.4", "Bad ENVID")
        elif key == "AUTH":  # RFC 4954 §5: accepted and ignored from unauthenticated clients
            continue
        else:
            raise CommandError(555, "5.5.4", f"Unsupported parameter {key}")


def check_rcpt_params(params: dict[str, str]) -> None:
    """RCPT TO parameters: NOTIFY and ORCPT (RFC 3461 §4.1, §4.2)."""
    for key, value in params.items():
        if key == "NOTIFY":
            words = {w.upper() for w in value.split(",")}
            if not words or not words <= _DSN_NOTIFY or ("NEVER" in words and len(words) > 1):
                raise CommandError(501, "5.5.4", "Bad NOTIFY value")
        elif key == "ORCPT":
            addr_type, semi, _ = value.partition(";")
            if not semi or not addr_type:
                raise CommandError(501, "5.5.4", "Bad ORCPT value")
        else:
            raise CommandError(555, "5.5.4", f"Unsupported parameter {key}")
