"""The local blob store's fan-out: the 256 first-level directories come at once, the leaf
directories one by one as blobs need them."""

from __future__ import annotations

from pathlib import Path

from postroom.store.fs_blobs import FsBlobStore


async def test_young_store_makes_first_level_at_once_and_leaves_as_needed(tmp_path: Path) -> None:
    store = FsBlobStore(str(tmp_path / "blobs"))
    await store.open()
    digests = [await store.put(f"message {n}".encode()) for n in range(20)]
    root = tmp_path / "blobs"
    assert sorted(p.name for p in root.iterdir()) == [f"{i:02x}" for i in range(256)]
    leaves = {p.relative_to(root) for p in root.glob("*/*") if p.is_dir()}
    assert leaves == {Path(d[0:2], d[2:4]) for d in digests}
    for n, digest in enumerate(digests):
        assert await store.get(digest) == f"message {n}".encode()
        assert await store.exists(digest)
