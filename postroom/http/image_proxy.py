"""GET /v1/messages/{id}/image?url=URL: a remote image of the user's own message, fetched by
the server, so the reader's address, browser and time of reading stay with the server.

Only a URL that occurs as an image in that message (`sanitize_html`'s list) is fetched; http and
https only; the name is resolved once and the connection goes to that checked address (a DNS
answer cannot change between the check and the fetch), with the TLS name still verified; no
cookies, no Referer, a generic User-Agent; at most `max_bytes` and `timeout` seconds; the answer
must be `image/*` (not SVG, which can carry script). Redirects are followed (up to 3), each
target checked the same way.

Addresses: only globally routable ones by default (never loopback, private, link-local, CGNAT,
multicast or reserved, which would let mail make the server probe its own network). An operator
or a test can allow networks with `POSTROOM_IMAGE_PROXY_ALLOW` (comma-separated CIDRs), or by
setting `allowed_networks` on `app.state.image_proxy`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urljoin, urlsplit

import httpx
from fastapi import FastAPI, Query, Response

from postroom.http.api import UserDep, error_response
from postroom.http.sanitize import sanitize_html
from postroom.service import MailService, NotFoundError

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOW_ENV = "POSTROOM_IMAGE_PROXY_ALLOW"


class ImageRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _networks_from_env() -> list[IpNetwork]:
    return [ipaddress.ip_network(n.strip(), strict=False)
            for n in os.environ.get(ALLOW_ENV, "").split(",") if n.strip()]


@dataclass
class ImageProxy:
    allowed_networks: list[IpNetwork] = field(default_factory=_networks_from_env)
    max_bytes: int = 5 * 1024 * 1024
    timeout: float = 10.0
    max_redirects: int = 3

    def address_allowed(self, address: IpAddress) -> bool:
        if any(address in net for net in self.allowed_networks):
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return self.address_allowed(address.ipv4_mapped)
        return address.is_global and not address.is_multicast

    async def _resolve(self, host: str, port: int) -> IpAddress:
        try:
            literal: IpAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise ImageRefused(502, "image_unreachable", f"cannot resolve {host}") from None
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        # Every answer must be allowed: a name mixing a public and a private address is refused.
        if not addresses or not all(self.address_allowed(a) for a in addresses):
            raise ImageRefused(403, "forbidden_address",
                               "the image's address is not on the public internet")
        return addresses[0]

    async def fetch(self, url: str) -> tuple[bytes, str]:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False,
                                     trust_env=False) as client:
            for _ in range(self.max_redirects + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ImageRefused(400, "bad_url", "only http and https images are fetched")
                port = parts.port or (443 if parts.scheme == "https" else 80)
                address = await self._resolve(parts.hostname, port)
                host = f"[{address}]" if address.version == 6 else str(address)
                pinned = parts._replace(netloc=f"{host}:{port}").geturl()
                request = client.build_request(
                    "GET", pinned,
                    headers={"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*",
                             "User-Agent": "Postroom image proxy"},
                    extensions={"sni_hostname": parts.hostname}
                    if parts.scheme == "https" else {})
                try:
                    async with asyncio.timeout(self.timeout):
                        response = await client.send(request, stream=True)
                        try:
                            if response.is_redirect and "location" in response.headers:
                                url = urljoin(url, response.headers["location"])
                                continue
                            return await self._body(response)
                        finally:
                            await response.aclose()
                except (httpx.HTTPError, TimeoutError, OSError) as exc:
                    raise ImageRefused(502, "image_unreachable",
                                       f"fetching the image failed: {type(exc).__name__}"
                                       ) from None
            raise ImageRefused(502, "image_unreachable", "too many redirects")

    async def _body(self, response: httpx.Response) -> tuple[bytes, str]:
        if response.status_code != 200:
            raise ImageRefused(502, "image_unreachable",
                               f"the image's server answered {response.status_code}")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/") or content_type == "image/svg+xml":
            raise ImageRefused(502, "not_an_image", "the answer is not an image")
        declared = response.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() \
                and (len(declared) > 18 or int(declared) > self.max_bytes):
            raise ImageRefused(502, "image_too_large", "the image is too large")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageRefused(502, "image_too_large", "the image is too large")
            chunks.append(chunk)
        return b"".join(chunks), content_type


def add_image_routes(app: FastAPI, service: MailService) -> ImageProxy:
    proxy = ImageProxy()
    app.state.image_proxy = proxy

    @app.get("/v1/messages/{message_id}/image", tags=["messages"],
             responses={200: {"content": {"image/*": {}}}})
    async def message_image(user: UserDep, message_id: str,
                            url: Annotated[str, Query(max_length=4096)]) -> Response:
        """A remote image of this message (one of the URLs its HTML shows), fetched by the
        server; 404 for a URL that is not an image of the message."""
        detail = await service.message_detail(user, message_id)
        html = detail.parsed.html
        if not html or url not in sanitize_html(html).remote_images:
            raise NotFoundError("no such image in this message")
        try:
            data, content_type = await app.state.image_proxy.fetch(url)
        except ImageRefused as exc:
            return error_response(exc.status, exc.code, str(exc))
        return Response(data, media_type=content_type, headers={
            "Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox", "Referrer-Policy": "no-referrer"})

    return proxy
