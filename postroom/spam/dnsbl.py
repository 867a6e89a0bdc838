"""DNS blocklists: is the client's address listed in a zone (RFC 5782)?

The address is reversed (octets for IPv4, nibbles for IPv6) and looked up as an A record under
each zone; any answer in 127.0.0.0/8 means listed. Zones are asked concurrently through the
configured resolver; a zone that does not answer in time counts as not listing the address.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver
import dns.exception
import dns.resolver


def query_name(ip: str, zone: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        reversed_ = ".".join(reversed(str(addr).split(".")))
    else:
        reversed_ = ".".join(reversed(addr.exploded.replace(":", "")))
    return f"{reversed_}.{zone.strip('.')}"


async def listed_in(resolver: dns.asyncresolver.Resolver, ip: str,
                    zones: list[str]) -> list[str]:
    """The zones that list `ip`."""

    async def one(zone: str) -> str | None:
        name = query_name(ip, zone)
        if name is None:
            return None
        try:
            answer = await resolver.resolve(name, "A", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout):
            return None
        for rdata in answer:
            if str(rdata.address).startswith("127."):
                return zone
        return None

    found = await asyncio.gather(*(one(z) for z in zones))
    return [z for z in found if z]


def make_async_resolver(servers: list[str], timeout: float) -> dns.asyncresolver.Resolver:
    from postroom.spam.auth import _split_server

    if not servers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        hosts = []
        for server in servers:
            host, port = _split_server(server)
            hosts.append(host)
            resolver.nameserver_ports[host] = port
        resolver.nameservers = hosts
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 5.0)
    return resolver
