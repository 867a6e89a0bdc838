"""Search through MailService over the real embedded backends: every operator of the query
language against a small hand-built mailbox whose answers are known, index upkeep on every
change, user isolation, malformed queries, import and reindex."""

from __future__ import annotations

import asyncio
import contextlib
import mailbox
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.app import Postroom
from postroom.core.models import Envelope, User
from postroom.imap.parser import Cursor, RawCommand
from postroom.imap.search import parse_program
from postroom.search.imap import criterion
from postroom.search.indexer import Indexer
from postroom.search.reindex import read_maildir, read_mbox, reindex_user
from postroom.service import BadQuery, InvalidInput, MailService
from postroom.store.search import IndexDocument

NOW = time.time()
DAY = 86400.0


def raw(subject: str, *, sender: str = "Carol <carol@example.org>", to: str = "alice@example.test",
        cc: str = "", bcc: str = "", body: str = "Nothing much.", html: str = "",
        attachment: str = "", date: float = NOW) -> bytes:
    head = (f"From: {sender}\r\nTo: {to}\r\n" + (f"Cc: {cc}\r\n" if cc else "")
            + (f"Bcc: {bcc}\r\n" if bcc else "") + f"Subject: {subject}\r\n"
            + f"Date: {format_datetime(datetime.fromtimestamp(date, UTC))}\r\n"
            + f"Message-ID: <{abs(hash((subject, date)))}@example.org>\r\nMIME-Version: 1.0\r\n")
    if attachment:
        return (head + 'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
                "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n--b1\r\n"
                f'Content-Type: application/pdf; name="{attachment}"\r\n'
                f'Content-Disposition: attachment; filename="{attachment}"\r\n'
                "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n").encode()
    if html:
        return (head + "Content-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n").encode()
    return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n").encode()


@pytest_asyncio.fixture
async def alice(node: Postroom) -> User:
    return await node.service.add_user("alice@example.test", "alice-secret-1")


@pytest_asyncio.fixture
async def mailbox_ids(node: Postroom, alice: User) -> dict[str, str]:
    """The hand-built mailbox: name -> message id."""
    s = node.service
    ids: dict[str, str] = {}

    async def put(name: str, data: bytes, folder: str = "INBOX", flags: tuple[str, ...] = (),
                  received: float | None = None) -> None:
        record = await s.append(alice, folder, data, list(flags), received)
        ids[name] = record.message_id

    await s.create_folder(alice, "Projects/Apollo")
    await put("report", raw("Quarterly report", sender="Bob Stone <bob@example.net>",
                            body="The quarterly numbers look good. Revenue is up."),
              received=NOW - 2 * DAY)
    await put("lunch", raw("Lunch on Friday?", sender="Zoë <zoe@example.com>",
                           cc="dave@example.org", body="Café at noon, then the résumé review."),
              flags=("\\Seen",), received=NOW - 10 * DAY)
    await put("invoice", raw("Invoice 2024-03", attachment="invoice-march.pdf",
                             body="Please find the invoice attached."),
              flags=("\\Flagged",), received=NOW - 40 * DAY)
    await put("html", raw("Newsletter", html="<p>Big <b>summer</b> sale &amp; more</p>"
                          "<script>var hidden='scriptword';</script>"),
              received=NOW - 400 * DAY)
    await put("sent", raw("Re: Quarterly report", sender="alice@example.test",
                          to="bob@example.net", bcc="boss@example.net",
                          body="Thanks Bob, numbers noted."),
              folder="Sent", flags=("\\Seen",), received=NOW - 1 * DAY)
    await put("apollo", raw("Launch checklist", body="Apollo launch window opens Monday."
                            + " padding" * 3000),
              folder="Projects/Apollo", received=NOW - 3 * DAY)
    await put("trash", raw("Quarterly spam in trash", body="quarterly offer"),
              folder="Trash", received=NOW - 1 * DAY)
    await put("junk", raw("Quarterly junk", body="quarterly winner"), folder="Junk",
              received=NOW - 1 * DAY)
    return ids


async def found(s: MailService, user: User, q: str, **kw: object) -> list[str]:
    page = await s.search(user, q, **kw)  # type: ignore[arg-type]
    return [r.record.message_id for r in page.results]


CASES = [
    # plain words: all must match, any field, case and accents folded
    ("quarterly", ["sent", "report"]),
    ("quarterly numbers good", ["report"]),
    ("CAFE resume", ["lunch"]),
    ("zoe", ["lunch"]),
    # phrase, exclusion, OR, parentheses
    ('"numbers look good"', ["report"]),
    ('"good numbers"', []),
    ("quarterly -thanks", ["report"]),
    ("lunch OR invoice", ["lunch", "invoice"]),
    ("(lunch OR invoice) -friday", ["invoice"]),
    ("-quarterly -lunch -invoice -summer", ["apollo"]),
    # fields
    ("from:bob", ["report"]),
    ("from:bob@example.net", ["report"]),
    ("to:bob", ["sent"]),
    ("cc:dave", ["lunch"]),
    ("bcc:boss", ["sent"]),
    ("subject:report", ["sent", "report"]),
    ("subject:revenue", []),
    ('subject:"on friday"', ["lunch"]),
    ("filename:invoice-march.pdf", ["invoice"]),
    ("filename:pdf", ["invoice"]),
    # html is searched as text, scripts are not
    ("summer sale", ["html"]),
    ("scriptword", []),
    ("b", []),
    # state
    ("has:attachment", ["invoice"]),
    ("is:unread", ["report", "apollo", "invoice", "html"]),
    ("is:read", ["sent", "lunch"]),
    ("is:starred", ["invoice"]),
    ("is:flagged", ["invoice"]),
    # folders: default hides Trash and Junk; naming one searches it
    ("in:inbox", ["report", "lunch", "invoice", "html"]),
    ("in:Sent", ["sent"]),
    ("in:projects/apollo", ["apollo"]),
    ("in:Projects", ["apollo"]),
    ("in:trash quarterly", ["trash"]),
    ("in:spam", ["junk"]),
    ("in:anywhere quarterly", ["junk", "trash", "sent", "report"]),
    ("-in:inbox", ["sent", "apollo"]),
    # dates and ages (received time)
    ("newer_than:5d", ["sent", "report", "apollo"]),
    ("older_than:1m", ["invoice", "html"]),
    ("older_than:1y", ["html"]),
    ("newer_than:2w older_than:1w", ["lunch"]),
    # sizes
    ("larger:10K", ["apollo"]),
    ("smaller:10K has:attachment", ["invoice"]),
    ("larger:1M", []),
]


async def test_every_operator_on_a_known_mailbox(node: Postroom, alice: User,
                                                 mailbox_ids: dict[str, str]) -> None:
    names = {v: k for k, v in mailbox_ids.items()}
    wrong = {}
    for query, expected in CASES:
        got = [names[g] for g in await found(node.service, alice, query, limit=100)]
        if got != expected:
            wrong[query] = (got, expected)
    assert not wrong, wrong


async def test_before_and_after_by_calendar_day(node: Postroom, alice: User) -> None:
    s = node.service
    a = await s.append(alice, "INBOX", raw("march"), [],
                       datetime(2024, 3, 5, 10, tzinfo=UTC).timestamp())
    b = await s.append(alice, "INBOX", raw("april"), [],
                       datetime(2024, 4, 1, 0, 0, tzinfo=UTC).timestamp())
    assert await found(s, alice, "before:2024-04-01") == [a.message_id]
    assert await found(s, alice, "after:2024-04-01") == [b.message_id]
    assert await found(s, alice, "after:2024/03/05 before:2024/03/06") == [a.message_id]


async def test_sorted_by_relevance_with_highlighted_snippets(
        node: Postroom, alice: User, mailbox_ids: dict[str, str]) -> None:
    page = await node.service.search(alice, "quarterly", sort="relevance")
    assert {r.record.message_id for r in page.results} == {mailbox_ids["report"],
                                                           mailbox_ids["sent"]}
    scores = [r.score for r in page.results]
    assert scores == sorted(scores)
    page = await node.service.search(alice, "cafe")
    assert page.results[0].highlight.startswith("<mark>Café</mark> at noon")
    page = await node.service.search(alice, '"summer sale"')
    assert "<mark>summer sale</mark>" in page.results[0].highlight
    assert "<b>" not in page.results[0].highlight  # HTML is escaped, never passed on


async def test_paging_with_a_cursor(node: Postroom, alice: User,
                                    mailbox_ids: dict[str, str]) -> None:
    s = node.service
    for sort in ("date", "relevance"):
        everything = await found(s, alice, "-zzz", sort=sort, limit=100)
        seen: list[str] = []
        cursor = None
        while True:
            page = await s.search(alice, "-zzz", sort=sort, limit=2, cursor=cursor)
            seen += [r.record.message_id for r in page.results]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == everything and len(seen) == 6
    with pytest.raises(InvalidInput):
        await s.search(alice, "x", cursor="garbage")


async def test_changes_show_in_search_at_once(node: Postroom, alice: User,
                                              mailbox_ids: dict[str, str]) -> None:
    s = node.service
    report = mailbox_ids["report"]
    await s.set_flags(alice, [report], add=["\\Seen", "\\Flagged"])
    assert report not in await found(s, alice, "is:unread")
    assert report in await found(s, alice, "is:starred")
    await s.move(alice, [report], "Archive")
    assert await found(s, alice, "in:archive") == [report]
    assert await found(s, alice, "in:inbox quarterly") == []
    await s.copy(alice, [report], "Projects/Apollo")
    assert len(await found(s, alice, "in:projects/apollo quarterly")) == 1
    await s.delete(alice, report)  # to Trash: hidden by default
    assert await found(s, alice, "from:bob in:archive") == []
    assert await found(s, alice, "in:trash from:bob") == [report]
    await s.expunge(alice, [report])
    assert await found(s, alice, "in:anywhere revenue") != [report]
    assert report not in await node.search.indexed_ids(alice.user_id)


async def test_queued_index_writes_are_never_seen_stale(node: Postroom, alice: User) -> None:
    """IMAP's write commands queue their index writes (index_later) and answer at once; a
    search made afterwards still sees every change, and writes not queued keep the order."""
    s = node.service
    one = await s.append(alice, "INBOX", raw("Queued one", body="zulu yankee"),
                         index_later=True)
    two = await s.append(alice, "INBOX", raw("Queued two", body="zulu xray"), index_later=True)
    assert sorted(await found(s, alice, "zulu")) == sorted([one.message_id, two.message_id])
    await s.store_flags(alice, [one.message_id], add=["\\Seen"], index_later=True)
    assert await found(s, alice, "zulu is:read") == [one.message_id]
    await s.expunge(alice, [one.message_id], index_later=True)
    await s.set_flags(alice, [two.message_id], add=["\\Flagged"])  # waits for the queue
    assert one.message_id not in await node.search.indexed_ids(alice.user_id)
    assert await found(s, alice, "zulu is:starred") == [two.message_id]
    assert await found(s, alice, "yankee") == []


@pytest.mark.parametrize("queued", [False, True])
async def test_append_parsed_in_an_analysis_process_files_what_parsing_here_does(
        node: Postroom, alice: User, queued: bool) -> None:
    """APPEND parses the message and builds its search document in the node's analysis
    process: the record and what search finds are those of a parse in this process."""
    s = node.service
    assert s.analysis is not None
    await s.create_folder(alice, "Here")
    messages = [raw("Plain words", body="kilo lima mike"),
                raw("With a file", attachment="plan-b.pdf", body="november oscar"),
                raw("Styled", html="<p>papa <b>quebec</b></p>", cc="dave@example.org")]
    pool = s.analysis
    for n, data in enumerate(messages):
        there = await s.append(alice, "INBOX", data, ["\\Seen"], NOW - n, index_later=queued)
        s.analysis = None  # parsed on the event loop, as a node without the pool does
        try:
            here = await s.append(alice, "Here", data, ["\\Seen"], NOW - n,
                                  index_later=queued)
        finally:
            s.analysis = pool
        assert (there.headers, there.snippet, there.has_attachments, there.size,
                there.blob_hash, there.flags, there.internal_date) == \
            (here.headers, here.snippet, here.has_attachments, here.size, here.blob_hash,
             here.flags, here.internal_date)
    for query, count in [("kilo", 2), ("filename:plan-b.pdf", 2), ("has:attachment", 2),
                         ("quebec cc:dave", 2), ("subject:styled is:read", 2),
                         ("in:here kilo", 1), ("in:inbox oscar", 1)]:
        assert len(await found(s, alice, query)) == count, query


async def test_queued_index_writes_survive_a_killed_process(
        node: Postroom, alice: User, tmp_path: Path) -> None:
    """The journal keeps queued index writes a killed process never made; the next start
    redoes them from the mail's state, and a drained queue leaves the journal empty. Each
    live process (node) on a data dir holds a journal of its own."""
    s = node.service
    assert s.indexer is not None
    journal = s.indexer.claim_journal(tmp_path)
    assert journal == tmp_path / "search-queue.journal"
    second_node = Indexer(node.search, node.blobs)
    assert second_node.claim_journal(tmp_path) == tmp_path / "search-queue.2.journal"
    kept = await s.append(alice, "INBOX", raw("Journal kept", body="quebec one"),
                          index_later=True)
    gone = await s.append(alice, "INBOX", raw("Journal gone", body="quebec two"),
                          index_later=True)
    await s.indexer.settled()
    assert journal.read_bytes() == b""  # drained: nothing to redo
    assert sorted(await found(s, alice, "quebec")) == sorted([kept.message_id, gone.message_id])

    # Three answered changes whose index writes are still queued when the process dies: the
    # queue's writer is stuck (it never gets to run before the kill).
    async def never() -> None:
        await asyncio.Event().wait()

    stuck = asyncio.create_task(never())
    s.indexer._flusher = stuck
    late = await s.append(alice, "INBOX", raw("Journal late", body="quebec three"),
                          index_later=True)
    await s.store_flags(alice, [kept.message_id], add=["\\Flagged"], index_later=True)
    await s.expunge(alice, [gone.message_id], index_later=True)
    assert len(journal.read_bytes().splitlines()) == 3
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stuck
    assert late.message_id not in await node.search.indexed_ids(alice.user_id)

    assert s.indexer._journal is not None
    s.indexer._journal.close()  # the killed process's lock on its journal goes with it
    restarted = Indexer(node.search, node.blobs)  # the next process, same data dir
    assert restarted.claim_journal(tmp_path) == journal  # the free one, not the second's
    assert await restarted.recover(node.metadata) == 3
    assert journal.read_bytes() == b""
    s.indexer = restarted
    assert sorted(await found(s, alice, "quebec")) == sorted([kept.message_id, late.message_id])
    assert await found(s, alice, "quebec is:starred") == [kept.message_id]
    assert gone.message_id not in await node.search.indexed_ids(alice.user_id)
    assert await restarted.recover(node.metadata) == 0  # nothing twice


async def test_delivered_mail_is_findable_and_users_are_isolated(node: Postroom,
                                                                 alice: User) -> None:
    s = node.service
    bob = await s.add_user("bob@example.test", "bob-secret-22")
    await s.deliver(Envelope("x@example.org", ("alice@example.test",)),
                    raw("Secret plans", body="alpha bravo charlie"))
    await s.deliver(Envelope("x@example.org", ("bob@example.test",)),
                    raw("Bob's own", to="bob@example.test", body="alpha delta"))
    assert len(await found(s, alice, "alpha")) == 1
    assert len(await found(s, alice, "charlie")) == 1
    assert await found(s, bob, "charlie") == []
    assert await found(s, bob, "secret") == []
    assert len(await found(s, bob, "alpha")) == 1
    assert len(await found(s, bob, "")) == 1
    await s.remove_user("alice@example.test")
    assert await node.search.indexed_ids(alice.user_id) == set()
    assert len(await found(s, bob, "alpha")) == 1


MALFORMED = [
    ("(unclosed", 0),
    ("a)", 1),
    ("from:", 5),
    ("a OR", 4),
    ("OR a", 0),
    ('say "unterminated', 4),
    ("is:bogus", 3),
    ("has:pictures", 4),
    ("before:2024-13-01", 7),
    ("after:yesterday", 6),
    ("older_than:7x", 11),
    ("larger:huge", 7),
    ("in:nowhere", 3),
    ("()", 0),
    ("a -", 2),
    ("x AND", 2),
]


async def test_malformed_queries_say_where(node: Postroom, alice: User) -> None:
    for query, position in MALFORMED:
        with pytest.raises(BadQuery) as err:
            await node.service.search(alice, query)
        assert err.value.position == position, query
        assert f"position {position}" in str(err.value)


async def test_imap_narrowing_reads_fewer_messages(node: Postroom, alice: User,
                                                   mailbox_ids: dict[str, str]) -> None:
    s = node.service
    inbox = await s.get_folder(alice, "INBOX")
    records = await node.metadata.list_uids(alice.user_id, inbox.folder_id)
    every = [r.message_id for r in records]

    def key(text: str) -> object:
        return criterion(parse_program(Cursor(RawCommand([text.encode()]))).key)

    assert await s.search_candidates(alice, inbox.folder_id, key('BODY "quarterly numb"'),
                                     every) == {mailbox_ids["report"]}
    assert await s.search_candidates(alice, inbox.folder_id, key("NOT BODY quarterly"),
                                     every) == set(every)
    # a message the index does not know is always a candidate
    await node.search.remove(alice.user_id, [mailbox_ids["lunch"]])
    assert await s.search_candidates(alice, inbox.folder_id, key('SUBJECT "quarterly"'),
                                     every) == {mailbox_ids["report"], mailbox_ids["lunch"]}


async def test_import_mbox_and_maildir(node: Postroom, alice: User, tmp_path: Path) -> None:
    box = mailbox.mbox(str(tmp_path / "old.mbox"))
    first = mailbox.mboxMessage(raw("From the old provider", body="migrated mbox mail"))
    first.set_from("carol@example.org", time.gmtime(1_600_000_000))
    first.set_flags("RF")
    box.add(first)
    box.add(mailbox.mboxMessage(raw("Second", body="another one")))
    box.flush()
    box.close()
    total, items = read_mbox(tmp_path / "old.mbox")
    listed = list(items)
    assert total == 2 and len(listed) == 2
    assert listed[0].flags == ("\\Flagged", "\\Seen")
    assert listed[0].internal_date == 1_600_000_000
    assert listed[0].raw.startswith(b"From: Carol")

    md = mailbox.Maildir(str(tmp_path / "md"))
    msg = mailbox.MaildirMessage(raw("In a maildir", body="maildir body"))
    msg.set_subdir("cur")
    msg.set_flags("SR")
    md.add(msg)
    total, items = read_maildir(tmp_path / "md")
    (only,) = list(items)
    assert only.flags == ("\\Answered", "\\Seen") and b"maildir body" in only.raw
    with pytest.raises(ValueError):
        read_maildir(tmp_path)


async def test_reindex_rebuilds_a_lost_index(node: Postroom, alice: User,
                                             mailbox_ids: dict[str, str]) -> None:
    s = node.service
    before = await found(s, alice, "in:anywhere", limit=100)
    await node.search.remove_user(alice.user_id)
    await node.search.index([])
    assert await found(s, alice, "in:anywhere") == []
    progress: list[tuple[int, int]] = []
    count = await reindex_user(s, alice, lambda d, t: progress.append((d, t)))
    assert count == len(mailbox_ids) and progress[-1] == (count, count)
    assert await found(s, alice, "in:anywhere", limit=100) == before
    assert await found(s, alice, "cafe") == [mailbox_ids["lunch"]]


async def test_import_files_in_batches_and_skips_what_it_refuses(
        node: Postroom, alice: User, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from postroom.search.cli import run_import

    box = mailbox.mbox(str(tmp_path / "batch.mbox"))
    for i in range(5):
        body = "x" * 50_000 if i == 2 else f"imported number {i}"
        box.add(mailbox.mboxMessage(raw(f"Batch {i}", body=body, date=NOW - i * DAY)))
    box.flush()
    box.close()
    s = node.service
    s.max_message_bytes = 20_000
    args = argparse.Namespace(command="import", format="mbox", path=tmp_path / "batch.mbox",
                              user=alice.address, folder="Imported")
    assert await run_import(args, s) == 1  # one was refused
    assert "skipped message 3" in capsys.readouterr().err
    assert len(await found(s, alice, "imported", limit=10)) == 4
    assert len(await found(s, alice, "in:Imported", limit=10)) == 4
    # a batch of good ones files in one go
    records = await s.append_many(alice, "INBOX", [(raw("One", body="alpha beta"), ["\\Seen"],
                                                    None), (raw("Two"), [], NOW - DAY)])
    assert [r.flags.system != 0 for r in records] == [True, False]
    with pytest.raises(InvalidInput):
        await s.append_many(alice, "INBOX", [(raw("Bad"), ["\\Bogus"], None)])


async def test_queued_index_writes_share_transactions_and_searches_do_not_wait(
        node: Postroom, alice: User) -> None:
    """IMAP's queued index writes linger a moment so that several share one index call;
    a search cuts the wait short and finds all of them."""
    s = node.service
    assert s.indexer is not None
    calls: list[int] = []
    real = node.search.index

    async def counting(docs: Sequence[IndexDocument]) -> None:
        calls.append(len(docs))
        await real(docs)

    node.search.index = counting  # type: ignore[method-assign]
    s.indexer.linger = 30.0  # only a search (or a full batch) may end the wait
    added = await asyncio.gather(*(
        s.append(alice, "INBOX", raw(f"Batch {n}", body=f"whiskey {n}"), index_later=True)
        for n in range(8)))
    assert calls == []  # still lingering
    started = time.monotonic()
    assert sorted(await found(s, alice, "whiskey")) == sorted(r.message_id for r in added)
    assert time.monotonic() - started < 5
    assert calls == [8]  # one index call for the eight


@pytest.mark.parametrize("batch_fails", [False, True])
async def test_a_flush_of_the_queue_is_one_index_transaction(
        node: Postroom, alice: User, batch_fails: bool) -> None:
    """The queue's writes of every kind and user go to the index as one write_batch (one
    commit, one round trip to its writer process); if that fails, one by one instead, and
    none is lost either way."""
    s = node.service
    assert s.indexer is not None
    bob = await s.add_user("bob@example.test", "bob-secret-22")
    old = await s.append(alice, "INBOX", raw("Old", body="tango old"))
    batches: list[list[str]] = []
    real = node.search.write_batch  # type: ignore[attr-defined]

    async def watched(ops: Sequence[tuple[str, str, Sequence[object]]]) -> None:
        batches.append([kind for kind, _, _ in ops])
        if batch_fails:
            raise RuntimeError("the index said no")
        await real(ops)

    node.search.write_batch = watched  # type: ignore[attr-defined]
    s.indexer.linger = 30.0
    a = await s.append(alice, "INBOX", raw("New", body="tango alpha"), index_later=True)
    b = await s.append(bob, "INBOX", raw("New", to="bob@example.test", body="tango bravo"),
                       index_later=True)
    await s.store_flags(alice, [a.message_id], add=["\\Seen"], index_later=True)
    await s.store_flags(bob, [b.message_id], add=["\\Flagged"], index_later=True)
    await s.expunge(alice, [old.message_id], index_later=True)
    assert await found(s, alice, "tango is:read") == [a.message_id]
    assert batches == [["index", "update", "update", "remove"]]
    assert await found(s, bob, "tango is:starred") == [b.message_id]
    assert await node.search.indexed_ids(alice.user_id) == {a.message_id}
