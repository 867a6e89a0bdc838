"""The CRLF size of each message, remembered by blob hash.

A blob's bytes never change (it is named by their sha256), so its CRLF size is a fact any node
may remember without invalidation. Remembering it means a client that polls a large maildrop and
keeps its mail (fetchmail every few minutes) costs a blob read only for messages new since its
last login, instead of one for every message at every login.
"""

from __future__ import annotations

from collections import OrderedDict


class CrlfSizes:
    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def get(self, blob_hash: str) -> int | None:
        size = self._sizes.get(blob_hash)
        if size is not None:
            self._sizes.move_to_end(blob_hash)
        return size

    def put(self, blob_hash: str, size: int) -> None:
        self._sizes[blob_hash] = size
        self._sizes.move_to_end(blob_hash)
        while len(self._sizes) > self.max_entries:
            self._sizes.popitem(last=False)


SIZES = CrlfSizes()  # one per process: the facts are the same for every node and user
