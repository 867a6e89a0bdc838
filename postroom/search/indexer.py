"""Keeps the search index in step with the mail, called by MailService after each change.

Indexing happens right after the metadata commit, in the same call that delivered or appended
the message, so mail is searchable as soon as SMTP or APPEND has answered; flag changes and
moves update the index's copy of folder and flags in the same way. A failure here never fails
the mail operation (the message is already stored): it is logged, search misses the change
until `postroom search reindex`, and IMAP SEARCH stays exact because it checks every record
the index does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from postroom.core.message import ParsedMessage, parse_message
from postroom.core.models import MessageRecord
from postroom.search.document import build_document, doc_state, for_record
from postroom.store.blobs import BlobStore
from postroom.store.metadata import MetadataStore
from postroom.store.search import IndexDocument, SearchIndex

log = logging.getLogger(__name__)

# Above this size the document is built on a worker thread, not on the event loop.
_THREAD_ABOVE = 256 * 1024


async def make_document(record: MessageRecord, raw: bytes,
                        parsed: ParsedMessage | None = None) -> IndexDocument:
    if len(raw) > _THREAD_ABOVE:
        return await asyncio.to_thread(
            build_document, record, raw, parsed if parsed is not None else parse_message(raw))
    return build_document(record, raw, parsed if parsed is not None else parse_message(raw))


LINGER = 0.015  # seconds
_BATCH_ENOUGH = 64  # queued writes that are worth a transaction without waiting longer


class Indexer:
    """Writes to the search index after each change of the mail.

    Most callers wait for their write (`added`, `changed`, `removed`, ...). IMAP's busy write
    commands may instead queue it (`later_*`) and answer at once: queued writes are done in
    order by one task, adjacent ones of a kind in one index call (so concurrent sessions'
    writes share a transaction), and every read of the index (`settled`, awaited by
    MailService's searches) and every write not queued first waits until the queue is
    empty, so nothing is ever found in a state older than a change already answered.

    With a journal (`claim_journal`, by `postroom serve`), each queued write is also
    appended to a file in the data dir (one unbuffered write, no fsync: it survives the
    process, as the index's own unsynced commits do) and the file is emptied whenever the
    queue drains; `recover` replays what a killed process left there, from the mail's current
    state, at the next start. Without one, a crash loses the queue's few milliseconds of index
    writes, as it can lose the write between a mail commit and its index write; IMAP SEARCH
    stays exact regardless, and `postroom search reindex` repairs the rest.
    """

    def __init__(self, index: SearchIndex, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs
        self._queue: list[_Queued] = []
        self._flusher: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._journal_path: Path | None = None
        self._journal: BinaryIO | None = None
        self.linger = LINGER  # seconds a queued write waits for others to share its transaction
        self._hurry = asyncio.Event()
        self._queued = 0  # items in _queue
        self._waiting = 0  # callers of settled() waiting
        self._running: list[_Queued] = []  # the batch being written

    # -- the journal of queued writes

    def claim_journal(self, directory: Path, stem: str = "search-queue") -> Path:
        """Use the first journal in `directory` that no running process holds (an exclusive
        flock, kept while this process lives): STEM.journal, then STEM.2.journal, ... So
        several nodes on one data dir each keep their own, and a node started after a crash
        takes over (and `recover`s) a journal whose process is gone."""
        for n in range(1, 1000):
            path = directory / (f"{stem}.journal" if n == 1 else f"{stem}.{n}.journal")
            handle = open(path, "ab", buffering=0)  # kept open: it holds the lock
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self._journal_path, self._journal = path, handle
            return path
        raise OSError(f"no free search queue journal in {directory}")

    def _note(self, kind: str, user_id: str, message_ids: Sequence[str]) -> None:
        if self._journal is None:
            return
        try:
            self._journal.write(json.dumps([kind, user_id, list(message_ids)]).encode() + b"\n")
        except OSError:
            log.warning("cannot write the search queue journal %s", self._journal_path,
                        exc_info=True)

    def _forget_journal(self) -> None:
        if self._journal is not None:
            try:
                self._journal.truncate(0)
            except OSError:
                log.warning("cannot empty the search queue journal", exc_info=True)

    async def recover(self, metadata: MetadataStore) -> int:
        """Redo the index writes a killed process had queued (from the mail's state now);
        returns how many messages it looked at."""
        path = self._journal_path
        if path is None:
            return 0
        try:
            lines = (await asyncio.to_thread(path.read_bytes)).splitlines()
        except FileNotFoundError:
            return 0
        done = 0
        for line in lines:
            try:
                kind, user_id, message_ids = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash: its write never got an answer
            for message_id in message_ids:
                done += 1
                try:
                    record = await metadata.get_message(user_id, message_id)
                    if record is None or kind == "remove":
                        if record is None:
                            await self.index.remove(user_id, [message_id])
                        continue
                    raw = await self.blobs.get(record.blob_hash)
                    await self.index.index([await make_document(record, raw)])
                except Exception:
                    log.exception("redoing the index write of %s failed", message_id)
        self._forget_journal()
        if done:
            log.info("search index: redid %d queued write(s) a stopped process left", done)
        return done

    # -- queued writes (IMAP)

    def later_added(self, record: MessageRecord, raw: bytes, parsed: ParsedMessage,
                    template: IndexDocument | None = None) -> None:
        """Queue a new message's indexing; `template`, its `document_template` if one was
        built already (in an analysis process), saves building the document here."""
        self._note("index", record.user_id, [record.message_id])
        self._enqueue(_Queued("index", record.user_id, [(record, raw, parsed, template)]))

    def later_changed(self, records: Sequence[MessageRecord]) -> None:
        if records:
            self._note("update", records[0].user_id, [r.message_id for r in records])
            self._enqueue(_Queued("update", records[0].user_id, list(records)))

    def later_removed(self, user_id: str, message_ids: Sequence[str]) -> None:
        if message_ids:
            self._note("remove", user_id, message_ids)
            self._enqueue(_Queued("remove", user_id, list(message_ids)))

    async def settled(self) -> None:
        """Return once every queued write is done (or has failed and been logged)."""
        if self._idle.is_set():
            return
        self._waiting += 1  # someone waits: no lingering for more writes
        self._hurry.set()
        try:
            while not self._idle.is_set():
                await self._idle.wait()
        finally:
            self._waiting -= 1

    def _enqueue(self, item: _Queued) -> None:
        last = self._queue[-1] if self._queue else None
        if last is not None and last.kind == item.kind \
                and (item.kind == "index" or last.user_id == item.user_id):
            last.items.extend(item.items)
        else:
            self._queue.append(item)
        self._idle.clear()
        self._queued += len(item.items)
        if self._queued >= _BATCH_ENOUGH:
            self._hurry.set()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="search-index-queue")

    async def _flush(self) -> None:
        try:
            while self._queue:
                if self.linger > 0 and not self._hurry.is_set():
                    # Let a few more writes join: the index's cost is mostly per transaction
                    # (FTS5 writes its segments at each COMMIT), a tenth per document in
                    # batches of ten. A search (settled) cuts the wait short.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self.linger)
                batch, self._queue = self._queue, []
                self._queued = 0
                if not self._waiting:
                    self._hurry.clear()
                self._running = _regroup(batch)
                if len(self._running) > 1 and await self._write_together(self._running):
                    self._running = []
                while self._running:
                    item = self._running.pop(0)
                    try:
                        if item.kind == "index":
                            await self._index_new(item.items)
                        elif item.kind == "update":
                            await self.changed(item.items, queued=True)
                        else:
                            await self.removed(item.user_id, item.items, queued=True)
                    except Exception:  # each of those logs its own failures
                        log.exception("queued search index write failed")
        finally:
            self._flusher = None
            if self._queue or self._running:
                # cancelled with work left: the journal keeps it for `recover`
                self._queue.clear()
                self._running = []
                self._queued = 0
            else:
                self._forget_journal()
            self._idle.set()

    async def _write_together(self, items: list[_Queued]) -> bool:
        """The regrouped queue in one index transaction, where the index can (`write_batch`):
        one commit and, in a writer process, one round trip instead of one per user and kind.
        False if it cannot or the batch failed (rolled back whole): then item by item."""
        write_batch = getattr(self.index, "write_batch", None)
        if write_batch is None:
            return False
        try:
            ops: list[tuple[str, str, Sequence[Any]]] = []
            for item in items:
                if item.kind == "index":
                    ops.append(("index", "", await self._documents(item.items)))
                elif item.kind == "update":
                    ops.append(("update", item.user_id, [doc_state(r) for r in item.items]))
                else:
                    ops.append(("remove", item.user_id, list(item.items)))
            await write_batch(ops)
        except Exception:
            log.warning("a batch of queued search index writes failed; writing them one by "
                        "one", exc_info=True)
            return False
        return True

    # -- writes the caller waits for

    async def added(self, record: MessageRecord, raw: bytes, parsed: ParsedMessage) -> None:
        await self.settled()
        try:
            await self.index.index([await make_document(record, raw, parsed)])
        except Exception:
            log.exception("indexing message %s failed", record.message_id)

    async def added_many(
        self, messages: Sequence[tuple[MessageRecord, bytes, ParsedMessage]]
    ) -> None:
        """`added` for a batch of new records, in one index transaction. Copies of one message
        (the same bytes for several recipients) share one document build."""
        await self.settled()
        await self._index_new([(record, raw, parsed, None) for record, raw, parsed in messages])

    async def _index_new(
        self,
        messages: Sequence[tuple[MessageRecord, bytes, ParsedMessage, IndexDocument | None]],
    ) -> None:
        """New records in one index transaction, each document from its template when there
        is one, else built here (once for copies of the same bytes)."""
        try:
            await self.index.index(await self._documents(messages))
        except Exception:
            log.exception("indexing %d new messages failed", len(messages))

    @staticmethod
    async def _documents(
        messages: Sequence[tuple[MessageRecord, bytes, ParsedMessage, IndexDocument | None]],
    ) -> list[IndexDocument]:
        """Each new record's document: from its template when there is one, else built here
        (once for copies of the same bytes)."""
        built: dict[int, IndexDocument] = {}
        docs: list[IndexDocument] = []
        for record, raw, parsed, template in messages:
            if template is not None:
                docs.append(for_record(template, record))
                continue
            doc = built.get(id(raw))
            if doc is None:
                doc = built[id(raw)] = await make_document(record, raw, parsed)
            else:
                doc = dataclasses.replace(doc, user_id=record.user_id, state=doc_state(record))
            docs.append(doc)
        return docs

    async def added_documents(
        self, documents: Sequence[tuple[MessageRecord, IndexDocument | None]]
    ) -> None:
        """`added` for new records whose documents were built from their messages already
        (`search.document.document_template`, in an analysis process): each completed with
        its record's own fields, all in one index transaction."""
        await self.settled()
        try:
            await self.index.index([for_record(template, record)
                                    for record, template in documents if template is not None])
        except Exception:
            log.exception("indexing %d new messages failed", len(documents))

    async def copied(self, records: Sequence[MessageRecord]) -> None:
        await self.settled()
        for record in records:
            try:
                if not await self.index.copy(record.user_id, record.blob_hash,
                                             doc_state(record)):
                    raw = await self.blobs.get(record.blob_hash)
                    await self.index.index([await make_document(record, raw)])
            except Exception:
                log.exception("indexing copy %s failed", record.message_id)

    async def changed(self, records: Sequence[MessageRecord], queued: bool = False) -> None:
        if not records:
            return
        if not queued:
            await self.settled()
        try:
            await self.index.update(records[0].user_id, [doc_state(r) for r in records])
        except Exception:
            log.exception("updating the search index failed")

    async def removed(self, user_id: str, message_ids: Sequence[str],
                      queued: bool = False) -> None:
        if not message_ids:
            return
        if not queued:
            await self.settled()
        try:
            await self.index.remove(user_id, message_ids)
        except Exception:
            log.exception("removing from the search index failed")

    async def user_removed(self, user_id: str) -> None:
        await self.settled()
        try:
            await self.index.remove_user(user_id)
        except Exception:
            log.exception("removing a user from the search index failed")


@dataclasses.dataclass
class _Queued:
    """Adjacent queued writes of one kind: new messages (any user's), or one user's flag
    and folder changes, or one user's removals."""

    kind: str  # "index", "update" or "remove"
    user_id: str
    items: list[Any]


def _regroup(batch: list[_Queued]) -> list[_Queued]:
    """The queued writes as few index calls: all new messages, then each user's changes, then
    each user's removals (each kind keeping its own order). Writes to different messages
    commute, and one message is only ever indexed, then changed, then removed, in that order;
    should a write name a message an earlier removal of the batch took out, the batch is
    written as it was queued instead."""
    if len(batch) <= 1:
        return batch
    removed: set[tuple[str, str]] = set()
    new: list[Any] = []
    changes: dict[str, list[Any]] = {}
    removals: dict[str, list[Any]] = {}
    for q in batch:
        if q.kind == "remove":
            removed.update((q.user_id, m) for m in q.items)
            removals.setdefault(q.user_id, []).extend(q.items)
            continue
        records = [i[0] for i in q.items] if q.kind == "index" else q.items
        if any((r.user_id, r.message_id) in removed for r in records):
            return batch
        if q.kind == "index":
            new.extend(q.items)
        else:
            changes.setdefault(q.user_id, []).extend(q.items)
    return ([_Queued("index", "", new)] if new else []) \
        + [_Queued("update", u, items) for u, items in changes.items()] \
        + [_Queued("remove", u, items) for u, items in removals.items()]
