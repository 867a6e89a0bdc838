"""Routing (RFC 5321 §5, RFC 7505) against a real DNS server: dnsmasq on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.mailflow.routing import Router, RoutingError, make_resolver
from tests.e2e.outbound_peers import Dnsmasq


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(Path(tmp_path_factory.mktemp("dns")), mx=[
        ("multi.test", "b.multi.test", 20), ("multi.test", "a.multi.test", 10),
        ("multi.test", "c.multi.test", 20), ("multi.test", "gone.multi.test", 5),
        ("null.test", ".", 0),
        ("dangling.test", "nowhere.dangling.test", 10),
    ], hosts=[
        ("a.multi.test", "127.0.0.10"), ("b.multi.test", "127.0.0.11"),
        ("c.multi.test", "127.0.0.12"), ("c.multi.test", "127.0.0.13"),
        ("plain.test", "127.0.0.20"), ("dual.test", "127.0.0.21,::1"),
    ])
    server.start()
    yield server
    server.stop()


def router(dns: Dnsmasq) -> Router:
    return Router(make_resolver([f"127.0.0.1:{dns.port}"], 5.0))


async def test_mx_hosts_by_preference_with_every_address(dns: Dnsmasq) -> None:
    hosts = await router(dns).hosts_for("multi.test")
    # gone.multi.test (preference 5) has no address and is skipped.
    assert hosts[0].name == "a.multi.test" and hosts[0].addresses == ("127.0.0.10",)
    assert {h.name for h in hosts[1:]} == {"b.multi.test", "c.multi.test"}
    c = next(h for h in hosts if h.name == "c.multi.test")
    assert sorted(c.addresses) == ["127.0.0.12", "127.0.0.13"]
    assert [h.preference for h in hosts] == [10, 20, 20]


async def test_equal_preferences_come_in_random_order(dns: Dnsmasq) -> None:
    r = router(dns)
    orders = {tuple(h.name for h in await r.hosts_for("multi.test"))[1:] for _ in range(40)}
    assert orders == {("b.multi.test", "c.multi.test"), ("c.multi.test", "b.multi.test")}


async def test_no_mx_falls_back_to_the_address_record(dns: Dnsmasq) -> None:
    hosts = await router(dns).hosts_for("plain.test")
    assert [(h.name, h.addresses) for h in hosts] == [("plain.test", ("127.0.0.20",))]


async def test_every_address_ipv6_first(dns: Dnsmasq) -> None:
    hosts = await router(dns).hosts_for("dual.test")
    assert hosts[0].addresses == ("::1", "127.0.0.21")


@pytest.mark.parametrize(("domain", "status"), [
    ("null.test", "5.1.10"),  # RFC 7505 null MX
    ("nonexistent.test", "5.1.2"),  # NXDOMAIN
    ("[not-an-ip]", "5.1.2"),
])
async def test_permanent_routing_failures(dns: Dnsmasq, domain: str, status: str) -> None:
    with pytest.raises(RoutingError) as info:
        await router(dns).hosts_for(domain)
    assert info.value.permanent and info.value.status == status


async def test_mx_without_addresses_is_temporary(dns: Dnsmasq) -> None:
    with pytest.raises(RoutingError) as info:
        await router(dns).hosts_for("dangling.test")
    assert not info.value.permanent


async def test_dns_failure_is_temporary() -> None:
    # Nothing answers on the discard port: a DNS outage must defer, never bounce.
    dead = Router(make_resolver(["127.0.0.1:9"], 1.0))
    with pytest.raises(RoutingError) as info:
        await dead.hosts_for("example.test")
    assert not info.value.permanent and info.value.status.startswith("4.")


async def test_address_literals_skip_dns() -> None:
    dead = Router(make_resolver(["127.0.0.1:9"], 1.0))
    hosts = await dead.hosts_for("[127.0.0.7]")
    assert hosts[0].addresses == ("127.0.0.7",)
    assert (await dead.hosts_for("[IPv6:::1]"))[0].addresses == ("::1",)
