"""Contract for the blob seam: every `BlobStore` implementation must pass this suite.

To add an implementation, add its name to `IMPLEMENTATIONS` and a branch to `_factory`
(skipping when its server is not configured).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.store.blobs import BlobStore, blob_hash
from postroom.store.errors import NotFound
from postroom.store.fs_blobs import FsBlobStore
from tests.engines import unique_name

IMPLEMENTATIONS = ["fs", "fs-packed", "s3"]

MakeStore = Callable[[], Awaitable[BlobStore]]


def _factory(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], BlobStore]:
    if name == "fs":  # every blob a file
        root = str(tmp_path / "blobs")
        return lambda: FsBlobStore(root, pack_max=0)
    if name == "fs-packed":  # the embedded default: small blobs in SQLite, large ones files
        root = str(tmp_path / "blobs")
        return lambda: FsBlobStore(root)
    if name == "s3":
        from postroom.store.s3_blobs import S3BlobStore

        server = request.getfixturevalue("s3_server")  # skips when SeaweedFS is missing
        bucket = unique_name("b").lower()  # a fresh bucket per test, made by open()
        return lambda: S3BlobStore(bucket, endpoint=server.endpoint,
                                   access_key=server.access_key, secret_key=server.secret_key)
    raise AssertionError(f"unknown blob store {name}")


@pytest_asyncio.fixture(params=IMPLEMENTATIONS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """Opens a new store on the same underlying storage each call (to test reopening)."""
    build = _factory(request.param, tmp_path, request)
    opened: list[BlobStore] = []

    async def make() -> BlobStore:
        store = build()
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def store(make_store: MakeStore) -> BlobStore:
    return await make_store()


def _files(store: BlobStore) -> list[str]:
    """Every file under an FsBlobStore's root but its pack's (empty for other stores)."""
    if not isinstance(store, FsBlobStore):
        return []
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, _dirs, names in os.walk(store.root)
        for name in names
        if store.pack is None or dirpath != os.path.dirname(store.pack.path)
    )


def _all_files(store: BlobStore) -> bool:
    """An FsBlobStore that keeps every blob as a file (no pack)."""
    return isinstance(store, FsBlobStore) and store.pack is None


@pytest.mark.parametrize(
    "data",
    [b"", b"x", bytes(range(256)) * 4, b"\r\n.\r\n\x00\xff", os.urandom(5 * 1024 * 1024)],
    ids=["empty", "one-byte", "all-bytes", "crlf-nul", "5MB"],
)
async def test_round_trip(store: BlobStore, data: bytes) -> None:
    digest = await store.put(data)
    assert digest == blob_hash(data)
    assert await store.exists(digest)
    assert await store.get(digest) == data


async def test_identical_content_is_stored_once(store: BlobStore) -> None:
    data = b"From: a@example.org\r\n\r\nhello\r\n"
    first = await store.put(data)
    second = await store.put(bytes(data))
    assert first == second
    assert await store.get(first) == data
    if _all_files(store):
        assert _files(store) == [store.path_of(first)]


async def test_distinct_content_distinct_blobs(store: BlobStore) -> None:
    a = await store.put(b"a")
    b = await store.put(b"b")
    assert a != b
    assert await store.get(a) == b"a"
    assert await store.get(b) == b"b"


async def test_absent_blob_is_not_found(store: BlobStore) -> None:
    missing = blob_hash(b"never stored")
    assert not await store.exists(missing)
    with pytest.raises(NotFound):
        await store.get(missing)


async def test_delete(store: BlobStore) -> None:
    digest = await store.put(b"short-lived")
    await store.delete(digest)
    assert not await store.exists(digest)
    with pytest.raises(NotFound):
        await store.get(digest)
    await store.delete(digest)  # absent: not an error
    assert await store.put(b"short-lived") == digest  # and it can come back
    assert await store.get(digest) == b"short-lived"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "../../../../etc/passwd",
        "A" * 64,  # upper case is not the canonical form
        "g" * 64,
        "0" * 63,
        "0" * 65,
        "../" + "0" * 61,
        "0" * 62 + "/x",
        "0" * 64 + "\n",
    ],
)
async def test_bad_digest_is_rejected(store: BlobStore, bad: str) -> None:
    with pytest.raises(ValueError):
        await store.get(bad)
    with pytest.raises(ValueError):
        await store.exists(bad)
    with pytest.raises(ValueError):
        await store.delete(bad)


async def test_data_survives_reopening(make_store: MakeStore) -> None:
    first = await make_store()
    blobs = {await first.put(data): data for data in (b"", b"one", os.urandom(70_000))}
    await first.close()
    second = await make_store()
    for digest, data in blobs.items():
        assert await second.exists(digest)
        assert await second.get(digest) == data


async def test_no_temporary_files_left_behind(store: BlobStore) -> None:
    digests = {await store.put(os.urandom(n)) for n in (0, 10, 100_000)}
    await store.put(b"dup")
    await store.put(b"dup")
    if _all_files(store):
        assert _files(store) == sorted(store.path_of(d) for d in digests | {blob_hash(b"dup")})


async def test_concurrent_puts_of_the_same_content(store: BlobStore) -> None:
    data = os.urandom(256 * 1024)
    digests = await asyncio.gather(*(store.put(data) for _ in range(20)))
    assert set(digests) == {blob_hash(data)}
    assert await store.get(digests[0]) == data
    if _all_files(store):
        assert _files(store) == [store.path_of(digests[0])]


async def test_concurrent_puts_of_different_content(store: BlobStore) -> None:
    datas = [os.urandom(1000) for _ in range(30)]
    digests = await asyncio.gather(*(store.put(d) for d in datas))
    for digest, data in zip(digests, datas, strict=True):
        assert await store.get(digest) == data


async def test_fs_layout(tmp_path: Path) -> None:
    store = FsBlobStore(str(tmp_path / "b"), pack_max=0)
    await store.open()
    digest = await store.put(b"layout")
    assert (tmp_path / "b" / digest[:2] / digest[2:4] / digest).read_bytes() == b"layout"
    await store.close()


async def test_quarantine_then_purge(make_store: MakeStore) -> None:
    store = await make_store()
    data = b"From: a@example.org\r\n\r\nto be collected\r\n"
    digest = await store.put(data)
    assert not await store.quarantine(digest, untouched_for=3600)  # put just now: kept
    assert await store.exists(digest)
    assert await store.quarantine(digest, untouched_for=0)
    assert not await store.exists(digest)
    assert not await store.quarantine(digest, untouched_for=0)  # nothing left to move
    await store.purge(digest)
    await store.purge(digest)  # twice is no error
    with pytest.raises(NotFound):
        await store.get(digest)
    await store.restore(digest)  # nothing to restore: no error, nothing appears
    assert not await store.exists(digest)
    if _all_files(store):
        assert _files(store) == []


async def test_quarantined_blob_comes_back(make_store: MakeStore) -> None:
    """A reference racing the collector keeps its bytes: a get restores the quarantined
    copy, a put stores the blob afresh, and restore brings it back in place."""
    store = await make_store()
    first, second, third = b"one\r\n", b"two\r\n", b"three\r\n"
    d1, d2, d3 = [await store.put(d) for d in (first, second, third)]
    for digest in (d1, d2, d3):
        assert await store.quarantine(digest, untouched_for=0)

    assert await store.get(d1) == first  # a reader brings it back
    assert await store.exists(d1)
    await store.purge(d1)  # the collector's late purge finds nothing to delete
    assert await (await make_store()).get(d1) == first

    assert await store.put(second) == d2  # stored afresh while quarantined
    await store.restore(d2)  # the collector saw the new reference: the held copy goes
    assert await store.get(d2) == second
    if _all_files(store):
        assert store.quarantine_path_of(d2) not in _files(store)

    await store.restore(d3)
    assert await store.get(d3) == third
    await store.purge(d3)  # nothing quarantined any more
    assert await store.get(d3) == third


async def test_put_of_stored_bytes_refreshes_the_put_time(tmp_path: Path) -> None:
    """(On S3 the put time is the object's Last-Modified, set by the server.)"""
    store = FsBlobStore(str(tmp_path / "blobs"), pack_max=0)
    await store.open()
    data = b"refreshed\r\n"
    digest = await store.put(data)
    old = time.time() - 7200
    os.utime(store.path_of(digest), (old, old))
    assert await store.put(data) == digest
    assert time.time() - os.stat(store.path_of(digest)).st_mtime < 60
    assert not await store.quarantine(digest, untouched_for=3600)
    os.utime(store.path_of(digest), (old, old))
    assert await store.quarantine(digest, untouched_for=3600)


async def test_scan_lists_what_was_not_put_lately(make_store: MakeStore) -> None:
    store = await make_store()
    digests = {await store.put(f"blob {n}\r\n".encode()) for n in range(3)}
    assert [d async for d in store.scan(3600)] == []  # all put just now
    everything = -60.0  # "not put in the last -60 seconds": every blob
    assert {d async for d in store.scan(everything)} == digests
    held = sorted(digests)[0]
    assert await store.quarantine(held, untouched_for=0)
    assert {d async for d in store.scan(everything)} == digests - {held}
