"""The push channel GET /v1/events over a real WebSocket against a real `postroom serve`:
authentication, each event type, folder counts, and reconnecting with the last event id."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.server import ServerProcess

ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base: Path = tmp_path_factory.mktemp("events")
    srv = ServerProcess(base / "data")
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", ALICE, "--password", PASSWORD_A)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token(server: ServerProcess) -> str:
    r = httpx.post(f"{server.base_url}/v1/auth/token", auth=(ALICE, PASSWORD_A), timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def api(server: ServerProcess, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=30,
                        headers={"Authorization": f"Bearer {token}"})


def ws_url(server: ServerProcess, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"ws://127.0.0.1:{server.http_port}/v1/events" + (f"?{query}" if query else "")


def deliver(server: ServerProcess, subject: str) -> None:
    raw = (f"From: Carol <carol@example.org>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nHello from Carol.\r\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [ALICE], raw.encode())


async def frames_until(ws: ClientConnection, want: Any, within: float = 15
                       ) -> list[dict[str, Any]]:
    """Frames received until one satisfies `want` (that one included)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; got {out!r}")
        frame = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        out.append(frame)
        if want(frame):
            return out


def is_new(subject: str) -> Any:
    return lambda f: f["type"] == "message.new" and (f.get("message") or {}).get(
        "subject") == subject


async def open_ws(server: ServerProcess, token: str, **params: str) -> ClientConnection:
    ws = await connect(ws_url(server, **params),
                       subprotocols=["postroom.v1", f"bearer.{token}"])  # type: ignore[list-item]
    assert ws.subprotocol == "postroom.v1"
    return ws


async def test_token_required(server: ServerProcess, token: str) -> None:
    for kwargs in ({}, {"subprotocols": ["postroom.v1", "bearer.pr_wrong"]}):
        async with connect(ws_url(server), **kwargs) as ws:  # type: ignore[arg-type]
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    # The query parameter works too (for clients that cannot set a subprotocol).
    async with connect(ws_url(server, access_token=token)) as ws:
        frames = await frames_until(ws, lambda f: f["type"] == "ready")
        assert frames[-1]["id"]


async def test_events_of_every_kind(server: ServerProcess, token: str) -> None:
    ws = await open_ws(server, token)
    try:
        await frames_until(ws, lambda f: f["type"] == "ready")
        subject = f"push {uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        await asyncio.to_thread(deliver, server, subject)
        frames = await frames_until(ws, is_new(subject))
        latency = time.monotonic() - started
        new = frames[-1]
        summary = new["message"]
        assert summary["from"].startswith("Carol") and summary["snippet"].startswith("Hello")
        assert new["id"] and new["message_id"] == summary["id"] and not summary["seen"]
        # Generous under load; bench/push.py measures the real figure.
        assert latency < 5, latency
        counts = await frames_until(ws, lambda f: f["type"] == "folder.counts")
        inbox = next(f for f in counts[-1]["folders"] if f["role"] == "inbox")
        assert inbox["unread"] >= 1

        with api(server, token) as c:
            assert c.patch(f"/v1/messages/{new['message_id']}",
                           json={"seen": True, "flagged": True}).status_code == 200
            flags = await frames_until(ws, lambda f: f["type"] == "message.flags")
            assert flags[-1]["seen"] and flags[-1]["flagged"]
            assert c.patch(f"/v1/messages/{new['message_id']}",
                           json={"folder": "Archive"}).status_code == 200
            moved = (await frames_until(ws, lambda f: f["type"] == "message.moved"))[-1]
            assert moved["from_folder_id"] == new["folder_id"]
            assert moved["message_id"] == new["message_id"]
            assert c.delete(f"/v1/messages/{new['message_id']}").status_code == 204  # to Trash
            assert c.delete(f"/v1/messages/{new['message_id']}").status_code == 204  # gone
            await frames_until(ws, lambda f: f["type"] == "message.deleted"
                               and f["message_id"] == new["message_id"])
    finally:
        await ws.close()


async def test_reconnect_with_last_id_misses_nothing(server: ServerProcess, token: str) -> None:
    ws = await open_ws(server, token)
    last = (await frames_until(ws, lambda f: f["type"] == "ready"))[-1]["id"]
    subject = f"before {uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(deliver, server, subject)
    frames = await frames_until(ws, is_new(subject))
    last = frames[-1]["id"]
    await ws.close()

    # While the page is away: three messages arrive and one is starred.
    missed = [f"missed {n} {uuid.uuid4().hex[:6]}" for n in range(3)]
    for subject in missed:
        await asyncio.to_thread(deliver, server, subject)
    with api(server, token) as c:
        inbox = c.get("/v1/folders/INBOX/messages", params={"limit": 10}).json()["messages"]
        starred = next(m for m in inbox if m["subject"] == missed[1])
        assert c.patch(f"/v1/messages/{starred['id']}", json={"flagged": True}).status_code == 200

    ws = await open_ws(server, token, last_event_id=last)
    try:
        frames = await frames_until(ws, lambda f: f["type"] == "ready")
        events = [f for f in frames if f["type"] not in ("ready", "folder.counts", "heartbeat")]
        assert [f["type"] for f in events] == ["message.new"] * 3 + ["message.flags"], events
        assert [f["message"]["subject"] for f in events[:3]] == missed
        assert events[3]["message_id"] == starred["id"] and events[3]["flagged"]
        assert frames[-1]["id"] == events[-1]["id"]
        # Ids are unique, and replaying from the newest id gives nothing more.
        assert len({f["id"] for f in events}) == 4
    finally:
        await ws.close()
    ws = await open_ws(server, token, last_event_id=events[-1]["id"])
    try:
        frames = await frames_until(ws, lambda f: f["type"] == "ready")
        assert [f["type"] for f in frames] == ["ready"]
    finally:
        await ws.close()


async def test_unknown_last_id_asks_for_resync(server: ServerProcess, token: str) -> None:
    ws = await open_ws(server, token, last_event_id="0123456789abcdef01234567")
    try:
        frames = await frames_until(ws, lambda f: f["type"] == "ready")
        assert frames[0]["type"] == "resync" and frames[0]["id"] == frames[-1]["id"]
    finally:
        await ws.close()


async def test_heartbeats_and_ping(server: ServerProcess, token: str) -> None:
    ws = await open_ws(server, token, heartbeat="1")
    try:
        ready = (await frames_until(ws, lambda f: f["type"] == "ready"))[-1]
        assert ready["heartbeat"] == 1
        await frames_until(ws, lambda f: f["type"] == "heartbeat", within=10)
        await ws.send("ping")
        await frames_until(ws, lambda f: f["type"] == "pong")
    finally:
        await ws.close()
