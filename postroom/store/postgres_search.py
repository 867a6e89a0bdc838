"""The scale-out search index: PostgreSQL full text (tsvector/GIN) and pg_trgm, per user.

One table, `search_docs`, keyed by (user_id, message_id) like every user table of the metadata
store, so it distributes by user on Citus with the rest; every statement names the user. A row
carries the record's folder, flags, date and size (a query never needs the metadata store),
the readable body for snippets, and:

- `words`, a tsvector built here in Python rather than by a text search configuration, so it
  holds exactly the words the SQLite index would: runs of letters and digits, lowercased, with
  diacritics removed (FTS5's `unicode61 remove_diacritics 2`). The fields follow one another
  with a gap between them (a phrase never spans two fields); each word is there plain, for
  queries on any field, and, outside the body, once more as `field:word` (a word itself never
  holds a colon) for from:, to:, cc:, bcc:, subject: and filename:. Weights rank a match in
  the subject (A) above one in the sender (B), the other headers and names (C) and the body
  (D); body: asks for weight D. tsvector positions stop at 16,383, so a phrase further into a
  very long body than that is not found (single words still are).
- `imap_headers`, `imap_body`: the casefolded texts IMAP SEARCH compares against, with pg_trgm
  GIN indexes. A substring key becomes `LIKE '%piece%'` for each piece of the needle between
  line breaks (IMAP's body text joins its chunks with line breaks), which the trigram index
  answers and rechecks: a superset of the true matches that IMAP then checks itself.

The GIN indexes lead with user_id (btree_gin), so a user's lookup never reads other users'
postings. The index is derived data: a table of another format is dropped and rebuilt empty
(`postroom search reindex` fills it again).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import asyncpg

from postroom.store.errors import StoreError
from postroom.store.search import (
    MAX_IMAP_TEXT,
    AllOf,
    And,
    AnyOf,
    Contains,
    Criterion,
    DateRange,
    DocState,
    Filter,
    HasAttachment,
    HasFlag,
    Hit,
    IndexDocument,
    InFolders,
    Narrowed,
    Not,
    Or,
    SizeRange,
    Sort,
    Words,
)

SCHEMA_VERSION = 1
_MAX_POS = 16383  # tsvector positions stop here
_MAX_LEXEME = 1000  # bytes; PostgreSQL refuses lexemes over 2 KB (a long token is noise)
_TOKEN = re.compile(r"[^\W_]+")
_PIECES = re.compile(r"[\r\n\x00]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# (field, weight) in position order; the body last, so the short fields keep low positions
_FIELDS = (("from", "B"), ("to", "C"), ("cc", "C"), ("bcc", "C"), ("subject", "A"),
           ("filename", "C"), ("body", "D"))
_RANK_WEIGHTS = "{0.1, 0.25, 0.4, 1.0}"  # D, C, B, A


def _clean(value: str) -> str:
    """Text PostgreSQL can store: no NUL, no lone surrogates (from undecodable bytes)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value)
    return value


def fold(text: str) -> str:
    """Lowercase without diacritics, as FTS5's unicode61 tokenizer compares words."""
    lowered = text.lower()
    if lowered.isascii():
        return lowered
    return "".join(c for c in unicodedata.normalize("NFKD", lowered)
                   if not unicodedata.combining(c))


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(fold(_clean(text))) if len(t.encode()) <= _MAX_LEXEME]


def _lexeme(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector_text(fields: dict[str, str]) -> str:
    """The tsvector literal of a document's word fields (see the module docstring)."""
    entries: dict[str, list[str]] = {}
    pos = 1
    for name, weight in _FIELDS:
        for word in tokens(fields.get(name, "")):
            at = f"{min(pos, _MAX_POS)}{weight}"
            entries.setdefault(word, []).append(at)
            if name != "body":
                entries.setdefault(f"{name}:{word}", []).append(at)
            pos += 1
        pos += 1  # a gap: no phrase across two fields
    # PostgreSQL keeps at most 256 positions a lexeme
    return " ".join(f"{_lexeme(w)}:{','.join(p[:256])}" for w, p in entries.items())


def tsquery_text(node: Words) -> str | None:
    """The tsquery literal of a phrase (None when the text has no word characters)."""
    words = tokens(node.text)
    if not words:
        return None
    if node.field is None:
        terms = [_lexeme(w) for w in words]
    elif node.field == "body":
        terms = [_lexeme(w) + ":D" for w in words]
    else:
        terms = [_lexeme(f"{node.field}:{w}") for w in words]
    return " <-> ".join(terms)


def _like(piece: str) -> str:
    return "%" + piece.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _Compiler:
    """SQL over `search_docs d` with numbered parameters after the ones already taken."""

    def __init__(self, params: list[object]) -> None:
        self.params = params

    def arg(self, value: object) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def sql(self, node: Filter) -> str:
        if isinstance(node, Words):
            query = tsquery_text(node)
            if query is None:
                return "FALSE"  # no word characters: nothing can contain it as a word
            return f"d.words @@ {self.arg(query)}::tsquery"
        if isinstance(node, HasFlag):
            return f"(d.sysflags & {self.arg(int(node.flag))}::int) <> 0"
        if isinstance(node, InFolders):
            if not node.folder_ids:
                return "FALSE"
            return f"d.folder_id = ANY({self.arg(list(node.folder_ids))}::text[])"
        if isinstance(node, DateRange):
            parts = []
            if node.since is not None:
                parts.append(f"d.internal_date >= {self.arg(float(node.since))}")
            if node.until is not None:
                parts.append(f"d.internal_date < {self.arg(float(node.until))}")
            return "(" + " AND ".join(parts) + ")" if parts else "TRUE"
        if isinstance(node, SizeRange):
            parts = []
            if node.larger is not None:
                parts.append(f"d.size > {self.arg(int(node.larger))}")
            if node.smaller is not None:
                parts.append(f"d.size < {self.arg(int(node.smaller))}")
            return "(" + " AND ".join(parts) + ")" if parts else "TRUE"
        if isinstance(node, HasAttachment):
            return "d.has_attachments"
        if isinstance(node, And):
            if not node.children:
                return "TRUE"
            return "(" + " AND ".join(self.sql(c) for c in node.children) + ")"
        if isinstance(node, Or):
            if not node.children:
                return "FALSE"
            return "(" + " OR ".join(self.sql(c) for c in node.children) + ")"
        if isinstance(node, Not):
            return f"NOT {self.sql(node.child)}"
        raise TypeError(f"not a search filter: {node!r}")

    def criterion(self, node: Criterion) -> str | None:
        """SQL true for every document that may satisfy `node`; None: all may."""
        if isinstance(node, Contains):
            pieces = [p for p in _PIECES.split(node.needle) if len(p) >= 3]
            if not pieces:
                return None  # under three characters: a trigram cannot narrow it
            columns = ("imap_headers", "imap_body") if node.where == "text" \
                else ("imap_headers",) if node.where == "headers" else ("imap_body",)
            parts = []
            for column in columns:
                parts.append("(" + " AND ".join(
                    f"d.{column} LIKE {self.arg(_like(_clean(p)))}" for p in pieces) + ")")
            return "(d.partial OR " + " OR ".join(parts) + ")"
        if isinstance(node, AllOf):
            found = [p for p in (self.criterion(c) for c in node.children) if p is not None]
            return "(" + " AND ".join(found) + ")" if found else None
        if isinstance(node, AnyOf):
            mark = len(self.params)
            out: list[str] = []
            for child in node.children:
                part = self.criterion(child)
                if part is None:
                    del self.params[mark:]
                    return None
                out.append(part)
            return "(" + " OR ".join(out) + ")" if out else "FALSE"
        raise TypeError(f"not a search criterion: {node!r}")


_COLUMNS = ("user_id, message_id, folder_id, uid, sysflags, keywords, internal_date, size, "
            "blob_hash, has_attachments, partial, body, words, imap_headers, imap_body")


class PostgresSearchIndex:
    """SearchIndex on PostgreSQL; `dsn` as for the metadata store (`?search_path=` works)."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10,
                 command_timeout: float = 60.0) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(self.dsn, min_size=self.min_size,
                                             max_size=self.max_size,
                                             command_timeout=self.command_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await self._setup(conn)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
                raise StoreError(f"cannot set up the search index: {exc}") from exc
            raise
        self._pool = pool

    @staticmethod
    async def _setup(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            # nodes (and test runs) starting together take turns
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('postroom-search'))")
            for ext in ("pg_trgm", "btree_gin"):
                if await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = $1",
                                       ext) is None:
                    await conn.execute(f"CREATE EXTENSION {ext} SCHEMA public")
            trgm = await conn.fetchval(
                "SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace n "
                "ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm'")
            await conn.execute("CREATE TABLE IF NOT EXISTS search_meta "
                               "(key text PRIMARY KEY, value text NOT NULL)")
            version = await conn.fetchval("SELECT value FROM search_meta WHERE key = 'version'")
            if version is not None and version != str(SCHEMA_VERSION):
                await conn.execute("DROP TABLE IF EXISTS search_docs")
            await conn.execute("""
                CREATE TABLE IF NOT EXISTS search_docs (
                    user_id text NOT NULL,
                    message_id text NOT NULL,
                    folder_id text NOT NULL,
                    uid bigint NOT NULL,
                    sysflags integer NOT NULL,
                    keywords text NOT NULL,
                    internal_date double precision NOT NULL,
                    size bigint NOT NULL,
                    blob_hash text NOT NULL,
                    has_attachments boolean NOT NULL,
                    partial boolean NOT NULL,
                    body text NOT NULL,
                    words tsvector NOT NULL,
                    imap_headers text NOT NULL,
                    imap_body text NOT NULL,
                    PRIMARY KEY (user_id, message_id)
                )""")
            for statement in (
                "CREATE INDEX IF NOT EXISTS search_docs_by_date ON search_docs "
                '(user_id, internal_date DESC, message_id COLLATE "C" DESC)',
                "CREATE INDEX IF NOT EXISTS search_docs_by_folder ON search_docs "
                "(user_id, folder_id)",
                "CREATE INDEX IF NOT EXISTS search_docs_by_blob ON search_docs "
                "(user_id, blob_hash)",
                "CREATE INDEX IF NOT EXISTS search_docs_words ON search_docs "
                "USING gin (user_id, words)",
                "CREATE INDEX IF NOT EXISTS search_docs_headers ON search_docs "
                f"USING gin (user_id, imap_headers {trgm}.gin_trgm_ops)",
                "CREATE INDEX IF NOT EXISTS search_docs_body ON search_docs "
                f"USING gin (user_id, imap_body {trgm}.gin_trgm_ops)",
            ):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO search_meta VALUES ('version', $1) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value", str(SCHEMA_VERSION))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("search index not open")
        return self._pool

    # ---- writes

    async def index(self, docs: Sequence[IndexDocument]) -> None:
        if not docs:
            return
        latest = {(d.user_id, d.state.message_id): d for d in docs}  # the last one wins
        rows = []
        for d in latest.values():
            s = d.state
            partial = d.partial or len(d.imap_headers) > MAX_IMAP_TEXT \
                or len(d.imap_body) > MAX_IMAP_TEXT
            words = tsvector_text({"from": d.from_, "to": d.to, "cc": d.cc, "bcc": d.bcc,
                                   "subject": d.subject, "filename": d.filenames,
                                   "body": d.body})
            rows.append((d.user_id, s.message_id, s.folder_id, s.uid, s.sysflags,
                         " ".join(s.keywords), s.internal_date, s.size, d.blob_hash,
                         d.has_attachments, partial, _clean(d.body), words,
                         _clean(d.imap_headers[:MAX_IMAP_TEXT]),
                         _clean(d.imap_body[:MAX_IMAP_TEXT])))
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[2:])
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            await conn.executemany(
                f"INSERT INTO search_docs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "$8, $9, $10, $11, $12, $13::tsvector, $14, $15) "
                f"ON CONFLICT (user_id, message_id) DO UPDATE SET {updates}", rows)

    async def copy(self, user_id: str, blob_hash: str, state: DocState) -> bool:
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            src = await conn.fetchval(
                "SELECT message_id FROM search_docs WHERE user_id = $1 AND blob_hash = $2 "
                "LIMIT 1", user_id, blob_hash)
            if src is None:
                return False
            await conn.execute(
                f"INSERT INTO search_docs ({_COLUMNS}) SELECT user_id, $3, $4, $5, $6, $7, "
                "$8, $9, blob_hash, has_attachments, partial, body, words, imap_headers, "
                "imap_body FROM search_docs WHERE user_id = $1 AND message_id = $2 "
                "ON CONFLICT (user_id, message_id) DO UPDATE SET folder_id = excluded.folder_id, "
                "uid = excluded.uid, sysflags = excluded.sysflags, keywords = excluded.keywords, "
                "internal_date = excluded.internal_date, size = excluded.size, "
                "blob_hash = excluded.blob_hash, has_attachments = excluded.has_attachments, "
                "partial = excluded.partial, body = excluded.body, words = excluded.words, "
                "imap_headers = excluded.imap_headers, imap_body = excluded.imap_body",
                user_id, src, state.message_id, state.folder_id, state.uid, state.sysflags,
                " ".join(state.keywords), state.internal_date, state.size)
            return True

    async def update(self, user_id: str, states: Sequence[DocState]) -> None:
        if not states:
            return
        async with self._pool_or_fail().acquire() as conn, conn.transaction():
            await conn.executemany(
                "UPDATE search_docs SET folder_id = $3, uid = $4, sysflags = $5, keywords = $6, "
                "internal_date = $7, size = $8 WHERE user_id = $1 AND message_id = $2",
                [(user_id, s.message_id, s.folder_id, s.uid, s.sysflags, " ".join(s.keywords),
                  s.internal_date, s.size) for s in states])

    async def remove(self, user_id: str, message_ids: Sequence[str]) -> None:
        if not message_ids:
            return
        async with self._pool_or_fail().acquire() as conn:
            await conn.execute("DELETE FROM search_docs WHERE user_id = $1 "
                               "AND message_id = ANY($2::text[])", user_id, list(message_ids))

    async def remove_user(self, user_id: str) -> None:
        async with self._pool_or_fail().acquire() as conn:
            await conn.execute("DELETE FROM search_docs WHERE user_id = $1", user_id)

    # ---- reads

    async def indexed_ids(self, user_id: str) -> set[str]:
        async with self._pool_or_fail().acquire() as conn:
            rows = await conn.fetch("SELECT message_id FROM search_docs WHERE user_id = $1",
                                    user_id)
        return {str(r[0]) for r in rows}

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
        params: list[object] = [user_id]
        comp = _Compiler(params)
        rank = None
        if sort == "relevance":
            exprs = [e for e in (tsquery_text(t) for t in rank_terms) if e is not None]
            if exprs:
                rank = comp.arg(" | ".join(f"({e})" for e in exprs)) + "::tsquery"
        where = comp.sql(query)
        score = (f"CASE WHEN d.words @@ {rank} THEN -ts_rank('{_RANK_WEIGHTS}', d.words, "
                 f"{rank}) ELSE 0 END" if rank is not None else "0")
        sql = (f"SELECT d.message_id, d.internal_date, ({score})::float8 AS score, d.body "
               f"FROM search_docs d WHERE d.user_id = $1 AND {where}")
        if before is not None and rank is None:
            sql += (f' AND (d.internal_date, d.message_id COLLATE "C") < '
                    f"({comp.arg(float(before[0]))}, {comp.arg(before[1])})")
        order = 'd.internal_date DESC, d.message_id COLLATE "C" DESC'
        sql += f" ORDER BY {'3, ' if rank is not None else ''}{order}"
        sql += f" LIMIT {comp.arg(limit)} OFFSET " \
               f"{comp.arg(offset if rank is not None or before is None else 0)}"
        async with self._pool_or_fail().acquire() as conn:
            rows = await conn.fetch(sql, *params)
        return [Hit(str(r[0]), float(r[1]), float(r[2]), str(r[3])) for r in rows]

    async def narrow(self, user_id: str, folder_id: str, criterion: Criterion) -> Narrowed:
        params: list[object] = [user_id, folder_id]
        cond = _Compiler(params).criterion(criterion)
        async with self._pool_or_fail().acquire() as conn:
            every = await conn.fetch("SELECT message_id FROM search_docs WHERE user_id = $1 "
                                     "AND folder_id = $2", user_id, folder_id)
            indexed = frozenset(str(r[0]) for r in every)
            if cond is None:
                return Narrowed(indexed, indexed)
            found = await conn.fetch("SELECT d.message_id FROM search_docs d WHERE "
                                     f"d.user_id = $1 AND d.folder_id = $2 AND {cond}", *params)
        return Narrowed(frozenset(str(r[0]) for r in found), indexed)
