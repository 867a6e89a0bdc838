"""CPU-heavy work on messages in worker processes, so a node's event loop stays free.

Parsing a 50 KB message costs ~0.5 ms of CPU, building its search document ~0.6 ms, scoring its
content for spam ~1 ms. Done on the event loop, a batch of deliveries stalls every SMTP session
and IMAP client for tens of milliseconds at a time (each waits behind the batch), and under the
GIL the node uses one core however many the machine has. `AnalysisPool` runs such pure
functions of the message bytes in a few worker processes instead: `spawn`ed, so the server's
threads and event loop are never forked into them; one per core but the one the node's own
process keeps busy; started when the node starts taking mail (`start`).

The pool is `postroom.store.workers.WorkerPool` (socket pairs read by the event loop itself,
calls pipelined, a dead worker's calls run in a thread here); only module-level functions of
picklable arguments can be called (`prepare_delivery` here, the spam filter's
`score_content`).
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.core.message import ParsedMessage, parse_message
from postroom.search.document import document_template
from postroom.store.search import IndexDocument
from postroom.store.workers import WorkerLost, WorkerPool, default_processes

__all__ = ["AnalysisPool", "Prepared", "WorkerLost", "default_processes", "prepare_delivery"]


class AnalysisPool(WorkerPool):
    """The node's message analysis processes."""

    def __init__(self, processes: int | None = None) -> None:
        super().__init__(processes, name="postroom-analysis")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A received message ready to file: its parse, and its search document without the
    fields of the records it will get (`search.document.for_record` adds them)."""

    parsed: ParsedMessage
    document: IndexDocument | None


def prepare_delivery(raws: list[bytes], index: bool) -> list[Prepared]:
    """Parse each message, and build its search document when there is an index."""
    out: list[Prepared] = []
    for raw in raws:
        parsed = parse_message(raw)
        out.append(Prepared(parsed, document_template(raw, parsed) if index else None))
    return out
