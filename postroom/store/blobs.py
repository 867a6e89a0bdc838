"""The blob seam: raw messages keyed by the sha256 of their bytes, stored once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from typing import Protocol

DIGEST = re.compile(r"[0-9a-f]{64}")  # a blob's name: the lower-case sha256 hex digest


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """The digest, if it is exactly the lower-case sha256 hex form; ValueError otherwise.

    A digest becomes a file path or an object key: nothing else may get near the storage.
    """
    if not isinstance(digest, str) or DIGEST.fullmatch(digest) is None:
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return digest


class BlobStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put(self, data: bytes, *, sync: bool = True) -> str:
        """Store the bytes durably (returns only once they survive a crash); the hash.

        sync=False: the caller will wait for a commit to the metadata store made after this
        returns, and the store (see `shares_log_with`) makes that commit's durability imply
        this put's; stores without such an order ignore it and are always durable."""
        ...
    def shares_log_with(self, metadata: object) -> bool:
        """Whether a put(sync=False) followed by a durable write of `metadata` is durable."""
        ...
    async def get(self, digest: str) -> bytes:
        """The stored bytes; NotFound when absent."""
        ...
    async def exists(self, digest: str) -> bool: ...
    async def delete(self, digest: str) -> None:
        """Remove the blob; absent blobs are not an error."""
        ...

    # Collection (postroom/blob_collector.py). A put of bytes already stored refreshes the
    # blob's put time, so the collector can tell a blob someone is about to refer to again.
    # Quarantine moves a blob aside: a later put stores it afresh and a get brings it back,
    # so a reference that races the collector still finds its bytes.
    async def quarantine(self, digest: str, untouched_for: float) -> bool:
        """Move the blob aside if it was not put in the last `untouched_for` seconds; True
        if it is now in quarantine."""
        ...
    async def restore(self, digest: str) -> None:
        """Bring a quarantined blob back (dropping the quarantined copy if the blob was put
        again meanwhile)."""
        ...
    async def purge(self, digest: str) -> None:
        """Delete the quarantined copy; absent is not an error."""
        ...
    def scan(self, untouched_for: float) -> AsyncIterator[str]:
        """Every stored blob not put in the last `untouched_for` seconds (quarantined ones
        apart), in no particular order: the collector's search for bytes nothing released."""
        ...
