"""Where mail for a domain goes: MX lookup and host ordering (RFC 5321 §5), null MX (RFC 7505).

The result of routing is an ordered list of `Host`s, each with every address it resolves to;
the SMTP client tries them in that order until one accepts the transaction. A failure to route is
either temporary (the DNS did not answer: try again later) or permanent (the domain does not exist
or says it takes no mail: bounce now).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from postroom.config import parse_nameserver


@dataclass(frozen=True, slots=True)
class Host:
    """One destination host: its name (for logs and the DSN) and the addresses to try."""

    name: str
    addresses: tuple[str, ...]
    preference: int = 0


class RoutingError(Exception):
    """No route to the domain's mail hosts; `permanent` decides bounce (True) or retry."""

    def __init__(self, message: str, *, permanent: bool, status: str) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status  # RFC 3463 enhanced status code for the DSN


def make_resolver(servers: list[str], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver asking `servers` (HOST or HOST:PORT), or the system's when empty."""
    if not servers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        nameservers: list[str | dns.nameserver.Nameserver] = []
        for server in servers:
            host, port = parse_nameserver(server)
            nameservers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = nameservers
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 5.0)
    return resolver


class Router:
    """Resolves a recipient domain to the ordered hosts that receive its mail."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

    async def hosts_for(self, domain: str) -> list[Host]:
        literal = _domain_literal(domain)
        if literal is not None:  # user@[192.0.2.1] (RFC 5321 §4.1.3): no DNS at all
            return [Host(domain, (literal,))]
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise RoutingError(f"domain {domain} does not exist", permanent=True,
                               status="5.1.2") from None
        except dns.resolver.NoAnswer:
            answer = None
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL: the DNS may recover
            raise RoutingError(f"DNS lookup of MX {domain} failed: {exc}", permanent=False,
                               status="4.4.3") from None
        if answer is None:
            # RFC 5321 §5.1: no MX records, so the domain itself is the one host (implicit MX).
            addresses = await self.addresses(domain)
            if not addresses:
                raise RoutingError(f"domain {domain} has no MX and no address records",
                                   permanent=True, status="5.1.2")
            return [Host(domain, addresses)]
        records = [(int(r.preference), r.exchange) for r in answer]
        if any(exchange == dns.name.root for _, exchange in records):
            # RFC 7505 §3: a null MX says the domain accepts no mail; fail at once, 5.1.10.
            raise RoutingError(f"domain {domain} accepts no mail (null MX)", permanent=True,
                               status="5.1.10")
        # RFC 5321 §5.1: lowest preference first; equal preferences in random order.
        random.shuffle(records)
        records.sort(key=lambda r: r[0])
        hosts: list[Host] = []
        errors: list[str] = []
        for preference, exchange in records:
            name = exchange.to_text(omit_final_dot=True)
            try:
                addresses = await self.addresses(name)
            except RoutingError as exc:
                errors.append(str(exc))
                continue
            if addresses:
                hosts.append(Host(name, addresses, preference))
            else:
                errors.append(f"MX host {name} has no address")
        if not hosts:
            raise RoutingError(f"no MX host of {domain} has an address: {'; '.join(errors)}",
                               permanent=False, status="4.4.4")
        return hosts

    async def addresses(self, name: str) -> tuple[str, ...]:
        """Every IPv6 and IPv4 address of a host name (IPv6 first, as RFC 6724 prefers)."""
        found: list[str] = []
        failures = 0
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self.resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                failures += 1
                continue
            found.extend(r.to_text() for r in answer)
        if not found and failures:
            raise RoutingError(f"DNS lookup of {name} failed", permanent=False, status="4.4.3")
        return tuple(found)


def _domain_literal(domain: str) -> str | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise RoutingError(f"invalid address literal {domain}", permanent=True,
                           status="5.1.2") from None
