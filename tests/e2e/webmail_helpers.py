"""Playwright with Debian's Chromium against a real `postroom serve`, for the webmail tests."""

from __future__ import annotations

import os
import shutil
import smtplib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route

from tests.e2e.server import ServerProcess

CHROMIUM = os.environ.get("POSTROOM_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that talks to Google's or anyone's servers: the machine is loopback only.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync",
                 "--no-first-run", "--disable-domain-reliability", "--metrics-recording-only",
                 "--disable-features=Translate,OptimizationHints,MediaRouter"]
SCREENSHOTS = os.environ.get("POSTROOM_SCREENSHOTS")  # a directory: save the main screens there


def launch(playwright: Playwright) -> Browser:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (scripts/debian-packages.txt lists it)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class Guarded:
    """A browser context where every request for a host other than 127.0.0.1 is refused and
    recorded, so a test can assert that nothing left for the internet."""

    def __init__(self, browser: Browser, server: ServerProcess, **options: object) -> None:
        self.server = server
        self.remote: list[str] = []
        self.context: BrowserContext = browser.new_context(**options)  # type: ignore[arg-type]
        self.context.route("**/*", self._route)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("request", self._seen)

    def _seen(self, request: object) -> None:
        url = getattr(request, "url", "")
        host = urlsplit(url).hostname
        if host not in (None, "127.0.0.1") and url.split(":", 1)[0] in ("http", "https", "ws",
                                                                         "wss"):
            self.remote.append(url)

    def _route(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or not url.startswith(("http", "ws")):
            route.continue_()
        else:
            self.remote.append(url)
            route.abort()

    def sign_in(self, address: str, password: str) -> Page:
        page = self.page
        page.goto(self.server.base_url + "/")
        page.get_by_label("Email address").fill(address)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector("#live-state.on", state="attached", timeout=15000)
        page.wait_for_selector("#folder-list a[aria-current='page']", timeout=15000)
        return page

    def shot(self, name: str) -> None:
        if SCREENSHOTS:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            self.page.wait_for_timeout(300)
            self.page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))

    def close(self) -> None:
        self.context.close()


def deliver(server: ServerProcess, to: str, subject: str, body: str, *,
            sender: str = "Carol Jones <carol@example.org>", html: bool = False) -> None:
    kind = "text/html; charset=utf-8" if html else "text/plain; charset=utf-8"
    raw = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: {kind}\r\n\r\n{body}\r\n")
    raw = raw.replace("\r\n", "\n").replace("\n", "\r\n")  # CRLF only: bare LF is refused
    envelope_from = sender.split("<")[-1].rstrip(">")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.sendmail(envelope_from, [to], raw.encode())
