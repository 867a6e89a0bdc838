"""Rebuild a user's index from their mail, and import mailboxes from other providers.

Both run beside a serving node (the CLI opens the same storage): the index is written in small
batches, each its own short transaction, so the server's own index writes interleave. A record
changed by the server while its batch was being built is put right by re-reading the batch's
records after writing it; a record expunged meanwhile may leave a stale document, which search
ignores (results are read back from the metadata store) and the next reindex drops.
"""

from __future__ import annotations

import asyncio
import email.utils
import mailbox
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.core.models import MessageRecord, User
from postroom.search.document import DocumentPool, doc_state
from postroom.store.errors import NotFound
from postroom.store.search import IndexDocument

if TYPE_CHECKING:
    from postroom.service import MailService

Progress = Callable[[int, int], None]  # (done, total)
BATCH = 100


async def reindex_user(service: MailService, user: User,
                       progress: Progress | None = None, workers: int | None = None) -> int:
    """Index every message of the user afresh and drop documents of vanished ones; the
    documents are built by `workers` processes (default one per core)."""
    index = service.search_index
    if index is None:
        raise RuntimeError("no search index configured")
    if service.indexer is not None:
        await service.indexer.settled()
    folders = await service.metadata.list_folders(user.user_id)
    records = []
    for folder in folders:
        records.extend(await service.metadata.list_uids(user.user_id, folder.folder_id))
    current = {r.message_id for r in records}
    stale = sorted(await index.indexed_ids(user.user_id) - current)
    for start in range(0, len(stale), 500):
        await index.remove(user.user_id, stale[start : start + 500])
    done = 0
    pool = DocumentPool(workers)

    async def build(batch: list[MessageRecord]) -> list[IndexDocument]:
        items = []
        for record in batch:
            try:
                items.append((record, await service.blobs.get(record.blob_hash)))
            except NotFound:
                continue
        return await pool.build(items)

    batches = [records[at : at + BATCH] for at in range(0, len(records), BATCH)]
    try:
        # the next batch is built in the pool while this one is written
        ahead = asyncio.ensure_future(build(batches[0])) if batches else None
        for k, batch in enumerate(batches):
            assert ahead is not None
            docs = await ahead
            ahead = asyncio.ensure_future(build(batches[k + 1])) \
                if k + 1 < len(batches) else None
            await index.index(docs)
            # whatever the server changed while this batch was built wins
            fresh = await service.metadata.get_messages(user.user_id,
                                                        [r.message_id for r in batch])
            await index.update(user.user_id, [doc_state(r) for r in fresh])
            done += len(batch)
            if progress is not None:
                progress(done, len(records))
    finally:
        if ahead is not None:
            ahead.cancel()
        pool.close()
    return done


# ---- import ---------------------------------------------------------------------------------

_STATUS_FLAGS = {"R": "\\Seen", "F": "\\Flagged", "A": "\\Answered", "D": "\\Deleted"}
_MAILDIR_FLAGS = {"S": "\\Seen", "F": "\\Flagged", "R": "\\Answered", "T": "\\Deleted",
                  "D": "\\Draft"}
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class Imported:
    raw: bytes
    flags: tuple[str, ...]
    internal_date: float | None


def _header_block(raw: bytes) -> bytes:
    m = _HEADER_END.search(raw)
    return raw[: m.start()] if m else raw


def _date_header(raw: bytes) -> float | None:
    m = re.search(rb"(?im)^date:[ \t]*(.+)$", _header_block(raw))
    if m is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(m.group(1).decode("latin-1").strip())
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed.tzinfo else None


def _mbox_flags(raw: bytes) -> tuple[str, ...]:
    letters = ""
    for m in re.finditer(rb"(?im)^(?:x-)?status:[ \t]*([A-Z]*)", _header_block(raw)):
        letters += m.group(1).decode()
    return tuple(sorted({_STATUS_FLAGS[c] for c in letters if c in _STATUS_FLAGS}))


def _from_line_date(line: str) -> float | None:
    # "From sender Mon Jan  1 00:00:00 2024": the date is the last five words (asctime)
    parts = line.split()
    if len(parts) < 6:
        return None
    try:
        return time.mktime(time.strptime(" ".join(parts[-5:]), "%a %b %d %H:%M:%S %Y")) \
            - time.timezone
    except ValueError:
        return None


def read_mbox(path: Path) -> tuple[int, Iterator[Imported]]:
    box = mailbox.mbox(str(path), create=False)
    keys = list(box.keys())

    def items() -> Iterator[Imported]:
        for key in keys:
            raw = box.get_bytes(key)
            with box.get_file(key, from_=True) as f:
                from_line = f.readline().decode("latin-1")
            when = _from_line_date(from_line) or _date_header(raw)
            yield Imported(raw, _mbox_flags(raw), when)

    return len(keys), items()


def read_maildir(path: Path) -> tuple[int, Iterator[Imported]]:
    if not (path / "cur").is_dir() and not (path / "new").is_dir():
        raise ValueError(f"{path} is not a Maildir (no cur/ or new/)")
    files = sorted(p for sub in ("cur", "new") if (path / sub).is_dir()
                   for p in (path / sub).iterdir() if p.is_file() and not p.name.startswith("."))

    def items() -> Iterator[Imported]:
        for p in files:
            info = p.name.rpartition(":2,")[2] if ":2," in p.name else ""
            flags = tuple(sorted({_MAILDIR_FLAGS[c] for c in info if c in _MAILDIR_FLAGS}))
            yield Imported(p.read_bytes(), flags, os.stat(p).st_mtime)

    return len(files), items()
