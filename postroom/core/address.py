"""Mail addresses: normalisation of user addresses and domains (IDNA, SMTPUTF8)."""

from __future__ import annotations

import re
from email.headerregistry import Address
from email.utils import getaddresses

# A dot-atom or quoted local part is accepted; we only refuse what can never be an address.
_LOCAL_BAD = re.compile(r"[\s<>()\[\],;:\\\"\x00-\x1f\x7f]")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class AddressError(ValueError):
    """An address or domain that cannot be used."""


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and convert it to its IDNA (A-label) form."""
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        raise AddressError("empty domain")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise AddressError(f"invalid domain {domain!r}: {exc}") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"invalid domain {domain!r}")
    return ascii_domain


def normalize_address(address: str) -> str:
    """`Local@Domain` -> `local@domain` with the domain in IDNA form.

    Local parts are compared case-insensitively, as every major provider does (RFC 5321
    allows a server to do so for its own mailboxes).
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, sep, domain = address.rpartition("@")
    if not sep or not local:
        raise AddressError(f"invalid address {address!r}: expected local@domain")
    if len(local.encode()) > 64 or _LOCAL_BAD.search(local) or local.startswith(".") \
            or local.endswith(".") or ".." in local:
        raise AddressError(f"invalid local part in {address!r}")
    return f"{local.lower()}@{normalize_domain(domain)}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def parse_address_list(values: list[str]) -> list[tuple[str, str]]:
    """Header values -> [(display name, address)], skipping groups' empty members."""
    return [(name, addr) for name, addr in safe_getaddresses(values) if addr]


def safe_getaddresses(values: list[str]) -> list[tuple[str, str]]:
    """`email.utils.getaddresses`, for headers anyone can write.

    It reads a comment by recursion, a level per "(": a From: of 500 of them, which fits on
    one line, raises RecursionError (IMAP SORT FROM failed for good on such a mailbox, and the
    DMARC check on its sender). Comments hold no address (RFC 5322 §3.2.2), so when that
    happens they are dropped and the values read again."""
    try:
        return getaddresses(values)
    except RecursionError:
        return getaddresses([_without_comments(v) for v in values])


def _without_comments(value: str) -> str:
    """The value with its (nested) comments replaced by a space; quoted strings and
    backslash escapes kept as they are, an unclosed comment running to the end."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == "(":
            depth += 1
            continue
        elif c == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
            continue
        elif c == '"' and not depth:
            quoted = True
        if not depth:
            out.append(c)
    return "".join(out)


def format_address(name: str, address: str) -> str:
    """One address for a header, quoting and encoding the display name as needed."""
    local, _, domain = address.rpartition("@")
    try:
        return str(Address(display_name=name, username=local, domain=domain))
    except (ValueError, IndexError):
        return f"<{address}>"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (`::ffff:127.0.0.1`)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def plaintext_login_allowed(*, tls_active: bool, peer_ip: str, plaintext_on_loopback: bool) -> bool:
    """The one rule every protocol applies to passwords sent in the clear (RFC 8314 §3):
    only inside TLS, or from this machine when `[auth] plaintext_on_loopback` allows it."""
    return tls_active or (plaintext_on_loopback and is_loopback(peer_ip))
