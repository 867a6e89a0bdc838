"""The image proxy's address rule: by default nothing but the public internet."""

from __future__ import annotations

import ipaddress

import pytest

from postroom.http.image_proxy import ImageProxy, ImageRefused


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/p.png", "http://localhost:9/p.png", "http://[::1]:9/p.png",
    "http://10.1.2.3/p.png", "http://192.168.0.1/p.png", "http://169.254.169.254/latest",
    "http://100.64.0.1/p.png", "http://0.0.0.0/p.png", "http://[::ffff:127.0.0.1]/p.png",
    "http://224.0.0.1/p.png",
])
async def test_private_and_loopback_targets_are_refused(url: str) -> None:
    with pytest.raises(ImageRefused) as refused:
        await ImageProxy(allowed_networks=[]).fetch(url)
    assert refused.value.status == 403 and refused.value.code == "forbidden_address"


@pytest.mark.parametrize("url", ["ftp://example.org/p.png", "file:///etc/passwd", "data:,x"])
async def test_only_http_and_https(url: str) -> None:
    with pytest.raises(ImageRefused) as refused:
        await ImageProxy(allowed_networks=[]).fetch(url)
    assert refused.value.status == 400


def test_allowed_networks_open_a_private_range() -> None:
    proxy = ImageProxy(allowed_networks=[ipaddress.ip_network("127.0.0.0/8")])
    assert proxy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert not proxy.address_allowed(ipaddress.ip_address("10.0.0.1"))
    assert ImageProxy(allowed_networks=[]).address_allowed(ipaddress.ip_address("93.184.216.34"))
