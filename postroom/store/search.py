"""The search seam: the full text of each user's own mail, and the filters a query resolves to.

The index holds one document per message record (keyed by user and message id) with the words
of its header fields, its body text and attachment names for ranked "Gmail-style" queries, and
the exact text IMAP SEARCH compares against (RFC 3501 §6.4.4: a case-insensitive substring of
the decoded header fields and body) for narrowing IMAP searches. It also keeps each record's
folder, flags, date and size, updated with every change, so a query is answered from the index
alone and flag changes or moves show at once.

Every method names the user and every query is scoped by it: no filter can reach another
user's documents. Queries arrive already resolved (folder names to ids, relative dates to
timestamps) as a small tree of the node types below; the parser lives in `postroom.search`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# The word fields a query may name (from:, to:, cc:, bcc:, subject:, filename:); a term with
# no field matches any of them.
WORD_FIELDS = ("from", "to", "cc", "bcc", "subject", "body", "filename")

# IMAP texts longer than this are cut, and the document is marked partial: IMAP then always
# checks it itself, so narrowing stays exact without indexing huge attachments in full.
MAX_IMAP_TEXT = 1_000_000
MAX_BODY_WORDS_TEXT = 200_000


@dataclass(frozen=True, slots=True)
class DocState:
    """What changes without the text changing: where the record is and how it is flagged."""

    message_id: str
    folder_id: str
    uid: int
    sysflags: int
    keywords: tuple[str, ...]
    internal_date: float
    size: int


@dataclass(frozen=True, slots=True)
class IndexDocument:
    """One message record as the index stores it."""

    user_id: str
    state: DocState
    blob_hash: str
    has_attachments: bool
    from_: str = ""
    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    body: str = ""
    filenames: str = ""
    imap_headers: str = ""  # casefolded, exactly what IMAP's HEADER/FROM/... keys look in
    imap_body: str = ""  # casefolded, exactly what IMAP's BODY key looks in
    partial: bool = False  # an IMAP text was cut at MAX_IMAP_TEXT


# ---- the resolved query tree ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Words:
    """Words in order (a phrase when several), tokenised with case and diacritics folded.

    `field` is one of WORD_FIELDS, or None for any field.
    """

    text: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class HasFlag:
    flag: int  # a postroom.core.models.Flag bit


@dataclass(frozen=True, slots=True)
class InFolders:
    folder_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DateRange:
    """internal_date >= since and < until (either may be None)."""

    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class SizeRange:
    """size > larger and size < smaller (either may be None)."""

    larger: int | None = None
    smaller: int | None = None


@dataclass(frozen=True, slots=True)
class HasAttachment:
    pass


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Filter, ...] = ()  # empty: every document


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Filter


Filter = Words | HasFlag | InFolders | DateRange | SizeRange | HasAttachment | And | Or | Not


# ---- IMAP substring narrowing ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contains:
    """IMAP text key: `needle` (casefolded) is a substring of the headers, body or either."""

    where: Literal["headers", "body", "text"]
    needle: str


@dataclass(frozen=True, slots=True)
class AllOf:
    children: tuple[Criterion, ...] = ()  # empty: no narrowing


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Criterion, ...]


Criterion = Contains | AllOf | AnyOf


@dataclass(frozen=True, slots=True)
class Narrowed:
    """`possible`: indexed records of the folder that may match; `indexed`: every indexed
    record of the folder. A record the index does not know must be checked by the caller."""

    possible: frozenset[str]
    indexed: frozenset[str]


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    message_id: str
    internal_date: float
    score: float  # lower is more relevant (bm25 sign convention); 0 when not ranked
    body: str = field(repr=False, default="")


Sort = Literal["date", "relevance"]


class SearchIndex(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def index(self, docs: Sequence[IndexDocument]) -> None:
        """Add or replace documents (one transaction for the batch)."""
        ...

    async def copy(self, user_id: str, blob_hash: str, state: DocState) -> bool:
        """Index a new record whose text equals an indexed one of the same blob (IMAP COPY);
        False when no document of the user has that blob (the caller indexes it in full)."""
        ...

    async def update(self, user_id: str, states: Sequence[DocState]) -> None:
        """New folder, uid, flags of indexed records (flag changes and moves)."""
        ...

    async def remove(self, user_id: str, message_ids: Sequence[str]) -> None: ...
    async def remove_user(self, user_id: str) -> None: ...

    async def indexed_ids(self, user_id: str) -> set[str]:
        """Every message id the index holds for the user (reindexing compares with it)."""
        ...

    async def search(
        self,
        user_id: str,
        query: Filter,
        *,
        rank_terms: Sequence[Words] = (),
        sort: Sort = "date",
        limit: int = 50,
        offset: int = 0,
        before: tuple[float, str] | None = None,
    ) -> list[Hit]:
        """Documents matching `query`, newest first (by internal_date, then message id) or
        by relevance to `rank_terms` (best first, then newest). `before` continues a date
        listing after (internal_date, message_id); `offset` pages a relevance listing."""
        ...

    async def narrow(self, user_id: str, folder_id: str, criterion: Criterion) -> Narrowed:
        """The records of a folder that may satisfy an IMAP text criterion (a superset)."""
        ...
