"""The SQLite index's query plans (start from words, a folder or a size range; walk the dates
and probe FTS5 per row; gather every match) all give the answer a brute-force scan gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from postroom.core.models import Flag
from postroom.store import sqlite_search
from postroom.store.search import (
    And,
    DateRange,
    DocState,
    Filter,
    HasFlag,
    IndexDocument,
    InFolders,
    Not,
    Or,
    SizeRange,
    Words,
)
from postroom.store.sqlite_search import SqliteSearchIndex

USER, OTHER = "plan-user", "plan-other"
VOCAB = ["alpha", "beta", "gamma", "delta", "omega", "rare", "the"]
FOLDERS = ["inbox", "archive", "trash"]


def _docs(user: str, count: int, seed: int) -> list[tuple[IndexDocument, list[str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = ["the"] + [w for w in VOCAB[:5] if rng.random() < 0.4]
        if rng.random() < 0.02:
            words.append("rare")
        rng.shuffle(words)
        body = " ".join(words)
        state = DocState(f"{user}-{i:04d}", rng.choice(FOLDERS), i + 1,
                         int(Flag.SEEN) if rng.random() < 0.7 else 0, (),
                         1_700_000_000.0 + rng.randrange(0, 500) * 3600.0,  # dates repeat
                         rng.choice([500, 2_000, 50_000, 200_000 if rng.random() < 0.1 else 900]))
        doc = IndexDocument(user_id=user, state=state, blob_hash=f"b-{user}-{i}",
                            has_attachments=False, from_="", to="", cc="", bcc="",
                            subject="", body=body, filenames="", imap_headers="",
                            imap_body=body, partial=False)
        out.append((doc, words))
    return out


def _matches(node: Filter, doc: IndexDocument, words: list[str]) -> bool:
    if isinstance(node, Words):
        want = node.text.split()
        return any(words[i : i + len(want)] == want for i in range(len(words)))
    if isinstance(node, And):
        return all(_matches(c, doc, words) for c in node.children)
    if isinstance(node, Or):
        return any(_matches(c, doc, words) for c in node.children)
    if isinstance(node, Not):
        return not _matches(node.child, doc, words)
    if isinstance(node, InFolders):
        return doc.state.folder_id in node.folder_ids
    if isinstance(node, HasFlag):
        return bool(doc.state.sysflags & node.flag)
    if isinstance(node, SizeRange):
        return (node.larger is None or doc.state.size > node.larger) and \
            (node.smaller is None or doc.state.size < node.smaller)
    if isinstance(node, DateRange):
        return (node.since is None or doc.state.internal_date >= node.since) and \
            (node.until is None or doc.state.internal_date < node.until)
    raise TypeError(node)


HIDDEN = Not(InFolders(("trash",)))
QUERIES: list[Filter] = [
    And((Words("the"), HIDDEN)),
    And((Words("alpha beta"), HIDDEN)),
    And((Words("alpha"), Words("gamma"), HIDDEN)),
    And((Words("alpha"), Not(Words("beta")), HIDDEN)),
    And((Or((Words("rare"), Words("omega"))), HIDDEN)),
    And((Words("rare"), HIDDEN)),
    And((Words("the"), Words("rare"))),
    And((Words("the"), Not(HasFlag(int(Flag.SEEN))), SizeRange(larger=100_000))),
    And((SizeRange(larger=100_000), HIDDEN)),
    And((SizeRange(smaller=1_000), Not(HasFlag(int(Flag.SEEN))), HIDDEN)),
    And((Words("delta"), InFolders(("archive",)))),
    And((Words("beta"), DateRange(since=1_700_000_000.0 + 100 * 3600.0,
                                  until=1_700_000_000.0 + 300 * 3600.0), HIDDEN)),
    And((Or((Words("gamma"), HasFlag(int(Flag.SEEN)))), Words("omega"), HIDDEN)),
]


@pytest.mark.parametrize("caps", [
    (3000, 20000, 300),  # as shipped: these small sets start from their smallest side
    (5, 10, 300),  # common words: walk the dates and probe each row
    (5, 10, 40),  # a walk that gives up and leaves it to SQLite's plan
    (5, 100_000, 300),  # SQLite's plan
    (0, 0, 1),
])
async def test_every_plan_gives_the_brute_force_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caps: tuple[int, int, int]) -> None:
    for name, value in zip(("_DRIVE_CAP", "_DENSE_CAP", "_PROBE_CAP"), caps, strict=True):
        monkeypatch.setattr(sqlite_search, name, value)
    mine = _docs(USER, 500, 1)
    index = SqliteSearchIndex(str(tmp_path / "search.db"))
    await index.open()
    try:
        await index.index([d for d, _ in mine] + [d for d, _ in _docs(OTHER, 100, 2)])
        for query in QUERIES:
            expected = sorted(
                ((d.state.internal_date, d.state.message_id) for d, w in mine
                 if _matches(query, d, w)), reverse=True)
            ordered = [m for _, m in expected]
            for limit in (1, 7, 50, 1000):
                got = [h.message_id for h in await index.search(USER, query, limit=limit)]
                assert got == ordered[:limit], (query, limit)
            got = [h.message_id for h in await index.search(USER, query, limit=5, offset=3)]
            assert got == ordered[3:8], query
            if len(expected) > 10:
                cursor = expected[9]
                got = [h.message_id for h in await index.search(
                    USER, query, limit=6, before=cursor)]
                assert got == ordered[10:16], query
    finally:
        await index.close()
