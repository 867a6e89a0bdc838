"""GET /v1/threads/{id} and the remote image proxy GET /v1/messages/{id}/image against a real
`postroom serve`, with a loopback HTTP server standing in for the sender's image host (the
node is started with that loopback network allowed; by default it would be refused)."""

from __future__ import annotations

import smtplib
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.server import ServerProcess

ALICE = "alice@example.test"
BOB = "bob@example.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


class ImageHost(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        ImageHost.seen.append({"path": self.path, **headers})
        if self.path.startswith("/pixel.png"):
            body, ctype = PNG, "image/png"
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/pixel.png?via=redirect")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        elif self.path == "/big.png":
            body, ctype = b"\0" * (6 * 1024 * 1024), "image/png"
        else:
            body, ctype = b"<p>not an image</p>", "text/html"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("reading")
    srv = ServerProcess(base / "data", env={"POSTROOM_IMAGE_PROXY_ALLOW": "127.0.0.0/8"})
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", ALICE, "--password", PASSWORD_A)
    srv.cli("user", "add", BOB, "--password", PASSWORD_A)
    srv.start()
    yield srv
    srv.stop()


def client(server: ServerProcess, user: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, auth=(user, PASSWORD_A), timeout=30)


def deliver(server: ServerProcess, to: str, subject: str, body: str, *, html: bool = False,
            headers: str = "") -> str:
    mid = f"<{uuid.uuid4().hex}@example.org>"
    ctype = "Content-Type: text/html; charset=utf-8\r\n" if html else ""
    raw = (f"From: Carol <carol@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: {mid}\r\n{headers}{ctype}\r\n{body}\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [to], raw.encode())
    return mid


def find(c: httpx.Client, subject: str) -> dict[str, object]:
    messages = c.get("/v1/folders/INBOX/messages", params={"limit": 50}).json()["messages"]
    return next(m for m in messages if m["subject"] == subject)


def test_thread_listing_is_user_scoped(server: ServerProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    root = deliver(server, ALICE, f"plan {tag}", "first")
    deliver(server, ALICE, f"Re: plan {tag}", "second",
            headers=f"In-Reply-To: {root}\r\nReferences: {root}\r\n")
    deliver(server, ALICE, f"other {tag}", "unrelated")
    with client(server, ALICE) as alice, client(server, BOB) as bob:
        first = find(alice, f"plan {tag}")
        thread = alice.get(f"/v1/threads/{first['thread_id']}")
        assert thread.status_code == 200, thread.text
        body = thread.json()
        assert body["id"] == first["thread_id"]
        assert [m["subject"] for m in body["messages"]] == [f"plan {tag}", f"Re: plan {tag}"]
        # Bob cannot list (or learn anything about) Alice's thread.
        refused = bob.get(f"/v1/threads/{first['thread_id']}")
        assert refused.status_code == 404 and refused.json()["error"]["code"]
        assert alice.get("/v1/threads/no-such-thread").status_code == 404


def test_image_proxy(server: ServerProcess, image_host: str) -> None:
    tag = uuid.uuid4().hex[:6]
    html = (f'<p>hi <img src="{image_host}/pixel.png?u=1"><img src="{image_host}/page">'
            f'<img src="{image_host}/big.png"><img src="{image_host}/moved"></p>')
    deliver(server, ALICE, f"pics {tag}", html, html=True)
    with client(server, ALICE) as alice, client(server, BOB) as bob:
        mid = find(alice, f"pics {tag}")["id"]
        detail = alice.get(f"/v1/messages/{mid}").json()
        assert detail["remote_images_blocked"] == 4
        assert detail["remote_images"][0] == f"{image_host}/pixel.png?u=1"
        assert 'src="remote-image:0"' in detail["html"] and image_host not in detail["html"]
        ImageHost.seen.clear()

        got = alice.get(f"/v1/messages/{mid}/image", params={"url": detail["remote_images"][0]})
        assert got.status_code == 200, got.text
        assert got.content == PNG and got.headers["content-type"] == "image/png"
        assert got.headers["x-content-type-options"] == "nosniff"
        # The image host saw the server, not the reader: no cookie, no referrer, our agent.
        [request] = ImageHost.seen
        assert "referer" not in request and "cookie" not in request
        assert request["user-agent"] == "Postroom image proxy"

        redirected = alice.get(f"/v1/messages/{mid}/image",
                               params={"url": f"{image_host}/moved"})
        assert redirected.status_code == 200 and redirected.content == PNG
        not_image = alice.get(f"/v1/messages/{mid}/image", params={"url": f"{image_host}/page"})
        assert not_image.status_code == 502
        assert not_image.json()["error"]["code"] == "not_an_image"
        big = alice.get(f"/v1/messages/{mid}/image", params={"url": f"{image_host}/big.png"})
        assert big.status_code == 502 and big.json()["error"]["code"] == "image_too_large"
        # Only URLs of that message, for its owner.
        other = alice.get(f"/v1/messages/{mid}/image",
                          params={"url": f"{image_host}/pixel.png?u=2"})
        assert other.status_code == 404
        assert bob.get(f"/v1/messages/{mid}/image",
                       params={"url": detail["remote_images"][0]}).status_code == 404
        assert httpx.get(f"{server.base_url}/v1/messages/{mid}/image",
                         params={"url": detail["remote_images"][0]}).status_code == 401
