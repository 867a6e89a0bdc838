"""MailService's read-through cache: first pages of folder listings, message summaries and
folder lists with counts, per user, on the cache seam (an LRU per process, shared by the
processes of a data dir through siblings://, or Redis for every node).

Freshness rests on a per-user *generation*: a random token kept in the cache at `u:USER:gen`
and part of every entry's key (`u:USER:GEN:...`).

- A reader reads the generation *before* it reads the metadata store, and files what it read
  under that generation. When there is none it installs a fresh random one first.
- Every change, *after* its commit, drops the user's whole prefix (`u:USER:`): the generation
  and every entry with it. The next reader installs a new generation.

So a slow reader that read the store before a change and writes its listing after the change's
invalidation files it under a generation nobody will ask for again: a change can never be
followed by a stale read, whichever node made it and whichever node reads. A generation is never
reused (random, 96 bits), and dropping the prefix on each change keeps a user's entries from
piling up between changes.

The cache is an accelerator, never a dependency: when it cannot be reached a read goes to the
store and is not cached. An invalidation that fails (the cache is down) is logged; entries
written before it are then bounded by their time to live (`ttl`, a minute by default) on other
nodes, while the node that made the change reads that user's mail past the cache, trying the
invalidation again at each read, until it succeeds (an invalidation is tried twice at once: the
first command on a connection that a cache restart broke fails, the next reconnects). A Redis
restart without persistence, the usual set-up for a cache, forgets everything anyway; entries
filed after it, before an invalidation that failed, are what the retries are for.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from postroom.core.models import (
    Flag,
    Flags,
    Folder,
    FolderCounts,
    FolderRole,
    HeaderSummary,
    MessageRecord,
)
from postroom.store.cache import Cache
from postroom.store.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL = 60.0


def user_prefix(user_id: str) -> str:
    return f"u:{user_id}:"


# ------------------------------------------------------------------------------- codecs


def record_to_json(r: MessageRecord) -> list[Any]:
    h = r.headers
    return [r.user_id, r.message_id, r.folder_id, r.uid, r.modseq,
            int(r.flags.system), list(r.flags.keywords), r.internal_date, r.size, r.blob_hash,
            [h.from_, h.to, h.cc, h.bcc, h.subject, h.date, h.message_id, h.in_reply_to,
             list(h.references)],
            r.snippet, r.has_attachments, r.thread_id, r.spam_verdict]


def record_from_json(v: list[Any]) -> MessageRecord:
    h = v[10]
    return MessageRecord(
        user_id=v[0], message_id=v[1], folder_id=v[2], uid=v[3], modseq=v[4],
        flags=Flags(Flag(v[5]), tuple(v[6])), internal_date=v[7], size=v[8], blob_hash=v[9],
        headers=HeaderSummary(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], tuple(h[8])),
        snippet=v[11], has_attachments=v[12], thread_id=v[13], spam_verdict=v[14],
    )


def folder_to_json(f: Folder) -> list[Any]:
    return [f.user_id, f.folder_id, f.name, f.role.value if f.role else None, f.uidvalidity,
            f.uidnext, f.highestmodseq, f.subscribed]


def folder_from_json(v: list[Any]) -> Folder:
    return Folder(v[0], v[1], v[2], FolderRole(v[3]) if v[3] is not None else None, v[4], v[5],
                  v[6], v[7])


# -------------------------------------------------------------------------------- cache


class MailCache:
    """Generation-keyed read-through caching over a `Cache`."""

    def __init__(self, cache: Cache, ttl: float = DEFAULT_TTL) -> None:
        self.cache = cache
        self.ttl = ttl
        # users whose invalidation failed here: their reads pass the cache by until a retry
        # of it succeeds (a change made here is never followed by a stale read here)
        self._unsure: set[str] = set()

    async def generation(self, user_id: str) -> str | None:
        """The user's current generation (installing one when there is none); None when the
        cache cannot be reached, or a failed invalidation of the user's entries still cannot
        be made (then nothing is cached)."""
        if user_id in self._unsure and not await self._drop(user_id):
            return None
        key = user_prefix(user_id) + "gen"
        try:
            found = await self.cache.get(key)
            if found is not None:
                return found.decode()
            fresh = secrets.token_hex(12)
            # Longer than any entry, so an entry never outlives the generation it was
            # filed under (a lost generation only costs misses, never staleness).
            await self.cache.set(key, fresh.encode(), ttl=self.ttl * 4)
            return fresh
        except StoreError as exc:
            log.debug("cache unavailable, reading through: %s", exc)
            return None

    async def read_through(self, user_id: str, name: str, load: Callable[[], Awaitable[T]],
                           encode: Callable[[T], Any], decode: Callable[[Any], T]) -> T:
        """The cached value of `name` for the user, else `load()` (filed under the generation
        read before it ran)."""
        if len(name) > 300:  # an id from a URL: not worth a key of its size
            return await load()
        gen = await self.generation(user_id)
        if gen is None:
            return await load()
        key = f"{user_prefix(user_id)}{gen}:{name}"
        try:
            hit = await self.cache.get(key)
        except StoreError:
            hit = None
        if hit is not None:
            try:
                return decode(json.loads(hit))
            except (ValueError, TypeError, IndexError, KeyError):
                log.warning("dropping a malformed cache entry %s", key)
        value = await load()
        try:
            await self.cache.set(key, json.dumps(encode(value)).encode(), ttl=self.ttl)
        except StoreError as exc:
            log.debug("cache set failed: %s", exc)
        return value

    async def changed(self, user_id: str) -> None:
        """Forget everything cached for the user (call after the change is committed)."""
        # Twice: a connection that a restart of the cache broke fails once, and the client
        # then connects afresh.
        if await self._drop(user_id) or await self._drop(user_id):
            return
        self._unsure.add(user_id)
        log.warning("cache invalidation for user %s failed; this node reads past the cache "
                    "for them until it succeeds, other nodes' entries expire within %.0f s",
                    user_id, self.ttl)

    async def _drop(self, user_id: str) -> bool:
        try:
            await self.cache.delete_prefix(user_prefix(user_id))
        except StoreError as exc:
            log.debug("cache invalidation failed: %s", exc)
            return False
        self._unsure.discard(user_id)
        return True


# Encoders for the shapes MailService caches.

def page_to_json(value: tuple[list[MessageRecord], bool]) -> list[Any]:
    records, more = value
    return [[record_to_json(r) for r in records], more]


def page_from_json(v: list[Any]) -> tuple[list[MessageRecord], bool]:
    return [record_from_json(r) for r in v[0]], bool(v[1])


def optional_record_to_json(r: MessageRecord | None) -> list[Any] | None:
    return None if r is None else record_to_json(r)


def optional_record_from_json(v: list[Any] | None) -> MessageRecord | None:
    return None if v is None else record_from_json(v)


def folders_to_json(value: list[tuple[Folder, FolderCounts]]) -> list[Any]:
    return [[folder_to_json(f), c.total, c.unread] for f, c in value]


def folders_from_json(v: list[Any]) -> list[tuple[Folder, FolderCounts]]:
    return [(folder_from_json(f), FolderCounts(total, unread)) for f, total, unread in v]
