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
import dataclasses
import logging
from collections.abc import Sequence

from postroom.core.message import ParsedMessage, parse_message
from postroom.core.models import MessageRecord
from postroom.search.document import build_document, doc_state, for_record
from postroom.store.blobs import BlobStore
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


class Indexer:
    def __init__(self, index: SearchIndex, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs

    async def added(self, record: MessageRecord, raw: bytes, parsed: ParsedMessage) -> None:
        try:
            await self.index.index([await make_document(record, raw, parsed)])
        except Exception:
            log.exception("indexing message %s failed", record.message_id)

    async def added_many(
        self, messages: Sequence[tuple[MessageRecord, bytes, ParsedMessage]]
    ) -> None:
        """`added` for a batch of new records, in one index transaction. Copies of one message
        (the same bytes for several recipients) share one document build."""
        try:
            built: dict[int, IndexDocument] = {}
            docs: list[IndexDocument] = []
            for record, raw, parsed in messages:
                doc = built.get(id(raw))
                if doc is None:
                    doc = built[id(raw)] = await make_document(record, raw, parsed)
                else:
                    doc = dataclasses.replace(doc, user_id=record.user_id,
                                              state=doc_state(record))
                docs.append(doc)
            await self.index.index(docs)
        except Exception:
            log.exception("indexing %d new messages failed", len(messages))

    async def added_documents(
        self, documents: Sequence[tuple[MessageRecord, IndexDocument | None]]
    ) -> None:
        """`added` for new records whose documents were built from their messages already
        (`search.document.document_template`, in an analysis process): each completed with
        its record's own fields, all in one index transaction."""
        try:
            await self.index.index([for_record(template, record)
                                    for record, template in documents if template is not None])
        except Exception:
            log.exception("indexing %d new messages failed", len(documents))

    async def copied(self, records: Sequence[MessageRecord]) -> None:
        for record in records:
            try:
                if not await self.index.copy(record.user_id, record.blob_hash,
                                             doc_state(record)):
                    raw = await self.blobs.get(record.blob_hash)
                    await self.index.index([await make_document(record, raw)])
            except Exception:
                log.exception("indexing copy %s failed", record.message_id)

    async def changed(self, records: Sequence[MessageRecord]) -> None:
        if not records:
            return
        try:
            await self.index.update(records[0].user_id, [doc_state(r) for r in records])
        except Exception:
            log.exception("updating the search index failed")

    async def removed(self, user_id: str, message_ids: Sequence[str]) -> None:
        if not message_ids:
            return
        try:
            await self.index.remove(user_id, message_ids)
        except Exception:
            log.exception("removing from the search index failed")

    async def user_removed(self, user_id: str) -> None:
        try:
            await self.index.remove_user(user_id)
        except Exception:
            log.exception("removing a user from the search index failed")
