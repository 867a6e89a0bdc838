"""The metadata seam: users, domains, aliases, tokens, folders and message records.

Every method that touches a user's data names the user first and is scoped by it: there is no
way to ask for a folder or message without saying whose it is. UID and MODSEQ allocation
happens inside the engine's transaction (an atomic update of the folder row), never in an
in-process counter, so writers on several processes or nodes cannot hand out the same uid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from postroom.core.models import (
    Alias,
    Domain,
    Flags,
    Folder,
    FolderCounts,
    FolderRole,
    MessageRecord,
    NewMessage,
    User,
)


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Position in a newest-first listing: the last (internal_date, uid) returned."""

    internal_date: float
    uid: int


@dataclass(frozen=True, slots=True)
class Token:
    token_hash: str
    user_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Reputation:
    """Decayed ham and spam counts of one sender subject (`addr:a@b`, `ip4:192.0.2`...)."""

    subject: str
    ham: float
    spam: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ListEntry:
    """A block or allow entry (an address, a domain or an IP); user_id '' is service-wide."""

    user_id: str
    value: str
    action: str  # "block" or "allow"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to file with `insert_messages`: what `insert_message` takes."""

    user_id: str
    folder_id: str
    message: NewMessage
    delivery_key: str | None = None


@dataclass(frozen=True, slots=True)
class Expunged:
    """A removed record, with what the caller needs for events and blob collection."""

    folder_id: str
    uid: int
    message_id: str
    blob_hash: str
    modseq: int


class MetadataStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # domains
    async def add_domain(self, name: str) -> Domain: ...
    async def remove_domain(self, name: str) -> None: ...
    async def list_domains(self) -> list[Domain]: ...
    async def has_domain(self, name: str) -> bool: ...

    # users
    async def create_user(self, address: str, password_hash: str) -> User:
        """Create the user (Conflict if the address is taken) with no folders."""
        ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def get_user_by_address(self, address: str) -> User | None: ...
    async def list_users(self, domain: str | None = None) -> list[User]: ...
    async def set_password(self, user_id: str, password_hash: str) -> None: ...
    async def delete_user(self, user_id: str) -> list[str]:
        """Remove the user and all their rows; returns blob hashes that lost a reference."""
        ...

    # aliases: alias address -> target address
    async def add_alias(self, alias: str, target: str) -> Alias: ...
    async def remove_alias(self, alias: str) -> None: ...
    async def list_aliases(self) -> list[Alias]: ...
    async def get_alias(self, alias: str) -> Alias | None: ...

    # API tokens, stored only as hashes
    async def add_token(self, token: Token) -> None: ...
    async def get_token(self, token_hash: str) -> Token | None: ...
    async def delete_token(self, token_hash: str) -> None: ...

    # folders
    async def create_folder(
        self, user_id: str, name: str, role: FolderRole | None = None
    ) -> Folder:
        """Create a folder with a fresh uidvalidity (Conflict if the name exists)."""
        ...
    async def list_folders(self, user_id: str) -> list[Folder]: ...
    async def get_folder(self, user_id: str, folder_id: str) -> Folder | None: ...
    async def get_folder_by_name(self, user_id: str, name: str) -> Folder | None: ...
    async def get_folder_by_role(self, user_id: str, role: FolderRole) -> Folder | None: ...
    async def rename_folder(self, user_id: str, folder_id: str, new_name: str) -> Folder:
        """Rename the folder and every folder below it; each gets a new uidvalidity."""
        ...
    async def delete_folder(self, user_id: str, folder_id: str) -> list[Expunged]:
        """Remove an empty-of-children folder and its messages."""
        ...
    async def set_subscribed(self, user_id: str, folder_id: str, subscribed: bool) -> None: ...
    async def folder_counts(
        self, user_id: str, folder_id: str | None = None
    ) -> dict[str, FolderCounts]:
        """Message and unseen counts by folder id: every folder of the user, or only
        `folder_id` (IMAP STATUS of one folder reads only that folder's messages; nothing
        for a folder that is not the user's)."""
        ...

    # messages
    async def insert_message(
        self,
        user_id: str,
        folder_id: str,
        message: NewMessage,
        delivery_key: str | None = None,
    ) -> tuple[MessageRecord, bool]:
        """File a message: allocate uid and modseq, resolve its thread, count a blob reference.

        With a delivery_key, the key is recorded in the same transaction; a second insert
        with the same key returns the first record and False instead of a duplicate.
        """
        ...
    async def insert_messages(
        self, deliveries: Sequence[Delivery]
    ) -> list[tuple[MessageRecord, bool] | None]:
        """`insert_message` for each delivery in one transaction: all are filed or none.

        Results are in the order given, each what `insert_message` returns, or None where it
        would raise Conflict (the key was delivered and that record expunged since). A key
        twice in one batch files once. Any other failure (a folder or user gone) fails the
        whole batch.
        """
        ...
    async def get_message(self, user_id: str, message_id: str) -> MessageRecord | None: ...
    async def get_messages(
        self, user_id: str, message_ids: Sequence[str]
    ) -> list[MessageRecord]: ...
    async def list_messages(
        self,
        user_id: str,
        folder_id: str,
        limit: int,
        before: ListCursor | None = None,
    ) -> list[MessageRecord]:
        """Newest first by (internal_date, uid), strictly after the cursor."""
        ...
    async def list_uids(self, user_id: str, folder_id: str) -> list[MessageRecord]:
        """Every record of the folder in uid order (for IMAP and POP3 sessions)."""
        ...
    async def list_thread(
        self, user_id: str, thread_id: str, limit: int = 500
    ) -> list[MessageRecord]:
        """The user's records of one conversation, every folder, oldest first by
        (internal_date, folder_id, uid); the first `limit`. Empty for another user's thread."""
        ...
    async def store_flags(
        self,
        user_id: str,
        message_ids: Sequence[str],
        add: Flags | None = None,
        remove: Flags | None = None,
        replace: Flags | None = None,
        unchanged_since: int | None = None,
    ) -> list[MessageRecord]:
        """Change flags; records whose flags changed get a new modseq and are returned."""
        ...
    async def move_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[tuple[Expunged, MessageRecord]]:
        """Move: each message gets a new uid in the target and leaves the source."""
        ...
    async def copy_messages(
        self, user_id: str, message_ids: Sequence[str], target_folder_id: str
    ) -> list[MessageRecord]: ...
    async def expunge(self, user_id: str, message_ids: Sequence[str]) -> list[Expunged]:
        """Remove records; returns what was removed (blob references are released)."""
        ...
    async def vanished(self, user_id: str, folder_id: str, since_modseq: int) -> list[int]:
        """The uids that left the folder (expunged or moved away) at a modseq above
        `since_modseq`, ascending (IMAP QRESYNC's VANISHED, RFC 7162 §3.2.5)."""
        ...

    # blob references: a blob is collected only when no record refers to it
    async def blob_refcount(self, blob_hash: str) -> int: ...
    async def released_blobs(self, before: float, limit: int = 1000) -> list[str]:
        """Blobs that lost their last reference (SQLite) or a reference (PostgreSQL) before
        `before` (unix time), oldest first: the blob collector's candidates, each to be
        checked again with `blob_refcount`."""
        ...
    async def note_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        """Make blobs candidates now although no message row released them: the bytes of a
        queue item that is done without reaching a mailbox (refused incoming mail, sent mail
        without a Sent copy, a deleted queue item). The collector checks them like any other."""
        ...
    async def forget_released_blobs(self, blob_hashes: Sequence[str]) -> None:
        """Drop candidates the collector has dealt with (collected, or found referenced)."""
        ...

    # spam filtering: sender reputation (service-wide), block/allow lists, contacts, each
    # user's own classifier weights, and the outbound sending log behind the per-user limits
    async def get_reputation(self, subjects: Sequence[str]) -> dict[str, Reputation]:
        """Stored counts as last written (the caller decays them to its own clock)."""
        ...
    async def add_reputation(
        self, subjects: Sequence[str], *, ham: float, spam: float, now: float, half_life: float
    ) -> None:
        """Decay each subject's counts to `now` (halving every `half_life` seconds), then add;
        a subject seen for the first time starts from zero."""
        ...
    async def set_list_entry(self, user_id: str, value: str, action: str) -> None:
        """Add or replace the entry for `value` in the user's (or, with '', the service's)
        list."""
        ...
    async def remove_list_entry(self, user_id: str, value: str) -> bool: ...
    async def list_entries(self, user_id: str) -> list[ListEntry]: ...
    async def match_list_entries(
        self, user_ids: Sequence[str], values: Sequence[str]
    ) -> list[ListEntry]:
        """The entries of any of these lists whose value is one of `values`."""
        ...
    async def add_contacts(self, user_id: str, addresses: Sequence[str], now: float) -> None: ...
    async def known_contacts(self, user_id: str, addresses: Sequence[str]) -> set[str]:
        """Those of `addresses` the user has written to."""
        ...
    async def get_spam_model(self, user_id: str) -> bytes | None: ...
    async def put_spam_model(self, user_id: str, model: bytes, now: float) -> None: ...
    async def record_send(self, user_id: str, recipients: int, now: float) -> None:
        """Log one outgoing message; entries older than a day are dropped."""
        ...
    async def send_totals(self, user_id: str, since: float) -> tuple[int, int]:
        """(messages, recipients) the user has sent since `since`."""
        ...
