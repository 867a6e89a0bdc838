"""DKIM signing of outgoing mail (RFC 6376) with dkimpy, one key per domain.

Keys live in the data directory, `dkim/DOMAIN/SELECTOR.pem` (mode 0600), and the file
`dkim/DOMAIN/selector` names the key in use, so a new key can be published in DNS before it is
switched to. `postroom dkim generate DOMAIN` makes a key and prints its TXT record.

A message is signed for the domain of its From: address (the one DMARC aligns with), or failing
that for the envelope sender's domain; a domain without a key sends unsigned.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postroom.core.address import AddressError, normalize_domain

log = logging.getLogger(__name__)

DEFAULT_SELECTOR = "postroom"
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*$")
# RFC 6376 §5.4.1 recommends these; From is required. Listing Subject etc. once more than they
# occur ("oversigning") would stop anyone adding a second copy, but breaks mailing lists.
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to",
                  b"references", b"reply-to", b"mime-version", b"content-type",
                  b"content-transfer-encoding", b"list-id", b"list-unsubscribe")


class DkimError(ValueError):
    """A DKIM key cannot be made or used (bad domain or selector, unreadable key)."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    private_pem: bytes

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key_b64(self) -> str:
        key = serialization.load_pem_private_key(self.private_pem, password=None)
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def txt_value(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_key_b64()}"

    def txt_strings(self) -> list[str]:
        """The TXT value split into the ≤255-byte character-strings DNS needs."""
        value = self.txt_value()
        return [value[i:i + 255] for i in range(0, len(value), 255)]

    def zone_line(self) -> str:
        quoted = " ".join(f'"{part}"' for part in self.txt_strings())
        return f"{self.record_name}. IN TXT ( {quoted} )"


class DkimKeys:
    """The DKIM keys in `{data_dir}/dkim`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def generate(self, domain: str, selector: str = DEFAULT_SELECTOR, *,
                 bits: int = 2048, replace: bool = False) -> DkimKey:
        """Make a key for the domain, make it the one in use, and return it."""
        domain, selector = _domain(domain), _selector(selector)
        folder = self.directory / domain
        path = folder / f"{selector}.pem"
        if path.exists() and not replace:
            raise DkimError(f"a key for selector {selector} of {domain} exists already: "
                            f"{path} (choose another --selector)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        folder.mkdir(parents=True, exist_ok=True)
        _write_private(path, pem)
        _write_private(folder / "selector", selector.encode() + b"\n")
        return DkimKey(domain, selector, pem)

    def active(self, domain: str) -> DkimKey | None:
        """The key the domain signs with, or None when it has none."""
        try:
            domain = _domain(domain)
        except DkimError:
            return None
        folder = self.directory / domain
        try:
            selector = (folder / "selector").read_text().strip()
            pem = (folder / f"{_selector(selector)}.pem").read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, DkimError) as exc:
            log.error("DKIM key of %s unusable: %s", domain, exc)
            return None
        return DkimKey(domain, selector, pem)


class DkimSigner:
    """Signs messages for whichever domains have a key."""

    def __init__(self, keys: DkimKeys) -> None:
        self.keys = keys

    def sign(self, wire: bytes, mail_from: str) -> bytes:
        """The message with a DKIM-Signature prepended, or unchanged when no key applies.

        `wire` must already have CRLF line ends (it is signed as it will be sent).
        """
        for domain in (_from_domain(wire), mail_from.rpartition("@")[2]):
            if not domain:
                continue
            key = self.keys.active(domain)
            if key is None:
                continue
            try:
                signature = dkimpy.sign(
                    wire, key.selector.encode(), key.domain.encode(), key.private_pem,
                    canonicalize=(b"relaxed", b"relaxed"), include_headers=list(SIGNED_HEADERS),
                    linesep=b"\r\n")
            except Exception as exc:  # a message dkimpy cannot parse still goes out, unsigned
                log.warning("DKIM signing for %s failed: %s", domain, exc)
                return wire
            return bytes(signature) + wire
        return wire


def _from_domain(wire: bytes) -> str:
    end = wire.find(b"\r\n\r\n")
    head = wire[: end if end >= 0 else len(wire)].decode("utf-8", "replace")
    match = re.search(r"(?im)^from:[ \t]*(.*(?:\r\n[ \t].*)*)", head)
    if not match:
        return ""
    _, address = email.utils.parseaddr(match.group(1).replace("\r\n", ""))
    return address.rpartition("@")[2].lower()


def _domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError as exc:
        raise DkimError(str(exc)) from None


def _selector(selector: str) -> str:
    selector = selector.strip().lower()
    if not _SELECTOR.match(selector):
        raise DkimError(f"invalid DKIM selector {selector!r} (letters, digits, '-' and '.')")
    return selector


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
