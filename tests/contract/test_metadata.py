"""Contract suite for the MetadataStore seam: every implementation must pass all of it."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import pytest

from postroom.core.models import (
    Flag,
    Flags,
    Folder,
    FolderCounts,
    FolderRole,
    HeaderSummary,
    NewMessage,
    User,
)
from postroom.store.errors import Conflict, NotFound
from postroom.store.metadata import Delivery, ListCursor, MetadataStore, Token

MetadataFactory = Callable[[], MetadataStore]  # the conftest fixture: more stores, same database

_serial = itertools.count(1)


def blob(n: int) -> str:
    return f"{n:064x}"


def message(
    *,
    blob_hash: str | None = None,
    internal_date: float | None = None,
    message_id: str = "",
    in_reply_to: str = "",
    references: tuple[str, ...] = (),
    flags: Flags | None = None,
    subject: str = "hello",
) -> NewMessage:
    n = next(_serial)
    return NewMessage(
        blob_hash=blob_hash if blob_hash is not None else blob(n),
        size=100 + n,
        internal_date=internal_date if internal_date is not None else 1_700_000_000.0 + n,
        headers=HeaderSummary(
            from_="Bob <bob@example.org>",
            to="alice@example.com",
            subject=subject,
            date=1_700_000_000.0,
            message_id=message_id,
            in_reply_to=in_reply_to,
            references=references,
        ),
        snippet="snippet",
        has_attachments=False,
        flags=flags if flags is not None else Flags(),
        spam_verdict="ham",
    )


async def make_user(store: MetadataStore, address: str = "alice@example.com") -> User:
    return await store.create_user(address, "hash:" + address)


async def make_user_with_inbox(
    store: MetadataStore, address: str = "alice@example.com"
) -> tuple[User, Folder]:
    user = await make_user(store, address)
    inbox = await store.create_folder(user.user_id, "INBOX", FolderRole.INBOX)
    return user, inbox


# ---- domains, users, aliases, tokens ------------------------------------------------------------


async def test_domains(metadata_store: MetadataStore) -> None:
    store = metadata_store
    assert await store.list_domains() == []
    d = await store.add_domain("example.com")
    assert d.name == "example.com" and d.created_at > 0
    await store.add_domain("example.org")
    assert await store.has_domain("example.com")
    assert not await store.has_domain("example.net")
    assert [x.name for x in await store.list_domains()] == ["example.com", "example.org"]
    with pytest.raises(Conflict):
        await store.add_domain("example.com")
    await store.remove_domain("example.org")
    assert not await store.has_domain("example.org")
    with pytest.raises(NotFound):
        await store.remove_domain("example.org")


async def test_remove_domain_with_users_conflicts(metadata_store: MetadataStore) -> None:
    store = metadata_store
    await store.add_domain("example.com")
    await store.add_domain("other.example")
    user = await make_user(store, "alice@example.com")
    await make_user(store, "bob@notexample.com")  # a suffix match is not the domain
    with pytest.raises(Conflict):
        await store.remove_domain("example.com")
    await store.remove_domain("other.example")
    await store.delete_user(user.user_id)
    await store.remove_domain("example.com")


async def test_users(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice = await store.create_user("alice@example.com", "h1")
    bob = await store.create_user("bob@example.org", "h2")
    assert alice.user_id != bob.user_id
    assert alice.address == "alice@example.com" and alice.password_hash == "h1"
    assert await store.get_user(alice.user_id) == alice
    assert await store.get_user_by_address("bob@example.org") == bob
    assert await store.get_user("nope") is None
    assert await store.get_user_by_address("carol@example.com") is None
    with pytest.raises(Conflict):
        await store.create_user("alice@example.com", "h3")
    assert [u.address for u in await store.list_users()] == [
        "alice@example.com",
        "bob@example.org",
    ]
    assert [u.address for u in await store.list_users("example.org")] == ["bob@example.org"]
    assert await store.list_users("example.net") == []
    assert await store.list_folders(alice.user_id) == []  # created with no folders

    await store.set_password(alice.user_id, "h9")
    got = await store.get_user(alice.user_id)
    assert got is not None and got.password_hash == "h9"
    with pytest.raises(NotFound):
        await store.set_password("nope", "x")

    assert await store.delete_user(bob.user_id) == []
    assert await store.get_user(bob.user_id) is None
    assert await store.get_user_by_address("bob@example.org") is None
    with pytest.raises(NotFound):
        await store.delete_user(bob.user_id)
    # the address is free again
    again = await store.create_user("bob@example.org", "h4")
    assert again.user_id != bob.user_id


async def test_delete_user_removes_everything(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    shared = blob(9001)
    await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=shared))
    await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=shared))
    own, _ = await store.insert_message(alice.user_id, inbox.folder_id, message())
    await store.insert_message(bob.user_id, bob_inbox.folder_id, message(blob_hash=shared))
    await store.add_token(Token("tok", alice.user_id, 2e9))

    hashes = await store.delete_user(alice.user_id)
    assert sorted(hashes) == sorted({shared, own.blob_hash})
    assert await store.blob_refcount(shared) == 1  # bob still refers to it
    assert await store.blob_refcount(own.blob_hash) == 0
    assert await store.get_token("tok") is None
    assert await store.list_folders(alice.user_id) == []
    assert await store.get_message(alice.user_id, own.message_id) is None
    assert len(await store.list_uids(bob.user_id, bob_inbox.folder_id)) == 1


async def test_aliases(metadata_store: MetadataStore) -> None:
    store = metadata_store
    a = await store.add_alias("postmaster@example.com", "alice@example.com")
    assert a.alias == "postmaster@example.com" and a.target == "alice@example.com"
    await store.add_alias("abuse@example.com", "alice@example.com")
    assert await store.get_alias("postmaster@example.com") == a
    assert await store.get_alias("nobody@example.com") is None
    assert [x.alias for x in await store.list_aliases()] == [
        "abuse@example.com",
        "postmaster@example.com",
    ]
    with pytest.raises(Conflict):
        await store.add_alias("postmaster@example.com", "bob@example.com")
    await store.remove_alias("postmaster@example.com")
    assert await store.get_alias("postmaster@example.com") is None
    with pytest.raises(NotFound):
        await store.remove_alias("postmaster@example.com")


async def test_tokens(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice = await make_user(store)
    token = Token("sha256:abc", alice.user_id, 1_900_000_000.0)
    await store.add_token(token)
    assert await store.get_token("sha256:abc") == token
    assert await store.get_token("sha256:zzz") is None
    with pytest.raises(Conflict):
        await store.add_token(token)
    with pytest.raises(NotFound):
        await store.add_token(Token("sha256:def", "no-such-user", 1.0))
    await store.delete_token("sha256:abc")
    assert await store.get_token("sha256:abc") is None
    await store.delete_token("sha256:abc")  # revoking twice is not an error


# ---- folders -----------------------------------------------------------------------------------


async def test_create_and_find_folders(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    assert inbox.name == "INBOX" and inbox.role is FolderRole.INBOX
    assert inbox.uidnext == 1 and inbox.highestmodseq == 1 and inbox.subscribed
    assert inbox.uidvalidity > 0
    work = await store.create_folder(alice.user_id, "Work")
    assert work.role is None and work.uidvalidity > inbox.uidvalidity
    assert await store.get_folder(alice.user_id, work.folder_id) == work
    assert await store.get_folder_by_name(alice.user_id, "Work") == work
    assert await store.get_folder_by_name(alice.user_id, "work") is None
    assert await store.get_folder_by_role(alice.user_id, FolderRole.INBOX) == inbox
    assert await store.get_folder_by_role(alice.user_id, FolderRole.TRASH) is None
    assert [f.name for f in await store.list_folders(alice.user_id)] == ["INBOX", "Work"]
    with pytest.raises(Conflict):
        await store.create_folder(alice.user_id, "Work")
    with pytest.raises(Conflict):
        await store.create_folder(alice.user_id, "Inbox2", FolderRole.INBOX)
    with pytest.raises(NotFound):
        await store.create_folder("no-such-user", "Work")
    assert await store.get_folder(alice.user_id, "no-such-folder") is None


async def test_set_subscribed(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    await store.set_subscribed(alice.user_id, inbox.folder_id, False)
    got = await store.get_folder(alice.user_id, inbox.folder_id)
    assert got is not None and not got.subscribed
    await store.set_subscribed(alice.user_id, inbox.folder_id, True)
    got = await store.get_folder(alice.user_id, inbox.folder_id)
    assert got is not None and got.subscribed
    with pytest.raises(NotFound):
        await store.set_subscribed(alice.user_id, "no-such-folder", True)


async def test_rename_folder_with_children(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, _ = await make_user_with_inbox(store)
    uid = alice.user_id
    work = await store.create_folder(uid, "Work")
    a = await store.create_folder(uid, "Work/A")
    b = await store.create_folder(uid, "Work/A/B")
    other = await store.create_folder(uid, "Workshop")  # shares the prefix, not a child
    rec, _ = await store.insert_message(uid, a.folder_id, message())

    renamed = await store.rename_folder(uid, work.folder_id, "Jobs")
    assert renamed.folder_id == work.folder_id and renamed.name == "Jobs"
    assert renamed.uidvalidity > work.uidvalidity
    by_id = {f.folder_id: f for f in await store.list_folders(uid)}
    assert by_id[work.folder_id] == renamed
    assert by_id[a.folder_id].name == "Jobs/A"
    assert by_id[b.folder_id].name == "Jobs/A/B"
    assert by_id[other.folder_id] == other
    for old in (a, b):
        assert by_id[old.folder_id].uidvalidity > max(old.uidvalidity, work.uidvalidity)
    # every renamed folder got its own new uidvalidity
    assert len({by_id[f.folder_id].uidvalidity for f in (work, a, b)}) == 3
    # messages stay where they were
    assert [r.message_id for r in await store.list_uids(uid, a.folder_id)] == [rec.message_id]
    assert await store.get_folder_by_name(uid, "Work") is None


async def test_rename_folder_conflicts(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    work = await store.create_folder(uid, "Work")
    await store.create_folder(uid, "Work/A")
    await store.create_folder(uid, "Play")
    await store.create_folder(uid, "Old/A")
    with pytest.raises(Conflict):
        await store.rename_folder(uid, work.folder_id, "Play")  # name taken
    with pytest.raises(Conflict):
        await store.rename_folder(uid, work.folder_id, "Old")  # would clash: Old/A exists
    with pytest.raises(Conflict):
        await store.rename_folder(uid, work.folder_id, "Work/A/Deeper")  # into itself
    with pytest.raises(NotFound):
        await store.rename_folder(uid, "no-such-folder", "X")
    # nothing changed by the failed attempts
    assert [f.name for f in await store.list_folders(uid)] == [
        "INBOX",
        "Old/A",
        "Play",
        "Work",
        "Work/A",
    ]
    assert await store.get_folder(uid, work.folder_id) == work
    assert inbox == await store.get_folder(uid, inbox.folder_id)


async def test_delete_folder(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    work = await store.create_folder(uid, "Work")
    child = await store.create_folder(uid, "Work/A")
    await store.create_folder(uid, "Workshop")
    r1, _ = await store.insert_message(uid, child.folder_id, message())
    r2, _ = await store.insert_message(uid, child.folder_id, message())
    with pytest.raises(Conflict):
        await store.delete_folder(uid, work.folder_id)

    gone = await store.delete_folder(uid, child.folder_id)
    assert sorted((e.uid, e.message_id, e.blob_hash) for e in gone) == [
        (r1.uid, r1.message_id, r1.blob_hash),
        (r2.uid, r2.message_id, r2.blob_hash),
    ]
    assert all(e.folder_id == child.folder_id for e in gone)
    assert await store.blob_refcount(r1.blob_hash) == 0
    assert await store.get_message(uid, r1.message_id) is None
    assert await store.get_folder(uid, child.folder_id) is None
    assert await store.delete_folder(uid, work.folder_id) == []  # no children left
    with pytest.raises(NotFound):
        await store.delete_folder(uid, work.folder_id)
    assert [f.name for f in await store.list_folders(uid)] == ["INBOX", "Workshop"]
    assert inbox.folder_id in await store.folder_counts(uid)


async def test_uidvalidity_increases_after_recreate(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice = await make_user(store)
    seen: list[int] = []
    for _ in range(3):
        folder = await store.create_folder(alice.user_id, "Work")
        seen.append(folder.uidvalidity)
        await store.delete_folder(alice.user_id, folder.folder_id)
    assert seen == sorted(seen) and len(set(seen)) == 3


async def test_folder_counts(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    empty = await store.create_folder(alice.user_id, "Empty")
    await store.insert_message(alice.user_id, inbox.folder_id, message())
    await store.insert_message(
        alice.user_id, inbox.folder_id, message(flags=Flags(Flag.SEEN | Flag.FLAGGED))
    )
    await store.insert_message(alice.user_id, inbox.folder_id, message(flags=Flags(Flag.FLAGGED)))
    counts = await store.folder_counts(alice.user_id)
    assert set(counts) == {inbox.folder_id, empty.folder_id}
    assert (counts[inbox.folder_id].total, counts[inbox.folder_id].unread) == (3, 2)
    assert (counts[empty.folder_id].total, counts[empty.folder_id].unread) == (0, 0)
    # one folder alone: only its own messages are read
    assert await store.folder_counts(alice.user_id, inbox.folder_id) == {
        inbox.folder_id: counts[inbox.folder_id]}
    assert await store.folder_counts(alice.user_id, empty.folder_id) == {
        empty.folder_id: FolderCounts(0, 0)}
    # another user's folder, or none, counts nothing
    bob = await store.create_user("bob@example.com", "x")
    assert await store.folder_counts(bob.user_id, inbox.folder_id) == {}
    assert await store.folder_counts(alice.user_id, "no-such-folder") == {}


# ---- uids, modseqs, flags -----------------------------------------------------------------------


async def test_insert_message_record(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    new = message(flags=Flags(Flag.SEEN, ("$label2", "$label1")), message_id="<m1@x>")
    rec, created = await store.insert_message(alice.user_id, inbox.folder_id, new)
    assert created
    assert rec.user_id == alice.user_id and rec.folder_id == inbox.folder_id
    assert rec.uid == 1 and rec.modseq > inbox.highestmodseq
    assert rec.flags == Flags(Flag.SEEN, ("$label1", "$label2"))
    assert rec.headers == new.headers and rec.size == new.size
    assert rec.blob_hash == new.blob_hash and rec.internal_date == new.internal_date
    assert rec.snippet == new.snippet and rec.spam_verdict == "ham" and rec.thread_id
    assert await store.get_message(alice.user_id, rec.message_id) == rec
    folder = await store.get_folder(alice.user_id, inbox.folder_id)
    assert folder is not None and folder.uidnext == 2 and folder.highestmodseq == rec.modseq
    with pytest.raises(NotFound):
        await store.insert_message(alice.user_id, "no-such-folder", message())


async def test_uids_increase_and_are_never_reused(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    recs = [(await store.insert_message(uid, inbox.folder_id, message()))[0] for _ in range(5)]
    assert [r.uid for r in recs] == [1, 2, 3, 4, 5]
    await store.expunge(uid, [recs[3].message_id, recs[4].message_id])
    later, _ = await store.insert_message(uid, inbox.folder_id, message())
    assert later.uid == 6
    assert [r.uid for r in await store.list_uids(uid, inbox.folder_id)] == [1, 2, 3, 6]
    modseqs = [r.modseq for r in recs]
    assert modseqs == sorted(modseqs) and len(set(modseqs)) == 5


async def test_store_flags_bumps_modseq(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    r1, _ = await store.insert_message(uid, inbox.folder_id, message())
    r2, _ = await store.insert_message(uid, inbox.folder_id, message(flags=Flags(Flag.SEEN)))

    changed = await store.store_flags(uid, [r1.message_id, r2.message_id], add=Flags(Flag.SEEN))
    assert [r.message_id for r in changed] == [r1.message_id]  # r2 already \Seen
    assert changed[0].flags == Flags(Flag.SEEN) and changed[0].modseq > r2.modseq
    folder = await store.get_folder(uid, inbox.folder_id)
    assert folder is not None and folder.highestmodseq == changed[0].modseq
    stored = await store.get_message(uid, r1.message_id)
    assert stored == changed[0]
    unchanged = await store.get_message(uid, r2.message_id)
    assert unchanged is not None and unchanged.modseq == r2.modseq

    # a store that changes nothing allocates no modseq
    assert await store.store_flags(uid, [r1.message_id], add=Flags(Flag.SEEN)) == []
    again = await store.get_folder(uid, inbox.folder_id)
    assert again is not None and again.highestmodseq == folder.highestmodseq

    # each later change gets a higher modseq
    before = changed[0].modseq
    changed = await store.store_flags(uid, [r1.message_id], add=Flags(keywords=("$Work",)))
    assert changed[0].modseq > before
    assert changed[0].flags == Flags(Flag.SEEN, ("$Work",))


async def test_store_flags_add_remove_replace(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    r, _ = await store.insert_message(
        uid, inbox.folder_id, message(flags=Flags(Flag.SEEN, ("$a",)))
    )
    (got,) = await store.store_flags(
        uid, [r.message_id], add=Flags(Flag.FLAGGED, ("$c", "$b")), remove=Flags(Flag.SEEN)
    )
    assert got.flags == Flags(Flag.FLAGGED, ("$a", "$b", "$c"))
    (got,) = await store.store_flags(uid, [r.message_id], remove=Flags(keywords=("$a", "$c")))
    assert got.flags == Flags(Flag.FLAGGED, ("$b",))
    (got,) = await store.store_flags(uid, [r.message_id], replace=Flags(Flag.DELETED | Flag.DRAFT))
    assert got.flags == Flags(Flag.DELETED | Flag.DRAFT)
    (got,) = await store.store_flags(uid, [r.message_id], replace=Flags())
    assert got.flags == Flags()
    assert await store.get_message(uid, r.message_id) == got


async def test_store_flags_unchanged_since(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    r1, _ = await store.insert_message(uid, inbox.folder_id, message())
    r2, _ = await store.insert_message(uid, inbox.folder_id, message())
    assert r1.modseq < r2.modseq
    # RFC 7162 §3.1.3: records modified after UNCHANGEDSINCE are not touched
    changed = await store.store_flags(
        uid, [r1.message_id, r2.message_id], add=Flags(Flag.FLAGGED), unchanged_since=r1.modseq
    )
    assert [r.message_id for r in changed] == [r1.message_id]
    left = await store.get_message(uid, r2.message_id)
    assert left == r2
    # the flagged message now has a modseq above the old value: a second try is refused
    assert (
        await store.store_flags(
            uid, [r1.message_id], add=Flags(Flag.SEEN), unchanged_since=r1.modseq
        )
        == []
    )
    assert (
        await store.store_flags(uid, [r1.message_id], add=Flags(Flag.SEEN), unchanged_since=0) == []
    )
    changed = await store.store_flags(
        uid, [r1.message_id], add=Flags(Flag.SEEN), unchanged_since=changed[0].modseq
    )
    assert len(changed) == 1 and changed[0].flags == Flags(Flag.SEEN | Flag.FLAGGED)


# ---- move, copy, expunge ------------------------------------------------------------------------


async def test_move_messages(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    archive = await store.create_folder(uid, "Archive", FolderRole.ARCHIVE)
    await store.insert_message(uid, archive.folder_id, message())  # archive uid 1 is taken
    r1, _ = await store.insert_message(uid, inbox.folder_id, message(flags=Flags(Flag.SEEN)))
    r2, _ = await store.insert_message(uid, inbox.folder_id, message())
    r3, _ = await store.insert_message(uid, inbox.folder_id, message())
    inbox_before = await store.get_folder(uid, inbox.folder_id)
    assert inbox_before is not None

    moved = await store.move_messages(uid, [r2.message_id, r1.message_id], archive.folder_id)
    assert [(e.message_id, e.uid, e.folder_id) for e, _ in moved] == [
        (r2.message_id, r2.uid, inbox.folder_id),
        (r1.message_id, r1.uid, inbox.folder_id),
    ]
    news = [rec for _, rec in moved]
    assert [r.uid for r in news] == [2, 3]  # allocated from the target's uidnext
    assert all(r.folder_id == archive.folder_id for r in news)
    assert news[1].flags == Flags(Flag.SEEN) and news[1].blob_hash == r1.blob_hash
    assert news[0].message_id == r2.message_id  # the record keeps its id
    inbox_after = await store.get_folder(uid, inbox.folder_id)
    assert inbox_after is not None
    assert inbox_after.highestmodseq > inbox_before.highestmodseq
    assert all(e.modseq == inbox_after.highestmodseq for e, _ in moved)
    archive_after = await store.get_folder(uid, archive.folder_id)
    assert archive_after is not None and archive_after.uidnext == 4
    assert all(r.modseq == archive_after.highestmodseq for r in news)

    assert [r.message_id for r in await store.list_uids(uid, inbox.folder_id)] == [r3.message_id]
    assert [r.uid for r in await store.list_uids(uid, archive.folder_id)] == [1, 2, 3]
    assert await store.get_message(uid, r1.message_id) == news[1]
    assert await store.blob_refcount(r1.blob_hash) == 1
    counts = await store.folder_counts(uid)
    assert counts[inbox.folder_id].total == 1 and counts[archive.folder_id].total == 3

    # moving within the same folder gives a new uid there
    ((gone, again),) = await store.move_messages(uid, [r3.message_id], inbox.folder_id)
    assert gone.uid == r3.uid and again.uid > r3.uid and again.folder_id == inbox.folder_id
    with pytest.raises(NotFound):
        await store.move_messages(uid, [r3.message_id], "no-such-folder")
    assert await store.move_messages(uid, ["no-such-message"], archive.folder_id) == []


async def test_copy_messages(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    work = await store.create_folder(uid, "Work")
    r1, _ = await store.insert_message(
        uid, inbox.folder_id, message(flags=Flags(Flag.FLAGGED, ("$x",)))
    )
    copies = await store.copy_messages(uid, [r1.message_id], work.folder_id)
    assert len(copies) == 1
    c = copies[0]
    assert c.message_id != r1.message_id and c.folder_id == work.folder_id and c.uid == 1
    assert c.flags == r1.flags and c.blob_hash == r1.blob_hash and c.headers == r1.headers
    assert c.thread_id == r1.thread_id and c.internal_date == r1.internal_date
    assert await store.get_message(uid, r1.message_id) == r1  # the original stays
    assert await store.get_message(uid, c.message_id) == c
    assert await store.blob_refcount(r1.blob_hash) == 2
    # copies into the same folder get new uids too
    (c2,) = await store.copy_messages(uid, [r1.message_id], inbox.folder_id)
    assert c2.uid == 2 and await store.blob_refcount(r1.blob_hash) == 3
    with pytest.raises(NotFound):
        await store.copy_messages(uid, [r1.message_id], "no-such-folder")


async def test_expunge_and_blob_refcounts(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    shared = blob(424242)
    assert await store.blob_refcount(shared) == 0
    a1, _ = await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=shared))
    b1, _ = await store.insert_message(bob.user_id, bob_inbox.folder_id, message(blob_hash=shared))
    assert await store.blob_refcount(shared) == 2  # stored once, referenced twice
    (copy,) = await store.copy_messages(alice.user_id, [a1.message_id], inbox.folder_id)
    assert await store.blob_refcount(shared) == 3

    gone = await store.expunge(alice.user_id, [a1.message_id, copy.message_id, "no-such"])
    assert [(e.message_id, e.uid, e.blob_hash) for e in gone] == [
        (a1.message_id, a1.uid, shared),
        (copy.message_id, copy.uid, shared),
    ]
    folder = await store.get_folder(alice.user_id, inbox.folder_id)
    assert folder is not None and all(e.modseq == folder.highestmodseq for e in gone)
    assert gone[0].modseq > copy.modseq
    assert await store.blob_refcount(shared) == 1
    assert await store.expunge(alice.user_id, [a1.message_id]) == []  # already gone
    await store.expunge(bob.user_id, [b1.message_id])
    assert await store.blob_refcount(shared) == 0


async def test_released_blobs_are_the_collectors_candidates(
        metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    shared, own, kept = blob(515151), blob(525252), blob(535353)
    a1, _ = await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=shared))
    b1, _ = await store.insert_message(bob.user_id, bob_inbox.folder_id, message(blob_hash=shared))
    a2, _ = await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=own))
    await store.insert_message(alice.user_id, inbox.folder_id, message(blob_hash=kept))
    assert await store.released_blobs(time.time() + 60) == []

    before = time.time()
    await store.expunge(alice.user_id, [a1.message_id, a2.message_id])
    released = await store.released_blobs(time.time() + 60)
    assert own in released and kept not in released
    # `shared` may be listed (PostgreSQL notes every lost reference): the collector counts
    assert await store.blob_refcount(shared) == 1
    assert await store.released_blobs(before - 60) == []  # not released that long ago

    await store.expunge(bob.user_id, [b1.message_id])
    released = await store.released_blobs(time.time() + 60)
    assert {own, shared} <= set(released) and kept not in released
    assert await store.released_blobs(time.time() + 60, limit=1) == released[:1]

    await store.forget_released_blobs([own])
    assert await store.released_blobs(time.time() + 60) == [shared]
    await store.forget_released_blobs([shared, blob(1)])  # unknown ones are no error
    assert await store.released_blobs(time.time() + 60) == []

    await store.delete_user(alice.user_id)  # a removed user's blobs are released too
    assert await store.released_blobs(time.time() + 60) == [kept]

    queued_only = blob(545454)  # bytes of a finished queue item that reached no mailbox
    await store.note_released_blobs([queued_only, queued_only])
    assert await store.released_blobs(time.time() + 60) == [kept, queued_only]
    assert await store.blob_refcount(queued_only) == 0


async def test_vanished_log_for_qresync(metadata_store: MetadataStore) -> None:
    """Expunged and moved-away uids are kept with the modseq of their removal (RFC 7162)."""
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    uid = alice.user_id
    other = await store.create_folder(uid, "Other")
    recs = [(await store.insert_message(uid, inbox.folder_id, message()))[0] for _ in range(5)]
    start = await store.get_folder(uid, inbox.folder_id)
    assert start is not None
    assert await store.vanished(uid, inbox.folder_id, 0) == []
    gone = await store.expunge(uid, [recs[3].message_id, recs[0].message_id])
    moved = await store.move_messages(uid, [recs[1].message_id], other.folder_id)
    assert await store.vanished(uid, inbox.folder_id, start.highestmodseq) == [
        recs[0].uid, recs[1].uid, recs[3].uid]
    assert await store.vanished(uid, inbox.folder_id, gone[0].modseq) == [recs[1].uid]
    assert await store.vanished(uid, inbox.folder_id, moved[0][0].modseq) == []
    assert await store.vanished(uid, other.folder_id, 0) == []
    assert await store.vanished(bob.user_id, inbox.folder_id, 0) == []  # scoped by user
    assert await store.vanished(bob.user_id, bob_inbox.folder_id, 0) == []
    await store.move_messages(uid, [moved[0][1].message_id], inbox.folder_id)
    assert await store.vanished(uid, other.folder_id, 0) == [moved[0][1].uid]
    await store.delete_folder(uid, other.folder_id)
    assert await store.vanished(uid, other.folder_id, 0) == []


# ---- delivery keys ------------------------------------------------------------------------------


async def test_delivery_key_is_idempotent(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    uid = alice.user_id
    first, created = await store.insert_message(uid, inbox.folder_id, message(), "q1:alice")
    assert created
    second, created = await store.insert_message(uid, inbox.folder_id, message(), "q1:alice")
    assert not created and second == first
    assert len(await store.list_uids(uid, inbox.folder_id)) == 1
    assert await store.blob_refcount(first.blob_hash) == 1

    # the key belongs to the user: another user's identical key is a different delivery
    _, created = await store.insert_message(bob.user_id, bob_inbox.folder_id, message(), "q1:alice")
    assert created

    # moved since: the moved record is returned, nothing new is filed
    work = await store.create_folder(uid, "Work")
    ((_, moved),) = await store.move_messages(uid, [first.message_id], work.folder_id)
    again, created = await store.insert_message(uid, inbox.folder_id, message(), "q1:alice")
    assert not created and again == moved

    # expunged since: still never delivered twice
    await store.expunge(uid, [first.message_id])
    with pytest.raises(Conflict):
        await store.insert_message(uid, inbox.folder_id, message(), "q1:alice")
    assert await store.list_uids(uid, inbox.folder_id) == []
    assert await store.list_uids(uid, work.folder_id) == []

    # no key: every insert files a message
    await store.insert_message(uid, inbox.folder_id, message())
    await store.insert_message(uid, inbox.folder_id, message())
    assert len(await store.list_uids(uid, inbox.folder_id)) == 2


async def test_concurrent_inserts_with_one_delivery_key(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    results = await asyncio.gather(
        *(
            store.insert_message(alice.user_id, inbox.folder_id, message(), "item-7")
            for _ in range(10)
        )
    )
    assert sum(created for _, created in results) == 1
    assert len({rec.message_id for rec, _ in results}) == 1
    assert len(await store.list_uids(alice.user_id, inbox.folder_id)) == 1


async def test_insert_messages_files_a_batch_in_order(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    junk = await store.create_folder(alice.user_id, "Junk", FolderRole.JUNK)
    assert await store.insert_messages([]) == []
    shared = blob(990_001)  # one blob for every copy: counted once per record
    batch = [
        Delivery(bob.user_id, bob_inbox.folder_id, message(blob_hash=shared), "b1:bob"),
        Delivery(alice.user_id, inbox.folder_id, message(blob_hash=shared), "b1:alice"),
        Delivery(alice.user_id, junk.folder_id, message(blob_hash=shared), "b2:alice"),
        Delivery(alice.user_id, inbox.folder_id, message(message_id="<p@x>"), "b3:alice"),
        Delivery(alice.user_id, inbox.folder_id,
                 message(message_id="<r@x>", in_reply_to="<p@x>"), None),
    ]
    results = await store.insert_messages(batch)
    assert all(r is not None and r[1] for r in results)
    records = [r[0] for r in results if r is not None]
    assert [(r.user_id, r.folder_id) for r in records] == [
        (d.user_id, d.folder_id) for d in batch]
    assert [r.uid for r in records] == [1, 1, 1, 2, 3]  # per folder, in the order given
    assert records[4].thread_id == records[3].thread_id  # sees the batch's earlier messages
    assert records[1].modseq < records[3].modseq < records[4].modseq
    assert await store.blob_refcount(shared) == 3
    listed = await store.list_uids(alice.user_id, inbox.folder_id)
    assert [r.message_id for r in listed] == [records[1].message_id, records[3].message_id,
                                              records[4].message_id]
    folder = await store.get_folder(alice.user_id, inbox.folder_id)
    assert folder is not None and folder.uidnext == 4


async def test_insert_messages_delivery_keys(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    first, _ = await store.insert_message(uid, inbox.folder_id, message(), "k1:alice")
    gone, _ = await store.insert_message(uid, inbox.folder_id, message(), "k2:alice")
    await store.expunge(uid, [gone.message_id])
    results = await store.insert_messages([
        Delivery(uid, inbox.folder_id, message(), "k1:alice"),  # delivered: the record again
        Delivery(uid, inbox.folder_id, message(), "k2:alice"),  # delivered, expunged: None
        Delivery(uid, inbox.folder_id, message(), "k3:alice"),  # new
        Delivery(uid, inbox.folder_id, message(), "k3:alice"),  # twice in a batch: once
    ])
    assert results[0] == (first, False)
    assert results[1] is None
    assert results[2] is not None and results[2][1]
    assert results[3] == (results[2][0], False)
    assert len(await store.list_uids(uid, inbox.folder_id)) == 2
    # the whole batch again (a redelivered queue batch): nothing new
    again = await store.insert_messages([
        Delivery(uid, inbox.folder_id, message(), "k1:alice"),
        Delivery(uid, inbox.folder_id, message(), "k3:alice"),
    ])
    assert again == [(first, False), (results[2][0], False)]
    assert len(await store.list_uids(uid, inbox.folder_id)) == 2


async def test_insert_messages_is_all_or_nothing(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid = alice.user_id
    with pytest.raises((NotFound, Conflict)):
        await store.insert_messages([
            Delivery(uid, inbox.folder_id, message(), "n1:alice"),
            Delivery(uid, "no-such-folder", message(), "n2:alice"),
        ])
    assert await store.list_uids(uid, inbox.folder_id) == []
    # the key of the delivery that was rolled back is free: the retried batch files it
    results = await store.insert_messages([Delivery(uid, inbox.folder_id, message(), "n1:alice")])
    assert results[0] is not None and results[0][1]
    folder = await store.get_folder(uid, inbox.folder_id)
    assert folder is not None and folder.uidnext == 2


async def test_concurrent_batches_with_shared_keys(
    metadata_store_factory: MetadataFactory,
) -> None:
    """Two nodes file overlapping batches (a redelivered queue item on each): each key once."""
    stores = [metadata_store_factory(), metadata_store_factory()]
    for s in stores:
        await s.open()
    try:
        alice, inbox = await make_user_with_inbox(stores[0])
        bob, bob_inbox = await make_user_with_inbox(stores[0], "bob@example.com")

        def batch(keys: range) -> list[Delivery]:
            out = []
            for n in keys:
                out.append(Delivery(alice.user_id, inbox.folder_id, message(), f"c{n}:alice"))
                out.append(Delivery(bob.user_id, bob_inbox.folder_id, message(), f"c{n}:bob"))
            return out

        runs = await asyncio.gather(
            stores[0].insert_messages(batch(range(0, 20))),
            stores[1].insert_messages(list(reversed(batch(range(10, 30))))),
            stores[0].insert_messages(batch(range(5, 25))),
        )
        created = sum(1 for run in runs for r in run if r is not None and r[1])
        assert created == 60
        for user, folder in ((alice, inbox), (bob, bob_inbox)):
            uids = [r.uid for r in await stores[1].list_uids(user.user_id, folder.folder_id)]
            assert uids == list(range(1, 31))
    finally:
        for s in stores:
            await s.close()


# ---- threads ------------------------------------------------------------------------------------


async def test_reply_joins_parent_thread(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid, fid = alice.user_id, inbox.folder_id
    parent, _ = await store.insert_message(uid, fid, message(message_id="<p@x>"))
    reply, _ = await store.insert_message(
        uid, fid, message(message_id="<r@x>", in_reply_to="<p@x>", references=("<p@x>",))
    )
    # a reply-to-reply naming only References still joins
    deeper, _ = await store.insert_message(
        uid, fid, message(message_id="<d@x>", references=("<p@x>", "<r@x>"))
    )
    other, _ = await store.insert_message(uid, fid, message(message_id="<o@x>"))
    assert reply.thread_id == parent.thread_id == deeper.thread_id
    assert other.thread_id != parent.thread_id


async def test_parent_arriving_after_reply_joins_its_thread(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    uid, fid = alice.user_id, inbox.folder_id
    reply, _ = await store.insert_message(
        uid, fid, message(message_id="<r@x>", in_reply_to="<p@x>", references=("<root@x>",))
    )
    parent, _ = await store.insert_message(uid, fid, message(message_id="<p@x>"))
    assert parent.thread_id == reply.thread_id
    root, _ = await store.insert_message(uid, fid, message(message_id="<root@x>"))
    assert root.thread_id == reply.thread_id


async def test_copies_of_one_message_share_a_thread(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    sent = await store.create_folder(alice.user_id, "Sent", FolderRole.SENT)
    mine, _ = await store.insert_message(alice.user_id, sent.folder_id, message(message_id="<s@x>"))
    echo, _ = await store.insert_message(
        alice.user_id, inbox.folder_id, message(message_id="<s@x>")
    )
    assert echo.thread_id == mine.thread_id


async def test_threads_never_cross_users(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    parent, _ = await store.insert_message(
        alice.user_id, inbox.folder_id, message(message_id="<p@x>")
    )
    bob_reply, _ = await store.insert_message(
        bob.user_id, bob_inbox.folder_id, message(message_id="<r@x>", in_reply_to="<p@x>")
    )
    assert bob_reply.thread_id != parent.thread_id
    # and a parent arriving for bob does not adopt alice's thread either
    alice_reply, _ = await store.insert_message(
        alice.user_id, inbox.folder_id, message(message_id="<r2@x>", in_reply_to="<q@x>")
    )
    bob_parent, _ = await store.insert_message(
        bob.user_id, bob_inbox.folder_id, message(message_id="<q@x>")
    )
    assert bob_parent.thread_id != alice_reply.thread_id


async def test_list_thread(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    sent = await store.create_folder(alice.user_id, "Sent", FolderRole.SENT)
    uid = alice.user_id
    parent, _ = await store.insert_message(uid, inbox.folder_id, message(
        message_id="<lt-p@x>", internal_date=1_800_000_000.0))
    reply, _ = await store.insert_message(uid, sent.folder_id, message(
        message_id="<lt-r@x>", in_reply_to="<lt-p@x>", internal_date=1_800_000_100.0))
    late, _ = await store.insert_message(uid, inbox.folder_id, message(
        message_id="<lt-l@x>", references=("<lt-p@x>", "<lt-r@x>"),
        internal_date=1_800_000_200.0))
    await store.insert_message(uid, inbox.folder_id, message(message_id="<lt-o@x>"))
    thread = await store.list_thread(uid, parent.thread_id)
    # Every folder, oldest first; nothing from outside the thread.
    assert [r.message_id for r in thread] == [parent.message_id, reply.message_id,
                                              late.message_id]
    assert [r.message_id for r in await store.list_thread(uid, parent.thread_id, limit=2)] == [
        parent.message_id, reply.message_id]
    # Scoped by user: bob cannot list alice's thread, even by its id.
    assert await store.list_thread(bob.user_id, parent.thread_id) == []
    assert await store.list_thread(uid, "no-such-thread") == []
    assert bob_inbox.folder_id  # bob has mail of his own elsewhere
    # An expunged message leaves the thread listing.
    await store.expunge(uid, [reply.message_id])
    assert [r.message_id for r in await store.list_thread(uid, parent.thread_id)] == [
        parent.message_id, late.message_id]


# ---- listing ------------------------------------------------------------------------------------


async def test_cursor_paging_returns_every_message_once(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    other = await store.create_folder(alice.user_id, "Other")
    uid, fid = alice.user_id, inbox.folder_id
    # several messages share an internal date, so the uid must break ties
    dates = [1000.0, 1000.0, 999.0, 1001.0, 1000.0, 500.0, 1001.0] * 4
    for d in dates:
        await store.insert_message(uid, fid, message(internal_date=d))
    await store.insert_message(uid, other.folder_id, message())

    full = await store.list_messages(uid, fid, limit=1000)
    assert len(full) == len(dates)
    keys = [(r.internal_date, r.uid) for r in full]
    assert keys == sorted(keys, reverse=True)

    pages: list[list[str]] = []
    cursor: ListCursor | None = None
    while True:
        page = await store.list_messages(uid, fid, limit=5, before=cursor)
        if not page:
            break
        assert len(page) <= 5
        pages.append([r.message_id for r in page])
        cursor = ListCursor(page[-1].internal_date, page[-1].uid)
    seen = [m for page in pages for m in page]
    assert seen == [r.message_id for r in full]
    assert len(set(seen)) == len(dates)


async def test_list_uids_in_uid_order(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    for d in (3.0, 1.0, 2.0):
        await store.insert_message(alice.user_id, inbox.folder_id, message(internal_date=d))
    recs = await store.list_uids(alice.user_id, inbox.folder_id)
    assert [r.uid for r in recs] == [1, 2, 3]
    assert [r.internal_date for r in recs] == [3.0, 1.0, 2.0]


# ---- isolation ----------------------------------------------------------------------------------


async def test_users_cannot_reach_each_others_mail(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    bob, bob_inbox = await make_user_with_inbox(store, "bob@example.com")
    a1, _ = await store.insert_message(alice.user_id, inbox.folder_id, message())
    a2, _ = await store.insert_message(alice.user_id, inbox.folder_id, message())
    b1, _ = await store.insert_message(bob.user_id, bob_inbox.folder_id, message())
    alice_ids = [a1.message_id, a2.message_id]
    folder_before = await store.get_folder(alice.user_id, inbox.folder_id)

    # reading
    assert await store.get_message(bob.user_id, a1.message_id) is None
    assert await store.get_messages(bob.user_id, [*alice_ids, b1.message_id]) == [b1]
    assert await store.list_messages(bob.user_id, inbox.folder_id, 100) == []
    assert await store.list_uids(bob.user_id, inbox.folder_id) == []
    assert await store.get_folder(bob.user_id, inbox.folder_id) is None
    assert [f.folder_id for f in await store.list_folders(bob.user_id)] == [bob_inbox.folder_id]
    counts = await store.folder_counts(bob.user_id)
    assert set(counts) == {bob_inbox.folder_id} and counts[bob_inbox.folder_id].total == 1

    # writing
    assert await store.store_flags(bob.user_id, alice_ids, add=Flags(Flag.DELETED)) == []
    assert await store.store_flags(bob.user_id, alice_ids, replace=Flags()) == []
    assert await store.move_messages(bob.user_id, alice_ids, bob_inbox.folder_id) == []
    assert await store.copy_messages(bob.user_id, alice_ids, bob_inbox.folder_id) == []
    assert await store.expunge(bob.user_id, alice_ids) == []
    with pytest.raises(NotFound):  # alice's folder is not a target for bob
        await store.move_messages(bob.user_id, [b1.message_id], inbox.folder_id)
    with pytest.raises(NotFound):
        await store.copy_messages(bob.user_id, [b1.message_id], inbox.folder_id)
    with pytest.raises(NotFound):  # nor can alice move into bob's folder
        await store.move_messages(alice.user_id, alice_ids, bob_inbox.folder_id)
    with pytest.raises(NotFound):
        await store.insert_message(bob.user_id, inbox.folder_id, message())
    with pytest.raises(NotFound):
        await store.rename_folder(bob.user_id, inbox.folder_id, "Mine")
    with pytest.raises(NotFound):
        await store.delete_folder(bob.user_id, inbox.folder_id)
    with pytest.raises(NotFound):
        await store.set_subscribed(bob.user_id, inbox.folder_id, False)

    # alice's mail is exactly as it was
    assert await store.get_messages(alice.user_id, alice_ids) == [a1, a2]
    assert await store.get_folder(alice.user_id, inbox.folder_id) == folder_before
    assert await store.blob_refcount(a1.blob_hash) == 1
    alice_counts = await store.folder_counts(alice.user_id)
    assert set(alice_counts) == {inbox.folder_id} and alice_counts[inbox.folder_id].total == 2


async def test_get_messages_keeps_order_and_skips_unknown(metadata_store: MetadataStore) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    recs = [
        (await store.insert_message(alice.user_id, inbox.folder_id, message()))[0] for _ in "abc"
    ]
    ids = [recs[2].message_id, "unknown", recs[0].message_id]
    assert await store.get_messages(alice.user_id, ids) == [recs[2], recs[0]]
    assert await store.get_messages(alice.user_id, []) == []


# ---- concurrency and durability ----------------------------------------------------------------


async def test_concurrent_inserts_get_distinct_consecutive_uids(
    metadata_store: MetadataStore,
) -> None:
    store = metadata_store
    alice, inbox = await make_user_with_inbox(store)
    results = await asyncio.gather(
        *(store.insert_message(alice.user_id, inbox.folder_id, message()) for _ in range(50))
    )
    uids = sorted(rec.uid for rec, _ in results)
    assert uids == list(range(1, 51))
    modseqs = {rec.modseq for rec, _ in results}
    assert len(modseqs) == 50
    folder = await store.get_folder(alice.user_id, inbox.folder_id)
    assert folder is not None and folder.uidnext == 51 and folder.highestmodseq == max(modseqs)


async def test_two_stores_on_one_database_never_share_a_uid(
    metadata_store: MetadataStore, metadata_store_factory: MetadataFactory
) -> None:
    first = metadata_store
    alice, inbox = await make_user_with_inbox(first)
    second = metadata_store_factory()  # a second process on the same database
    await second.open()
    try:
        assert await second.get_folder(alice.user_id, inbox.folder_id) == inbox

        async def insert(store: MetadataStore) -> int:
            rec, _ = await store.insert_message(alice.user_id, inbox.folder_id, message())
            return rec.uid

        uids = await asyncio.gather(
            *(insert(first if i % 2 else second) for i in range(40)),
            *(second.store_flags(alice.user_id, ["none"], add=Flags(Flag.SEEN)) for _ in range(5)),
        )
        inserted = [u for u in uids if isinstance(u, int)]
        assert sorted(inserted) == list(range(1, 41))
        listed = await second.list_uids(alice.user_id, inbox.folder_id)
        assert [r.uid for r in listed] == list(range(1, 41))
        assert len(await first.list_uids(alice.user_id, inbox.folder_id)) == 40
    finally:
        await second.close()


async def test_two_nodes_hand_out_uids_and_modseqs_in_one_order(
    metadata_store: MetadataStore, metadata_store_factory: MetadataFactory
) -> None:
    """Inserts, copies and moves into one folder from two nodes at once: every record gets its
    own uid, and uid order is modseq order (both come from one atomic step on the folder)."""
    first = metadata_store
    alice, inbox = await make_user_with_inbox(first)
    uid, fid = alice.user_id, inbox.folder_id
    other = await first.create_folder(uid, "Other")
    seeds = [(await first.insert_message(uid, other.folder_id, message()))[0] for _ in range(12)]
    second = metadata_store_factory()  # another node: its own connections
    await second.open()
    try:

        def node(i: int) -> MetadataStore:
            return first if i % 2 else second

        async def insert(i: int) -> list[tuple[int, int]]:
            rec, _ = await node(i).insert_message(uid, fid, message())
            return [(rec.uid, rec.modseq)]

        async def copy(i: int) -> list[tuple[int, int]]:
            copies = await node(i).copy_messages(uid, [seeds[i].message_id], fid)
            return [(r.uid, r.modseq) for r in copies]

        async def move(i: int) -> list[tuple[int, int]]:
            moved = await node(i).move_messages(uid, [seeds[i].message_id], fid)
            return [(r.uid, r.modseq) for _, r in moved]

        results = await asyncio.gather(
            *(insert(i) for i in range(20)),
            *(copy(i) for i in range(6)),
            *(move(i) for i in range(6, 12)),
        )
        filed = sorted(pair for result in results for pair in result)
        assert [u for u, _ in filed] == list(range(1, 33))
        modseqs = [m for _, m in filed]
        assert modseqs == sorted(modseqs) and len(set(modseqs)) == 32
        listed = await first.list_uids(uid, fid)
        assert [(r.uid, r.modseq) for r in listed] == filed
        folder = await second.get_folder(uid, fid)
        assert folder is not None and (folder.uidnext, folder.highestmodseq) == (33, modseqs[-1])
        assert len(await second.list_uids(uid, other.folder_id)) == 6
    finally:
        await second.close()


async def test_crossing_moves_and_flag_changes_on_two_nodes(
    metadata_store: MetadataStore, metadata_store_factory: MetadataFactory
) -> None:
    """Two nodes move the same messages in opposite directions and flag them at once: every
    operation succeeds (no deadlock surfaces), no message is lost or doubled, and no flag
    change is lost to another's read-modify-write."""
    first = metadata_store
    alice, inbox = await make_user_with_inbox(first)
    uid = alice.user_id
    other = await first.create_folder(uid, "Other")
    ids = [
        (await first.insert_message(uid, f.folder_id, message()))[0].message_id
        for f in (inbox, other)
        for _ in range(10)
    ]
    second = metadata_store_factory()
    await second.open()
    try:
        ops = []
        for _ in range(4):
            ops += [
                first.move_messages(uid, ids, other.folder_id),
                second.move_messages(uid, ids[::-1], inbox.folder_id),
                first.store_flags(uid, ids, add=Flags(Flag.SEEN)),
                second.store_flags(uid, ids[::-1], add=Flags(Flag.FLAGGED, ("$work",))),
            ]
        await asyncio.gather(*ops)
        records = await second.get_messages(uid, ids)
        assert [r.message_id for r in records] == ids
        assert all(Flag.SEEN in r.flags and Flag.FLAGGED in r.flags for r in records)
        assert all(r.flags.keywords == ("$work",) for r in records)
        for folder in (inbox, other):
            listed = await first.list_uids(uid, folder.folder_id)
            assert len({r.uid for r in listed}) == len(listed)
        in_folders = [r for f in (inbox, other) for r in await first.list_uids(uid, f.folder_id)]
        assert sorted(r.message_id for r in in_folders) == sorted(ids)
    finally:
        await second.close()


async def test_data_survives_reopen(
    metadata_store: MetadataStore, metadata_store_factory: MetadataFactory
) -> None:
    alice, inbox = await make_user_with_inbox(metadata_store)
    rec, _ = await metadata_store.insert_message(alice.user_id, inbox.folder_id, message())
    await metadata_store.close()
    reopened = metadata_store_factory()
    await reopened.open()
    try:
        assert await reopened.get_message(alice.user_id, rec.message_id) == rec
        folder = await reopened.get_folder(alice.user_id, inbox.folder_id)
        assert folder is not None and folder.uidnext == rec.uid + 1
        next_rec, _ = await reopened.insert_message(alice.user_id, inbox.folder_id, message())
        assert next_rec.uid == rec.uid + 1
    finally:
        await reopened.close()


# ---- spam filtering: reputation, lists, contacts, user models, sending log ----------------------


async def test_reputation_decays_then_adds(metadata_store: MetadataStore) -> None:
    assert await metadata_store.get_reputation(["addr:x@example.org"]) == {}
    await metadata_store.add_reputation(["addr:x@example.org", "dom:example.org"], ham=0.0,
                                        spam=1.0, now=1000.0, half_life=100.0)
    await metadata_store.add_reputation(["addr:x@example.org"], ham=1.0, spam=0.0, now=1100.0,
                                        half_life=100.0)
    got = await metadata_store.get_reputation(["addr:x@example.org", "dom:example.org", "nope"])
    assert set(got) == {"addr:x@example.org", "dom:example.org"}
    addr = got["addr:x@example.org"]
    assert addr.spam == pytest.approx(0.5)  # one half-life later
    assert addr.ham == pytest.approx(1.0)
    assert addr.updated_at == 1100.0
    assert got["dom:example.org"].spam == pytest.approx(1.0)


async def test_block_and_allow_lists(metadata_store: MetadataStore) -> None:
    alice = await make_user(metadata_store)
    await metadata_store.set_list_entry("", "spammer.example", "block")
    await metadata_store.set_list_entry(alice.user_id, "friend@spammer.example", "allow")
    await metadata_store.set_list_entry(alice.user_id, "192.0.2.7", "block")
    await metadata_store.set_list_entry(alice.user_id, "192.0.2.7", "allow")  # replaces
    assert [(e.value, e.action) for e in await metadata_store.list_entries(alice.user_id)] == [
        ("192.0.2.7", "allow"), ("friend@spammer.example", "allow")]
    found = await metadata_store.match_list_entries(
        ["", alice.user_id], ["friend@spammer.example", "spammer.example", "other.example"])
    assert sorted((e.user_id, e.value, e.action) for e in found) == [
        ("", "spammer.example", "block"),
        (alice.user_id, "friend@spammer.example", "allow")]
    bob = await make_user(metadata_store, "bob@example.com")
    assert await metadata_store.match_list_entries([bob.user_id], ["192.0.2.7"]) == []
    assert await metadata_store.remove_list_entry("", "spammer.example") is True
    assert await metadata_store.remove_list_entry("", "spammer.example") is False
    assert await metadata_store.list_entries("") == []


async def test_contacts_are_per_user(metadata_store: MetadataStore) -> None:
    alice = await make_user(metadata_store)
    bob = await make_user(metadata_store, "bob@example.com")
    await metadata_store.add_contacts(alice.user_id, ["carol@example.org", "dan@example.net"],
                                      now=1.0)
    await metadata_store.add_contacts(alice.user_id, ["carol@example.org"], now=2.0)
    assert await metadata_store.known_contacts(
        alice.user_id, ["carol@example.org", "eve@example.org"]) == {"carol@example.org"}
    assert await metadata_store.known_contacts(bob.user_id, ["carol@example.org"]) == set()


async def test_spam_models_per_user(metadata_store: MetadataStore) -> None:
    alice = await make_user(metadata_store)
    bob = await make_user(metadata_store, "bob@example.com")
    assert await metadata_store.get_spam_model(alice.user_id) is None
    await metadata_store.put_spam_model(alice.user_id, b"\x00\x01model", now=1.0)
    await metadata_store.put_spam_model(alice.user_id, b"\x00\x02newer", now=2.0)
    assert await metadata_store.get_spam_model(alice.user_id) == b"\x00\x02newer"
    assert await metadata_store.get_spam_model(bob.user_id) is None


async def test_send_log_totals(metadata_store: MetadataStore) -> None:
    alice = await make_user(metadata_store)
    bob = await make_user(metadata_store, "bob@example.com")
    await metadata_store.record_send(alice.user_id, 3, now=1_000.0)
    await metadata_store.record_send(alice.user_id, 2, now=5_000.0)
    await metadata_store.record_send(bob.user_id, 7, now=5_000.0)
    assert await metadata_store.send_totals(alice.user_id, since=0.0) == (2, 5)
    assert await metadata_store.send_totals(alice.user_id, since=2_000.0) == (1, 2)
    # a day later the old entries are gone
    await metadata_store.record_send(alice.user_id, 1, now=1_000.0 + 90_000.0)
    assert await metadata_store.send_totals(alice.user_id, since=0.0) == (2, 3)
    assert await metadata_store.send_totals(bob.user_id, since=0.0) == (1, 7)
