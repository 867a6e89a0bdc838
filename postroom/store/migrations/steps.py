"""The metadata schema, as numbered steps with the SQL of each engine.

Rules (docs/ARCHITECTURE.md, "Schema migrations"):
- Append only: a released step is never edited; a change is a new step.
- Expand, then contract: a step that adds (a table, a nullable or defaulted column, an index, a
  backfill) leaves ``oldest_compatible`` unset. A step that removes or tightens something the code
  of schema version K still uses ships only after a release that no longer uses it, and sets
  ``oldest_compatible`` to K + 1, so older nodes refuse to start rather than break.
- Every table that belongs to a user has user_id first in its key, and every index of such a
  table starts with user_id too, except the few global lookups named in docs/SCALING.md.
- Statements are idempotent where the engine allows (IF NOT EXISTS), so a database made by code
  before this runner (it created step 1's tables itself) is adopted without surprises.

The two engines' schemas differ where the engine or distribution by user asks for it (see
postgres_metadata.py): PostgreSQL has native booleans and arrays, keeps the unique address in
its own lookup table, and counts blob references from the messages themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    name: str
    sqlite: str
    postgres: str
    # None for an expand step; for a contract step, the oldest schema version whose code still
    # runs correctly after it
    oldest_compatible: int | None = None


# ---- 1: the first release's schema ----------------------------------------------------------

_SQLITE_1 = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    quota_bytes INTEGER NOT NULL DEFAULT 0,
    last_uidvalidity INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    target TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (user_id),
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user_id);
CREATE TABLE IF NOT EXISTS folders (
    user_id TEXT NOT NULL REFERENCES users (user_id),
    folder_id TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    subscribed INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user_id, folder_id),
    UNIQUE (user_id, name)
) WITHOUT ROWID;
-- one folder per special-use role and user, so get_folder_by_role is unambiguous
CREATE UNIQUE INDEX IF NOT EXISTS folders_by_role ON folders (user_id, role)
    WHERE role IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    user_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    sysflags INTEGER NOT NULL DEFAULT 0,
    keywords TEXT NOT NULL DEFAULT '',
    internal_date REAL NOT NULL,
    size INTEGER NOT NULL,
    blob_hash TEXT NOT NULL,
    from_ TEXT NOT NULL DEFAULT '',
    to_ TEXT NOT NULL DEFAULT '',
    cc TEXT NOT NULL DEFAULT '',
    bcc TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    date REAL,
    header_message_id TEXT NOT NULL DEFAULT '',
    in_reply_to TEXT NOT NULL DEFAULT '',
    refs TEXT NOT NULL DEFAULT '[]',
    snippet TEXT NOT NULL DEFAULT '',
    has_attachments INTEGER NOT NULL DEFAULT 0,
    thread_id TEXT NOT NULL,
    spam_verdict TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user_id, message_id),
    UNIQUE (user_id, folder_id, uid),
    FOREIGN KEY (user_id, folder_id) REFERENCES folders (user_id, folder_id)
);
CREATE INDEX IF NOT EXISTS messages_by_date
    ON messages (user_id, folder_id, internal_date, uid);
CREATE INDEX IF NOT EXISTS messages_by_header_id ON messages (user_id, header_message_id);
-- the message-ids each message refers to (In-Reply-To and References), so a parent that
-- arrives after its replies finds their thread by index instead of scanning the mailbox
CREATE TABLE IF NOT EXISTS message_refs (
    user_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (user_id, ref, message_id),
    FOREIGN KEY (user_id, message_id) REFERENCES messages (user_id, message_id)
        ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS message_refs_by_message ON message_refs (user_id, message_id);
CREATE TABLE IF NOT EXISTS deliveries (
    user_id TEXT NOT NULL REFERENCES users (user_id),
    delivery_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (user_id, delivery_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blob_refs (
    blob_hash TEXT PRIMARY KEY,
    refcount INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Distribution by user (Citus, docs/SCALING.md): users, folders, messages, message_refs and
# deliveries are keyed by user_id first and colocated, so every mailbox transaction touches one
# shard. Foreign keys only join colocated tables. The global lookups -- domains, aliases,
# user_addresses (the unique address -> user), tokens -- are keyed by their own value and carry no
# foreign key into the user tables; the store keeps them consistent in its transactions.
# There is no blob_refs table: a blob's reference count is the number of message rows naming it
# (messages_by_blob), which keeps a delivery a single-shard transaction with no hot counter row
# for mail sent to many local recipients; only the blob collector asks across users.
_POSTGRES_1 = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    quota_bytes BIGINT NOT NULL DEFAULT 0,
    last_uidvalidity BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS user_addresses (
    address TEXT PRIMARY KEY,
    user_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    target TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user_id);
CREATE TABLE IF NOT EXISTS folders (
    user_id TEXT NOT NULL REFERENCES users (user_id),
    folder_id TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT,
    uidvalidity BIGINT NOT NULL,
    uidnext BIGINT NOT NULL DEFAULT 1,
    highestmodseq BIGINT NOT NULL DEFAULT 1,
    subscribed BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (user_id, folder_id),
    UNIQUE (user_id, name)
);
CREATE UNIQUE INDEX IF NOT EXISTS folders_by_role ON folders (user_id, role)
    WHERE role IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    user_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    uid BIGINT NOT NULL,
    modseq BIGINT NOT NULL,
    sysflags INTEGER NOT NULL DEFAULT 0,
    keywords TEXT NOT NULL DEFAULT '',
    internal_date DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    blob_hash TEXT NOT NULL,
    from_ TEXT NOT NULL DEFAULT '',
    to_ TEXT NOT NULL DEFAULT '',
    cc TEXT NOT NULL DEFAULT '',
    bcc TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    date DOUBLE PRECISION,
    header_message_id TEXT NOT NULL DEFAULT '',
    in_reply_to TEXT NOT NULL DEFAULT '',
    refs TEXT[] NOT NULL DEFAULT '{}',
    snippet TEXT NOT NULL DEFAULT '',
    has_attachments BOOLEAN NOT NULL DEFAULT FALSE,
    thread_id TEXT NOT NULL,
    spam_verdict TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (user_id, message_id),
    UNIQUE (user_id, folder_id, uid),
    FOREIGN KEY (user_id, folder_id) REFERENCES folders (user_id, folder_id)
);
CREATE INDEX IF NOT EXISTS messages_by_date
    ON messages (user_id, folder_id, internal_date, uid);
CREATE INDEX IF NOT EXISTS messages_by_header_id ON messages (user_id, header_message_id);
CREATE INDEX IF NOT EXISTS messages_by_blob ON messages (blob_hash);
CREATE TABLE IF NOT EXISTS message_refs (
    user_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (user_id, ref, message_id),
    FOREIGN KEY (user_id, message_id) REFERENCES messages (user_id, message_id)
        ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS message_refs_by_message ON message_refs (user_id, message_id);
CREATE TABLE IF NOT EXISTS deliveries (
    user_id TEXT NOT NULL REFERENCES users (user_id),
    delivery_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (user_id, delivery_key)
);
"""

# ---- 2: changes since a modseq ----------------------------------------------------------------
# CONDSTORE/QRESYNC (RFC 7162) ask "what changed in this folder since modseq N" (FETCH
# CHANGEDSINCE, SEARCH MODSEQ, SELECT ... QRESYNC), and so will clients syncing over the API.
# Without this index each such question reads the whole folder. Expand only.

_SQLITE_2 = """
CREATE INDEX IF NOT EXISTS messages_by_modseq ON messages (user_id, folder_id, modseq);
"""
_POSTGRES_2 = _SQLITE_2

# ---- 3: spam filtering -----------------------------------------------------------------------
# Sender reputation (decaying ham/spam counts per subject: address, domain, authenticated domain,
# client network; service-wide, not a user's data), block/allow lists (user_id '' is the whole
# service), the addresses each user has written to (trusted for that user), each user's own
# classifier weights, and the outbound sending log behind the per-user limits. Expand only.

_SQLITE_3 = """
CREATE TABLE IF NOT EXISTS spam_reputation (
    subject TEXT PRIMARY KEY,
    ham REAL NOT NULL,
    spam REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS spam_lists (
    user_id TEXT NOT NULL,
    value TEXT NOT NULL,
    action TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (user_id, value)
);
CREATE TABLE IF NOT EXISTS contacts (
    user_id TEXT NOT NULL,
    address TEXT NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (user_id, address)
);
CREATE TABLE IF NOT EXISTS spam_models (
    user_id TEXT PRIMARY KEY,
    model BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS send_log (
    user_id TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    sent_at REAL NOT NULL,
    recipients INTEGER NOT NULL,
    PRIMARY KEY (user_id, entry_id)
);
CREATE INDEX IF NOT EXISTS send_log_by_time ON send_log (user_id, sent_at);
"""
_POSTGRES_3 = (_SQLITE_3.replace("REAL", "DOUBLE PRECISION").replace("BLOB", "BYTEA")
               .replace("recipients INTEGER", "recipients BIGINT"))


# ---- 4: the expunge log, for IMAP QRESYNC (RFC 7162 §3.2: VANISHED since a modseq) ----------
# One row per uid that left a folder (expunged, moved away), with the folder modseq of that
# removal; the folder's rows go with the folder.

_SQLITE_4 = """
CREATE TABLE IF NOT EXISTS vanished (
    user_id TEXT NOT NULL,
    folder_id TEXT NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (user_id, folder_id, uid)
);
CREATE INDEX IF NOT EXISTS vanished_by_modseq ON vanished (user_id, folder_id, modseq);
"""
_POSTGRES_4 = _SQLITE_4.replace("INTEGER", "BIGINT")


# ---- 5: a conversation's messages ------------------------------------------------------------
# The webmail's conversation view and the API's thread listing ask for one thread of a user;
# without this index each such question reads all of the user's messages. Expand only.

_SQLITE_5 = """
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages (user_id, thread_id);
"""
_POSTGRES_5 = _SQLITE_5

# ---- 6: blobs that lost their last reference, for the blob collector -------------------------
# A row per blob whose references went to zero (SQLite) or that lost one (PostgreSQL, where the
# count is the rows naming it), with when; the collector (postroom/blob_collector.py) takes the
# old ones, checks again that nothing refers to them, and deletes the bytes. Expand only.

_SQLITE_6 = """
CREATE TABLE IF NOT EXISTS blob_released (
    blob_hash TEXT PRIMARY KEY,
    released_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blob_released_by_time ON blob_released (released_at);
"""
_POSTGRES_6 = _SQLITE_6.replace("REAL", "DOUBLE PRECISION")


STEPS: tuple[Step, ...] = (
    Step(1, "initial schema", _SQLITE_1, _POSTGRES_1, oldest_compatible=1),
    Step(2, "messages by modseq", _SQLITE_2, _POSTGRES_2),
    Step(3, "spam filtering", _SQLITE_3, _POSTGRES_3),
    Step(4, "expunge log", _SQLITE_4, _POSTGRES_4),
    Step(5, "messages by thread", _SQLITE_5, _POSTGRES_5),
    Step(6, "released blobs", _SQLITE_6, _POSTGRES_6),
)
