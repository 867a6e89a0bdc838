"""MailService: the one facade every protocol server and the CLI use.

Protocol servers parse and format their protocol and call this class; they never open a database
or a file. Authorisation is enforced here: every method that reaches mail takes the `User` acting,
and every lookup is scoped by that user's id, so a message id of another user is simply not found.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from postroom.analysis import AnalysisPool, Prepared, prepare_delivery
from postroom.core.address import (
    AddressError,
    domain_of,
    normalize_address,
    normalize_domain,
)
from postroom.core.compose import ComposeError, compose_message, make_message_id
from postroom.core.message import Attachment, ParsedMessage, attachment_part, parse_message
from postroom.core.models import (
    DEFAULT_FOLDERS,
    Alias,
    Domain,
    Envelope,
    Flag,
    FlagError,
    Flags,
    Folder,
    FolderCounts,
    FolderNameError,
    FolderRole,
    MessageRecord,
    NewMessage,
    User,
    normalize_folder_name,
)
from postroom.core.threads import thread_refs
from postroom.mailcache import (
    MailCache,
    folders_from_json,
    folders_to_json,
    optional_record_from_json,
    optional_record_to_json,
    page_from_json,
    page_to_json,
)
from postroom.search.engine import SearchPage, narrow_candidates, run_search
from postroom.search.indexer import Indexer
from postroom.search.query import QuerySyntaxError
from postroom.store.blobs import BlobStore
from postroom.store.cache import Cache
from postroom.store.errors import Conflict, NotFound
from postroom.store.events import (
    FOLDER_CHANGED,
    MESSAGE_DELETED,
    MESSAGE_FLAGS,
    MESSAGE_MOVED,
    MESSAGE_NEW,
    Event,
    EventBus,
)
from postroom.store.metadata import Delivery, Expunged, ListCursor, MetadataStore, Token
from postroom.store.queue import HELD, INCOMING, OUTGOING, Queue
from postroom.store.search import Criterion, IndexDocument, SearchIndex

log = logging.getLogger(__name__)

_PREPARE_CHUNK = 8  # received messages parsed per analysis task (~10 ms of work)


class ServiceError(Exception):
    """Base of the errors MailService raises; each protocol maps them to its own replies."""

    code = "error"


class NotFoundError(ServiceError):
    code = "not_found"


class ConflictError(ServiceError):
    code = "conflict"


class InvalidInput(ServiceError):
    code = "invalid_input"


class BadQuery(InvalidInput):
    """A malformed search query; `position` is the 0-based offset of the fault."""

    code = "bad_query"

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class AuthFailed(ServiceError):
    code = "unauthorized"


class TooManyAttempts(ServiceError):
    code = "too_many_attempts"


class Forbidden(ServiceError):
    code = "forbidden"


class RateLimited(ServiceError):
    """An outbound limit was hit (SMTP 451 4.7.1, HTTP 429)."""

    code = "rate_limited"


@dataclass(frozen=True, slots=True)
class Screening:
    """The spam filter's look at a message at SMTP time: refuse it (`reject` says why), or
    take it with `headers` above it and `data` for the incoming pipeline."""

    reject: str = ""
    headers: bytes = b""
    data: dict[str, Any] | None = None


class SpamHooks(Protocol):
    """What MailService asks of the spam filter (postroom.spam.filter.SpamFilter)."""

    async def screen(self, envelope: Envelope, raw: bytes) -> Screening: ...
    async def sender_refused(self, mail_from: str, client_ip: str,
                             user: User | None) -> bool: ...
    async def learn(self, user: User, records: Sequence[MessageRecord], spam: bool) -> None: ...
    async def send_refusal(self, user: User, recipients: int) -> str | None: ...
    async def record_send(self, user: User, recipients: int) -> None: ...
    async def hold_reason(self, user: User, raw: bytes) -> str: ...


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[MessageRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class MessageDetail:
    record: MessageRecord
    parsed: ParsedMessage


@dataclass(frozen=True, slots=True)
class MailboxSnapshot:
    """A folder's records as they stood at one moment, in uid order (a POP3 maildrop)."""

    folder: Folder
    messages: list[MessageRecord]


@dataclass(frozen=True, slots=True)
class OutgoingAttachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Draft:
    """A message to send, as the API and webmail describe it."""

    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: tuple[OutgoingAttachment, ...] = ()
    in_reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    sent: MessageRecord
    delivered: tuple[str, ...]
    queued: tuple[str, ...]
    queue_item: str | None
    held: str = ""  # why the remote copy waits for the admin (queue `held`), if it does


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message for `deliver_many`: what `deliver` takes."""

    envelope: Envelope
    raw: bytes
    delivery_key: str | None = None
    folders: Mapping[str, FolderRole] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What happened to each recipient of one delivery."""

    delivered: dict[str, MessageRecord] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()


def encode_cursor(cursor: ListCursor) -> str:
    text = f"{cursor.internal_date!r}:{cursor.uid}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> ListCursor:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        date_text, uid_text = text.split(":")
        return ListCursor(float(date_text), int(uid_text))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("invalid cursor") from None


def _list_value(value: str) -> str:
    """A block/allow entry as stored: an IP address, or an address or domain in lower case."""
    text = value.strip().lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not text or any(c.isspace() for c in text) or text.count("@") > 1 \
            or text.startswith("@") or text.endswith(("@", ".")) or "." not in text:
        raise InvalidInput(f"not an address, domain or IP address: {value!r}")
    return text


class AuthThrottle:
    """Counts failed logins per address and per client; refuses once a key exceeds the limit.

    In-process by design: each node throttles what it sees, which is what stops a single
    client hammering one listener.
    """

    def __init__(self, limit: int = 10, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, list[float]] = {}

    def check(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            recent = [t for t in self._failures.get(key, []) if now - t < self.window]
            if recent:
                self._failures[key] = recent
            else:
                self._failures.pop(key, None)
            if len(recent) >= self.limit:
                raise TooManyAttempts("too many failed logins; try again later")

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._failures.setdefault(key, []).append(now)
        if len(self._failures) > 100_000:  # bound memory under a spray of random keys
            self._failures.clear()

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)


def _sorted(flags: Flags) -> Flags:
    """Keywords sorted and unique, as the metadata store keeps them."""
    return Flags(flags.system, tuple(sorted(set(flags.keywords))))


def _flags_after(flags: Flags, add: Flags | None, remove: Flags | None,
                 replace: Flags | None) -> Flags:
    """What a STORE does to a message's flags: replace, then add, then remove."""
    out = _sorted(flags if replace is None else replace)
    if add is not None:
        out = out.union(add)
    if remove is not None:
        out = out.difference(remove)
    return _sorted(out)


# Above this a message is parsed on a thread, not on the event loop: parsing is linear, but a
# 50 MB message, or one of tens of thousands of MIME parts, takes seconds of it.
_PARSE_ON_LOOP_MAX = 256 * 1024


async def parse_off_loop(raw: bytes) -> ParsedMessage:
    """parse_message, on a thread for a large message (the loop keeps serving meanwhile)."""
    if len(raw) <= _PARSE_ON_LOOP_MAX:
        return parse_message(raw)
    return await asyncio.to_thread(parse_message, raw)


class MailService:
    def __init__(
        self,
        *,
        metadata: MetadataStore,
        blobs: BlobStore,
        queue: Queue,
        cache: Cache,
        events: EventBus,
        hostname: str,
        token_ttl: float = 30 * 24 * 3600.0,
        max_message_bytes: int = 50 * 1024 * 1024,
        max_recipients: int = 100,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self._blob_put_sync = not blobs.shares_log_with(metadata)
        self.queue = queue
        self.cache = cache
        # Listings and summaries, keyed by a per-user generation (postroom.mailcache).
        self.mail_cache = MailCache(cache)
        self.events = events
        self.hostname = hostname
        self.token_ttl = token_ttl
        self.max_message_bytes = max_message_bytes
        # recipients of one message sent or drafted through the API, as SMTP's RCPT limit
        self.max_recipients = max_recipients
        self.hasher = PasswordHasher()
        self.throttle = AuthThrottle()
        # set by the app (use_search_index) when a search index is configured
        self.search_index: SearchIndex | None = None
        self.indexer: Indexer | None = None
        self.spam: SpamHooks | None = None  # set by the app when spam filtering is on
        self.analysis: AnalysisPool | None = None  # worker processes for parsing, if any
        # Verified (address, password) pairs, keyed by an HMAC under a per-process secret:
        # argon2 costs ~100 ms by design, far too much to pay on every API request.
        self._auth_secret = os.urandom(32)
        self._verified: OrderedDict[bytes, tuple[str, float]] = OrderedDict()

    # ----------------------------------------------------------------- domains, users, aliases

    async def add_domain(self, name: str) -> Domain:
        domain = self._domain(name)
        try:
            return await self.metadata.add_domain(domain)
        except Conflict:
            raise ConflictError(f"domain {domain} already exists") from None

    async def remove_domain(self, name: str) -> None:
        domain = self._domain(name)
        try:
            await self.metadata.remove_domain(domain)
        except NotFound:
            raise NotFoundError(f"no such domain {domain}") from None
        except Conflict:
            raise ConflictError(f"domain {domain} still has users; remove them first") from None

    async def list_domains(self) -> list[Domain]:
        return await self.metadata.list_domains()

    async def is_local_domain(self, domain: str) -> bool:
        try:
            return await self.metadata.has_domain(normalize_domain(domain))
        except AddressError:
            return False

    async def add_user(self, address: str, password: str) -> User:
        addr = self._address(address)
        if not await self.metadata.has_domain(domain_of(addr)):
            raise InvalidInput(f"domain {domain_of(addr)} is not a local domain; add it first")
        if await self.metadata.get_alias(addr) is not None:
            raise ConflictError(f"{addr} is already an alias")
        self._check_password(password)
        password_hash = await asyncio.to_thread(self.hasher.hash, password)
        try:
            user = await self.metadata.create_user(addr, password_hash)
        except Conflict:
            raise ConflictError(f"user {addr} already exists") from None
        for name, role in DEFAULT_FOLDERS:
            await self.metadata.create_folder(user.user_id, name, role)
        return user

    async def set_password(self, address: str, password: str) -> None:
        user = await self._user_by_address(address)
        self._check_password(password)
        password_hash = await asyncio.to_thread(self.hasher.hash, password)
        await self.metadata.set_password(user.user_id, password_hash)

    async def remove_user(self, address: str) -> None:
        user = await self._user_by_address(address)
        await self.metadata.delete_user(user.user_id)
        if self.indexer is not None:
            await self.indexer.user_removed(user.user_id)
        await self._changed(user.user_id)

    async def list_users(self, domain: str | None = None) -> list[User]:
        return await self.metadata.list_users(self._domain(domain) if domain else None)

    async def get_user(self, user_id: str) -> User | None:
        return await self.metadata.get_user(user_id)

    async def add_alias(self, alias: str, target: str) -> Alias:
        alias_addr = self._address(alias)
        target_addr = self._address(target)
        if not await self.metadata.has_domain(domain_of(alias_addr)):
            raise InvalidInput(f"domain {domain_of(alias_addr)} is not a local domain")
        if await self.metadata.get_user_by_address(alias_addr) is not None:
            raise ConflictError(f"{alias_addr} is a user")
        if alias_addr == target_addr:
            raise InvalidInput("an alias cannot point to itself")
        try:
            return await self.metadata.add_alias(alias_addr, target_addr)
        except Conflict:
            raise ConflictError(f"alias {alias_addr} already exists") from None

    async def remove_alias(self, alias: str) -> None:
        try:
            await self.metadata.remove_alias(self._address(alias))
        except NotFound:
            raise NotFoundError(f"no such alias {alias}") from None

    async def list_aliases(self) -> list[Alias]:
        return await self.metadata.list_aliases()

    async def resolve_recipient(self, address: str) -> User | None:
        """The local user an address delivers to: user, alias chain, or `user+tag`."""
        try:
            addr = normalize_address(address)
        except AddressError:
            return None
        for _ in range(8):  # alias chains are short; a loop must not hang delivery
            user = await self.metadata.get_user_by_address(addr)
            if user is not None:
                return user
            alias = await self.metadata.get_alias(addr)
            if alias is None:
                break
            addr = alias.target
        local, _, domain = addr.rpartition("@")
        if "+" in local:  # subaddressing (RFC 5233)
            return await self.resolve_recipient(f"{local.partition('+')[0]}@{domain}")
        return None

    # ------------------------------------------------------------------------ authentication

    async def authenticate(self, address: str, password: str, client: str = "") -> User:
        """The user for these credentials; AuthFailed or TooManyAttempts otherwise."""
        keys = [f"addr:{address.lower()}"] + ([f"client:{client}"] if client else [])
        self.throttle.check(*keys)
        try:
            addr = normalize_address(address)
        except AddressError:
            addr = ""
        user = await self.metadata.get_user_by_address(addr) if addr else None
        if user is not None and await self._password_matches(user, password):
            self.throttle.succeeded(*keys)
            return user
        self.throttle.failed(*keys)
        raise AuthFailed("invalid credentials")

    async def _password_matches(self, user: User, password: str) -> bool:
        key = hmac.digest(
            self._auth_secret,
            f"{user.user_id}\0{user.password_hash}\0{password}".encode(),
            "sha256",
        )
        hit = self._verified.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return True
        try:
            await asyncio.to_thread(self.hasher.verify, user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        self._verified[key] = (user.user_id, time.monotonic() + 300)
        while len(self._verified) > 10_000:
            self._verified.popitem(last=False)
        return True

    async def issue_token(self, user: User, ttl: float | None = None) -> tuple[str, float]:
        """A new bearer token (returned once, stored only as its sha256) and its expiry."""
        token = "pr_" + secrets.token_urlsafe(32)
        expires_at = time.time() + (ttl if ttl is not None else self.token_ttl)
        await self.metadata.add_token(Token(self._token_hash(token), user.user_id, expires_at))
        return token, expires_at

    async def user_for_token(self, token: str) -> User:
        stored = await self.metadata.get_token(self._token_hash(token))
        if stored is None:
            raise AuthFailed("invalid token")
        if stored.expires_at <= time.time():
            await self.metadata.delete_token(stored.token_hash)
            raise AuthFailed("token expired")
        user = await self.metadata.get_user(stored.user_id)
        if user is None:
            raise AuthFailed("invalid token")
        return user

    async def revoke_token(self, token: str) -> None:
        await self.metadata.delete_token(self._token_hash(token))

    @staticmethod
    def _token_hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    # -------------------------------------------------------------------------------- folders

    async def list_folders(self, user: User) -> list[tuple[Folder, FolderCounts]]:
        async def load() -> list[tuple[Folder, FolderCounts]]:
            folders = await self.metadata.list_folders(user.user_id)
            counts = await self.metadata.folder_counts(user.user_id)
            empty = FolderCounts(0, 0)
            # The order people expect to see: INBOX, the special-use folders, then their own.
            rank: dict[FolderRole | None, int] = {
                role: n for n, (_, role) in enumerate(DEFAULT_FOLDERS)}
            folders.sort(key=lambda f: (rank.get(f.role, len(rank)), f.name.lower(), f.name))
            return [(f, counts.get(f.folder_id, empty)) for f in folders]

        return await self.mail_cache.read_through(user.user_id, "folders", load,
                                                  folders_to_json, folders_from_json)

    async def get_folder(self, user: User, folder: str) -> Folder:
        """A folder by id, or by name (INBOX, Sent, a/b) for convenience."""
        found = await self.metadata.get_folder(user.user_id, folder)
        if found is None:
            try:
                name = normalize_folder_name(folder)
            except FolderNameError:
                name = ""
            found = await self.metadata.get_folder_by_name(user.user_id, name) if name else None
        if found is None:
            raise NotFoundError("no such folder")
        return found

    async def folder_by_role(self, user: User, role: FolderRole) -> Folder:
        folder = await self.metadata.get_folder_by_role(user.user_id, role)
        if folder is None:  # a role folder removed by hand is recreated on demand
            default = dict((r, n) for n, r in DEFAULT_FOLDERS)[role]
            try:
                folder = await self.metadata.create_folder(user.user_id, default, role)
            except Conflict:
                folder = await self.metadata.get_folder_by_name(user.user_id, default)
                if folder is None:
                    raise
        return folder

    async def create_folder(self, user: User, name: str) -> Folder:
        clean = self._folder_name(name)
        parts = clean.split("/")
        # Parents are created as needed, as IMAP CREATE does (RFC 3501 §6.3.3).
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if await self.metadata.get_folder_by_name(user.user_id, parent) is None:
                try:
                    await self.metadata.create_folder(user.user_id, parent)
                except Conflict:
                    pass
        try:
            folder = await self.metadata.create_folder(user.user_id, clean)
        except Conflict:
            raise ConflictError(f"folder {clean} already exists") from None
        await self._changed(user.user_id)
        await self._publish(Event(FOLDER_CHANGED, user.user_id, folder.folder_id,
                                  data={"name": folder.name, "change": "created"}))
        return folder

    async def rename_folder(self, user: User, folder: str, new_name: str) -> Folder:
        current = await self.get_folder(user, folder)
        clean = self._folder_name(new_name)
        if current.role is FolderRole.INBOX:
            raise InvalidInput("INBOX cannot be renamed")
        if clean == "INBOX" or (clean.startswith("INBOX/") and current.name == "INBOX"):
            raise ConflictError("INBOX already exists")
        if clean == current.name or clean.startswith(current.name + "/"):
            raise InvalidInput("a folder cannot be renamed to itself or below itself")
        try:
            renamed = await self.metadata.rename_folder(user.user_id, current.folder_id, clean)
        except Conflict:
            raise ConflictError(f"folder {clean} already exists") from None
        await self._changed(user.user_id)
        await self._publish(Event(FOLDER_CHANGED, user.user_id, renamed.folder_id,
                                  data={"name": renamed.name, "change": "renamed"}))
        return renamed

    async def delete_folder(self, user: User, folder: str) -> None:
        current = await self.get_folder(user, folder)
        if current.role is not None:
            raise InvalidInput(f"{current.name} is a special-use folder and cannot be deleted")
        try:
            gone = await self.metadata.delete_folder(user.user_id, current.folder_id)
        except Conflict:
            raise ConflictError(f"{current.name} has subfolders; delete them first") from None
        await self._changed(user.user_id)
        if self.indexer is not None:
            await self.indexer.removed(user.user_id, [g.message_id for g in gone])
        await self._publish(Event(FOLDER_CHANGED, user.user_id, current.folder_id,
                                  data={"name": current.name, "change": "deleted"}))

    async def set_subscribed(self, user: User, folder: str, subscribed: bool) -> None:
        current = await self.get_folder(user, folder)
        await self.metadata.set_subscribed(user.user_id, current.folder_id, subscribed)
        await self._changed(user.user_id)

    # ------------------------------------------------------------------------------- messages

    async def list_messages(
        self, user: User, folder: str, limit: int = 50, cursor: str | None = None
    ) -> Page:
        if not 1 <= limit <= 500:
            raise InvalidInput("limit must be between 1 and 500")
        target = await self.get_folder(user, folder)
        before = decode_cursor(cursor) if cursor else None

        async def load() -> tuple[list[MessageRecord], bool]:
            found = await self.metadata.list_messages(user.user_id, target.folder_id,
                                                      limit + 1, before)
            return found[:limit], len(found) > limit

        if before is None:  # first pages are what clients poll; deeper ones are read once
            records, more = await self.mail_cache.read_through(
                user.user_id, f"list:{target.folder_id}:{limit}", load, page_to_json,
                page_from_json)
        else:
            records, more = await load()
        next_cursor = None
        if more and records:
            last = records[-1]
            next_cursor = encode_cursor(ListCursor(last.internal_date, last.uid))
        return Page(records, next_cursor)

    async def get_message(self, user: User, message_id: str) -> MessageRecord:
        record = await self.mail_cache.read_through(
            user.user_id, f"msg:{message_id}",
            lambda: self.metadata.get_message(user.user_id, message_id),
            optional_record_to_json, optional_record_from_json)
        if record is None:
            raise NotFoundError("no such message")
        return record

    async def list_thread(self, user: User, thread_id: str, limit: int = 200
                          ) -> list[MessageRecord]:
        """The user's messages of one conversation, every folder, oldest first. A thread
        with none of the user's messages (another user's, or gone) is NotFoundError."""
        if not 1 <= limit <= 500:
            raise InvalidInput("limit must be between 1 and 500")
        records = await self.metadata.list_thread(user.user_id, thread_id, limit)
        if not records:
            raise NotFoundError("no such thread")
        return records

    async def message_detail(self, user: User, message_id: str) -> MessageDetail:
        record = await self.get_message(user, message_id)
        raw = await self.blobs.get(record.blob_hash)
        return MessageDetail(record, await parse_off_loop(raw))

    async def raw_message(self, user: User, message_id: str) -> bytes:
        """Exactly the bytes that were received."""
        record = await self.get_message(user, message_id)
        return await self.blobs.get(record.blob_hash)

    async def mailbox_snapshot(
        self, user: User, role: FolderRole = FolderRole.INBOX
    ) -> MailboxSnapshot:
        """Every message of the user's role folder, in uid order, as of now."""
        folder = await self.folder_by_role(user, role)
        records = await self.metadata.list_uids(user.user_id, folder.folder_id)
        return MailboxSnapshot(folder, records)

    async def record_bytes(self, user: User, record: MessageRecord) -> bytes:
        """The raw bytes of a record the user was shown (a snapshot entry), even if the
        message has since moved; NotFoundError once its blob is gone."""
        if record.user_id != user.user_id:
            raise NotFoundError("no such message")
        try:
            return await self.blobs.get(record.blob_hash)
        except NotFound:
            raise NotFoundError("the message no longer exists") from None

    async def remove_from_folder(
        self, user: User, folder_id: str, message_ids: Sequence[str], *, to_trash: bool = False
    ) -> int:
        """Expunge (or move to Trash) those of the messages still in the folder; how many.

        Messages another client moved elsewhere meanwhile are left alone, so a POP3 DELE
        never removes mail from a folder it was not read from.
        """
        records = await self.metadata.get_messages(user.user_id, list(message_ids))
        here = [r.message_id for r in records if r.folder_id == folder_id]
        if not here:
            return 0
        if to_trash:
            trash = await self.folder_by_role(user, FolderRole.TRASH)
            if trash.folder_id != folder_id:
                return len(await self.move(user, here, trash.folder_id))
        return len(await self.expunge(user, here))

    async def attachment(self, user: User, message_id: str, index: int) -> Attachment:
        raw = await self.raw_message(user, message_id)
        part = attachment_part(raw, index) if len(raw) <= _PARSE_ON_LOOP_MAX \
            else await asyncio.to_thread(attachment_part, raw, index)
        if part is None:
            raise NotFoundError("no such attachment")
        return part

    async def set_flags(
        self,
        user: User,
        message_ids: Sequence[str],
        *,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        replace: Sequence[str] | None = None,
    ) -> list[MessageRecord]:
        try:
            add_flags = Flags.parse(list(add)) if add else None
            remove_flags = Flags.parse(list(remove)) if remove else None
            replace_flags = Flags.parse(list(replace)) if replace is not None else None
        except FlagError as exc:
            raise InvalidInput(str(exc)) from None
        changed = await self.metadata.store_flags(
            user.user_id, message_ids, add=add_flags, remove=remove_flags, replace=replace_flags
        )
        if changed:
            await self._changed(user.user_id)
            if self.indexer is not None:
                await self.indexer.changed(changed)
        for record in changed:
            await self._publish(Event(MESSAGE_FLAGS, user.user_id, record.folder_id, record.uid,
                                      record.modseq, record.message_id,
                                      {"flags": record.flags.names()}))
        return changed

    async def move(
        self, user: User, message_ids: Sequence[str], folder: str
    ) -> list[MessageRecord]:
        target = await self.get_folder(user, folder)
        moved = await self.metadata.move_messages(user.user_id, message_ids, target.folder_id)
        if moved:
            await self._changed(user.user_id)
            if self.indexer is not None:
                await self.indexer.changed([new for _, new in moved])
        for old, new in moved:
            await self._publish(Event(MESSAGE_MOVED, user.user_id, new.folder_id, new.uid,
                                      new.modseq, new.message_id,
                                      {"from_folder_id": old.folder_id, "from_uid": old.uid}))
        await self._spam_feedback(user, [(old.folder_id, new) for old, new in moved], target)
        return [new for _, new in moved]

    async def copy(
        self, user: User, message_ids: Sequence[str], folder: str
    ) -> list[MessageRecord]:
        target = await self.get_folder(user, folder)
        copies = await self.metadata.copy_messages(user.user_id, message_ids, target.folder_id)
        if copies:
            await self._changed(user.user_id)
            if self.indexer is not None:
                await self.indexer.copied(copies)
        for record in copies:
            await self._publish(self._new_event(record))
        await self._spam_feedback(user, [("", record) for record in copies], target)
        return copies

    async def report_spam(self, user: User, message_ids: Sequence[str],
                          spam: bool) -> list[MessageRecord]:
        """The user says these are spam (moved to Junk) or not (moved to INBOX); moving
        trains the filter, as any move into or out of Junk does."""
        target = await self.folder_by_role(user, FolderRole.JUNK if spam else FolderRole.INBOX)
        records = await self.metadata.get_messages(user.user_id, list(message_ids))
        if not records:
            raise NotFoundError("no such message")
        here = [r for r in records if r.folder_id == target.folder_id]
        moved = await self.move(user, [r.message_id for r in records
                                       if r.folder_id != target.folder_id], target.folder_id)
        if here and self.spam is not None:  # already there: still a verdict worth learning
            await self._learn(user, here, spam)
        return moved + here

    async def spam_list(self, user: User) -> list[tuple[str, str]]:
        """The user's own block and allow entries: (value, action)."""
        return [(e.value, e.action) for e in await self.metadata.list_entries(user.user_id)]

    async def set_spam_list_entry(self, user: User, value: str, action: str) -> str:
        """Block or allow an address, a domain or an IP address for this user only."""
        if action not in ("block", "allow"):
            raise InvalidInput("action must be block or allow")
        entry = _list_value(value)
        await self.metadata.set_list_entry(user.user_id, entry, action)
        return entry

    async def remove_spam_list_entry(self, user: User, value: str) -> None:
        if not await self.metadata.remove_list_entry(user.user_id, _list_value(value)):
            raise NotFoundError("no such entry")

    async def _spam_feedback(self, user: User, moved: Sequence[tuple[str, MessageRecord]],
                             target: Folder) -> None:
        """Moving into Junk trains spam; out of Junk (not to Trash) trains ham."""
        if self.spam is None or not moved:
            return
        junk = await self.metadata.get_folder_by_role(user.user_id, FolderRole.JUNK)
        if junk is None:
            return
        if target.folder_id == junk.folder_id:
            await self._learn(user, [r for src, r in moved if src != junk.folder_id], True)
        elif target.role is not FolderRole.TRASH:
            await self._learn(user, [r for src, r in moved if src == junk.folder_id], False)

    async def _learn(self, user: User, records: Sequence[MessageRecord], spam: bool) -> None:
        if self.spam is None or not records:
            return
        try:
            await self.spam.learn(user, records, spam)
        except Exception:  # feedback must never fail the move that carried it
            log.exception("spam feedback for %s failed", user.address)

    async def delete(self, user: User, message_id: str) -> MessageRecord | None:
        """Move to Trash; a message already in Trash is expunged (returns None then)."""
        record = await self.get_message(user, message_id)
        trash = await self.folder_by_role(user, FolderRole.TRASH)
        if record.folder_id == trash.folder_id:
            await self.expunge(user, [message_id])
            return None
        moved = await self.move(user, [message_id], trash.folder_id)
        return moved[0] if moved else None

    async def expunge(self, user: User, message_ids: Sequence[str], *,
                      index_later: bool = False) -> list[Expunged]:
        """Remove messages for good. With index_later the search index hears of it after
        this returns (see Indexer: searches still never see the message)."""
        removed = await self.metadata.expunge(user.user_id, message_ids)
        if removed:
            await self._changed(user.user_id)
            if self.indexer is not None and index_later:
                self.indexer.later_removed(user.user_id, [g.message_id for g in removed])
            elif self.indexer is not None:
                await self.indexer.removed(user.user_id, [g.message_id for g in removed])
        for gone in removed:
            await self._publish(Event(MESSAGE_DELETED, user.user_id, gone.folder_id, gone.uid,
                                      gone.modseq, gone.message_id))
        return removed

    async def append(
        self,
        user: User,
        folder: str | Folder,
        raw: bytes,
        flags: Sequence[str] = (),
        internal_date: float | None = None,
        *,
        index_later: bool = False,
    ) -> MessageRecord:
        """Store a message the user supplies (IMAP APPEND, drafts). With index_later the
        search index gets it after this returns (see Indexer: searches still find it).

        `folder` is an id or a name, or the user's Folder the caller has just looked up
        (IMAP's APPEND finds it by name first, for TRYCREATE): then it is not read again."""
        if isinstance(folder, Folder):
            if folder.user_id != user.user_id:
                raise NotFoundError("no such folder")
            target = folder
        else:
            target = await self.get_folder(user, folder)
        try:
            parsed_flags = Flags.parse(list(flags))
        except FlagError as exc:
            raise InvalidInput(str(exc)) from None
        self._check_size(raw)
        if self.analysis is None:
            record, _ = await self._file(user, target, raw, await parse_off_loop(raw),
                                         parsed_flags,
                                         internal_date, None, index_later=index_later)
            return record
        # The parse and the search document in an analysis process (the node's event loop
        # serves every session; IMAP APPEND's parse was a tenth of its time under load),
        # while the blob is written. (Parsing a 2.5 KB message here instead, 0.16 ms, cost
        # the loop 0.3 ms per APPEND under load and 10 % of the APPEND rate.)
        digest, (prepared,) = await asyncio.gather(self._put_before_record(raw),
                                                   self._prepare([raw]))
        record, _ = await self._file(user, target, raw, prepared.parsed, parsed_flags,
                                     internal_date, None, index_later=index_later,
                                     digest=digest, document=prepared.document)
        return record

    async def append_many(
        self,
        user: User,
        folder: str,
        messages: Sequence[tuple[bytes, Sequence[str], float | None]],
    ) -> list[MessageRecord]:
        """`append` for a batch of (raw, flags, internal date), e.g. a mail import: the
        blobs stored first, then every record in one metadata transaction (one commit, not
        one per message) and one search index batch. InvalidInput (a message too large, a
        bad flag) before anything is filed."""
        target = await self.get_folder(user, folder)
        flags: list[Flags] = []
        for raw, names, _ in messages:
            self._check_size(raw)
            try:
                flags.append(Flags.parse(list(names)))
            except FlagError as exc:
                raise InvalidInput(str(exc)) from None
        parsed = await asyncio.to_thread(lambda: [parse_message(raw) for raw, _, _ in messages])
        digests = await asyncio.gather(*(self._put_before_record(raw) for raw, _, _ in messages))
        now = time.time()
        deliveries = [
            Delivery(user.user_id, target.folder_id, NewMessage(
                blob_hash=digest, size=len(raw),
                internal_date=when if when is not None else now, headers=p.headers,
                snippet=p.snippet, has_attachments=p.has_attachments, flags=f))
            for (raw, _, when), p, f, digest in zip(messages, parsed, flags, digests,
                                                   strict=True)]
        results = await self._insert_deliveries(deliveries)
        filed = [(result[0], raw, p) for result, (raw, _, _), p
                 in zip(results, messages, parsed, strict=True) if result is not None]
        if filed:
            await self._changed(user.user_id)
            if self.indexer is not None:  # searchable before anyone hears of it
                await self.indexer.added_many(filed)
            for record, _, _ in filed:
                await self._publish(self._new_event(record))
        return [record for record, _, _ in filed]

    # -------------------------------------------------------------------------------- search

    def use_search_index(self, index: SearchIndex) -> None:
        self.search_index = index
        self.indexer = Indexer(index, self.blobs)

    async def search(self, user: User, query: str, *, sort: str = "date", limit: int = 50,
                     cursor: str | None = None) -> SearchPage:
        """The user's messages matching a query (postroom.search.query), newest first or
        most relevant first, each with a highlighted snippet; BadQuery when malformed."""
        if self.indexer is not None:
            await self.indexer.settled()
        try:
            return await run_search(self, user, query, sort=sort, limit=limit, cursor=cursor)
        except QuerySyntaxError as exc:
            raise BadQuery(str(exc), exc.position) from None

    async def search_candidates(self, user: User, folder_id: str, criterion: Criterion,
                                message_ids: Sequence[str]) -> set[str]:
        """Those of `message_ids` (records of the folder) that may satisfy an IMAP SEARCH
        text criterion: IMAP then checks only these, with RFC 3501 semantics."""
        if self.indexer is not None:
            await self.indexer.settled()
        return await narrow_candidates(self.search_index, user, folder_id, criterion,
                                       message_ids)

    # ---------------------------------------------------------------------------- IMAP support

    async def find_folder(self, user: User, name: str) -> Folder | None:
        """The user's folder with exactly this name (INBOX in any case); None if none."""
        try:
            clean = normalize_folder_name(name)
        except FolderNameError:
            return None
        return await self.metadata.get_folder_by_name(user.user_id, clean)

    async def folders(self, user: User) -> list[Folder]:
        """The user's folders by name, without counting their messages (IMAP LIST)."""
        return await self.metadata.list_folders(user.user_id)

    async def folder_messages(
        self, user: User, folder_id: str
    ) -> tuple[Folder, list[MessageRecord]]:
        """A folder and every record in it, in uid order (IMAP SELECT and resynchronising).

        The records are read first, so the folder's highestmodseq is never below theirs.
        """
        records = await self.metadata.list_uids(user.user_id, folder_id)
        folder = await self.metadata.get_folder(user.user_id, folder_id)
        if folder is None:
            raise NotFoundError("no such folder")
        return folder, records

    async def vanished(self, user: User, folder_id: str, since_modseq: int) -> list[int]:
        """Uids that left the folder after `since_modseq`, ascending (IMAP QRESYNC)."""
        return await self.metadata.vanished(user.user_id, folder_id, since_modseq)

    async def folder_status(self, user: User, folder_id: str) -> tuple[Folder, FolderCounts]:
        """A folder with its message and unseen counts (IMAP STATUS)."""
        folder = await self.metadata.get_folder(user.user_id, folder_id)
        if folder is None:
            raise NotFoundError("no such folder")
        counts = await self.metadata.folder_counts(user.user_id, folder_id)
        return folder, counts.get(folder_id, FolderCounts(0, 0))

    async def store_flags(
        self,
        user: User,
        message_ids: Sequence[str],
        *,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        replace: Sequence[str] | None = None,
        unchanged_since: int | None = None,
        index_later: bool = False,
        believed: MessageRecord | None = None,
    ) -> tuple[list[MessageRecord], list[str]]:
        """Change flags as set_flags does, optionally only where modseq <= unchanged_since
        (with index_later, the search index hears of it after this returns). `believed`:
        the caller's last known copy of the one message (an IMAP session's map), which
        spares the read that looks for a change when that copy already shows one.

        Returns the changed records and the ids left alone because they were modified after
        unchanged_since (CONDSTORE's MODIFIED response code, RFC 7162 §3.1.3).
        """
        try:
            add_flags = Flags.parse(list(add)) if add else None
            remove_flags = Flags.parse(list(remove)) if remove else None
            replace_flags = Flags.parse(list(replace)) if replace is not None else None
        except FlagError as exc:
            raise InvalidInput(str(exc)) from None
        if len(message_ids) == 1 and unchanged_since is None and (
                believed is None or believed.message_id != message_ids[0]
                or _flags_after(believed.flags, add_flags, remove_flags,
                                replace_flags) == _sorted(believed.flags)):
            # A STORE that changes nothing (a client setting \Seen again) needs no write:
            # on a fresh point read the message already has (or lacks) those flags, or is
            # gone, so doing nothing is what the write would do at that instant. (Where the
            # caller's copy shows a change, the write goes ahead: it compares with the
            # stored flags itself and changes nothing if that copy was out of date.)
            current = await self.metadata.get_message(user.user_id, message_ids[0])
            if current is None or _flags_after(current.flags, add_flags, remove_flags,
                                               replace_flags) == _sorted(current.flags):
                return [], []
        changed = await self.metadata.store_flags(
            user.user_id, message_ids, add=add_flags, remove=remove_flags,
            replace=replace_flags, unchanged_since=unchanged_since,
        )
        if changed and self.indexer is not None and index_later:
            self.indexer.later_changed(changed)
        elif changed and self.indexer is not None:
            await self.indexer.changed(changed)
        modified: list[str] = []
        if unchanged_since is not None:
            done = {r.message_id for r in changed}
            rest = [m for m in message_ids if m not in done]
            for record in await self.metadata.get_messages(user.user_id, rest) if rest else []:
                if record.modseq > unchanged_since:
                    modified.append(record.message_id)
        if changed:
            await self._changed(user.user_id)
        for record in changed:
            await self._publish(Event(MESSAGE_FLAGS, user.user_id, record.folder_id, record.uid,
                                      record.modseq, record.message_id,
                                      {"flags": record.flags.names()}))
        return changed, modified

    async def copy_mapped(
        self, user: User, message_ids: Sequence[str], folder_id: str
    ) -> list[tuple[MessageRecord, MessageRecord]]:
        """Copy into a folder; (source, copy) pairs for IMAP's COPYUID (RFC 4315).

        The store copies the records it finds in the order given, so the pairs line up with
        the sources read just before; if a source vanished meanwhile, the pairs are matched
        by blob and date instead.
        """
        sources = await self.metadata.get_messages(user.user_id, list(message_ids))
        copies = await self.copy(user, [s.message_id for s in sources], folder_id)
        if len(copies) == len(sources) and all(
            s.blob_hash == c.blob_hash for s, c in zip(sources, copies, strict=True)
        ):
            return list(zip(sources, copies, strict=True))
        pairs: list[tuple[MessageRecord, MessageRecord]] = []
        pool = list(sources)
        for copy in copies:
            for i, source in enumerate(pool):
                if (source.blob_hash, source.internal_date) == (copy.blob_hash,
                                                                copy.internal_date):
                    pairs.append((pool.pop(i), copy))
                    break
        return pairs

    # ------------------------------------------------------------------------------ delivery

    async def deliver(
        self, envelope: Envelope, raw: bytes, delivery_key: str | None = None,
        folders: Mapping[str, FolderRole] | None = None,
    ) -> DeliveryResult:
        """File a received message into each local recipient's INBOX.

        With a delivery_key (the incoming queue item id), each recipient's copy is recorded
        with `key:recipient`, so a redelivered queue item never makes a second copy.
        `folders` picks another folder by role per user id (the spam filter's Junk).
        """
        return (await self.deliver_many([Inbound(envelope, raw, delivery_key, folders)]))[0]

    async def deliver_many(self, messages: Sequence[Inbound]) -> list[DeliveryResult]:
        """`deliver` each message, with every copy of the batch filed in one metadata
        transaction (one commit instead of one per copy).

        Each message is parsed once, off the event loop (`_prepare`), and its blob stored
        (fsynced) before the records naming it are committed; caches, the search index and
        events hear of the new records after the commit. If it raises, nothing was filed.
        """
        for m in messages:
            self._check_size(m.raw)
        users: dict[str, User | None] = {}
        copies: list[tuple[int, str, User]] = []  # (message, recipient, user) to file
        unknown: list[list[str]] = [[] for _ in messages]
        for i, m in enumerate(messages):
            seen_users: set[str] = set()
            for rcpt in m.envelope.rcpt_to:
                if rcpt not in users:
                    users[rcpt] = await self.resolve_recipient(rcpt)
                user = users[rcpt]
                if user is None:
                    unknown[i].append(rcpt)
                elif user.user_id not in seen_users:  # two aliases of one user: one copy
                    seen_users.add(user.user_id)
                    copies.append((i, rcpt, user))
        wanted = sorted({i for i, _, _ in copies})
        prepared = dict(zip(wanted, await self._prepare([messages[i].raw for i in wanted]),
                            strict=True))
        stored = await asyncio.gather(*(self._put_before_record(messages[i].raw)
                                        for i in wanted))
        digests = dict(zip(wanted, stored, strict=True))
        folders: dict[tuple[str, FolderRole], Folder] = {}
        deliveries: list[Delivery] = []
        now = time.time()
        for i, _, user in copies:
            m, p = messages[i], prepared[i].parsed
            role = m.folders.get(user.user_id, FolderRole.INBOX) if m.folders \
                else FolderRole.INBOX
            if (user.user_id, role) not in folders:
                folders[user.user_id, role] = await self.folder_by_role(user, role)
            new = NewMessage(blob_hash=digests[i], size=len(m.raw), internal_date=now,
                             headers=p.headers, snippet=p.snippet,
                             has_attachments=p.has_attachments, flags=Flags())
            key = f"{m.delivery_key}:{user.user_id}" if m.delivery_key else None
            deliveries.append(Delivery(user.user_id, folders[user.user_id, role].folder_id,
                                       new, key))
        results = await self._insert_deliveries(deliveries)
        delivered: list[dict[str, MessageRecord]] = [{} for _ in messages]
        created: list[tuple[int, MessageRecord]] = []
        for (i, rcpt, _), result in zip(copies, results, strict=True):
            if result is None:
                continue  # delivered before and since expunged by the user: nothing to redo
            record, new_record = result
            delivered[i][rcpt] = record
            if new_record:
                created.append((i, record))
        for user_id in dict.fromkeys(record.user_id for _, record in created):
            await self._changed(user_id)
        if created and self.indexer is not None:  # searchable before anyone hears of it
            await self.indexer.added_documents(
                [(record, prepared[i].document) for i, record in created])
        for _, record in created:
            await self._publish(self._new_event(record))
        return [DeliveryResult(delivered[i], tuple(unknown[i])) for i in range(len(messages))]

    async def _put_before_record(self, raw: bytes) -> str:
        """Store a blob that a message record about to be committed (and waited for) will
        name. Where the blob store orders its puts with the metadata's commits (the embedded
        default: one SQLite WAL), the record's durability is the blob's, and the put does not
        wait for an fsync of its own (one wait per APPEND, not two one after the other)."""
        return await self.blobs.put(raw, sync=self._blob_put_sync)

    async def _prepare(self, raws: list[bytes]) -> list[Prepared]:
        """Parse received messages and build their search documents: in the analysis
        processes when there are some, else on a thread, never on the event loop (a batch
        of them would stall every session for tens of milliseconds). A few messages per
        task, so the spam scoring of mail arriving meanwhile is not queued behind a batch."""
        index = self.indexer is not None
        if self.analysis is None:
            return await asyncio.to_thread(prepare_delivery, raws, index)
        out: list[Prepared] = []
        for start in range(0, len(raws), _PREPARE_CHUNK):
            out += await self.analysis.run(prepare_delivery,
                                           raws[start:start + _PREPARE_CHUNK], index)
        return out

    async def _insert_deliveries(
        self, deliveries: list[Delivery]
    ) -> list[tuple[MessageRecord, bool] | None]:
        try:
            return await self.metadata.insert_messages(deliveries)
        except NotFound:
            raise NotFoundError("no such folder") from None
        except Conflict:
            if len(deliveries) == 1:
                return [None]
        # A user went away under the batch: file each copy alone, skipping that user's.
        results: list[tuple[MessageRecord, bool] | None] = []
        for delivery in deliveries:
            results += await self._insert_deliveries([delivery])
        return results

    async def screen_incoming(self, envelope: Envelope, raw: bytes) -> Screening:
        """The spam filter's SMTP-time look at a message from the internet (nothing to say
        when filtering is off, or when the filter itself fails: the pipeline tries again)."""
        if self.spam is None:
            return Screening()
        try:
            return await self.spam.screen(envelope, raw)
        except Exception:
            log.exception("spam screening at SMTP time failed")
            return Screening()

    async def sender_refused(self, mail_from: str, client_ip: str, rcpt: str,
                             recipient: User | None = None) -> bool:
        """Is this sender banned, service-wide or by the recipient? (checked at RCPT;
        `recipient` is whom rcpt resolves to, when the caller looked it up already)"""
        if self.spam is None:
            return False
        if recipient is None:
            recipient = await self.resolve_recipient(rcpt)
        return await self.spam.sender_refused(mail_from, client_ip, recipient)

    async def enqueue_incoming(self, envelope: Envelope, raw: bytes,
                               screening: dict[str, Any] | None = None) -> str:
        """Make a received message durable on the incoming queue; SMTP says 250 after this."""
        self._check_size(raw)
        digest = await self.blobs.put(raw)
        payload = {
            "mail_from": envelope.mail_from,
            "rcpt_to": list(envelope.rcpt_to),
            "client_ip": envelope.client_ip,
            "helo": envelope.helo,
            "authenticated_as": envelope.authenticated_as,
            "blob": digest,
            "received_at": time.time(),
        }
        if screening is not None:
            payload["screening"] = screening
        return await self.queue.put(INCOMING, json.dumps(payload).encode())

    async def process_incoming(self, payload: bytes, item_id: str) -> DeliveryResult:
        """Deliver one incoming queue item (idempotent: keyed by the item id)."""
        data = json.loads(payload)
        raw = await self.blobs.get(data["blob"])
        envelope = Envelope(data["mail_from"], tuple(data["rcpt_to"]), data.get("client_ip", ""),
                            data.get("helo", ""), data.get("authenticated_as", ""))
        return await self.deliver(envelope, raw, delivery_key=item_id)

    async def send(self, user: User, draft: Draft) -> SendResult:
        """Send as the user: local recipients directly, remote ones via the outgoing queue."""
        self.check_recipient_count(len(draft.to) + len(draft.cc) + len(draft.bcc))
        to, cc, bcc = (self._addresses(draft.to), self._addresses(draft.cc),
                       self._addresses(draft.bcc))
        recipients = list(dict.fromkeys([*to, *cc, *bcc]))
        if not recipients:
            raise InvalidInput("at least one recipient is required")
        for rcpt in recipients:  # refuse before anything is stored or queued
            if await self.is_local_domain(domain_of(rcpt)) \
                    and await self.resolve_recipient(rcpt) is None:
                raise InvalidInput(f"no such local recipient: {rcpt}")
        references: list[str] = []
        in_reply_to: str | None = None
        replied: MessageRecord | None = None
        if draft.in_reply_to:
            if draft.in_reply_to.startswith("<"):
                in_reply_to = draft.in_reply_to
            else:
                replied = await self.get_message(user, draft.in_reply_to)
                in_reply_to = replied.headers.message_id or None
                references = list(replied.headers.references)
            if in_reply_to:
                references.append(in_reply_to)
        build = functools.partial(
            compose_message,
            from_addr=user.address, from_name="", to=to, cc=cc, bcc=bcc, subject=draft.subject,
            text=draft.text, html=draft.html,
            attachments=[(a.filename, a.content_type, a.data) for a in draft.attachments],
            in_reply_to=in_reply_to, references=references,
            message_id=make_message_id(self.hostname), date=time.time(),
        )
        try:  # on a thread: encoding 50 MB of attachments takes seconds
            sent_copy, transmitted = await asyncio.to_thread(
                lambda: (build(include_bcc=True), build(include_bcc=False)))
        except ComposeError as exc:
            raise InvalidInput(str(exc)) from None
        self._check_size(transmitted)
        await self._check_send_limits(user, len(recipients))

        sent = await self._dispatch(user, Envelope(user.address, tuple(recipients)),
                                    transmitted, sent_copy)
        if replied is not None:
            await self.set_flags(user, [replied.message_id], add=["\\Answered"])
        return sent

    def check_recipient_count(self, count: int) -> None:
        """InvalidInput past max_recipients (duplicates count, as in SMTP): the standard
        library's header folding, which composes the message, grows with the square of the
        address list (5 s of the event loop for 20,000 addresses)."""
        if count > self.max_recipients:
            raise InvalidInput(f"too many recipients: at most {self.max_recipients} per message")

    async def may_send_as(self, user: User, address: str) -> bool:
        """True when `address` is the user's own address or one of their aliases."""
        if not address:
            return False
        target = await self.resolve_recipient(address)
        return target is not None and target.user_id == user.user_id

    async def submit(self, user: User, envelope: Envelope, raw: bytes) -> SendResult:
        """Send a message the user composed themselves (SMTP submission).

        Remote recipients go on the outgoing queue, local ones are delivered, and the sender
        keeps a \\Seen copy in Sent. The caller checks MAIL FROM and From: via may_send_as.
        """
        self._check_size(raw)
        await self._check_send_limits(user, len(set(envelope.rcpt_to)))
        return await self._dispatch(user, envelope, raw, raw)

    async def _check_send_limits(self, user: User, recipients: int) -> None:
        if self.spam is None:
            return
        refusal = await self.spam.send_refusal(user, recipients)
        if refusal:
            raise RateLimited(refusal)

    async def _dispatch(
        self, user: User, envelope: Envelope, transmitted: bytes, sent_copy: bytes
    ) -> SendResult:
        """Hand a sent message to its recipients and file the sender's copy in Sent.

        Remote recipients first: once the message is on the outgoing queue it will go out, so
        local deliveries and the Sent copy follow only a durable hand-off.
        """
        local: list[str] = []
        remote: list[str] = []
        for rcpt in dict.fromkeys(envelope.rcpt_to):
            (local if await self.is_local_domain(domain_of(rcpt)) else remote).append(rcpt)
        queue_item = None
        held = ""
        if remote:
            digest = await self.blobs.put(transmitted)
            payload = {"mail_from": envelope.mail_from, "rcpt_to": remote, "blob": digest,
                       "user_id": user.user_id, "queued_at": time.time()}
            # Outbound abuse: a burst or clearly spammy content waits for the admin
            # (`postroom queue held|release|delete`) instead of reaching the internet.
            held = await self.spam.hold_reason(user, transmitted) if self.spam else ""
            if held:
                payload["held"] = held
            queue_item = await self.queue.put(HELD if held else OUTGOING,
                                              json.dumps(payload).encode())
        delivered: tuple[str, ...] = ()
        if local:
            result = await self.deliver(
                Envelope(envelope.mail_from, tuple(local), envelope.client_ip, envelope.helo,
                         user.address), transmitted)
            delivered = tuple(result.delivered)
        sent_folder = await self.folder_by_role(user, FolderRole.SENT)
        sent, _ = await self._file(user, sent_folder, sent_copy, await parse_off_loop(sent_copy),
                                   Flags(Flag.SEEN), None, None)
        # Whoever the user writes to is trusted for them: their replies skip the Junk folder.
        await self.metadata.add_contacts(user.user_id, [r.lower() for r in envelope.rcpt_to],
                                         time.time())
        if self.spam is not None:
            await self.spam.record_send(user, len(set(envelope.rcpt_to)))
        return SendResult(sent, delivered, tuple(remote), queue_item, held)

    async def deliver_report(
        self, user_id: str, sender: str, report: bytes, delivery_key: str
    ) -> MessageRecord | None:
        """File a delivery status notification (a bounce) in the sender's INBOX.

        The sender is the local user who submitted the message (`user_id`), else whoever
        `sender` resolves to. None when neither is a local user: a report is never sent out,
        so a bounce can never bounce. `delivery_key` makes a repeated call a no-op.
        """
        user = await self.metadata.get_user(user_id) if user_id else None
        if user is None and sender:
            user = await self.resolve_recipient(sender)
        if user is None:
            return None
        inbox = await self.folder_by_role(user, FolderRole.INBOX)
        try:
            record, _ = await self._file(user, inbox, report, await parse_off_loop(report),
                                         Flags(),
                                         None, f"{delivery_key}:{user.user_id}")
        except Conflict:
            return None  # filed before and since expunged by the user
        return record

    # ------------------------------------------------------------------------------ internals

    async def _file(
        self,
        user: User,
        folder: Folder,
        raw: bytes,
        parsed: ParsedMessage,
        flags: Flags,
        internal_date: float | None,
        delivery_key: str | None,
        *,
        index_later: bool = False,
        digest: str | None = None,
        document: IndexDocument | None = None,
    ) -> tuple[MessageRecord, bool]:
        """File one message: its blob (unless the caller stored it: `digest`), its record,
        the search index (from `document`, a `document_template` of it, when given)."""
        if digest is None:
            digest = await self.blobs.put(raw)
        new = NewMessage(
            blob_hash=digest,
            size=len(raw),
            internal_date=internal_date if internal_date is not None else time.time(),
            headers=parsed.headers,
            snippet=parsed.snippet,
            has_attachments=parsed.has_attachments,
            flags=flags,
        )
        try:
            record, created = await self.metadata.insert_message(
                user.user_id, folder.folder_id, new, delivery_key=delivery_key
            )
        except NotFound:
            raise NotFoundError("no such folder") from None
        if created:
            await self._changed(user.user_id)
            if self.indexer is not None and index_later:  # searches wait for the queue
                self.indexer.later_added(record, raw, parsed, document)
            elif self.indexer is not None and document is not None:
                await self.indexer.added_documents([(record, document)])
            elif self.indexer is not None:  # searchable before anyone hears of it
                await self.indexer.added(record, raw, parsed)
            await self._publish(self._new_event(record))
        return record, created

    @staticmethod
    def _new_event(record: MessageRecord) -> Event:
        return Event(MESSAGE_NEW, record.user_id, record.folder_id, record.uid, record.modseq,
                     record.message_id, {"thread_id": record.thread_id,
                                         "refs": thread_refs(record.headers)[:5]})

    async def _publish(self, event: Event) -> None:
        try:
            await self.events.publish(event)
        except Exception:  # a lost notification must never fail the change it reports
            log.exception("publishing %s failed", event.type)

    async def _changed(self, user_id: str) -> None:
        """After a committed change of the user's mail or folders: drop their cached
        listings (a new generation; see postroom.mailcache)."""
        await self.mail_cache.changed(user_id)

    def _check_size(self, raw: bytes) -> None:
        if len(raw) > self.max_message_bytes:
            raise InvalidInput(f"message exceeds the maximum size of {self.max_message_bytes} "
                               "bytes")

    async def _user_by_address(self, address: str) -> User:
        user = await self.metadata.get_user_by_address(self._address(address))
        if user is None:
            raise NotFoundError(f"no such user {address}")
        return user

    @staticmethod
    def _address(address: str) -> str:
        try:
            return normalize_address(address)
        except AddressError as exc:
            raise InvalidInput(str(exc)) from None

    def _addresses(self, values: Sequence[str]) -> list[str]:
        return [self._address(v) for v in values]

    @staticmethod
    def _domain(name: str) -> str:
        try:
            return normalize_domain(name)
        except AddressError as exc:
            raise InvalidInput(str(exc)) from None

    @staticmethod
    def _folder_name(name: str) -> str:
        try:
            return normalize_folder_name(name)
        except FolderNameError as exc:
            raise InvalidInput(str(exc)) from None

    @staticmethod
    def _check_password(password: str) -> None:
        if len(password) < 8:
            raise InvalidInput("password must be at least 8 characters")
        if len(password) > 1024:
            raise InvalidInput("password must be at most 1024 characters")
