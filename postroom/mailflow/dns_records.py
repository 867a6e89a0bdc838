"""The DNS records a mail domain needs, as `postroom dns-records DOMAIN` prints them.

MX names this server; SPF (RFC 7208) allows the domain's MX hosts to send for it; DKIM
(RFC 6376) publishes the public half of the signing key; DMARC (RFC 7489) tells receivers what to
do with mail that fails both; PTR (reverse DNS) is set by whoever owns the server's address.
"""

from __future__ import annotations

from postroom.config import Settings
from postroom.core.address import AddressError, normalize_domain
from postroom.mailflow.dkim import DkimKeys
from postroom.service import InvalidInput


def records_for(domain: str, settings: Settings) -> str:
    try:
        domain = normalize_domain(domain)
    except AddressError as exc:
        raise InvalidInput(str(exc)) from None
    host = settings.hostname.rstrip(".")
    key = DkimKeys(settings.data_dir / "dkim").active(domain)
    lines = [
        f"; DNS records for mail to and from {domain}, served by {host}",
        "; MX: where the internet delivers mail for the domain",
        f"{domain}. IN MX 10 {host}.",
        "; SPF: the hosts allowed to send mail from the domain (its MX hosts)",
        f'{domain}. IN TXT "v=spf1 mx -all"',
    ]
    if key is not None:
        lines += [f"; DKIM: the public key of selector {key.selector}", key.zone_line()]
    else:
        lines += ["; DKIM: no key yet; run `postroom dkim generate "
                  f"{domain}` and publish the record it prints"]
    lines += [
        "; DMARC: what receivers do with mail failing SPF and DKIM alignment; start with",
        "; p=none and reports, then move to quarantine or reject",
        f'_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; adkim=s; aspf=s; '
        f'rua=mailto:postmaster@{domain}"',
        f"; PTR: ask the owner of {host}'s IP address to point its reverse DNS at {host}.",
        f"; and make sure {host}. has an A (and AAAA) record with that address",
    ]
    return "\n".join(lines)
