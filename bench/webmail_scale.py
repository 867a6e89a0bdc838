"""Webmail on a big mailbox: an INBOX of N messages (100,000 by default) read through the REST
API the page uses and through the page itself in headless Chromium.

    .venv/bin/python -m bench.webmail_scale [--messages 100000] [--pages 20]

The mailbox is filled through the metadata seam in batches (rows naming a few dozen real blobs
that were appended normally), which is what N deliveries leave behind without N SMTP sessions.
Then a `postroom serve` node is started on it and the bench measures: `GET /v1/folders` (with
the unread counts), the first page of `GET /v1/folders/{id}/messages`, the next pages by cursor,
and in the browser the time from "Sign in" to the first rows on screen and from scrolling to
the end of the list to the next page on screen. Not a test: run it by hand; figures go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from postroom.app import Postroom
from postroom.config import load_settings
from postroom.core.models import Flag, Flags, HeaderSummary, MessageRecord, NewMessage
from postroom.store.metadata import Delivery
from tests.e2e.server import ServerProcess

DOMAIN = "example.test"
USER = f"reader@{DOMAIN}"
PASSWORD = "bench-password-1"
TEMPLATES = 40


def template(n: int) -> bytes:
    body = "".join(f"Line {i} of message {n}: the quarterly figures and the offsite plans.\r\n"
                   for i in range(20))
    return (f"From: Sender {n} <sender{n}@remote.example>\r\nTo: {USER}\r\n"
            f"Subject: Template message {n}\r\nMessage-ID: <t{n}@remote.example>\r\n"
            f"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n\r\n{body}").encode()


async def fill(data_dir: Path, count: int) -> None:
    settings = load_settings(None, data_dir=str(data_dir), hostname="mx.example.test")
    async with Postroom(settings) as node:
        service = node.service
        await service.add_domain(DOMAIN)
        user = await service.add_user(USER, PASSWORD)
        inbox = await service.get_folder(user, "INBOX")
        records: list[MessageRecord] = [
            await service.append(user, "INBOX", template(n)) for n in range(TEMPLATES)]
        start = time.time() - count * 60
        batch: list[Delivery] = []
        for n in range(count - TEMPLATES):
            rec = records[n % TEMPLATES]
            headers = replace(rec.headers, subject=f"Message {n} of the big mailbox",
                              message_id=f"<big.{n}@remote.example>", in_reply_to="",
                              references=())
            message = _new_message(rec, headers, start + n * 60,
                                   Flags(Flag.SEEN) if n % 3 else Flags())
            batch.append(Delivery(user.user_id, inbox.folder_id, message))
            if len(batch) == 2000:
                await node.metadata.insert_messages(batch)
                batch.clear()
        if batch:
            await node.metadata.insert_messages(batch)


def _new_message(rec: MessageRecord, headers: HeaderSummary, when: float, flags: Flags
                 ) -> NewMessage:
    return NewMessage(blob_hash=rec.blob_hash, size=rec.size, internal_date=when,
                      headers=headers, snippet=rec.snippet,
                      has_attachments=rec.has_attachments, flags=flags)


def api_figures(server: ServerProcess, pages: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"folders": [], "first page": [], "next pages": []}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        token = http.post("/v1/auth/token", auth=(USER, PASSWORD)).json()["token"]
        http.headers["Authorization"] = f"Bearer {token}"

        def get(name: str, path: str, params: dict[str, str] | None = None) -> Any:
            started = time.perf_counter()
            response = http.get(path, params=params)
            figures[name].append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            return response.json()

        for _ in range(5):
            folders = get("folders", "/v1/folders")
        inbox = next(f for f in folders["folders"] if f["role"] == "inbox")
        print(f"  INBOX: {inbox['total']} messages, {inbox['unread']} unread")
        path = f"/v1/folders/{inbox['id']}/messages"
        for _ in range(5):
            page = get("first page", path)
        for _ in range(pages):
            page = get("next pages", path, {"cursor": page["next_cursor"]})
    return figures


def browser_figures(server: ServerProcess, pages: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    from tests.e2e.webmail_helpers import CHROMIUM, CHROMIUM_ARGS

    figures: dict[str, list[float]] = {"sign in to first rows": [], "scroll to next page": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.base_url + "/")
        page.get_by_label("Email address").fill(USER)
        page.get_by_label("Password").fill(PASSWORD)
        started = time.perf_counter()
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector("#list li", timeout=60000)
        figures["sign in to first rows"].append((time.perf_counter() - started) * 1000)
        for _ in range(pages):
            rows = page.locator("#list li").count()
            started = time.perf_counter()
            page.locator("#list li").last.scroll_into_view_if_needed()
            deadline = time.monotonic() + 60
            while page.locator("#list li").count() <= rows:  # (the page's CSP forbids eval)
                if time.monotonic() > deadline:
                    raise TimeoutError("the next page did not come")
                page.wait_for_timeout(5)
            figures["scroll to next page"].append((time.perf_counter() - started) * 1000)
        rows = page.locator("#list li").count()
        heap = page.evaluate("() => performance.memory ? performance.memory.usedJSHeapSize : 0")
        print(f"  browser: {rows} rows on the page after {pages} pages, JS heap "
              f"{heap / 2**20:.1f} MiB")
        browser.close()
    return figures


def show(figures: dict[str, list[float]]) -> None:
    for name, values in figures.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]
        print(f"  {name:24} p50 {statistics.median(values):7.1f} ms   p95 {p95:7.1f} ms   "
              f"({len(values)} runs)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="postroom-webmail-scale-"))
    started = time.perf_counter()
    asyncio.run(fill(base / "data", args.messages))
    print(f"Postroom webmail, INBOX of {args.messages} messages "
          f"(filled in {time.perf_counter() - started:.0f} s)")
    server = ServerProcess(base / "data")
    server.start()
    try:
        show(api_figures(server, args.pages))
        show(browser_figures(server, args.pages))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
