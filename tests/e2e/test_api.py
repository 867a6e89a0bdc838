"""The REST API v1 over real HTTP against a real `postroom serve` process and data dir."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A, PASSWORD_B
from tests.e2e.server import ServerProcess

ALICE = ("alice@example.test", PASSWORD_A)
BOB = ("bob@example.test", PASSWORD_B)


def client(server: ServerProcess, auth: tuple[str, str] | None = ALICE) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, auth=auth, timeout=30)


def folders(c: httpx.Client) -> dict[str, dict[str, Any]]:
    r = c.get("/v1/folders")
    assert r.status_code == 200, r.text
    return {f["name"]: f for f in r.json()["folders"]}


def inbox_ids(c: httpx.Client) -> list[str]:
    r = c.get("/v1/folders/INBOX/messages", params={"limit": 500})
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["messages"]]


def send(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/messages", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body


def test_health_and_openapi(server: ServerProcess) -> None:
    with client(server, None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        spec = c.get("/openapi.json").json()
        for path in ("/v1/messages", "/v1/folders", "/v1/folders/{folder_id}/messages",
                     "/v1/messages/{message_id}"):
            assert path in spec["paths"]
        assert c.get("/docs").status_code == 200


def test_authentication_required_and_checked(server: ServerProcess) -> None:
    with client(server, None) as c:
        r = c.get("/v1/folders")
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Basic")
        assert_error(c.get("/v1/folders", auth=("alice@example.test", "wrong-password")), 401)
        assert_error(c.get("/v1/folders", auth=("nobody@example.test", "x" * 10)), 401)
        assert_error(c.get("/v1/folders", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/folders", headers={"Authorization": "Basic !!!"}), 401)


def test_bearer_token_lifecycle(server: ServerProcess) -> None:
    with client(server) as c:
        r = c.post("/v1/auth/token", json={"ttl_seconds": 600})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        short = c.post("/v1/auth/token", json={"ttl_seconds": 1}).json()["token"]
    with client(server, None) as anon:
        bearer = {"Authorization": f"Bearer {token}"}
        assert anon.get("/v1/folders", headers=bearer).status_code == 200
        time.sleep(1.2)
        assert_error(anon.get("/v1/folders", headers={"Authorization": f"Bearer {short}"}), 401)
        assert anon.delete("/v1/auth/token", headers=bearer).status_code == 204
        assert_error(anon.get("/v1/folders", headers=bearer), 401)


def test_default_folders_with_counts(server: ServerProcess) -> None:
    with client(server) as c:
        fs = folders(c)
    assert {"INBOX", "Sent", "Drafts", "Junk", "Trash", "Archive"} <= set(fs)
    assert fs["INBOX"]["role"] == "inbox" and fs["Trash"]["role"] == "trash"
    for f in fs.values():
        assert f["total"] >= 0 and f["unread"] >= 0 and f["uidvalidity"] > 0


def test_send_deliver_read_raw_and_isolation(server: ServerProcess) -> None:
    """The issue's "done when": alice sends to bob; bob reads it; alice keeps a Sent copy."""
    with client(server) as alice, client(server, BOB) as bob:
        before_unread = folders(bob)["INBOX"]["unread"]
        sent = send(alice, to=["bob@example.test"], subject="Lunch? ☕",
                    text="Shall we meet at noon?\nÀ bientôt")
        assert sent["delivered"] == ["bob@example.test"] and sent["queued"] == []

        listing = bob.get("/v1/folders/INBOX/messages").json()["messages"]
        mine = [m for m in listing if m["message_id_header"] == sent["message_id_header"]]
        assert len(mine) == 1
        summary = mine[0]
        assert summary["subject"] == "Lunch? ☕" and summary["seen"] is False
        assert "alice@example.test" in summary["from"]
        assert summary["snippet"].startswith("Shall we meet at noon?")
        assert folders(bob)["INBOX"]["unread"] == before_unread + 1

        # the folder id works as well as the name
        inbox_id = folders(bob)["INBOX"]["id"]
        assert summary["id"] in [m["id"] for m in
                                 bob.get(f"/v1/folders/{inbox_id}/messages").json()["messages"]]

        detail = bob.get(f"/v1/messages/{summary['id']}").json()
        assert detail["text"].replace("\r\n", "\n").strip() == "Shall we meet at noon?\nÀ bientôt"
        assert detail["attachments"] == [] and detail["html"] is None

        raw = bob.get(f"/v1/messages/{summary['id']}/raw")
        assert raw.status_code == 200 and raw.headers["content-type"] == "message/rfc822"
        # the Sent copy (no Bcc here) and the delivered copy are the same bytes
        sent_raw = alice.get(f"/v1/messages/{sent['id']}/raw").content
        assert raw.content == sent_raw
        parsed = email.message_from_bytes(raw.content, policy=email.policy.default)
        assert parsed["Subject"] == "Lunch? ☕"

        sent_listing = alice.get("/v1/folders/Sent/messages").json()["messages"]
        assert sent["id"] in [m["id"] for m in sent_listing]
        assert alice.get(f"/v1/messages/{sent['id']}").json()["seen"] is True

        # Each user's ids are invisible to the other: 404, never content, nothing changed.
        for path in (f"/v1/messages/{summary['id']}", f"/v1/messages/{summary['id']}/raw",
                     f"/v1/messages/{summary['id']}/attachments/0"):
            assert_error(alice.get(path), 404, "not_found")
        assert_error(alice.patch(f"/v1/messages/{summary['id']}", json={"seen": True}), 404)
        assert_error(alice.delete(f"/v1/messages/{summary['id']}"), 404)
        assert_error(bob.get(f"/v1/messages/{sent['id']}"), 404)
        assert_error(bob.get(f"/v1/folders/{folders(alice)['Sent']['id']}/messages"), 404)
        after = bob.get(f"/v1/messages/{summary['id']}").json()
        assert after["seen"] is False and after["folder_id"] == inbox_id


def test_cursor_paging_newest_first(server: ServerProcess) -> None:
    with client(server) as alice, client(server, BOB) as bob:
        bob.post("/v1/folders", json={"name": "Paging"})
        for n in range(7):
            send(alice, to="bob@example.test", subject=f"page {n}", text=str(n))
        ids = [m["id"] for m in bob.get("/v1/folders/INBOX/messages",
                                        params={"limit": 500}).json()["messages"]
               if m["subject"].startswith("page ")]
        for mid in ids:
            assert bob.patch(f"/v1/messages/{mid}", json={"folder": "Paging"}).status_code == 200
        seen: list[dict[str, Any]] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = bob.get("/v1/folders/Paging/messages", params=params).json()
            seen.extend(page["messages"])
            pages += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert pages == 3
        assert [m["subject"] for m in seen] == [f"page {n}" for n in reversed(range(7))]
        assert_error(bob.get("/v1/folders/Paging/messages", params={"cursor": "%%%"}), 400)
        assert_error(bob.get("/v1/folders/Paging/messages", params={"limit": 0}), 400)


def test_html_attachments_and_sanitising(server: ServerProcess) -> None:
    payload = bytes(range(256)) * 40
    html = ('<p onclick="steal()">Hello <b>Bob</b><img src="https://tracker.example/p.gif">'
            '<script>alert(1)</script><a href="javascript:alert(2)">x</a></p>')
    with client(server) as alice, client(server, BOB) as bob:
        sent = send(alice, to=["bob@example.test"], subject="report", text="see attached",
                    html=html, attachments=[{
                        "filename": "résumé data.bin", "content_type": "application/octet-stream",
                        "content_base64": base64.b64encode(payload).decode()}])
        mid = next(m["id"] for m in bob.get("/v1/folders/INBOX/messages").json()["messages"]
                   if m["message_id_header"] == sent["message_id_header"])
        detail = bob.get(f"/v1/messages/{mid}").json()
        assert detail["has_attachments"] is True
        assert detail["text"].strip() == "see attached"
        assert "<b>Bob</b>" in detail["html"]
        for bad in ("script", "onclick", "tracker.example", "javascript:"):
            assert bad not in detail["html"]
        assert detail["remote_images_blocked"] == 1
        [att] = detail["attachments"]
        assert att["filename"] == "résumé data.bin" and att["size"] == len(payload)
        got = bob.get(att["url"])
        assert got.status_code == 200 and got.content == payload
        assert "attachment" in got.headers["content-disposition"]
        assert_error(bob.get(f"/v1/messages/{mid}/attachments/5"), 404)


def test_bcc_hidden_from_recipients_kept_in_sent(server: ServerProcess) -> None:
    with client(server) as alice, client(server, BOB) as bob:
        sent = send(alice, to=["alice@example.test"], bcc=["bob@example.test"], subject="bcc",
                    text="secret copy")
        assert sorted(sent["delivered"]) == ["alice@example.test", "bob@example.test"]
        mid = next(m["id"] for m in bob.get("/v1/folders/INBOX/messages").json()["messages"]
                   if m["message_id_header"] == sent["message_id_header"])
        assert b"bob@example.test" not in bob.get(f"/v1/messages/{mid}/raw").content.split(
            b"\r\n\r\n")[0].replace(b"Delivered-To", b"")
        assert b"Bcc: bob@example.test" in alice.get(f"/v1/messages/{sent['id']}/raw").content


def test_reply_threads_and_marks_answered(server: ServerProcess) -> None:
    with client(server) as alice, client(server, BOB) as bob:
        first = send(alice, to="bob@example.test", subject="thread start", text="one")
        bob_copy = next(m for m in bob.get("/v1/folders/INBOX/messages").json()["messages"]
                        if m["message_id_header"] == first["message_id_header"])
        reply = send(bob, to="alice@example.test", subject="Re: thread start", text="two",
                     in_reply_to=bob_copy["id"])
        assert bob.get(f"/v1/messages/{bob_copy['id']}").json()["answered"] is True
        alice_reply = next(m for m in alice.get("/v1/folders/INBOX/messages").json()["messages"]
                           if m["message_id_header"] == reply["message_id_header"])
        alice_first = alice.get(f"/v1/messages/{first['id']}").json()
        assert alice_reply["thread_id"] == alice_first["thread_id"]
        detail = alice.get(f"/v1/messages/{alice_reply['id']}").json()
        assert detail["in_reply_to"] == first["message_id_header"]


def test_remote_recipients_go_to_the_outgoing_queue(server: ServerProcess) -> None:
    with client(server) as alice:
        sent = send(alice, to=["someone@elsewhere.example"], cc=["bob@example.test"],
                    subject="out", text="to the internet")
    assert sent["queued"] == ["someone@elsewhere.example"]
    assert sent["delivered"] == ["bob@example.test"]
    out = server.cli("queue", "list", "--topic", "outgoing").stdout
    assert "someone@elsewhere.example" in out


def test_flags_move_and_delete(server: ServerProcess) -> None:
    with client(server) as alice, client(server, BOB) as bob:
        sent = send(alice, to="bob@example.test", subject="organise me", text="x")
        mid = next(m["id"] for m in bob.get("/v1/folders/INBOX/messages").json()["messages"]
                   if m["message_id_header"] == sent["message_id_header"])
        r = bob.patch(f"/v1/messages/{mid}", json={"seen": True, "flagged": True})
        assert r.status_code == 200 and r.json()["seen"] and r.json()["flagged"]
        assert set(r.json()["flags"]) == {"\\Seen", "\\Flagged"}
        assert r.json()["modseq"] <= folders(bob)["INBOX"]["highestmodseq"]
        r = bob.patch(f"/v1/messages/{mid}", json={"flagged": False, "folder": "Archive"})
        assert r.status_code == 200, r.text
        moved = r.json()
        archive = folders(bob)["Archive"]
        assert moved["folder_id"] == archive["id"] and not moved["flagged"] and moved["seen"]
        # a move gives a uid (and modseq) of the target folder (RFC 6851)
        assert moved["uid"] == archive["uidnext"] - 1
        assert moved["modseq"] <= archive["highestmodseq"]
        assert bob.delete(f"/v1/messages/{moved['id']}").status_code == 204
        in_trash = bob.get(f"/v1/messages/{moved['id']}").json()
        assert in_trash["folder_id"] == folders(bob)["Trash"]["id"]
        assert bob.delete(f"/v1/messages/{moved['id']}").status_code == 204
        assert_error(bob.get(f"/v1/messages/{moved['id']}"), 404)
        assert_error(bob.patch(f"/v1/messages/{mid}", json={"folder": "Nowhere"}), 404)


def test_folder_management(server: ServerProcess) -> None:
    with client(server, BOB) as bob:
        r = bob.post("/v1/folders", json={"name": "Projects/2026/Q4"})
        assert r.status_code == 201, r.text
        assert r.json()["parent"] == "Projects/2026"
        names = folders(bob)
        assert {"Projects", "Projects/2026", "Projects/2026/Q4"} <= set(names)
        assert_error(bob.post("/v1/folders", json={"name": "Projects"}), 409, "conflict")
        assert_error(bob.post("/v1/folders", json={"name": "bad//name"}), 400)
        assert_error(bob.post("/v1/folders", json={"name": ""}), 400)
        fid = names["Projects"]["id"]
        r = bob.patch(f"/v1/folders/{fid}", json={"name": "Work"})
        assert r.status_code == 200 and r.json()["name"] == "Work"
        assert "Work/2026/Q4" in folders(bob)
        assert_error(bob.delete(f"/v1/folders/{fid}"), 409)
        assert_error(bob.delete(f"/v1/folders/{names['INBOX']['id']}"), 400)
        assert bob.delete("/v1/folders/Work/2026/Q4").status_code in (204, 404)
        q4 = folders(bob)["Work/2026/Q4"]["id"]
        assert bob.delete(f"/v1/folders/{q4}").status_code == 204
        assert "Work/2026/Q4" not in folders(bob)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'{"to": ["bob@example.test"], "unknown_field": 1}', "invalid_request"),
        (b'{"to": ["not an address"], "text": "x"}', "invalid_input"),
        (b'{"to": [], "text": "x"}', "invalid_input"),
        (b'{"to": ["ghost@example.test"], "text": "x"}', "invalid_input"),
        (b'{"to": ["bob@example.test"], "subject": "a\\r\\nBcc: x@y.z", "text": "x"}',
         "invalid_input"),
        (b'{"to": ["bob@example.test"], "attachments": [{"filename": "a", '
         b'"content_base64": "***"}]}', "invalid_input"),
        # past the recipients per message (smtp.max_recipients, 100), duplicates counted: the
        # header folding that composes the message grows with the square of the list, and
        # 100,000 of them held the event loop for minutes
        (json.dumps({"to": ["bob@example.test"] * 100_000, "text": "x"}).encode(),
         "invalid_input"),
        (json.dumps({"to": ["bob@example.test"] * 60, "cc": ["bob@example.test"] * 41,
                     "text": "x"}).encode(), "invalid_input"),
    ],
)
def test_bad_send_requests_store_nothing(server: ServerProcess, body: bytes, code: str) -> None:
    with client(server) as alice, client(server, BOB) as bob:
        sent_before = folders(alice)["Sent"]["total"]
        inbox_before = folders(bob)["INBOX"]["total"]
        r = alice.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400, code)
        assert folders(alice)["Sent"]["total"] == sent_before
        assert folders(bob)["INBOX"]["total"] == inbox_before


def test_draft_recipients_are_bounded(server: ServerProcess) -> None:
    """A draft's fields are free text: the addresses they list count against the same
    limit as a sent message's (the composing grows with the square of the list)."""
    with client(server) as alice:
        drafts_before = folders(alice)["Drafts"]["total"]
        many = ", ".join(f"u{i}@example.org" for i in range(45))  # one field's 998 octets
        assert_error(alice.post("/v1/drafts", json={"to": [many], "cc": [many], "bcc": [many],
                                                    "text": "x"}), 400, "invalid_input")
        assert_error(alice.post("/v1/drafts", json={"to": ["a" * 999], "text": "x"}), 400,
                     "invalid_request")
        assert folders(alice)["Drafts"]["total"] == drafts_before
        r = alice.post("/v1/drafts", json={"to": [many], "cc": ["bob@example.test"],
                                           "text": "x"})
        assert r.status_code == 201, r.text
        assert folders(alice)["Drafts"]["total"] == drafts_before + 1


def test_unknown_paths_and_folders(server: ServerProcess) -> None:
    with client(server) as c:
        assert_error(c.get("/v1/folders/no-such-folder/messages"), 404)
        assert_error(c.get("/v1/messages/01HZZZZZZZZZZZZZZZZZZZZZZZ"), 404)
        assert_error(c.get("/v1/nothing-here"), 404)
        assert_error(c.put("/v1/folders"), 405)


def test_cli_works_while_the_server_runs(server: ServerProcess) -> None:
    server.cli("user", "add", "carol@example.test", "--password", "carol-pass-1")
    assert "carol@example.test" in server.cli("user", "list").stdout
    with client(server, ("carol@example.test", "carol-pass-1")) as carol:
        assert "INBOX" in folders(carol)
    server.cli("user", "passwd", "carol@example.test", "--password", "carol-pass-2")
    with client(server, ("carol@example.test", "carol-pass-1")) as old:
        assert_error(old.get("/v1/folders"), 401)
    server.cli("alias", "add", "postmaster@example.test", "carol@example.test")
    with client(server) as alice:
        sent = send(alice, to="postmaster@example.test", subject="to the alias", text="hi")
    assert sent["delivered"] == ["postmaster@example.test"]
    with client(server, ("carol@example.test", "carol-pass-2")) as carol:
        subjects = [m["subject"] for m in
                    carol.get("/v1/folders/INBOX/messages").json()["messages"]]
        assert "to the alias" in subjects
    # operator errors are clear and leave things as they were
    r = server.cli("user", "add", "carol@example.test", "--password", "whatever-1", check=False)
    assert r.returncode != 0 and "already exists" in r.stderr
    r = server.cli("user", "add", "dave@unknown.test", "--password", "whatever-1", check=False)
    assert r.returncode != 0 and "not a local domain" in r.stderr
    r = server.cli("domain", "remove", "example.test", check=False)
    assert r.returncode != 0 and "users" in r.stderr
    server.cli("user", "remove", "carol@example.test")
    with client(server, ("carol@example.test", "carol-pass-2")) as gone:
        assert_error(gone.get("/v1/folders"), 401)
