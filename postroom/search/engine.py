"""Planning a parsed query onto the index, and turning hits into listings with snippets.

Planning resolves what the index cannot know: folder names (in:) to ids, calendar days and
ages (before:, older_than:) to timestamps, and the default scope of a search (every folder
but Trash and Junk, unless the query names a folder itself; `in:anywhere` searches all).
Dates are the messages' received times (as the folder listing sorts them), days in UTC.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postroom.core.models import Flag, Folder, FolderRole, MessageRecord, User
from postroom.search import query as q
from postroom.search.snippet import highlight, term_words
from postroom.store import search as s

if TYPE_CHECKING:
    from postroom.service import MailService

MAX_LIMIT = 500
_DAY = 86400.0
_ROLE_NAMES = {"inbox": FolderRole.INBOX, "sent": FolderRole.SENT, "drafts": FolderRole.DRAFTS,
               "junk": FolderRole.JUNK, "spam": FolderRole.JUNK, "trash": FolderRole.TRASH,
               "archive": FolderRole.ARCHIVE}
_IS = {"unread": (Flag.SEEN, False), "read": (Flag.SEEN, True),
       "starred": (Flag.FLAGGED, True), "flagged": (Flag.FLAGGED, True),
       "answered": (Flag.ANSWERED, True), "draft": (Flag.DRAFT, True)}


@dataclass(frozen=True, slots=True)
class SearchResult:
    record: MessageRecord
    highlight: str  # HTML: escaped text with <mark> around the matches
    score: float


@dataclass(frozen=True, slots=True)
class SearchPage:
    results: list[SearchResult]
    next_cursor: str | None


def _folder_ids(name: str, folders: Sequence[Folder], position: int) -> tuple[str, ...] | None:
    """The folders `in:name` means (a folder and its subfolders); None for anywhere."""
    lowered = name.lower()
    if lowered in ("anywhere", "all"):
        return None
    found = [f for f in folders if f.name == name] or \
        [f for f in folders if f.name.lower() == lowered]
    if not found and lowered in _ROLE_NAMES:
        found = [f for f in folders if f.role is _ROLE_NAMES[lowered]]
    if not found:
        raise q.QuerySyntaxError(f"no folder named {name!r}", position)
    top = found[0].name
    return tuple(f.folder_id for f in folders if f.name == top or f.name.startswith(top + "/"))


def _day_start(day: datetime.date) -> float:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def plan(tree: q.Query | None, folders: Sequence[Folder], now: float) -> s.Filter:
    """The index filter for a parsed query (QuerySyntaxError for an unknown folder)."""

    def walk(node: q.Query) -> s.Filter:
        if isinstance(node, q.Term):
            return s.Words(node.text, node.field)
        if isinstance(node, q.IsFlag):
            flag, present = _IS[node.name]
            return s.HasFlag(int(flag)) if present else s.Not(s.HasFlag(int(flag)))
        if isinstance(node, q.HasAttachment):
            return s.HasAttachment()
        if isinstance(node, q.InFolder):
            ids = _folder_ids(node.name, folders, node.position)
            return s.And() if ids is None else s.InFolders(ids)
        if isinstance(node, q.DateBound):
            at = _day_start(node.day)
            return s.DateRange(until=at) if node.before else s.DateRange(since=at)
        if isinstance(node, q.Age):
            at = now - node.days * _DAY
            return s.DateRange(until=at) if node.older else s.DateRange(since=at)
        if isinstance(node, q.Size):
            return s.SizeRange(larger=node.octets) if node.larger \
                else s.SizeRange(smaller=node.octets)
        if isinstance(node, q.AllOf):
            return s.And(tuple(walk(c) for c in node.children))
        if isinstance(node, q.AnyOf):
            return s.Or(tuple(walk(c) for c in node.children))
        return s.Not(walk(node.child))

    base = walk(tree) if tree is not None else s.And()
    if q.mentions_folder(tree):
        return base
    hidden = tuple(f.folder_id for f in folders if f.role in (FolderRole.TRASH, FolderRole.JUNK))
    if not hidden:
        return base
    return s.And((base, s.Not(s.InFolders(hidden))))


def _encode(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode(token: str) -> dict[str, object]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise ValueError("invalid cursor")
    return data


async def run_search(service: MailService, user: User, text: str, *, sort: str = "date",
                     limit: int = 50, cursor: str | None = None,
                     now: float | None = None) -> SearchPage:
    from postroom.service import InvalidInput

    if sort not in ("date", "relevance"):
        raise InvalidInput("sort must be date or relevance")
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    index = service.search_index
    if index is None:
        raise InvalidInput("search is not configured on this server")
    tree = q.parse_query(text)
    folders = await service.metadata.list_folders(user.user_id)
    query = plan(tree, folders, time.time() if now is None else now)
    terms = q.positive_terms(tree)
    offset, before = 0, None
    if cursor:
        try:
            data = _decode(cursor)
            if data.get("s") != sort:
                raise ValueError("cursor of another sort order")
            if sort == "relevance":
                offset = int(data["o"])  # type: ignore[call-overload]
            else:
                before = (float(data["d"]), str(data["m"]))  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            raise InvalidInput("invalid cursor") from None
    sort_kind: s.Sort = "relevance" if sort == "relevance" else "date"
    hits = await index.search(user.user_id, query,
                              rank_terms=[s.Words(t.text, t.field) for t in terms],
                              sort=sort_kind, limit=limit + 1, offset=offset, before=before)
    more = len(hits) > limit
    hits = hits[:limit]
    records = {r.message_id: r for r in
               await service.metadata.get_messages(user.user_id, [h.message_id for h in hits])}
    phrases = [term_words(t.text) for t in terms if t.field in (None, "body")]
    results = [SearchResult(records[h.message_id], highlight(h.body, phrases), h.score)
               for h in hits if h.message_id in records]
    next_cursor = None
    if more and hits:
        last = hits[-1]
        next_cursor = _encode({"s": sort, "o": offset + limit} if sort == "relevance"
                              else {"s": sort, "d": last.internal_date, "m": last.message_id})
    return SearchPage(results, next_cursor)


async def narrow_candidates(index: s.SearchIndex | None, user: User, folder_id: str,
                            criterion: s.Criterion, message_ids: Collection[str]) -> set[str]:
    """Those of `message_ids` (records of one folder) that may satisfy an IMAP criterion:
    the index's matches and every record it does not know (not yet indexed, or failed)."""
    if index is None or (isinstance(criterion, s.AllOf) and not criterion.children):
        return set(message_ids)
    narrowed = await index.narrow(user.user_id, folder_id, criterion)
    return {m for m in message_ids if m in narrowed.possible or m not in narrowed.indexed}
