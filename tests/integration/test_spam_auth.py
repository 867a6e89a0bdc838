"""SPF, DKIM, DMARC and DNSBL against a real DNS server (dnsmasq) on loopback."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postroom.spam.auth import Authenticator, make_sync_resolver, org_domain
from postroom.spam.dnsbl import listed_in, make_async_resolver
from tests.spam_dns import dnsmasq

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
PUBLIC = base64.b64encode(KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()

RECORDS = {
    "good.test": "v=spf1 ip4:127.0.0.1 -all",
    "bad.test": "v=spf1 ip4:192.0.2.1 -all",
    "soft.test": "v=spf1 ~all",
    "sel._domainkey.good.test": f"v=DKIM1; k=rsa; p={PUBLIC}",
    "sel._domainkey.bad.test": f"v=DKIM1; k=rsa; p={PUBLIC}",
    "_dmarc.good.test": "v=DMARC1; p=reject; adkim=r; aspf=r",
    "_dmarc.bad.test": "v=DMARC1; p=reject",
    "_dmarc.soft.test": "v=DMARC1; p=quarantine",
}


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir: Path = tmp_path_factory.mktemp("dns")
    with dnsmasq(workdir, RECORDS, {"2.0.0.127.bl.test": "127.0.0.2"}) as port:
        yield port


def message(from_addr: str, body: str = "Hello there.\r\n") -> bytes:
    return (f"From: Sender <{from_addr}>\r\nTo: alice@example.test\r\nSubject: test\r\n"
            f"Date: Mon, 05 Jan 2026 10:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\n{body}"
            ).encode()


def signed(raw: bytes, domain: str) -> bytes:
    sig = dkim.sign(raw, b"sel", domain.encode(), PRIVATE,
                    include_headers=[b"from", b"to", b"subject", b"date"])
    return bytes(sig) + raw


def auth(port: int) -> Authenticator:
    return Authenticator(make_sync_resolver([f"127.0.0.1:{port}"], 3.0))


def test_spf_pass_fail_softfail_none(dns_port: int) -> None:
    a = auth(dns_port)
    assert a.check(message("x@good.test"), "127.0.0.1", "x@good.test", "h.good.test").spf \
        == "pass"
    assert a.check(message("x@bad.test"), "127.0.0.1", "x@bad.test", "h").spf == "fail"
    assert a.check(message("x@soft.test"), "127.0.0.1", "x@soft.test", "h").spf == "softfail"
    assert a.check(message("x@none.test"), "127.0.0.1", "x@none.test", "h").spf == "none"


def test_dkim_pass_and_tampered_fail(dns_port: int) -> None:
    a = auth(dns_port)
    raw = signed(message("x@good.test"), "good.test")
    result = a.check(raw, "192.0.2.9", "x@good.test", "h")
    assert [(d.result, d.domain, d.selector) for d in result.dkim] == [
        ("pass", "good.test", "sel")]
    tampered = raw.replace(b"Hello there.", b"Hello thief.")
    assert [d.result for d in a.check(tampered, "192.0.2.9", "x@good.test", "h").dkim] == [
        "fail"]


def test_dmarc_alignment(dns_port: int) -> None:
    a = auth(dns_port)
    # SPF passes and aligns (relaxed: the bounce domain is a subdomain of the From domain)
    ok = a.check(message("x@good.test"), "127.0.0.1", "bounce@good.test", "h")
    assert (ok.dmarc, ok.dmarc_policy) == ("pass", "reject")
    # SPF fails, no signature: DMARC fails under p=reject
    bad = a.check(message("ceo@bad.test"), "127.0.0.1", "x@bad.test", "h")
    assert (bad.spf, bad.dmarc, bad.dmarc_policy) == ("fail", "fail", "reject")
    # a DKIM signature of another domain passes but does not align
    other = a.check(signed(message("ceo@bad.test"), "good.test"), "127.0.0.1", "x@bad.test",
                    "h")
    assert other.dkim[0].result == "pass" and other.dmarc == "fail"
    # an aligned signature rescues a failing SPF
    rescued = a.check(signed(message("ceo@bad.test"), "bad.test"), "127.0.0.1", "x@bad.test",
                      "h")
    assert rescued.dmarc == "pass"
    header = rescued.header("mx.example.test")
    assert header.startswith("Authentication-Results: mx.example.test;")
    assert "spf=fail smtp.mailfrom=x@bad.test" in header
    assert "dkim=pass header.d=bad.test header.s=sel" in header
    assert "dmarc=pass (p=reject) header.from=bad.test" in header
    # no record: none
    assert a.check(message("x@none.test"), "127.0.0.1", "x@none.test", "h").dmarc == "none"


def test_org_domain_uses_the_public_suffix_list() -> None:
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    assert org_domain("a.b.example.com") == "example.com"
    assert org_domain("x.y.example.test") == "example.test"  # unknown TLD: the "*" rule


async def test_dnsbl(dns_port: int) -> None:
    resolver = make_async_resolver([f"127.0.0.1:{dns_port}"], 3.0)
    assert await listed_in(resolver, "127.0.0.2", ["bl.test", "other.test"]) == ["bl.test"]
    assert await listed_in(resolver, "127.0.0.3", ["bl.test"]) == []


def test_arc_chain_pass_tampered_fail_and_none(dns_port: int) -> None:
    """A forwarder (good.test) seals what it saw with ARC (RFC 8617); the seal verifies through
    the DNS, a body changed after it fails, and mail without a seal has none."""
    a = auth(dns_port)
    seen = (b"Authentication-Results: relay.good.test; spf=pass smtp.mailfrom=x@origin.test\r\n"
            + message("x@origin.test"))
    sealed = b"".join(dkim.arc_sign(seen, b"sel", b"good.test", PRIVATE, b"relay.good.test",
                                    include_headers=[b"from", b"to", b"subject", b"date"]))
    forwarded = sealed + seen
    assert a.check(forwarded, "127.0.0.1", "x@good.test", "relay.good.test").arc == "pass"
    result = a.check(forwarded.replace(b"Hello there.", b"Hello thief."), "127.0.0.1",
                     "x@good.test", "relay.good.test")
    assert result.arc == "fail"
    assert "arc=fail" in result.header("mx.example.test")
    assert a.check(message("x@good.test"), "127.0.0.1", "x@good.test", "h").arc == "none"
