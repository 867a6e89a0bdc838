"""The webmail in a real browser (Playwright driving Debian's Chromium, headless) against a
real `postroom serve`: sign in, read, reply live to another user's open page, search, spam,
drafts and attachments, hostile HTML rendered inert, keyboard, phone width, security headers.

Every context refuses (and records) requests for any host but 127.0.0.1.
Set POSTROOM_SCREENSHOTS=docs/screenshots to save the main screens.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, expect, sync_playwright

from tests.e2e.server import ServerProcess
from tests.e2e.webmail_helpers import Guarded, deliver, launch

ALICE, ALICE_PW = "alice@example.test", "alice-secret-1"
BOB, BOB_PW = "bob@example.test", "bob-secret-22"

HOSTILE = """<html><head>
<meta http-equiv="refresh" content="0;url=http://evil.test/refresh">
<link rel="stylesheet" href="http://evil.test/link.css">
<style>@import url(http://evil.test/import.css);
body { background: url(http://evil.test/bg.png) }</style>
<script>parent.document.title = 'pwned'; fetch('http://evil.test/script');</script>
</head><body>
<p style="background-image:url(http://evil.test/inline.png)">Hostile greetings</p>
<img src="x" onerror="parent.postMessage('pwned', '*'); fetch('http://evil.test/onerror')">
<img src="http://evil.test/pixel.gif" width="1" height="1">
<a id="js" href="javascript:parent.document.title='pwned'">click me</a>
<a href="https://example.org/safe">a safe link</a>
<form action="http://evil.test/form" method="post"><input name="q" value="x">
<button type="submit">go</button></form>
<iframe src="http://evil.test/frame"></iframe>
<svg><image href="http://evil.test/svg.png"/></svg>
<object data="http://evil.test/object"></object>
<video poster="http://evil.test/poster.png"></video>
<body onload="fetch('http://evil.test/onload')">
</body></html>"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("webmail")
    srv = ServerProcess(base / "data")
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", ALICE, "--password", ALICE_PW)
    srv.cli("user", "add", BOB, "--password", BOB_PW)
    srv.start()
    subjects = ["Quarterly report", "Lunch on Friday?", "Your invoice 4471", "Trip to Lisbon",
                "Team offsite agenda", "Welcome aboard"]
    senders = ["Carol Jones <carol@example.org>", "Dave Lee <dave@example.net>",
               "Erin Park <erin@example.org>"]
    for n, subject in enumerate(subjects):
        deliver(srv, ALICE, subject, f"Hi Alice,\r\n\r\nA few words about {subject.lower()}."
                f"\r\n\r\nCheers", sender=senders[n % len(senders)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


def api(server: ServerProcess, user: str, password: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, auth=(user, password), timeout=30)


def find(server: ServerProcess, user: str, password: str, subject: str) -> dict[str, object]:
    """The message with this subject in any of the user's folders, with its folder's role
    (waiting a little: SMTP's 250 means queued, the worker files it a moment later)."""
    with api(server, user, password) as c:
        for _ in range(100):
            for folder in c.get("/v1/folders").json()["folders"]:
                page = c.get(f"/v1/folders/{folder['id']}/messages",
                             params={"limit": 200}).json()
                for m in page["messages"]:
                    if m["subject"] == subject:
                        return {**m, "role": folder["role"]}
            time.sleep(0.1)
    raise AssertionError(f"no message {subject!r}")


def test_page_security_headers(server: ServerProcess) -> None:
    r = httpx.get(server.base_url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'",
                      "object-src 'none'", "base-uri 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"
    js = httpx.get(server.base_url + "/webmail/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(server.base_url + "/webmail/../service.py").status_code == 404
    assert httpx.get(server.base_url + "/webmail/%2e%2e/webmail.py").status_code == 404


def test_sign_in_open_and_reply_shows_live_on_the_other_page(
        server: ServerProcess, browser: Browser) -> None:
    deliver(server, ALICE, "Dinner plans", "Are you free on Saturday?",
            sender="Bob Smith <bob@example.test>")
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    bob = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        expect(page.locator("#list .row").first).to_be_visible()
        expect(page).to_have_title(re.compile(r"^\(\d+\) Inbox — Postroom$"))
        alice.shot("inbox")
        row = page.locator("#list .row", has_text="Dinner plans")
        row.click()
        expect(page.locator("#open-message")).to_contain_text("Are you free on Saturday?")
        expect(row).not_to_have_class(re.compile(r"\bunread\b"))
        alice.shot("reading")

        bob_page = bob.sign_in(BOB, BOB_PW)
        bob_page.evaluate("window.__noReload = 42")
        rows_before = bob_page.locator("#list .row").count()

        page.keyboard.press("r")
        expect(page.locator("#compose")).to_be_visible()
        expect(page.locator("#c-to")).to_have_value(re.compile("bob@example.test"))
        expect(page.locator("#c-subject")).to_have_value("Re: Dinner plans")
        expect(page.locator("#c-body")).to_have_value(re.compile(r"> Are you free on Saturday\?"))
        page.locator("#c-body").press("Control+Home")
        page.locator("#c-body").type("Saturday works for me!")
        alice.shot("compose")
        page.get_by_role("button", name="Send").click()
        started = time.monotonic()
        bob_row = bob_page.locator("#list .row", has_text="Re: Dinner plans")
        expect(bob_row).to_be_visible(timeout=10000)
        latency = time.monotonic() - started
        print(f"reply visible on the other page after {latency * 1000:.0f} ms")
        # The target is a second; assert generously so a loaded CI machine does not flake
        # (bench/push.py measures the real delay).
        assert latency < 5, latency
        assert bob_page.evaluate("window.__noReload") == 42  # no reload happened
        assert bob_page.locator("#list .row").count() == rows_before + 1
        expect(bob_row).to_have_class(re.compile(r"\bunread\b"))
        expect(bob_page).to_have_title(re.compile(r"^\(1\) Inbox"))
        expect(page.locator("#compose")).to_be_hidden()
        # Replying marked Alice's message answered; Bob's copy threads with it.
        assert find(server, ALICE, ALICE_PW, "Dinner plans")["answered"] is True
        assert not alice.remote and not bob.remote
        assert not alice.errors and not bob.errors, alice.errors + bob.errors
    finally:
        alice.close()
        bob.close()


def test_search_and_move_to_junk(server: ServerProcess, browser: Browser) -> None:
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        page.keyboard.press("/")
        expect(page.locator("#search-input")).to_be_focused()
        page.keyboard.type("subject:invoice")
        page.keyboard.press("Enter")
        expect(page.locator("#list-title")).to_have_text("Search: subject:invoice")
        expect(page.locator("#list .row")).to_have_count(1)
        page.locator("#search-input").fill("lisbon")
        page.locator("#search-input").press("Enter")
        expect(page.locator("#list .row")).to_have_count(1)
        expect(page.locator("#list .row mark").first).to_have_text(
            re.compile("lisbon", re.IGNORECASE))
        alice.shot("search")
        page.get_by_role("button", name="Clear search").click()
        expect(page.locator("#list-title")).to_have_text("Inbox")

        row = page.locator("#list .row", has_text="Lunch on Friday?")
        row.click()
        expect(page.locator("#open-message")).to_contain_text("lunch on friday")
        page.locator("#spam-btn").click()
        expect(row).to_have_count(0)
        deadline = time.monotonic() + 10
        while find(server, ALICE, ALICE_PW, "Lunch on Friday?")["role"] != "junk":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        page.locator("#folder-list a", has_text="Junk").click()
        expect(page.locator("#list .row", has_text="Lunch on Friday?")).to_be_visible()
        page.locator("#list .row", has_text="Lunch on Friday?").click()
        expect(page.locator("#spam-btn")).to_have_text("Not spam")
        page.locator("#spam-btn").click()
        expect(page.locator("#list .row", has_text="Lunch on Friday?")).to_have_count(0)
        assert not alice.remote and not alice.errors
    finally:
        alice.close()


def test_hostile_html_renders_inert(server: ServerProcess, browser: Browser) -> None:
    subject = "Hostile HTML"
    deliver(server, ALICE, subject, HOSTILE, html=True)
    found = find(server, ALICE, ALICE_PW, subject)
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    dialogs: list[str] = []
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.evaluate("""() => { window.__messages = [];
            window.addEventListener('message', (e) => window.__messages.push(String(e.data))); }""")
        if found["role"] != "inbox":  # the spam filter may well think so
            page.locator("#folder-list a", has_text=str(found["role"]).title()).click()
        page.locator("#list .row", has_text=subject).click()
        frame_el = page.locator("#open-message iframe")
        expect(frame_el).to_be_visible()
        sandbox = frame_el.get_attribute("sandbox") or ""
        assert "allow-scripts" not in sandbox and "allow-forms" not in sandbox
        assert "allow-same-origin" not in sandbox
        frame = frame_el.element_handle().content_frame()
        assert frame is not None
        expect(frame.locator("body")).to_contain_text("Hostile greetings")
        page.wait_for_timeout(1500)  # time for a meta refresh or a late script to act
        alice.shot("hostile")
        # Nothing ran, nothing was fetched from anywhere but our own server, nothing navigated.
        assert alice.remote == [], alice.remote
        assert page.evaluate("window.__messages") == []
        assert "pwned" not in page.title()
        assert dialogs == []
        assert frame.url == "about:srcdoc"
        html = frame.locator("body").inner_html()  # the mail's part (our head has our CSP)
        for bad in ("<script", "onerror", "onload", "javascript:", "<form", "<meta", "<link",
                    "evil.test", "<iframe", "<object", "<style>@import"):
            assert bad not in html, bad
        assert frame.locator("a", has_text="a safe link").get_attribute("target") == "_blank"
        assert "noopener" in (frame.locator("a", has_text="a safe link").get_attribute("rel")
                              or "")
        expect(page.locator("#open-message .notice")).to_contain_text("remote image")
        assert not alice.errors, alice.errors
    finally:
        alice.close()


def test_compose_checks_addresses_saves_drafts_and_sends_attachments(
        server: ServerProcess, browser: Browser, tmp_path: Path) -> None:
    attachment = tmp_path / "notes.txt"
    attachment.write_text("attached notes\n")
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        page.keyboard.press("c")
        expect(page.locator("#compose")).to_be_visible()
        expect(page.locator("#c-to")).to_be_focused()
        page.locator("#c-to").fill("bob@example.test, not an address")
        page.locator("#c-subject").focus()
        expect(page.locator("#c-to")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#c-to-err")).to_contain_text("not an address")
        page.locator("#c-to").fill("Bob <bob@example.test>")
        page.locator("#c-subject").focus()
        expect(page.locator("#c-to")).not_to_have_attribute("aria-invalid", "true")
        page.locator("#c-subject").fill("Notes for you")
        page.locator("#c-body").type("Here are the notes.")
        page.locator("#c-files").set_input_files(str(attachment))
        expect(page.locator("#c-attachments")).to_contain_text("notes.txt")
        expect(page.locator("#draft-state")).to_contain_text("Draft saved", timeout=10000)
        draft = find(server, ALICE, ALICE_PW, "Notes for you")
        assert draft["role"] == "drafts" and draft["draft"] and draft["has_attachments"]
        page.get_by_role("button", name="Send").click()
        expect(page.locator("#compose")).to_be_hidden()
        received = find(server, BOB, BOB_PW, "Notes for you")
        assert received["role"] == "inbox" and received["has_attachments"]
        with api(server, BOB, BOB_PW) as c:
            detail = c.get(f"/v1/messages/{received['id']}").json()
            assert detail["attachments"][0]["filename"] == "notes.txt"
            assert "Here are the notes." in detail["text"]
        # The draft is gone once sent.
        with api(server, ALICE, ALICE_PW) as c:
            drafts = c.get("/v1/folders/Drafts/messages").json()["messages"]
            assert not [m for m in drafts if m["subject"] == "Notes for you"]
        assert not alice.remote and not alice.errors
    finally:
        alice.close()


def test_keyboard_and_landmarks(server: ServerProcess, browser: Browser) -> None:
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        for role in ("banner", "navigation", "main", "search"):
            expect(page.get_by_role(role)).to_have_count(1)
        expect(page.get_by_role("listbox")).to_be_visible()
        expect(page.get_by_label("Search mail")).to_be_visible()
        rows = page.locator("#list .row")
        expect(rows.first).to_have_attribute("aria-selected", "true")
        page.locator("#list").focus()
        page.keyboard.press("j")
        expect(rows.nth(1)).to_have_attribute("aria-selected", "true")
        page.keyboard.press("k")
        expect(rows.nth(0)).to_have_attribute("aria-selected", "true")
        page.keyboard.press("j")
        page.keyboard.press("o")
        expect(page.locator("#open-message")).to_be_visible()
        subject = rows.nth(1).locator(".subject").inner_text()
        expect(page.locator("#thread-subject")).to_have_text(subject)
        page.keyboard.press("s")
        expect(rows.nth(1).locator(".star")).to_have_class(re.compile(r"\bon\b"))
        page.keyboard.press("s")
        page.keyboard.press("?")
        expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_hidden()
        page.keyboard.press("e")  # archive
        expect(page.locator("#list .row .subject", has_text=subject)).to_have_count(0)
        deadline = time.monotonic() + 10
        while find(server, ALICE, ALICE_PW, subject)["role"] != "archive":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        page.keyboard.press("f")
        expect(page.locator("#c-subject")).to_have_value(re.compile(r"^Fwd: "))
        page.keyboard.press("Escape")
        expect(page.locator("#compose")).to_be_hidden()
        assert not alice.remote and not alice.errors
    finally:
        alice.close()


def test_phone_width_and_dark_theme(server: ServerProcess, browser: Browser) -> None:
    alice = Guarded(browser, server, viewport={"width": 390, "height": 844},
                    color_scheme="dark", is_mobile=True, has_touch=True)
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background != "rgb(246, 247, 249)"  # the dark palette, following the system
        expect(page.locator("#reader")).to_be_hidden()
        alice.shot("phone-list")
        page.locator("#list .row").first.click()
        expect(page.locator("#reader")).to_be_visible()
        expect(page.locator("#list-pane")).to_be_hidden()
        sender = page.locator("#open-message .msg-head .who").last  # who wrote it, on a phone too
        expect(sender).to_be_visible()
        expect(sender).to_contain_text("@")
        alice.shot("phone-reading")
        page.get_by_role("button", name="Back to the list").click()
        expect(page.locator("#list-pane")).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width  # nothing wider than the phone
        page.locator("#menu-btn").click()
        expect(page.locator("#folders")).to_have_class(re.compile(r"\bopen\b"))
        assert not alice.remote and not alice.errors
    finally:
        alice.close()


def test_sign_out_revokes_the_token(server: ServerProcess, browser: Browser) -> None:
    alice = Guarded(browser, server)
    try:
        page = alice.sign_in(ALICE, ALICE_PW)
        token = page.evaluate("JSON.parse(sessionStorage.getItem('postroom.session')).token")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Email address")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('postroom.session')") is None
        r = httpx.get(server.base_url + "/v1/folders",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401
        page.get_by_label("Email address").fill(ALICE)
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signin-error")).to_contain_text("Wrong address or password")
    finally:
        alice.close()


# Records the page's WebSockets and, while window.__blockWs is set, hands the page a socket that
# fails at once (as a refused connection would), so the page stays offline and keeps retrying
# while mail arrives.
_WS_SPY = """(() => {
  const Native = window.WebSocket;
  window.__sockets = []; window.__wsUrls = []; window.__blockWs = false;
  function Spy(url, protocols) {
    window.__wsUrls.push(String(url));
    if (window.__blockWs) {
      const dead = { readyState: 3, close() {}, send() {} };
      Object.defineProperty(dead, "onclose", { set(fn) {
        setTimeout(() => fn({ code: 1006, reason: "" }), 0); } });
      return dead;
    }
    const ws = new Native(url, protocols);
    window.__sockets.push(ws);
    return ws;
  }
  Spy.prototype = Native.prototype;
  Object.assign(Spy, { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 });
  window.WebSocket = Spy;
})();"""


def test_push_reconnects_with_last_event_id_and_misses_nothing(
        server: ServerProcess, browser: Browser) -> None:
    alice = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        alice.context.add_init_script(_WS_SPY)
        page = alice.sign_in(ALICE, ALICE_PW)
        tag = uuid.uuid4().hex[:6]
        deliver(server, ALICE, f"before drop {tag}", "live")
        expect(page.locator("#list .row", has_text=f"before drop {tag}")).to_be_visible(
            timeout=15000)
        page.evaluate("window.__noReload = 7")
        # The socket drops; reconnecting fails until we allow it again.
        page.evaluate("window.__blockWs = true; window.__sockets.at(-1).close()")
        expect(page.locator("#live-state.on")).to_have_count(0, timeout=10000)
        missed = [f"while away {n} {tag}" for n in range(2)]
        for subject in missed:
            deliver(server, ALICE, subject, "sent while the page was offline")
        page.wait_for_timeout(1000)  # a failed retry or two
        for subject in missed:
            expect(page.locator("#list .row", has_text=subject)).to_have_count(0)
        page.evaluate("window.__blockWs = false")
        for subject in missed:
            expect(page.locator("#list .row", has_text=subject)).to_be_visible(timeout=20000)
        # It came back with the id of the last frame it saw, was replayed what it missed,
        # and the page never reloaded.
        last_url = page.evaluate("window.__wsUrls.at(-1)")
        assert "last_event_id=" in last_url, last_url
        assert page.evaluate("window.__noReload") == 7
        expect(page.locator("#live-state.on")).to_have_count(1, timeout=10000)
        assert not alice.errors, alice.errors
    finally:
        alice.close()


def test_the_list_pages_through_a_big_folder(server: ServerProcess, browser: Browser) -> None:
    """The list loads 50 rows at a time as the reader scrolls, to the last message."""
    dana, dana_pw, count = "dana@example.test", "dana-secret-333", 120
    server.cli("user", "add", dana, "--password", dana_pw)
    with imaplib.IMAP4("127.0.0.1", server.imap_port) as imap:
        imap.login(dana, dana_pw)
        for n in range(count):
            raw = (f"From: Sender {n} <s{n}@example.org>\r\nTo: {dana}\r\n"
                   f"Subject: Paged message {n:03d}\r\nMessage-ID: <paged.{n}@example.org>\r\n"
                   f"\r\nNumber {n}.\r\n").encode()
            when = imaplib.Time2Internaldate(1_790_000_000 + n * 3600)
            typ, _ = imap.append("INBOX", "", when, raw)
            assert typ == "OK"
    reader = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = reader.sign_in(dana, dana_pw)
        rows = page.locator("#list li")
        expect(rows.first).to_contain_text("Paged message 119")
        expect(rows).to_have_count(50)
        for _ in range(20):
            if page.locator("#list-end").text_content() == f"{count} messages":
                break
            rows.last.scroll_into_view_if_needed()
            page.wait_for_timeout(100)
        expect(page.locator("#list-end")).to_have_text(f"{count} messages")
        expect(rows).to_have_count(count)
        expect(rows.last).to_contain_text("Paged message 000")  # newest first, to the oldest
        assert reader.errors == [] and reader.remote == []
    finally:
        reader.close()


def test_reply_all_and_forward_fill_the_form(server: ServerProcess, browser: Browser) -> None:
    subject = f"Plans {uuid.uuid4().hex[:6]}"
    raw = (f"From: Carol Jones <carol@example.org>\r\nTo: {ALICE}, Dave Lee <dave@example.net>"
           f"\r\nCc: erin@example.org\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nShall we meet at noon?\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [ALICE], raw.encode())
    find(server, ALICE, ALICE_PW, subject)
    reader = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = reader.sign_in(ALICE, ALICE_PW)
        page.locator("#list .row", has_text=subject).click()
        expect(page.locator("#open-message")).to_contain_text("Shall we meet at noon?")

        page.keyboard.press("a")  # reply all: everyone but me, Cc kept
        expect(page.locator("#compose")).to_be_visible()
        to = page.locator("#c-to")
        expect(to).to_have_value(re.compile(r"carol@example\.org.*dave@example\.net"))
        expect(to).not_to_have_value(re.compile(re.escape(ALICE)))
        expect(page.locator("#c-cc")).to_have_value("erin@example.org")
        expect(page.locator("#c-subject")).to_have_value(f"Re: {subject}")
        expect(page.locator("#c-body")).to_have_value(re.compile(r"> Shall we meet at noon\?"))
        page.get_by_role("button", name="Discard").click()
        expect(page.locator("#compose")).to_be_hidden()

        page.keyboard.press("f")  # forward: nobody yet, the original quoted below
        expect(page.locator("#compose")).to_be_visible()
        expect(page.locator("#c-to")).to_have_value("")
        expect(page.locator("#c-to")).to_be_focused()
        expect(page.locator("#c-subject")).to_have_value(f"Fwd: {subject}")
        body = page.locator("#c-body")
        expect(body).to_have_value(re.compile(r"-+ Forwarded message -+\nFrom: Carol Jones"))
        expect(body).to_have_value(re.compile(r"Shall we meet at noon\?"))
        page.get_by_role("button", name="Discard").click()
        assert reader.errors == [] and reader.remote == []
    finally:
        reader.close()


def test_conversation_view_and_the_remaining_shortcuts(
        server: ServerProcess, browser: Browser) -> None:
    """A thread opens as one conversation; u marks unread, # deletes to Trash, / goes to the
    search box, c composes."""
    tag = uuid.uuid4().hex[:6]
    first_id = f"<first.{tag}@example.org>"
    msgs = [
        (f"Lunch plans {tag}", first_id, "", "Noon at the usual place?"),
        (f"Re: Lunch plans {tag}", f"<second.{tag}@example.org>",
         f"In-Reply-To: {first_id}\r\nReferences: {first_id}\r\n", "Make it half past."),
    ]
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        for subject, message_id, extra, body in msgs:
            raw = (f"From: Carol Jones <carol@example.org>\r\nTo: {ALICE}\r\n"
                   f"Subject: {subject}\r\nMessage-ID: {message_id}\r\n{extra}\r\n{body}\r\n")
            smtp.sendmail("carol@example.org", [ALICE], raw.encode())
    for subject, *_ in msgs:
        find(server, ALICE, ALICE_PW, subject)
    reader = Guarded(browser, server, viewport={"width": 1280, "height": 800})
    try:
        page = reader.sign_in(ALICE, ALICE_PW)
        row = page.locator("#list .row", has_text=f"Re: Lunch plans {tag}")
        row.click()
        thread = page.locator("#thread article")
        expect(thread).to_have_count(2)  # both messages of the conversation, in order
        expect(thread.first).to_contain_text("Carol Jones")
        expect(thread.last).to_contain_text("Make it half past.")
        expect(row).not_to_have_class(re.compile(r"\bunread\b"))

        page.locator("#list").focus()
        page.keyboard.press("u")
        expect(row).to_have_class(re.compile(r"\bunread\b"))
        assert find(server, ALICE, ALICE_PW, f"Re: Lunch plans {tag}")["seen"] is False

        page.keyboard.press("#")
        expect(page.locator("#list .row", has_text=f"Re: Lunch plans {tag}")).to_have_count(0)
        deadline = time.monotonic() + 10
        while find(server, ALICE, ALICE_PW, f"Re: Lunch plans {tag}")["role"] != "trash":
            assert time.monotonic() < deadline
            time.sleep(0.1)

        page.locator("#list").focus()
        page.keyboard.press("/")
        expect(page.get_by_label("Search mail")).to_be_focused()
        page.keyboard.press("Escape")
        page.locator("#list").focus()
        page.keyboard.press("c")
        expect(page.locator("#compose")).to_be_visible()
        expect(page.locator("#compose-title")).to_have_text("New message")
        page.get_by_role("button", name="Discard").click()
        assert not reader.errors and not reader.remote
    finally:
        reader.close()
