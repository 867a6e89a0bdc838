"""Two `postroom serve` nodes sharing the scale-out engines: PostgreSQL (metadata), S3
(SeaweedFS, blobs), NATS JetStream (queues) and Redis (cache and events).

Node A runs every role; node B runs `--roles http,imap,pop3,workers` (no SMTP). Mail taken in
over SMTP by A is listed over the API on B, wakes an IMAP IDLE on B, reaches a push (WebSocket)
client on B, and when A is killed with
SIGKILL in the middle of a stream of messages, nothing it answered 250 for is lost: B's workers
drain the queue (items A had taken come back when their lease runs out).
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import PASSWORD_A
from tests.e2e.imap_helpers import RawImap, idle_wakes, quote
from tests.e2e.server import ServerProcess, message_to, running_nodes
from tests.engines import S3Server, require_nats, require_redis, unique_name
from tests.pgtest import open_test_database, run_in_thread

ALICE = "alice@example.test"


@dataclass
class Cluster:
    node_a: ServerProcess
    node_b: ServerProcess
    env: dict[str, str]


def _all_subjects(node: ServerProcess) -> list[str]:
    """Every message subject in alice's mailbox (all folders: the spam filter may file some
    elsewhere), through node's REST API."""
    out: list[str] = []
    with httpx.Client(base_url=node.base_url, auth=(ALICE, PASSWORD_A), timeout=30) as api:
        r = api.get("/v1/folders")
        assert r.status_code == 200, r.text
        for folder in r.json()["folders"]:
            cursor: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 500}
                if cursor:
                    params["cursor"] = cursor
                page = api.get(f"/v1/folders/{folder['id']}/messages", params=params)
                assert page.status_code == 200, page.text
                body = page.json()
                out.extend(m["subject"] for m in body["messages"])
                cursor = body["next_cursor"]
                if not cursor:
                    break
    return out


def _wait_for(node: ServerProcess, wanted: set[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        subjects = _all_subjects(node)
        if wanted <= set(subjects) or time.monotonic() > deadline:
            return subjects
        time.sleep(0.25)


def _cleanup_engines(prefix: str) -> None:
    import nats
    from redis.asyncio import Redis

    async def go() -> None:
        nc = await nats.connect(require_nats())
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                if info.config.name and info.config.name.startswith(prefix + "_"):
                    await js.delete_stream(info.config.name)
        finally:
            await nc.close()
        client = Redis.from_url(require_redis())
        try:
            keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    run_in_thread(go)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Cluster]:
    nats_url, redis_url = require_nats(), require_redis()
    db, why = open_test_database()
    if db is None:
        pytest.skip(why)
    prefix = unique_name("s")
    base: Path = tmp_path_factory.mktemp("scaleout")
    env = {
        **s3_server.env(),
        "POSTROOM_STORAGE__METADATA": db.dsn,
        "POSTROOM_STORAGE__BLOBS": s3_server.url(prefix.lower()),
        # A short ack_wait: a message node A had pulled but not yet leased when it died comes
        # back within seconds.
        "POSTROOM_STORAGE__QUEUE": f"{nats_url}?stream_prefix={prefix}&ack_wait=5",
        "POSTROOM_STORAGE__CACHE": f"{redis_url}?prefix={prefix}:",
        "POSTROOM_STORAGE__EVENTS": f"{redis_url}?prefix={prefix}:",
    }
    node_a = ServerProcess(base / "a", env=env)
    node_b = ServerProcess(base / "b", env=env, extra_args=["--roles", "http,imap,pop3,workers"])
    try:
        with running_nodes(node_a, node_b, user=ALICE, password=PASSWORD_A):
            yield Cluster(node_a, node_b, env)
    finally:
        try:
            _cleanup_engines(prefix)
        finally:
            db.drop()


def test_node_b_runs_only_its_roles(cluster: Cluster) -> None:
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", cluster.node_b.smtp_port, timeout=5)
    with smtplib.SMTP("127.0.0.1", cluster.node_a.smtp_port, timeout=30) as smtp:
        assert smtp.noop()[0] == 250


def test_mail_taken_by_a_is_listed_by_b(cluster: Cluster) -> None:
    subject = f"cross-node {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", cluster.node_a.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [ALICE], message_to(ALICE, subject))
    subjects = _wait_for(cluster.node_b, {subject}, timeout=30)
    assert subjects.count(subject) == 1
    # The raw bytes come from the shared blob store, whichever node serves them.
    with httpx.Client(base_url=cluster.node_b.base_url, auth=(ALICE, PASSWORD_A),
                      timeout=30) as api:
        inbox = api.get("/v1/folders/INBOX/messages", params={"limit": 500}).json()["messages"]
        found = [m for m in inbox if m["subject"] == subject]
        assert found, "filed outside the INBOX"
        raw = api.get(f"/v1/messages/{found[0]['id']}/raw")
        assert raw.status_code == 200
        assert raw.content.endswith(f"Body of {subject}.\r\n".encode())


def test_idle_on_b_wakes_for_mail_taken_by_a(cluster: Cluster) -> None:
    def send() -> None:
        with smtplib.SMTP("127.0.0.1", cluster.node_a.smtp_port, timeout=30) as smtp:
            smtp.sendmail("carol@example.org", [ALICE],
                          message_to(ALICE, f"idle {uuid.uuid4().hex[:8]}"))

    # another test's mail may land too: what matters is that B's IDLE woke with a new count
    idle_wakes(cluster.node_b.imap_port, ALICE, PASSWORD_A, send, exact=False)


def test_store_and_move_on_a_are_listed_by_b_at_once(cluster: Cluster) -> None:
    """Node B's API caches listings in the shared Redis; a STORE or MOVE over IMAP on node A
    must show in B's very next listing, with no waiting."""
    subject = f"flags {uuid.uuid4().hex[:8]}"
    with smtplib.SMTP("127.0.0.1", cluster.node_a.smtp_port, timeout=30) as smtp:
        smtp.sendmail("carol@example.org", [ALICE], message_to(ALICE, subject))
    _wait_for(cluster.node_b, {subject}, timeout=30)
    with httpx.Client(base_url=cluster.node_b.base_url, auth=(ALICE, PASSWORD_A),
                      timeout=30) as api:
        def listed() -> dict[str, Any]:
            page = api.get("/v1/folders/INBOX/messages", params={"limit": 50})
            assert page.status_code == 200, page.text
            return {m["subject"]: m for m in page.json()["messages"]}

        found = listed()
        if subject not in found:
            pytest.skip("the spam filter filed the message outside the INBOX")
        assert "\\Seen" not in found[subject]["flags"]
        raw = RawImap(cluster.node_a.imap_port)
        raw.ok(f"LOGIN {quote(ALICE)} {quote(PASSWORD_A)}")
        raw.ok("SELECT INBOX")
        search = raw.ok(f"UID SEARCH SUBJECT {quote(subject)}")
        uid = next(u for u in search if u.startswith(b"* SEARCH")).split()[-1].decode()
        for _ in range(3):  # each round: B has the listing cached, A changes it, B lists
            listed()
            raw.ok(f"UID STORE {uid} +FLAGS (\\Seen \\Flagged)")
            assert set(listed()[subject]["flags"]) >= {"\\Seen", "\\Flagged"}
            raw.ok(f"UID STORE {uid} -FLAGS (\\Seen \\Flagged)")
            assert not {"\\Seen", "\\Flagged"} & set(listed()[subject]["flags"])
        raw.ok(f"UID MOVE {uid} Archive")
        assert subject not in listed()
        archive = api.get("/v1/folders/Archive/messages", params={"limit": 50}).json()
        assert subject in [m["subject"] for m in archive["messages"]]
        raw.ok("LOGOUT")


def test_push_on_b_hears_of_changes_made_on_a(cluster: Cluster) -> None:
    """A webmail page connected to node B gets `message.new` for mail taken in by A, and the
    `message.flags` of a change made through A's API: the push channel rides the event bus."""
    from websockets.sync.client import connect

    node_a, node_b = cluster.node_a, cluster.node_b
    token = httpx.post(f"{node_b.base_url}/v1/auth/token", auth=(ALICE, PASSWORD_A),
                       timeout=30).json()["token"]
    url = f"ws://127.0.0.1:{node_b.http_port}/v1/events"
    subject = f"pushed across {uuid.uuid4().hex[:6]}"

    def frames_until(ws: Any, want: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no such frame on node B"
            frame: dict[str, Any] = json.loads(ws.recv(timeout=remaining))
            if want(frame):
                return frame

    with connect(url, subprotocols=["postroom.v1", f"bearer.{token}"]) as ws:  # type: ignore[list-item]
        frames_until(ws, lambda f: f["type"] == "ready")
        with smtplib.SMTP("127.0.0.1", node_a.smtp_port, timeout=30) as smtp:
            smtp.sendmail("carol@example.org", [ALICE], message_to(ALICE, subject))
        new = frames_until(ws, lambda f: f["type"] == "message.new"
                           and (f.get("message") or {}).get("subject") == subject)
        with httpx.Client(base_url=node_a.base_url, auth=(ALICE, PASSWORD_A),
                          timeout=30) as api_a:
            r = api_a.patch(f"/v1/messages/{new['message_id']}", json={"flagged": True})
            assert r.status_code == 200, r.text
        flags = frames_until(ws, lambda f: f["type"] == "message.flags"
                             and f["message_id"] == new["message_id"])
        assert flags["flagged"] is True


def test_killing_node_a_mid_stream_loses_nothing_acknowledged(cluster: Cluster) -> None:
    """Senders stream messages into A; A is SIGKILLed after a while. Every message that got
    250 must reach the mailbox exactly once, through B's workers."""
    run = uuid.uuid4().hex[:6]
    acknowledged: list[str] = []
    lock = threading.Lock()
    kill_after = 40

    def sender(worker: int) -> None:
        try:
            smtp = smtplib.SMTP("127.0.0.1", cluster.node_a.smtp_port, timeout=30)
        except OSError:
            return
        try:
            for n in range(500):
                subject = f"stream {run} {worker}-{n}"
                smtp.sendmail("carol@example.org", [ALICE], message_to(ALICE, subject))
                with lock:  # sendmail returned: A answered 250
                    acknowledged.append(subject)
        except (smtplib.SMTPException, OSError):
            return  # A is gone: what was not acknowledged may or may not have arrived
        finally:
            try:
                smtp.close()
            except OSError:
                pass

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            if len(acknowledged) >= kill_after:
                break
        time.sleep(0.01)
    proc = cluster.node_a.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown: workers, leases, connections just vanish
    proc.wait(30)
    for thread in threads:
        thread.join(60)
    with lock:
        wanted = set(acknowledged)
    assert len(wanted) >= kill_after
    # Items A had leased come back when their lease (10 s) runs out; ones it had pulled but not
    # yet leased when their ack_wait (5 s) does.
    subjects = _wait_for(cluster.node_b, wanted, timeout=120)
    stream = [s for s in subjects if s.startswith(f"stream {run} ")]
    missing = wanted - set(stream)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
    duplicates = {s for s in stream if stream.count(s) > 1}
    assert not duplicates, f"delivered twice: {sorted(duplicates)[:5]}"

