"""The SearchIndex contract: every implementation answers these the same way.

Documents are built by hand here (the words and IMAP texts a document carries), so the suite
tests the index itself: filters, ordering, paging, user scoping, updates, copies, removal and
the substring narrowing IMAP SEARCH relies on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.core.models import Flag
from postroom.store.search import (
    MAX_IMAP_TEXT,
    AllOf,
    And,
    AnyOf,
    Contains,
    DateRange,
    DocState,
    HasAttachment,
    HasFlag,
    IndexDocument,
    InFolders,
    Not,
    Or,
    SearchIndex,
    SizeRange,
    Words,
)
from postroom.store.sqlite_search import SqliteSearchIndex

IndexFactory = Callable[[], SearchIndex]
U1, U2 = "user-one", "user-two"
DAY = 86400.0
T0 = 1_700_000_000.0


class ProcessWrittenIndex(SqliteSearchIndex):
    """The embedded index as `postroom serve` runs it: writes in a process of its own."""

    async def open(self) -> None:
        await super().open()
        await self.start_writer_process()


@pytest.fixture(params=["sqlite", "sqlite-writer-process", "postgres"])
def index_factory(request: pytest.FixtureRequest, tmp_path: Path) -> IndexFactory:
    if request.param == "sqlite":
        path = str(tmp_path / "search.db")
        return lambda: SqliteSearchIndex(path)
    if request.param == "sqlite-writer-process":
        path = str(tmp_path / "search.db")
        return lambda: ProcessWrittenIndex(path)
    if request.param == "postgres":
        from postroom.store.postgres_search import PostgresSearchIndex

        dsn: str = request.getfixturevalue("postgres_dsn")
        return lambda: PostgresSearchIndex(dsn, max_size=4)
    raise NotImplementedError(request.param)


@pytest_asyncio.fixture
async def index(index_factory: IndexFactory) -> AsyncIterator[SearchIndex]:
    idx = index_factory()
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


def doc(user: str, mid: str, *, folder: str = "inbox", uid: int = 1, flags: int = 0,
        date: float = T0, size: int = 1000, attach: bool = False, from_: str = "",
        to: str = "", cc: str = "", bcc: str = "", subject: str = "", body: str = "",
        filenames: str = "", imap_headers: str | None = None, imap_body: str | None = None,
        blob: str | None = None, partial: bool = False) -> IndexDocument:
    return IndexDocument(
        user_id=user,
        state=DocState(mid, folder, uid, flags, (), date, size),
        blob_hash=blob or f"blob-{user}-{mid}",
        has_attachments=attach,
        from_=from_, to=to, cc=cc, bcc=bcc, subject=subject, body=body, filenames=filenames,
        imap_headers=(imap_headers if imap_headers is not None
                      else f"from: {from_}\nsubject: {subject}".casefold()),
        imap_body=(imap_body if imap_body is not None else body.casefold()),
        partial=partial,
    )


MAILBOX = [
    doc(U1, "m1", uid=1, date=T0 + 1 * DAY, from_="Alice Doe <alice@example.org>",
        to="me@example.test", subject="Quarterly report", body="The numbers look good.",
        size=500),
    doc(U1, "m2", uid=2, date=T0 + 2 * DAY, from_="Bob <bob@example.net>",
        to="me@example.test", cc="alice@example.org", subject="Lunch on Friday?",
        body="Café at noon, then the résumé review.", flags=int(Flag.SEEN), size=5000),
    doc(U1, "m3", uid=3, date=T0 + 3 * DAY, from_="Carol <carol@example.com>",
        to="me@example.test", bcc="secret@example.test", subject="Invoice attached",
        body="Please find the invoice attached.", attach=True, filenames="invoice-2024.pdf",
        flags=int(Flag.FLAGGED), size=90_000),
    doc(U1, "m4", folder="archive", uid=1, date=T0 + 4 * DAY, from_="alice@example.org",
        subject="Old report", body="Quarterly numbers from last year", size=800),
    doc(U2, "x1", uid=1, date=T0 + 5 * DAY, from_="alice@example.org",
        subject="Quarterly report for user two", body="numbers numbers numbers"),
]


async def ids(index: SearchIndex, user: str, query: object, **kw: object) -> list[str]:
    hits = await index.search(user, query, **kw)  # type: ignore[arg-type]
    return [h.message_id for h in hits]


@pytest_asyncio.fixture
async def filled(index: SearchIndex) -> SearchIndex:
    await index.index(MAILBOX)
    return index


async def test_words_match_any_field_folding_case_and_diacritics(filled: SearchIndex) -> None:
    assert await ids(filled, U1, Words("quarterly")) == ["m4", "m1"]
    assert await ids(filled, U1, Words("CAFE")) == ["m2"]
    assert await ids(filled, U1, Words("resume")) == ["m2"]
    assert await ids(filled, U1, Words("invoice")) == ["m3"]  # subject, body and file name
    assert await ids(filled, U1, Words("nothing-like-this")) == []


async def test_field_terms_and_phrases(filled: SearchIndex) -> None:
    assert await ids(filled, U1, Words("alice", "from")) == ["m4", "m1"]
    assert await ids(filled, U1, Words("alice", "cc")) == ["m2"]
    assert await ids(filled, U1, Words("alice@example.org", "from")) == ["m4", "m1"]
    assert await ids(filled, U1, Words("secret", "bcc")) == ["m3"]
    assert await ids(filled, U1, Words("invoice-2024.pdf", "filename")) == ["m3"]
    assert await ids(filled, U1, Words("report", "subject")) == ["m4", "m1"]
    assert await ids(filled, U1, Words("numbers look")) == ["m1"]
    assert await ids(filled, U1, Words("look numbers")) == []
    assert await ids(filled, U1, Words("!!!")) == []


async def test_boolean_structure(filled: SearchIndex) -> None:
    both = And((Words("quarterly"), Words("report")))
    assert await ids(filled, U1, both) == ["m4", "m1"]
    assert await ids(filled, U1, And((Words("quarterly"), Not(Words("old"))))) == ["m1"]
    assert await ids(filled, U1, Or((Words("lunch"), Words("invoice")))) == ["m3", "m2"]
    assert await ids(filled, U1, Not(Words("report"))) == ["m3", "m2"]
    mixed = Or((Words("lunch"), HasFlag(int(Flag.FLAGGED))))
    assert await ids(filled, U1, mixed) == ["m3", "m2"]
    assert await ids(filled, U1, And()) == ["m4", "m3", "m2", "m1"]


async def test_state_filters(filled: SearchIndex) -> None:
    assert await ids(filled, U1, Not(HasFlag(int(Flag.SEEN)))) == ["m4", "m3", "m1"]
    assert await ids(filled, U1, HasFlag(int(Flag.FLAGGED))) == ["m3"]
    assert await ids(filled, U1, InFolders(("archive",))) == ["m4"]
    assert await ids(filled, U1, InFolders(())) == []
    assert await ids(filled, U1, HasAttachment()) == ["m3"]
    assert await ids(filled, U1, DateRange(since=T0 + 2 * DAY, until=T0 + 4 * DAY)) == \
        ["m3", "m2"]
    assert await ids(filled, U1, SizeRange(larger=800)) == ["m3", "m2"]
    assert await ids(filled, U1, SizeRange(smaller=800)) == ["m1"]


async def test_every_query_is_scoped_to_its_user(filled: SearchIndex) -> None:
    assert await ids(filled, U2, Words("quarterly")) == ["x1"]
    assert await ids(filled, U2, And()) == ["x1"]
    assert await ids(filled, "nobody", And()) == []
    assert "x1" not in await ids(filled, U1, Words("numbers"))
    narrowed = await filled.narrow(U1, "inbox", Contains("text", "quarterly"))
    assert narrowed.possible == {"m1"} and "x1" not in narrowed.indexed
    assert await filled.indexed_ids(U2) == {"x1"}


async def test_relevance_orders_by_bm25_then_date(filled: SearchIndex) -> None:
    hits = await filled.search(U1, Words("quarterly"), rank_terms=[Words("quarterly")],
                               sort="relevance")
    assert {h.message_id for h in hits} == {"m1", "m4"}
    assert hits[0].score <= hits[1].score < 0
    # a subject match outweighs a body match
    assert hits[0].message_id == "m1"


async def test_paging_by_date_and_by_offset(filled: SearchIndex) -> None:
    everything = await filled.search(U1, And(), limit=10)
    first = await filled.search(U1, And(), limit=2)
    last = first[-1]
    rest = await filled.search(U1, And(), limit=10, before=(last.internal_date, last.message_id))
    assert [h.message_id for h in first + rest] == [h.message_id for h in everything]
    page2 = await filled.search(U1, Words("quarterly"), rank_terms=[Words("quarterly")],
                                sort="relevance", limit=1, offset=1)
    assert [h.message_id for h in page2] == ["m4"]


async def test_hits_carry_the_body_for_snippets(filled: SearchIndex) -> None:
    (hit,) = await filled.search(U1, Words("lunch"))
    assert hit.body == "Café at noon, then the résumé review."


async def test_flag_changes_and_moves_show_at_once(filled: SearchIndex) -> None:
    await filled.update(U1, [DocState("m1", "archive", 9, int(Flag.SEEN), ("$work",), T0 + DAY,
                                      500)])
    assert await ids(filled, U1, InFolders(("archive",))) == ["m4", "m1"]
    assert "m1" not in await ids(filled, U1, Not(HasFlag(int(Flag.SEEN))))
    assert (await filled.narrow(U1, "inbox", Contains("text", "quarterly"))).possible == set()
    assert (await filled.narrow(U1, "archive", Contains("headers", "quarterly"))).possible == \
        {"m1"}


async def test_remove_and_reindex_replace(filled: SearchIndex) -> None:
    await filled.remove(U1, ["m1", "not-there"])
    assert await ids(filled, U1, Words("quarterly")) == ["m4"]
    assert "m1" not in await filled.indexed_ids(U1)
    # indexing an id again replaces its document
    await filled.index([doc(U1, "m2", subject="Dinner instead", body="changed")])
    assert await ids(filled, U1, Words("lunch")) == []
    assert await ids(filled, U1, Words("dinner")) == ["m2"]
    await filled.remove_user(U1)
    assert await filled.indexed_ids(U1) == set()
    assert await ids(filled, U2, Words("quarterly")) == ["x1"]


async def test_copy_duplicates_the_text_of_the_same_blob(filled: SearchIndex) -> None:
    assert await filled.copy(U1, "blob-user-one-m2", DocState("m2c", "archive", 5, 0, (), T0,
                                                              5000))
    assert set(await ids(filled, U1, Words("lunch"))) == {"m2", "m2c"}
    assert await ids(filled, U1, And((Words("lunch"), InFolders(("archive",))))) == ["m2c"]
    # another user's blob is not theirs to copy from
    assert not await filled.copy(U2, "blob-user-one-m2", DocState("y", "inbox", 1, 0, (), T0, 1))


async def test_narrowing_is_a_substring_superset(index: SearchIndex) -> None:
    await index.index([
        doc(U1, "a", imap_headers="subject: hello world\nfrom: ann <ann@x.org>",
            imap_body="the quick brown fox\njumps over"),
        doc(U1, "b", imap_headers="subject: other\nfrom: bob <bob@y.org>",
            imap_body="lazy dog; hello there"),
        doc(U1, "c", imap_headers="subject: huge", imap_body="", partial=True),
    ])

    async def possible(c: object) -> set[str]:
        return set((await index.narrow(U1, "inbox", c)).possible)  # type: ignore[arg-type]

    assert await possible(Contains("body", "uick bro")) == {"a", "c"}
    assert await possible(Contains("headers", "ann@x")) == {"a", "c"}
    assert await possible(Contains("text", "hello")) == {"a", "b", "c"}
    assert await possible(Contains("body", "hello")) == {"b", "c"}
    assert await possible(Contains("body", "fox\njumps")) == {"a", "c"}  # across a line
    assert await possible(Contains("body", "zzzzz")) == {"c"}
    assert await possible(Contains("body", "ox")) == {"a", "b", "c"}  # too short to narrow
    assert await possible(AllOf((Contains("body", "quick"), Contains("headers", "bob")))) \
        == {"c"}
    assert await possible(AnyOf((Contains("body", "quick"), Contains("headers", "bob")))) \
        == {"a", "b", "c"}
    assert await possible(AnyOf((Contains("body", "quick"), Contains("body", "x")))) \
        == {"a", "b", "c"}
    assert await possible(Contains("body", 'say "hi"')) == {"c"}  # quotes are literal
    narrowed = await index.narrow(U1, "inbox", AllOf())
    assert narrowed.possible == narrowed.indexed == {"a", "b", "c"}


async def test_long_texts_are_cut_and_marked_partial(index: SearchIndex) -> None:
    tail = "needle-at-the-end"
    await index.index([doc(U1, "big", imap_body="x" * MAX_IMAP_TEXT + tail)])
    # the text beyond the cut is not indexed, so the document must stay a candidate
    assert (await index.narrow(U1, "inbox", Contains("body", tail))).possible == {"big"}


async def test_undecodable_text_is_stored(index: SearchIndex) -> None:
    await index.index([doc(U1, "s", subject="bad \udce9 byte", body="caf\udce9 ok",
                           imap_body="caf\udce9 ok")])
    assert await ids(index, U1, Words("ok")) == ["s"]
    assert (await index.narrow(U1, "inbox", Contains("body", "ok"))).possible == {"s"}


async def test_a_second_instance_sees_the_same_index(index_factory: IndexFactory,
                                                      index: SearchIndex) -> None:
    await index.index(MAILBOX[:2])
    other = index_factory()
    await other.open()
    try:
        assert await ids(other, U1, Words("lunch")) == ["m2"]
        await other.index([doc(U1, "z", subject="from the other process")])
    finally:
        await other.close()
    assert await ids(index, U1, Words("process")) == ["z"]


async def test_phrases_stay_within_one_field_and_fields_stay_apart(index: SearchIndex) -> None:
    await index.index([doc(U1, "f", from_="Zed Quill", subject="orange kiwi",
                           body="plain words here")])
    assert await ids(index, U1, Words("quill orange")) == []  # across from and subject
    assert await ids(index, U1, Words("orange kiwi", "subject")) == ["f"]
    assert await ids(index, U1, Words("orange", "from")) == []
    assert await ids(index, U1, Words("plain words", "body")) == ["f"]
    assert await ids(index, U1, Words("orange", "body")) == []


async def test_one_batch_with_several_users_and_a_repeated_message(index: SearchIndex) -> None:
    await index.index([doc(U1, "a", subject="first apple"), doc(U2, "a", subject="pear"),
                       doc(U1, "b", subject="banana"), doc(U1, "a", subject="second apple")])
    assert await ids(index, U1, Words("apple")) == ["a"]
    assert await ids(index, U1, Words("first")) == []  # the later copy of "a" won
    assert await ids(index, U1, Words("banana")) == ["b"]
    assert await ids(index, U2, Words("pear")) == ["a"]
    assert await ids(index, U2, Words("banana")) == []
    assert await index.indexed_ids(U1) == {"a", "b"}


async def test_long_bodies_odd_characters_and_long_tokens(index: SearchIndex) -> None:
    body = " ".join(f"w{i}" for i in range(30_000)) + " zebra\x00crossing " + "q" * 3000
    await index.index([doc(U1, "long", body=body, imap_body=body.casefold())])
    assert await ids(index, U1, Words("w29999")) == ["long"]
    assert await ids(index, U1, Words("zebra")) == ["long"]
    assert (await index.narrow(U1, "inbox", Contains("body", "w29999 zeb"))).possible \
        == {"long"}


async def test_writes_outlive_their_writer_process(tmp_path: Path) -> None:
    """The writer process killed: the write in flight and those after it are made all the
    same (here, then by a new process), and nothing is written twice."""
    index = ProcessWrittenIndex(str(tmp_path / "search.db"))
    await index.open()
    try:
        await index.index([doc(U1, "m1", uid=1, body="alpha")])
        assert index._process is not None
        (worker,) = index._process._workers
        first = worker.process.pid
        assert first is not None and first != os.getpid()
        os.kill(first, signal.SIGKILL)
        await index.index([doc(U1, "m2", uid=2, body="beta")])
        await index.remove(U1, ["m1"])
        await index.update(U1, [DocState("m2", "inbox", 2, int(Flag.SEEN), (), T0, 1000)])
        assert await index.indexed_ids(U1) == {"m2"}
        (worker,) = index._process._workers
        assert worker.process.pid not in (None, first)
        hits = await index.search(U1, And((Words("beta"), HasFlag(Flag.SEEN))))
        assert [h.message_id for h in hits] == ["m2"]
    finally:
        await index.close()


@pytest.mark.parametrize("kind", [SqliteSearchIndex, ProcessWrittenIndex])
async def test_a_batch_of_writes_is_one_transaction(tmp_path: Path,
                                                    kind: type[SqliteSearchIndex]) -> None:
    """The embedded index's write_batch (the IMAP write queue's flush): writes of several
    kinds and users in order, all made, or none when one fails."""
    index = kind(str(tmp_path / "search.db"))
    await index.open()
    try:
        await index.index([doc(U1, "old", uid=1, body="gone soon")])
        await index.write_batch([
            ("index", "", [doc(U1, "a", uid=2, body="apple"), doc(U2, "b", uid=1, body="pear")]),
            ("update", U1, [DocState("a", "inbox", 2, int(Flag.SEEN), (), T0, 1000)]),
            ("remove", U1, ["old"]),
        ])
        assert await index.indexed_ids(U1) == {"a"}
        assert await index.indexed_ids(U2) == {"b"}
        seen = await index.search(U1, And((Words("apple"), HasFlag(Flag.SEEN))))
        assert [h.message_id for h in seen] == ["a"]
        with pytest.raises(ValueError):
            await index.write_batch([("index", "", [doc(U2, "c", uid=2, body="plum")]),
                                     ("rename", U2, [])])
        assert await index.indexed_ids(U2) == {"b"}  # the batch's first write undone too
    finally:
        await index.close()


async def test_without_a_writer_process_the_thread_writes(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No process to be had (a process limit): `serve` goes on, the writer thread writing."""
    from postroom.store.workers import WorkerPool

    async def refuse(self: WorkerPool) -> None:
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(WorkerPool, "start", refuse)
    index = ProcessWrittenIndex(str(tmp_path / "search.db"))
    await index.open()
    try:
        assert index._process is None
        await index.index([doc(U1, "m1", uid=1, body="alpha")])
        assert await index.indexed_ids(U1) == {"m1"}
    finally:
        await index.close()
