"""The local blob store's fan-out: the 256 first-level directories come at once, the leaf
directories one by one as blobs need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postroom.store import fs_blobs
from postroom.store.blobs import blob_hash
from postroom.store.fs_blobs import FsBlobStore


async def test_young_store_makes_first_level_at_once_and_leaves_as_needed(tmp_path: Path) -> None:
    store = FsBlobStore(str(tmp_path / "blobs"), pack_max=0)
    await store.open()
    digests = [await store.put(f"message {n}".encode()) for n in range(20)]
    root = tmp_path / "blobs"
    assert sorted(p.name for p in root.iterdir()) == [f"{i:02x}" for i in range(256)]
    leaves = {p.relative_to(root) for p in root.glob("*/*") if p.is_dir()}
    assert leaves == {Path(d[0:2], d[2:4]) for d in digests}
    for n, digest in enumerate(digests):
        assert await store.get(digest) == f"message {n}".encode()
        assert await store.exists(digest)


async def test_a_put_survives_its_directory_vanishing_and_a_stale_temporary_name(
    tmp_path: Path,
) -> None:
    """The store remembers the directories it has seen, and names its temporary files by
    process and counter: a leaf directory removed behind its back is made again, and a
    temporary file a crashed process left under the next name is stepped over, not written."""
    root = tmp_path / "blobs"
    store = FsBlobStore(str(root), pack_max=0)
    await store.open()
    first = await store.put(b"first")
    leaf = root / first[0:2] / first[2:4]
    (leaf / first).unlink()
    leaf.rmdir()
    assert await store.put(b"first") == first
    assert (leaf / first).read_bytes() == b"first"
    second = b"second"
    digest = blob_hash(second)
    directory = root / digest[0:2] / digest[2:4]
    directory.mkdir(exist_ok=True)
    n = next(store._temp_names)
    stale = [directory / f".tmp-{os.getpid()}-{n + k}" for k in (1, 2)]
    for path in stale:
        path.write_bytes(b"left by a crash")
    assert await store.put(second) == digest
    assert await store.get(digest) == second
    assert all(p.read_bytes() == b"left by a crash" for p in stale)
    assert [p.name for p in directory.iterdir() if not p.name.startswith(".tmp-")] == [digest]
    assert (directory / digest).stat().st_mode & 0o777 == 0o600


async def test_a_put_into_a_new_directory_returns_once_the_new_entries_are_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directories a put makes are fsynced after the blob's own fsyncs (one journal
    commit the fewer), but before the put returns: the leaf's entry for the blob, then the
    first level's entry for the leaf. A put into a directory already made fsyncs only it."""
    root = tmp_path / "blobs"
    store = FsBlobStore(str(root), pack_max=0)
    await store.open()
    synced: list[str] = []
    real = fs_blobs._fsync_dir

    def recording(path: str) -> None:
        synced.append(os.path.relpath(path, root))
        real(path)

    monkeypatch.setattr(fs_blobs, "_fsync_dir", recording)
    first = await store.put(b"into a new leaf")
    leaf = os.path.join(first[0:2], first[2:4])
    assert synced == [leaf, first[0:2], "."]  # the root gained the first level at once
    synced.clear()
    beside = next(data for n in range(100_000) if (digest := blob_hash(
        data := f"x{n}".encode()))[0:2] == first[0:2] and digest[2:4] != first[2:4])
    other = await store.put(beside)
    assert synced == [os.path.join(other[0:2], other[2:4]), first[0:2]]
    synced.clear()
    again = next(data for n in range(100_000)
                 if blob_hash(data := f"y{n}".encode()).startswith(first[0:4]))
    await store.put(again)
    assert synced == [leaf]
