"""The index document of a message: its words for queries, and the exact texts IMAP searches.

The IMAP texts are built by the IMAP server's own SEARCH code (`postroom.imap.search.Candidate`)
from the same MIME structure, so what the index narrows with can never drift from what IMAP
then checks: a substring IMAP would find is always in the indexed text.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from postroom.core.message import ParsedMessage, decode_bytes, html_to_text, parse_message
from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.imap import mime
from postroom.imap.search import Candidate
from postroom.store.search import (
    MAX_BODY_WORDS_TEXT,
    MAX_IMAP_TEXT,
    DocState,
    IndexDocument,
)

A = TypeVar("A")


def doc_state(record: MessageRecord) -> DocState:
    return DocState(record.message_id, record.folder_id, record.uid, int(record.flags.system),
                    record.flags.keywords, record.internal_date, record.size)


def body_words(parsed: ParsedMessage) -> str:
    """The readable body: the plain text part, or the HTML part with its tags stripped."""
    text = parsed.text if parsed.text.strip() else html_to_text(parsed.html[:MAX_BODY_WORDS_TEXT])
    return text[:MAX_BODY_WORDS_TEXT]


def imap_texts(raw: bytes) -> tuple[str, str]:
    """(all header fields, body) as IMAP SEARCH compares them, casefolded; the body without
    the decoded text parts that already appear verbatim in the undecoded body.

    IMAP's body text is its decoded text parts and then the undecoded body, joined by line
    breaks (postroom.imap.search.Candidate.body_text). The index splits a needle at line
    breaks, so a needle matching there matches piece by piece within single lines of one of
    those chunks; a decoded part found verbatim in the undecoded body adds nothing to find,
    and leaving it out halves what most plain messages cost to index.
    """
    part = mime.parse(raw)
    candidate = Candidate(0, _NO_RECORD, False, raw=raw, part=part)
    undecoded = raw[part.body_start :].decode("utf-8", "replace").casefold()
    chunks = [undecoded]
    for leaf in mime.text_leaves(part):
        text = decode_bytes(mime.decoded_body(raw, leaf), leaf.param("charset")).casefold()
        if text and text not in undecoded:
            chunks.append(text)
    return candidate.all_headers(), "\n".join(chunks)


def build_document(record: MessageRecord, raw: bytes, parsed: ParsedMessage) -> IndexDocument:
    h = parsed.headers
    headers, body = imap_texts(raw)
    partial = len(headers) > MAX_IMAP_TEXT or len(body) > MAX_IMAP_TEXT
    return IndexDocument(
        user_id=record.user_id,
        state=doc_state(record),
        blob_hash=record.blob_hash,
        has_attachments=record.has_attachments,
        from_=h.from_,
        to=h.to,
        cc=h.cc,
        bcc=h.bcc,
        subject=h.subject,
        body=body_words(parsed),
        filenames=" ".join(a.filename for a in parsed.attachments if a.filename),
        imap_headers=headers[:MAX_IMAP_TEXT],
        imap_body=body[:MAX_IMAP_TEXT],
        partial=partial,
    )


def document_template(raw: bytes, parsed: ParsedMessage) -> IndexDocument:
    """What of a message's document comes from its bytes alone, the same for every copy
    (built before the records exist, in a worker process); `for_record` completes it."""
    return build_document(_NO_RECORD, raw, parsed)


def for_record(template: IndexDocument, record: MessageRecord) -> IndexDocument:
    """A `document_template` completed with the record's own fields: the fields
    `build_document` takes from the record, so the two always give the same document."""
    return dataclasses.replace(template, user_id=record.user_id, state=doc_state(record),
                               blob_hash=record.blob_hash,
                               has_attachments=record.has_attachments)


# Candidate wants a record; the texts never look at it.
_NO_RECORD = MessageRecord(
    user_id="", message_id="", folder_id="", uid=0, modseq=0,
    flags=Flags(),
    internal_date=0.0, size=0, blob_hash="",
    headers=HeaderSummary(),
    snippet="", has_attachments=False, thread_id="",
)


def build_from_raw(record: MessageRecord, raw: bytes) -> IndexDocument:
    """`build_document` parsing the message itself (what a pool worker runs)."""
    return build_document(record, raw, parse_message(raw))


def build_batch(items: list[tuple[MessageRecord, bytes]]) -> list[IndexDocument]:
    """Documents for a batch of records: one pool task per batch keeps the hand-offs few."""
    return [build_from_raw(record, raw) for record, raw in items]


class DocumentPool:
    """Builds index documents in worker processes, for bulk indexing (import, reindex).

    Parsing and building a document is pure Python and costs about as much as writing it to
    the index, so on a machine with more than one core the builds of the next batches run
    beside the index writes of this one. One core (or workers=0): built in this process.
    """

    def __init__(self, workers: int | None = None) -> None:
        import os

        count = (os.cpu_count() or 1) if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        if count > 1:
            import multiprocessing

            # forkserver: no copy of the caller's threads and event loop in the workers
            self._pool = ProcessPoolExecutor(
                count, mp_context=multiprocessing.get_context("forkserver"))

    async def build(self, items: list[tuple[MessageRecord, bytes]]) -> list[IndexDocument]:
        return await self.run(build_batch, items)

    async def run(self, fn: Callable[[A], list[IndexDocument]], arg: A) -> list[IndexDocument]:
        """`fn(arg)` on a worker (fn must be a module-level function: it is pickled)."""
        if self._pool is None:
            return fn(arg)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
