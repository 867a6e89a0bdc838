"""The embedded search index: SQLite FTS5 in its own file, beside the metadata.

Two full-text tables share the document ids of `docs` (one row per message record, with its
folder, flags, date and size, so a query never needs the metadata store):

- `words` (unicode61, diacritics removed): header fields, body text and attachment names as
  words, for the query language and bm25 relevance; its stored body feeds the snippets.
- `grams_h`, `grams_b` (trigram, headers and body): the exact casefolded texts IMAP SEARCH
  compares against. A substring key becomes "every trigram of the needle is in the text", a
  superset of the true matches (positions are not stored, `detail=none`, which keeps these
  tables small and fast to write); IMAP then applies RFC 3501 to that superset itself.

Scoping by user is structural: each user gets a number `n` and every document id of theirs lies
in [n << 32, (n + 1) << 32), so every full-text query carries `rowid BETWEEN` on the user's
range (FTS5 seeks within its doclists) as well as `docs.user_id = ?`.

Concurrency follows the metadata store: one writer runs each whole transaction (a thread, or
in `postroom serve` a process of its own, `start_writer_process`), readers use their own
connections (WAL), and other processes (`postroom search reindex`) may write the same file:
every write is a short `BEGIN IMMEDIATE` transaction that waits on busy_timeout.
The index can always be rebuilt from the mail, so commits do not fsync (synchronous=NORMAL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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
from postroom.store.workers import WorkerLost, WorkerPool

T = TypeVar("T")
log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
READER_THREADS = 2
_USER_BITS = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS search_users (
    user_id TEXT PRIMARY KEY,
    n INTEGER NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    uid INTEGER NOT NULL,
    sysflags INTEGER NOT NULL,
    keywords TEXT NOT NULL,
    internal_date REAL NOT NULL,
    size INTEGER NOT NULL,
    blob_hash TEXT NOT NULL,
    has_attachments INTEGER NOT NULL,
    partial INTEGER NOT NULL,
    UNIQUE (user_id, message_id)
);
CREATE INDEX IF NOT EXISTS docs_by_date ON docs (user_id, internal_date, message_id);
DROP INDEX IF EXISTS docs_by_folder;
CREATE INDEX IF NOT EXISTS docs_by_folder_date ON docs (user_id, folder_id, internal_date,
                                                        message_id);
CREATE INDEX IF NOT EXISTS docs_by_blob ON docs (user_id, blob_hash);
CREATE INDEX IF NOT EXISTS docs_by_size ON docs (user_id, size);
CREATE VIRTUAL TABLE IF NOT EXISTS words USING fts5(
    f_from, f_to, f_cc, f_bcc, f_subject, f_body, f_filename,
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE IF NOT EXISTS grams_h USING fts5(
    text, tokenize = 'trigram', detail = 'none'
);
CREATE VIRTUAL TABLE IF NOT EXISTS grams_b USING fts5(
    text, tokenize = 'trigram', detail = 'none'
);
"""
SCHEMA_VERSION = 2
_TABLES = ("docs", "search_users", "words", "grams", "grams_h", "grams_b")
_GRAMS = {"headers": "grams_h", "body": "grams_b"}
_DRIVE_CAP = 3000  # below this many candidates a search starts from them (see _driver)
_DENSE_CAP = 40000  # words matching this many documents are probed per row (see _walk)
_PROBE_CAP = 300  # rows a date walk probes against FTS5 before it leaves it to SQLite's plan
_MAX_TRIGRAMS = 24  # trigrams of one needle looked up; any subset still gives a superset

_COLUMN = {"from": "f_from", "to": "f_to", "cc": "f_cc", "bcc": "f_bcc",
           "subject": "f_subject", "body": "f_body", "filename": "f_filename"}
# bm25 weights in column order: a word in the subject or sender says more than one in a body
_BM25 = "bm25(words, 4.0, 1.5, 1.0, 1.0, 6.0, 1.0, 2.0)"
_WORD_CHAR = re.compile(r"[^\W_]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAK = re.compile(r"[\r\n]+")


def _text(value: str) -> str:
    """Text SQLite can store: lone surrogates (from undecodable bytes) become U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value)
    return value


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _words_expr(node: Words) -> str | None:
    """An FTS5 phrase for the words (None when the text has no word characters at all)."""
    if not _WORD_CHAR.search(node.text):
        return None
    phrase = _quote(node.text)
    return f"{_COLUMN[node.field]} : {phrase}" if node.field else phrase


def _fts(node: Filter) -> str | None:
    """One FTS5 expression for a purely textual subtree, else None."""
    if isinstance(node, Words):
        return _words_expr(node)
    if isinstance(node, And):
        pos: list[str] = []
        neg: list[str] = []
        for child in node.children:
            inner = child.child if isinstance(child, Not) else child
            expr = _fts(inner)
            if expr is None:
                return None
            (neg if isinstance(child, Not) else pos).append(expr)
        if not pos:
            return None
        return "(" + " AND ".join(f"({p})" for p in pos) + ")" + "".join(
            f" NOT ({n})" for n in neg)
    if isinstance(node, Or):
        exprs = [_fts(child) for child in node.children]
        if not exprs or any(e is None for e in exprs):
            return None
        return "(" + " OR ".join(f"({e})" for e in exprs) + ")"
    return None


def _has_words(node: Filter) -> bool:
    if isinstance(node, Words):
        return True
    if isinstance(node, (And, Or)):
        return any(_has_words(c) for c in node.children)
    if isinstance(node, Not):
        return _has_words(node.child)
    return False


def _conjuncts(node: Filter) -> list[Filter]:
    """The parts every match must satisfy (nested Ands flattened)."""
    if isinstance(node, And):
        return [part for child in node.children for part in _conjuncts(child)]
    return [node]


class _Compiler:
    """SQL for a filter over `docs d`. A textual subtree becomes `d.id IN (the FTS5 matches)`,
    which gathers every match first; with `probe` it becomes a test of the one row instead
    (FTS5 seeks its doclists to `rowid = d.id`), for plans that stop after a few rows."""

    def __init__(self, lo: int, hi: int, *, probe: bool = False) -> None:
        self.lo, self.hi = lo, hi
        self.probe = probe
        self.params: list[object] = []

    def sql(self, node: Filter) -> str:
        expr = _fts(node)
        if expr is not None and self.probe:
            self.params.append(expr)
            return "EXISTS (SELECT 1 FROM words WHERE words MATCH ? AND rowid = d.id)"
        if expr is not None:
            self.params += [expr, self.lo, self.hi]
            return "d.id IN (SELECT rowid FROM words WHERE words MATCH ? AND rowid BETWEEN ? AND ?)"
        if isinstance(node, Words):
            return "0"  # no word characters: nothing can contain it as a word
        if isinstance(node, HasFlag):
            self.params.append(int(node.flag))
            return "(d.sysflags & ?) != 0"
        if isinstance(node, InFolders):
            if not node.folder_ids:
                return "0"
            self.params += list(node.folder_ids)
            return f"d.folder_id IN ({','.join('?' * len(node.folder_ids))})"
        if isinstance(node, DateRange):
            parts = []
            if node.since is not None:
                parts.append("d.internal_date >= ?")
                self.params.append(node.since)
            if node.until is not None:
                parts.append("d.internal_date < ?")
                self.params.append(node.until)
            return "(" + " AND ".join(parts) + ")" if parts else "1"
        if isinstance(node, SizeRange):
            parts = []
            if node.larger is not None:
                parts.append("d.size > ?")
                self.params.append(node.larger)
            if node.smaller is not None:
                parts.append("d.size < ?")
                self.params.append(node.smaller)
            return "(" + " AND ".join(parts) + ")" if parts else "1"
        if isinstance(node, HasAttachment):
            return "d.has_attachments = 1"
        if isinstance(node, And):
            if not node.children:
                return "1"
            return "(" + " AND ".join(self.sql(c) for c in node.children) + ")"
        if isinstance(node, Or):
            if not node.children:
                return "0"
            return "(" + " OR ".join(self.sql(c) for c in node.children) + ")"
        if isinstance(node, Not):
            return f"NOT {self.sql(node.child)}"
        raise TypeError(f"not a search filter: {node!r}")

    def criterion(self, node: Criterion) -> str | None:
        """SQL that is true for every document that may satisfy `node`; None: all may."""
        if isinstance(node, Contains):
            pieces = [p for p in _LINE_BREAK.split(node.needle) if len(p) >= 3]
            if not pieces:
                return None  # under three characters: a trigram cannot narrow it
            grams = sorted({_text(p[i : i + 3]) for p in pieces for i in range(len(p) - 2)})
            if len(grams) > _MAX_TRIGRAMS:
                step = len(grams) / _MAX_TRIGRAMS
                grams = [grams[int(i * step)] for i in range(_MAX_TRIGRAMS)]
            expr = " AND ".join(_quote(g) for g in grams)
            tables = ("headers", "body") if node.where == "text" else (node.where,)
            parts = []
            for table in tables:
                self.params += [expr, self.lo, self.hi]
                parts.append(f"d.id IN (SELECT rowid FROM {_GRAMS[table]} WHERE "
                             f"{_GRAMS[table]} MATCH ? AND rowid BETWEEN ? AND ?)")
            return "(d.partial = 1 OR " + " OR ".join(parts) + ")"
        if isinstance(node, AllOf):
            parts = [p for p in (self.criterion(c) for c in node.children) if p is not None]
            return "(" + " AND ".join(parts) + ")" if parts else None
        if isinstance(node, AnyOf):
            mark = len(self.params)
            out: list[str] = []
            for child in node.children:
                part = self.criterion(child)
                if part is None:
                    del self.params[mark:]
                    return None
                out.append(part)
            return "(" + " OR ".join(out) + ")" if out else "0"
        raise TypeError(f"not a search criterion: {node!r}")


def _transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    """`fn(conn, *args)` in one BEGIN IMMEDIATE transaction, rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


_PROCESS_CONNS: dict[str, sqlite3.Connection] = {}


def _write_in_process(path: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """A write transaction in the search index's writer process, on the connection it keeps
    to that file (opened at its first write)."""
    conn = _PROCESS_CONNS.get(path)
    if conn is None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        _PROCESS_CONNS[path] = conn
    return _transaction(conn, fn, *args)


class SqliteSearchIndex:
    def __init__(self, path: str) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="search-writer")
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="search-reader")
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._process: WorkerPool | None = None

    # ---- plumbing

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        with self._lock:
            self._conns.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` in one write transaction: in the writer process if one was
        started (`start_writer_process`), else (or if that process died with the call out)
        on the writer thread. `fn` is a function of this module or class (it is pickled by
        name for the process) and its arguments are plain data."""
        if self._process is not None:
            try:
                return await self._process.call(_write_in_process, self.path, fn, args)
            except WorkerLost as exc:
                log.warning("search index writer process lost (%s); this write runs here",
                            exc)

        def run() -> T:
            conn = self._write_conn
            assert conn is not None, "search index not open"
            return _transaction(conn, fn, *args)

        return await asyncio.get_running_loop().run_in_executor(self._writer, run)

    async def start_writer_process(self) -> None:
        """Write from now on in a process of its own (`postroom serve`): FTS5 tokenizes in
        SQLite without the GIL, but a writer thread still takes the GIL between statements,
        hundreds of times a second, from an event loop that is busy with every session."""
        if self._process is not None:
            return
        process = WorkerPool(processes=1, name="postroom-search-writer")
        try:
            await process.start()
        except OSError as exc:  # no process to be had (a limit): the thread writes, as before
            log.warning("search index writer process not started (%s); writing on a thread",
                        exc)
            return
        self._process = process

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    async def open(self) -> None:
        def setup() -> None:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                exists = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'docs'"
                                      ).fetchone()[0]
                if exists and version != SCHEMA_VERSION:
                    # an index is derived data: rebuild it rather than migrate it
                    log.warning("search index %s has format %s, not %s: emptied; run "
                                "`postroom search reindex`", self.path, version, SCHEMA_VERSION)
                    for table in _TABLES:
                        conn.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._write_conn = conn

        await asyncio.get_running_loop().run_in_executor(self._writer, setup)

    async def close(self) -> None:
        if self._process is not None:
            process, self._process = self._process, None
            await process.stop()

        def shut() -> None:
            with self._lock:
                for conn in self._conns:
                    conn.close()
                self._conns.clear()
            self._write_conn = None

        self._readers.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._writer, shut)
        self._writer.shutdown(wait=True)

    # ---- ids

    @staticmethod
    def _range_of(n: int) -> tuple[int, int]:
        return n << _USER_BITS, ((n + 1) << _USER_BITS) - 1

    @staticmethod
    def _user_n(conn: sqlite3.Connection, user_id: str) -> int | None:
        row = conn.execute("SELECT n FROM search_users WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0]) if row else None

    # ---- writes

    @staticmethod
    def _delete_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        for table in ("words", "grams_h", "grams_b"):
            conn.executemany(f"DELETE FROM {table} WHERE rowid = ?", [(i,) for i in ids])
        conn.executemany("DELETE FROM docs WHERE id = ?", [(i,) for i in ids])

    @staticmethod
    def _insert_doc_row(conn: sqlite3.Connection, doc_id: int, user_id: str, s: DocState,
                        blob_hash: str, has_attachments: bool, partial: bool) -> None:
        conn.execute(
            "INSERT INTO docs (id, user_id, message_id, folder_id, uid, sysflags, keywords, "
            "internal_date, size, blob_hash, has_attachments, partial) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (doc_id, user_id, s.message_id, s.folder_id, s.uid, s.sysflags,
             " ".join(s.keywords), s.internal_date, s.size, blob_hash, int(has_attachments),
             int(partial)))

    @staticmethod
    def _new_ids(conn: sqlite3.Connection, user_ids: Sequence[str]) -> list[int]:
        """Fresh document ids, one per entry (users may repeat), with one counter update per
        user: statements other than full-text inserts are kept out of the run of inserts,
        because each statement transaction makes FTS5 flush its pending terms to a new
        segment (fts5SavepointMethod), which more than doubled the cost of a batch."""
        counts: dict[str, int] = {}
        for user_id in user_ids:
            counts[user_id] = counts.get(user_id, 0) + 1
        first: dict[str, tuple[int, int]] = {}
        for user_id, count in counts.items():
            row = conn.execute(
                "UPDATE search_users SET next_seq = next_seq + ? WHERE user_id = ? "
                "RETURNING n, next_seq - ?", (count, user_id, count)).fetchone()
            if row is None:
                row = conn.execute(
                    "INSERT INTO search_users (user_id, n, next_seq) VALUES "
                    "(?, (SELECT coalesce(max(n), 0) + 1 FROM search_users), ?) "
                    "RETURNING n, 1", (user_id, count + 1)).fetchone()
            n, seq = int(row[0]), int(row[1])
            if seq + count > 1 << _USER_BITS:
                raise OverflowError("search index: too many documents for one user; reindex")
            first[user_id] = (n, seq)
        ids = []
        for user_id in user_ids:
            n, seq = first[user_id]
            ids.append((n << _USER_BITS) | seq)
            first[user_id] = (n, seq + 1)
        return ids

    async def index(self, docs: Sequence[IndexDocument]) -> None:
        if not docs:
            return

        await self._write(SqliteSearchIndex._index_tx, docs)

    async def copy(self, user_id: str, blob_hash: str, state: DocState) -> bool:
        return await self._write(SqliteSearchIndex._copy_tx, user_id, blob_hash, state)

    async def update(self, user_id: str, states: Sequence[DocState]) -> None:
        if not states:
            return

        await self._write(SqliteSearchIndex._update_tx, user_id, states)

    async def remove(self, user_id: str, message_ids: Sequence[str]) -> None:
        if not message_ids:
            return

        await self._write(SqliteSearchIndex._remove_tx, user_id, message_ids)

    async def remove_user(self, user_id: str) -> None:
        await self._write(SqliteSearchIndex._remove_user_tx, user_id)

    async def write_batch(self, ops: Sequence[tuple[str, str, Sequence[Any]]]) -> None:
        """Writes in order, in one transaction: ("index", "", documents), ("update",
        user_id, states), ("remove", user_id, message_ids); all or none are made."""
        if ops:
            await self._write(SqliteSearchIndex._batch_tx, list(ops))

    @staticmethod
    def _index_tx(conn: sqlite3.Connection, docs: Sequence[IndexDocument]) -> None:
        # the last of a message id in the batch wins, as if indexed one after another
        latest = {(d.user_id, d.state.message_id): d for d in docs}
        batch = list(latest.values())
        old = []
        for doc in batch:
            row = conn.execute("SELECT id FROM docs WHERE user_id = ? AND message_id = ?",
                               (doc.user_id, doc.state.message_id)).fetchone()
            if row is not None:
                old.append(int(row[0]))
        if old:
            SqliteSearchIndex._delete_ids(conn, old)
        ids = SqliteSearchIndex._new_ids(conn, [d.user_id for d in batch])
        rows = []
        for doc_id, doc in zip(ids, batch, strict=True):
            s = doc.state
            partial = doc.partial or len(doc.imap_headers) > MAX_IMAP_TEXT \
                or len(doc.imap_body) > MAX_IMAP_TEXT
            rows.append((doc_id, doc.user_id, s.message_id, s.folder_id, s.uid, s.sysflags,
                         " ".join(s.keywords), s.internal_date, s.size, doc.blob_hash,
                         int(doc.has_attachments), int(partial)))
        conn.executemany(
            "INSERT INTO docs (id, user_id, message_id, folder_id, uid, sysflags, keywords, "
            "internal_date, size, blob_hash, has_attachments, partial) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        # the full-text inserts last, each table in one run (see _new_ids)
        conn.executemany(
            "INSERT INTO words (rowid, f_from, f_to, f_cc, f_bcc, f_subject, f_body, "
            "f_filename) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(i, _text(d.from_), _text(d.to), _text(d.cc), _text(d.bcc), _text(d.subject),
              _text(d.body), _text(d.filenames)) for i, d in zip(ids, batch, strict=True)])
        conn.executemany("INSERT INTO grams_h (rowid, text) VALUES (?, ?)",
                         [(i, _text(d.imap_headers[:MAX_IMAP_TEXT]))
                          for i, d in zip(ids, batch, strict=True)])
        conn.executemany("INSERT INTO grams_b (rowid, text) VALUES (?, ?)",
                         [(i, _text(d.imap_body[:MAX_IMAP_TEXT]))
                          for i, d in zip(ids, batch, strict=True)])

    @staticmethod
    def _copy_tx(conn: sqlite3.Connection, user_id: str, blob_hash: str,
                 state: DocState) -> bool:
        src = conn.execute(
            "SELECT id, has_attachments, partial FROM docs WHERE user_id = ? "
            "AND blob_hash = ? LIMIT 1", (user_id, blob_hash)).fetchone()
        if src is None:
            return False
        old = conn.execute("SELECT id FROM docs WHERE user_id = ? AND message_id = ?",
                           (user_id, state.message_id)).fetchone()
        if old is not None:
            SqliteSearchIndex._delete_ids(conn, [int(old[0])])
        doc_id = SqliteSearchIndex._new_ids(conn, [user_id])[0]
        SqliteSearchIndex._insert_doc_row(conn, doc_id, user_id, state, blob_hash,
                                          bool(src[1]), bool(src[2]))
        conn.execute(
            "INSERT INTO words (rowid, f_from, f_to, f_cc, f_bcc, f_subject, f_body, "
            "f_filename) SELECT ?, f_from, f_to, f_cc, f_bcc, f_subject, f_body, "
            "f_filename FROM words WHERE rowid = ?", (doc_id, src[0]))
        for table in ("grams_h", "grams_b"):
            conn.execute(f"INSERT INTO {table} (rowid, text) SELECT ?, text FROM {table} "
                         "WHERE rowid = ?", (doc_id, src[0]))
        return True

    @staticmethod
    def _update_tx(conn: sqlite3.Connection, user_id: str,
                   states: Sequence[DocState]) -> None:
        conn.executemany(
            "UPDATE docs SET folder_id = ?, uid = ?, sysflags = ?, keywords = ?, "
            "internal_date = ?, size = ? WHERE user_id = ? AND message_id = ?",
            [(s.folder_id, s.uid, s.sysflags, " ".join(s.keywords), s.internal_date,
              s.size, user_id, s.message_id) for s in states])

    @staticmethod
    def _remove_tx(conn: sqlite3.Connection, user_id: str,
                   message_ids: Sequence[str]) -> None:
        ids: list[int] = []
        for mid in message_ids:
            row = conn.execute("SELECT id FROM docs WHERE user_id = ? AND message_id = ?",
                               (user_id, mid)).fetchone()
            if row is not None:
                ids.append(int(row[0]))
        SqliteSearchIndex._delete_ids(conn, ids)

    @staticmethod
    def _batch_tx(conn: sqlite3.Connection,
                  ops: Sequence[tuple[str, str, Sequence[Any]]]) -> None:
        for kind, user_id, items in ops:
            if kind == "index":
                SqliteSearchIndex._index_tx(conn, items)
            elif kind == "update":
                SqliteSearchIndex._update_tx(conn, user_id, items)
            elif kind == "remove":
                SqliteSearchIndex._remove_tx(conn, user_id, items)
            else:
                raise ValueError(f"unknown search index write {kind!r}")

    @staticmethod
    def _remove_user_tx(conn: sqlite3.Connection, user_id: str) -> None:
        n = SqliteSearchIndex._user_n(conn, user_id)
        if n is None:
            return
        lo, hi = SqliteSearchIndex._range_of(n)
        for table in ("words", "grams_h", "grams_b"):
            conn.execute(f"DELETE FROM {table} WHERE rowid BETWEEN ? AND ?", (lo, hi))
        conn.execute("DELETE FROM docs WHERE user_id = ?", (user_id,))

    # ---- reads

    async def indexed_ids(self, user_id: str) -> set[str]:
        def run(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT message_id FROM docs WHERE user_id = ?", (user_id,))
            return {str(r[0]) for r in rows}

        return await self._read(run)

    @staticmethod
    def _driver(conn: sqlite3.Connection, user_id: str, lo: int, hi: int, query: Filter,
                params: list[object], counts: list[int]) -> tuple[str, bool]:
        """The FROM clause of a date-sorted search: start from the smaller side.

        SQLite's own plan walks `docs` newest first and tests each row, which stops early when
        matches are common but reads most of the mailbox when a rare word (or a small folder)
        meets a broad filter. So the positive words, folders and size ranges every result must
        have are counted first, up to _DRIVE_CAP (the words up to _DENSE_CAP, appended to
        `counts` for _walk), and when one side is that small the query starts from it (CROSS
        JOIN and INDEXED BY fix the loop order) and sorts what it found. Returns the clause
        and whether it starts from a small side.
        """
        words: list[str] = []
        folders: list[InFolders] = []
        sizes: list[SizeRange] = []
        for node in _conjuncts(query):
            expr = _fts(node)
            if expr is not None:
                words.append(f"({expr})")
            elif isinstance(node, InFolders) and node.folder_ids:
                folders.append(node)
            elif isinstance(node, SizeRange) and (node.larger is not None
                                                  or node.smaller is not None):
                sizes.append(node)
        best: tuple[int, str, list[object]] | None = None
        if words:
            match = " AND ".join(words)
            count = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM words WHERE words MATCH ? "
                "AND rowid BETWEEN ? AND ? LIMIT ?)", (match, lo, hi, _DENSE_CAP)).fetchone()[0]
            counts.append(count)
            best = (count, "FROM (SELECT rowid AS rid FROM words WHERE words MATCH ? "
                    "AND rowid BETWEEN ? AND ?) m CROSS JOIN docs d ON d.id = m.rid ",
                    [match, lo, hi])
        for node in folders:
            marks = ",".join("?" * len(node.folder_ids))
            count = conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM docs WHERE user_id = ? AND folder_id "
                f"IN ({marks}) LIMIT ?)", (user_id, *node.folder_ids, _DRIVE_CAP)).fetchone()[0]
            if best is None or count < best[0]:
                best = (count, "FROM docs d INDEXED BY docs_by_folder_date ", [])
        for size in sizes:
            count = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM docs WHERE user_id = ? AND size > ? "
                "AND size < ? LIMIT ?)", (user_id, -1 if size.larger is None else size.larger,
                                          1 << 62 if size.smaller is None else size.smaller,
                                          _DRIVE_CAP)).fetchone()[0]
            if best is None or count < best[0]:
                best = (count, "FROM docs d INDEXED BY docs_by_size ", [])
        if best is None or best[0] >= _DRIVE_CAP:
            # no small side: walk the dates (of the one folder), which SQLite would not
            # always choose over a size range
            if any(len(f.folder_ids) == 1 for f in folders):
                return "FROM docs d INDEXED BY docs_by_folder_date ", False
            return "FROM docs d INDEXED BY docs_by_date ", False
        params += best[2]
        return best[1], True

    @staticmethod
    def _walk(conn: sqlite3.Connection, user_id: str, lo: int, hi: int, query: Filter,
              before: tuple[float, str] | None, limit: int, offset: int, dense: bool
              ) -> list[Any] | None:
        """A date-sorted search whose words match most of the mailbox.

        SQLite's own plan gathers every match into a temporary b-tree before it walks the date
        index, ~15-25 ms for a word in most of 100,000 messages. When the words are `dense`
        (_DENSE_CAP matches or more), the date index is walked newest first under the filters
        without words instead, and each row's words are probed against FTS5 (`rowid = d.id`:
        a seek in each doclist, 25-80 us), stopping at `offset + limit` hits. After
        _PROBE_CAP rows without enough hits (the other filters make the combination rare)
        it gives up: None, SQLite's plan. Below _DENSE_CAP, gathering is the cheaper side
        (~0.3 us a match against a probe's 25-80 us).
        """
        plain: list[Filter] = []
        texts: list[Filter] = []
        for node in _conjuncts(query):
            (texts if _has_words(node) else plain).append(node)
        if not texts or not dense:
            return None
        filt = _Compiler(lo, hi)
        filt_sql = filt.sql(And(tuple(plain)))
        # one folder: walk its own dates rather than skip every other folder's rows
        walk_index = "docs_by_folder_date" if any(
            isinstance(n, InFolders) and len(n.folder_ids) == 1 for n in plain) \
            else "docs_by_date"
        want = offset + limit
        hits: list[Any] = []
        walked = 0

        test = _Compiler(lo, hi, probe=True)
        test_sql = test.sql(And(tuple(texts)))
        sql = (f"SELECT d.id, d.message_id, d.internal_date, {test_sql} "
               f"FROM docs d INDEXED BY {walk_index} "
               f"WHERE d.user_id = ? AND d.id BETWEEN ? AND ? AND {filt_sql}")
        params = [*test.params, user_id, lo, hi, *filt.params]
        if before is not None:
            sql += " AND (d.internal_date, d.message_id) < (?, ?)"
            params += [before[0], before[1]]
        cur = conn.execute(sql + " ORDER BY d.internal_date DESC, d.message_id DESC", params)
        try:
            while walked < _PROBE_CAP:
                chunk = cur.fetchmany(32)
                if not chunk:
                    return hits[offset:]
                for row in chunk:
                    if row[3]:
                        hits.append((row[0], row[1], row[2], 0))
                        if len(hits) >= want:
                            return hits[offset:]
                walked += len(chunk)
        finally:
            cur.close()
        return None

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
        def run(conn: sqlite3.Connection) -> list[Hit]:
            n = self._user_n(conn, user_id)
            if n is None:
                return []
            lo, hi = self._range_of(n)
            rows: list[Any] = []
            source = "FROM docs d "
            comp = _Compiler(lo, hi)
            where = comp.sql(query)
            rank_expr = None
            if sort == "relevance":
                exprs = [e for e in (_words_expr(t) for t in rank_terms) if e is not None]
                rank_expr = " OR ".join(f"({e})" for e in exprs) if exprs else None
            params: list[object] = []
            if rank_expr is not None:
                sql = (f"SELECT d.id, d.message_id, d.internal_date, coalesce(r.score, 0) "
                       f"FROM docs d LEFT JOIN (SELECT rowid AS rid, {_BM25} AS score "
                       "FROM words WHERE words MATCH ? AND rowid BETWEEN ? AND ?) r "
                       "ON r.rid = d.id ")
                params += [rank_expr, lo, hi]
            else:
                counts: list[int] = []
                source, small = self._driver(conn, user_id, lo, hi, query, params, counts)
                if not small:
                    walked = self._walk(conn, user_id, lo, hi, query, before, limit,
                                        offset if before is None else 0,
                                        bool(counts) and counts[0] >= _DENSE_CAP)
                    if walked is not None:
                        rows = walked
                        source = ""
                sql = "SELECT d.id, d.message_id, d.internal_date, 0 " + source
            sql += f"WHERE d.user_id = ? AND d.id BETWEEN ? AND ? AND {where}"
            params += [user_id, lo, hi, *comp.params]
            if before is not None and rank_expr is None:
                sql += " AND (d.internal_date, d.message_id) < (?, ?)"
                params += [before[0], before[1]]
            order = "d.internal_date DESC, d.message_id DESC"
            sql += f" ORDER BY {'4, ' if rank_expr else ''}{order} LIMIT ? OFFSET ?"
            params += [limit, offset if rank_expr is not None or before is None else 0]
            if rank_expr is not None or source:
                rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            ids = [int(r[0]) for r in rows]
            bodies = dict(conn.execute(
                f"SELECT rowid, f_body FROM words WHERE rowid IN ({','.join('?' * len(ids))})",
                ids).fetchall())
            return [Hit(str(r[1]), float(r[2]), float(r[3]), str(bodies.get(r[0], "")))
                    for r in rows]

        return await self._read(run)

    async def narrow(self, user_id: str, folder_id: str, criterion: Criterion) -> Narrowed:
        def run(conn: sqlite3.Connection) -> Narrowed:
            n = self._user_n(conn, user_id)
            if n is None:
                return Narrowed(frozenset(), frozenset())
            lo, hi = self._range_of(n)
            comp = _Compiler(lo, hi)
            cond = comp.criterion(criterion) or "1"
            rows = conn.execute(
                f"SELECT d.message_id, {cond} FROM docs d WHERE d.user_id = ? "
                "AND d.folder_id = ?", [*comp.params, user_id, folder_id]).fetchall()
            return Narrowed(frozenset(str(r[0]) for r in rows if r[1]),
                            frozenset(str(r[0]) for r in rows))

        return await self._read(run)
