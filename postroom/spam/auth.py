"""Sender authentication: SPF (RFC 7208), DKIM (RFC 6376), ARC (RFC 8617) and DMARC (RFC 7489),
all through the configured resolver, written up as an Authentication-Results field (RFC 8601).

SPF is pyspf, DKIM and ARC are dkimpy; DMARC is evaluated here (a record lookup at the author
domain, then at its organizational domain, and the alignment of SPF and DKIM identifiers), the
organizational domain coming from the public suffix list bundled with publicsuffix2 (no network).
The libraries are synchronous: `Authenticator.check` runs in a worker thread.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.exception
import dns.name
import dns.resolver
import spf
from publicsuffix2 import PublicSuffixList

from postroom.core.address import safe_getaddresses

_PSL = PublicSuffixList()
_FROM = re.compile(rb"^from[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def make_sync_resolver(servers: list[str], timeout: float) -> dns.resolver.Resolver:
    """A resolver asking `servers` (HOST, HOST:PORT or [V6]:PORT), or the system's when empty."""
    if not servers:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        hosts: list[str] = []
        for server in servers:
            host, port = _split_server(server)
            hosts.append(host)
            resolver.nameserver_ports[host] = port
        resolver.nameservers = hosts
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 5.0)
    return resolver


def _split_server(server: str) -> tuple[str, int]:
    server = server.strip()
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if server.count(":") == 1:
        host, _, port = server.partition(":")
        return host, int(port)
    return server, 53


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 §3.2): the public suffix plus one label.

    A name under a suffix the list does not know falls under the default rule "*" (its last
    label is the suffix), as the algorithm says; publicsuffix2 alone would answer the TLD.
    """
    domain = domain.lower().strip(".")
    labels = domain.split(".")
    if len(labels) < 2:
        return domain
    found = _PSL.get_sld(domain, strict=True)
    if not found or "." not in found:
        return ".".join(labels[-2:])
    return str(found)


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().strip("."), b.lower().strip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str  # pass, fail, neutral, permerror, temperror
    domain: str
    selector: str


@dataclass(frozen=True, slots=True)
class AuthResults:
    spf: str = "none"
    spf_domain: str = ""
    mail_from: str = ""
    helo: str = ""
    dkim: tuple[DkimResult, ...] = ()
    arc: str = "none"
    dmarc: str = "none"
    dmarc_policy: str = ""  # none, quarantine, reject ("" without a record)
    from_domain: str = ""

    @property
    def dkim_pass_domains(self) -> list[str]:
        return [d.domain for d in self.dkim if d.result == "pass"]

    def header(self, authserv_id: str) -> str:
        """The Authentication-Results field, folded, without its line end (RFC 8601 §2.2)."""
        parts = [authserv_id]
        if self.mail_from:
            parts.append(f"spf={self.spf} smtp.mailfrom={self.mail_from}")
        else:
            parts.append(f"spf={self.spf} smtp.helo={self.helo or 'unknown'}")
        if not self.dkim:
            parts.append("dkim=none")
        for d in self.dkim:
            parts.append(f"dkim={d.result} header.d={d.domain or 'unknown'}"
                         + (f" header.s={d.selector}" if d.selector else ""))
        parts.append(f"arc={self.arc}")
        policy = f" (p={self.dmarc_policy})" if self.dmarc_policy else ""
        parts.append(f"dmarc={self.dmarc}{policy} header.from={self.from_domain or 'unknown'}")
        return "Authentication-Results: " + ";\r\n\t".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"spf": self.spf, "spf_domain": self.spf_domain, "mail_from": self.mail_from,
                "helo": self.helo, "arc": self.arc, "dmarc": self.dmarc,
                "dmarc_policy": self.dmarc_policy, "from_domain": self.from_domain,
                "dkim": [[d.result, d.domain, d.selector] for d in self.dkim]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuthResults:
        return cls(spf=data.get("spf", "none"), spf_domain=data.get("spf_domain", ""),
                   mail_from=data.get("mail_from", ""), helo=data.get("helo", ""),
                   dkim=tuple(DkimResult(*d) for d in data.get("dkim", [])),
                   arc=data.get("arc", "none"), dmarc=data.get("dmarc", "none"),
                   dmarc_policy=data.get("dmarc_policy", ""),
                   from_domain=data.get("from_domain", ""))


# pyspf looks names up through its module-level DNSLookup; this one asks the resolver of the
# check in progress (a context variable, so concurrent checks in other threads keep theirs).
_current_resolver: contextvars.ContextVar[dns.resolver.Resolver] = contextvars.ContextVar(
    "postroom_spf_resolver")


def _spf_lookup(name: str, qtype: str, strict: bool = True,
                timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    resolver = _current_resolver.get(None)
    if resolver is None:
        return list(_original_spf_lookup(name, qtype, strict, timeout))
    out: list[tuple[tuple[str, str], Any]] = []
    try:
        answer = resolver.resolve(name, qtype, search=False, lifetime=min(timeout,
                                                                          resolver.lifetime))
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return out
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise spf.TempError(f"DNS {exc}") from None
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


_original_spf_lookup = spf.DNSLookup
spf.DNSLookup = _spf_lookup


def _from_domains(raw: bytes) -> list[str]:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    values = [m.group(1).decode("utf-8", "replace").replace("\r", "").replace("\n", "")
              for m in _FROM.finditer(head)]
    domains = []
    for _, addr in safe_getaddresses(values):
        if "@" in addr:
            domains.append(addr.rpartition("@")[2].lower().strip(". >"))
    return domains


def _signatures(raw: bytes) -> int:
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    return len(re.findall(rb"^dkim-signature[ \t]*:", head, re.I | re.M))


@dataclass
class Authenticator:
    """Checks one message's SPF, DKIM, ARC and DMARC; see the module docstring."""

    resolver: dns.resolver.Resolver
    spf_timeout: float = 20.0  # RFC 7208 §4.6.4: at least 20 seconds for the whole check
    _cache: dict[str, dict[str, str] | None] = field(default_factory=dict)

    def _txt(self, name: str) -> list[str]:
        try:
            answer = self.resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.name.EmptyLabel,
                dns.name.LabelTooLong, dns.name.NameTooLong):
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    def _dkim_dns(self, name: bytes, timeout: int = 5) -> bytes:
        """dkimpy's DNS function: the TXT record at `name`, strings joined, or b""."""
        try:
            answer = self.resolver.resolve(name.decode("ascii", "replace").rstrip("."), "TXT",
                                           search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            return b""
        for rdata in answer:
            return b"".join(rdata.strings)
        return b""

    def check(self, raw: bytes, client_ip: str, mail_from: str, helo: str) -> AuthResults:
        spf_result, spf_domain = self._spf(client_ip, mail_from, helo)
        dkim_results = tuple(self._dkim(raw))
        arc = self._arc(raw)
        dmarc, policy, from_domain = self._dmarc(raw, spf_result, spf_domain, dkim_results)
        return AuthResults(spf=spf_result, spf_domain=spf_domain, mail_from=mail_from, helo=helo,
                           dkim=dkim_results, arc=arc, dmarc=dmarc, dmarc_policy=policy,
                           from_domain=from_domain)

    def _spf(self, client_ip: str, mail_from: str, helo: str) -> tuple[str, str]:
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return "none", ""
        # RFC 7208 §2.4: with a null reverse path, check postmaster@HELO.
        sender = mail_from or (f"postmaster@{helo}" if helo else "")
        domain = sender.rpartition("@")[2].lower()
        if not sender:
            return "none", ""
        token = _current_resolver.set(self.resolver)
        try:
            result, _ = spf.check2(i=client_ip, s=sender, h=helo or domain,
                                   querytime=self.spf_timeout)
        except Exception:  # a library bug on odd input must not lose the message
            result = "temperror"
        finally:
            _current_resolver.reset(token)
        return str(result), domain

    def _dkim(self, raw: bytes) -> Iterator[DkimResult]:
        count = min(_signatures(raw), 5)  # more signatures than this are abuse, not mail
        if not count:
            return
        try:
            verifier = dkim.DKIM(raw)
        except Exception:
            yield DkimResult("permerror", "", "")
            return
        for index in range(count):
            verifier.domain, verifier.selector = None, None
            try:
                ok = verifier.verify(idx=index, dnsfunc=self._dkim_dns)
                result = "pass" if ok else "fail"
            except (dkim.MessageFormatError, dkim.KeyFormatError, dkim.ParameterError):
                result = "permerror"  # the signature or its key record is malformed
            except dkim.ValidationError:
                result = "fail"  # e.g. the body hash does not match
            except Exception:
                result = "temperror"
            domain = (verifier.domain or b"").decode("ascii", "replace").lower() \
                if isinstance(verifier.domain, bytes) else str(verifier.domain or "").lower()
            selector = (verifier.selector or b"").decode("ascii", "replace") \
                if isinstance(verifier.selector, bytes) else str(verifier.selector or "")
            yield DkimResult(result, domain, selector)

    def _arc(self, raw: bytes) -> str:
        if not re.search(rb"^arc-seal[ \t]*:", raw[: max(raw.find(b"\r\n\r\n"), 0)],
                         re.I | re.M):
            return "none"
        try:
            cv, _, _ = dkim.ARC(raw).verify(dnsfunc=self._dkim_dns)
        except Exception:
            return "fail"
        value = cv.decode() if isinstance(cv, bytes) else str(cv)
        return value.lower() or "none"

    def _dmarc_record(self, domain: str) -> dict[str, str] | None:
        if domain in self._cache:
            return self._cache[domain]
        record: dict[str, str] | None = None
        for text in self._txt(f"_dmarc.{domain}"):
            if text.strip().lower().startswith("v=dmarc1"):
                if record is not None:  # RFC 7489 §6.6.3: more than one record: none applies
                    record = None
                    break
                record = {}
                for part in text.split(";"):
                    key, _, value = part.partition("=")
                    record[key.strip().lower()] = value.strip().lower()
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[domain] = record
        return record

    def _dmarc(self, raw: bytes, spf_result: str, spf_domain: str,
               dkim_results: tuple[DkimResult, ...]) -> tuple[str, str, str]:
        domains = _from_domains(raw)
        if not domains:
            return "none", "", ""
        from_domain = domains[0]
        try:
            record = self._dmarc_record(from_domain)
            organizational = org_domain(from_domain)
            is_sub = False
            if record is None and organizational != from_domain:
                record = self._dmarc_record(organizational)
                is_sub = True
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            return "temperror", "", from_domain
        if record is None:
            return "none", "", from_domain
        policy = record.get("p", "none")
        if is_sub and record.get("sp"):
            policy = record["sp"]
        if policy not in ("none", "quarantine", "reject"):
            policy = "none"
        spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain,
                                                  record.get("aspf", "r"))
        dkim_ok = any(d.result == "pass" and aligned(d.domain, from_domain,
                                                     record.get("adkim", "r"))
                      for d in dkim_results)
        return ("pass" if spf_ok or dkim_ok else "fail"), policy, from_domain


__all__ = ["AuthResults", "Authenticator", "DkimResult", "aligned", "make_sync_resolver",
           "org_domain"]
