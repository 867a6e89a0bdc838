"""The blob seam: raw messages keyed by the sha256 of their bytes, stored once."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

_DIGEST = re.compile(r"[0-9a-f]{64}")


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """The digest, if it is exactly the lower-case sha256 hex form; ValueError otherwise.

    A digest becomes a file path or an object key: nothing else may get near the storage.
    """
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return digest


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
