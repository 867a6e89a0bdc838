"""Outbound abuse: spammy content and bursts from one user are held for the admin, and
`postroom queue held|release|delete` lists, sends on or drops them (real SQLite backends)."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from postroom.app import Postroom
from postroom.cli import manage_queue
from postroom.config import load_settings
from postroom.core.message import parse_message
from postroom.core.models import Envelope, User
from postroom.service import Draft, ServiceError
from postroom.spam.classifier import ContentClassifier
from postroom.store.queue import HELD, OUTGOING
from tests.corpus import messages

HOLD_SCORE = 6.0
REMOTE = "someone@remote.example"


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Postroom]:
    settings = load_settings(None, data_dir=str(tmp_path / "data"), hostname="mx.example.test")
    settings.spam.hold_score = HOLD_SCORE
    settings.spam.burst_messages = 3
    settings.spam.burst_minutes = 5
    settings.spam.check_auth = False
    async with Postroom(settings) as n:
        await n.service.add_domain("example.test")
        yield n


@pytest_asyncio.fixture
async def alice(node: Postroom) -> User:
    return await node.service.add_user("alice@example.test", "alice-secret-1")


def spammy(sender: str) -> bytes:
    """A corpus spam, sent as `sender`, that the shipped model scores well above HOLD_SCORE."""
    classifier = ContentClassifier.default()
    for _, raw in messages("spam-2", limit=200):
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        lines = [line for line in head.split(b"\n")
                 if not line.lower().startswith((b"from:", b"received:", b"\t", b" "))]
        mine = b"\r\n".join([f"From: {sender}".encode(), *lines]) + b"\r\n\r\n" \
            + body.replace(b"\n", b"\r\n")
        if classifier.score(parse_message(mine)).logit >= HOLD_SCORE + 2:
            return mine
    raise AssertionError("no corpus spam scores high enough")


async def cli(node: Postroom, capsys: pytest.CaptureFixture[str], action: str,
              **kw: Any) -> str:
    args = argparse.Namespace(action=action, json=kw.pop("json", False), **kw)
    assert await manage_queue(args, node) == 0
    return capsys.readouterr().out


async def test_spammy_submission_is_held_then_released(
        node: Postroom, alice: User, capsys: pytest.CaptureFixture[str]) -> None:
    raw = spammy(alice.address)
    result = await node.service.submit(alice, Envelope(alice.address, (REMOTE,)), raw)
    assert result.held.startswith("content score") and result.queue_item
    assert [i.item_id for i in await node.queue.list(HELD)] == [result.queue_item]
    assert await node.queue.list(OUTGOING) == []
    listed = json.loads(await cli(node, capsys, "held", json=True))
    assert listed[0]["id"] == result.queue_item and listed[0]["to"] == [REMOTE]
    assert listed[0]["held"].startswith("content score")

    out = await cli(node, capsys, "release", id=result.queue_item)
    assert "released" in out
    assert await node.queue.list(HELD) == []
    released = [i for i in await node.queue.list(OUTGOING) if i.item_id == result.queue_item]
    assert released and "held" not in json.loads(released[0].payload)
    with pytest.raises(ServiceError):
        await cli(node, capsys, "release", id=result.queue_item)


async def test_ordinary_mail_goes_out_and_a_burst_is_held(
        node: Postroom, alice: User, capsys: pytest.CaptureFixture[str]) -> None:
    results = [await node.service.send(alice, Draft(to=(REMOTE,), subject=f"notes {n}",
                                                    text="The minutes from today's meeting."))
               for n in range(4)]
    assert [r.held for r in results[:3]] == ["", "", ""]  # API mail is scored, and passes
    assert results[3].held.startswith("burst: 4 messages")
    held = await node.queue.list(HELD)
    assert [i.item_id for i in held] == [results[3].queue_item]
    assert "1 held item(s)" in await cli(node, capsys, "held")
    assert "deleted" in await cli(node, capsys, "delete", id=results[3].queue_item)
    assert await node.queue.list(HELD) == []
