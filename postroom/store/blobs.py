"""The blob seam: raw messages keyed by the sha256 of their bytes, stored once."""

from __future__ import annotations

import hashlib
from typing import Protocol


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put(self, data: bytes) -> str:
        """Store the bytes durably (returns only once they survive a crash); the hash."""
        ...
    async def get(self, digest: str) -> bytes:
        """The stored bytes; NotFound when absent."""
        ...
    async def exists(self, digest: str) -> bool: ...
    async def delete(self, digest: str) -> None:
        """Remove the blob; absent blobs are not an error."""
        ...
