"""The domain model: users, domains, folders, message records and flags."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Flag(enum.IntFlag):
    """IMAP system flags (RFC 3501 §2.3.2) plus the junk keywords, kept as a bitmask."""

    SEEN = 1
    ANSWERED = 2
    FLAGGED = 4
    DELETED = 8
    DRAFT = 16
    JUNK = 32
    NOTJUNK = 64


FLAG_NAMES: dict[Flag, str] = {
    Flag.SEEN: "\\Seen",
    Flag.ANSWERED: "\\Answered",
    Flag.FLAGGED: "\\Flagged",
    Flag.DELETED: "\\Deleted",
    Flag.DRAFT: "\\Draft",
    Flag.JUNK: "$Junk",
    Flag.NOTJUNK: "$NotJunk",
}
_BY_NAME = {name.lower(): flag for flag, name in FLAG_NAMES.items()}
# every combination of the bits above, built once: Flag(bits) costs a microsecond per call,
# and the stores make one for each message record they read
_FLAG_BY_BITS = tuple(Flag(bits) for bits in range(1 << len(FLAG_NAMES)))


def flag_of(bits: int) -> Flag:
    """Flag(bits), without enum's construction cost for the known bits."""
    return _FLAG_BY_BITS[bits] if 0 <= bits < len(_FLAG_BY_BITS) else Flag(bits)

# the same as plain ints: `flag in system` goes through enum's machinery, ~1 us a test
_NAME_BITS = tuple((int(flag), name) for flag, name in FLAG_NAMES.items())


class FlagError(ValueError):
    """A flag or keyword that cannot be stored."""


def _valid_keyword(word: str) -> bool:
    # RFC 3501 flag-keyword = atom: no specials, no controls, no "\" (reserved for system flags)
    return bool(word) and len(word) <= 100 and not any(
        c in '(){ %*"\\]' or ord(c) < 0x21 or ord(c) > 0x7E for c in word
    )


@dataclass(frozen=True, slots=True)
class Flags:
    """System flags as a bitmask and user keywords as a sorted tuple."""

    system: Flag = Flag(0)  # noqa: RUF009 - an immutable IntFlag value
    keywords: tuple[str, ...] = ()

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...]) -> Flags:
        system = Flag(0)
        keywords: set[str] = set()
        for name in names:
            flag = _BY_NAME.get(name.lower())
            if flag is not None:
                system |= flag
            elif name.startswith("\\") or not _valid_keyword(name):
                raise FlagError(f"invalid flag {name!r}")
            else:
                keywords.add(name)
        return cls(system, tuple(sorted(keywords)))

    def names(self) -> list[str]:
        value = int(self.system)
        out = [name for bit, name in _NAME_BITS if value & bit]
        out.extend(self.keywords)
        return out

    def __contains__(self, flag: Flag) -> bool:
        # what `flag in self.system` says, without enum's machinery (IMAP tests it per message)
        return self.system._value_ & flag._value_ == flag._value_

    def union(self, other: Flags) -> Flags:
        return Flags(self.system | other.system, tuple(sorted({*self.keywords, *other.keywords})))

    def difference(self, other: Flags) -> Flags:
        return Flags(
            self.system & ~other.system,
            tuple(k for k in self.keywords if k not in other.keywords),
        )


class FolderRole(enum.StrEnum):
    """Special-use roles (RFC 6154), INBOX included."""

    INBOX = "inbox"
    SENT = "sent"
    DRAFTS = "drafts"
    JUNK = "junk"
    TRASH = "trash"
    ARCHIVE = "archive"


DEFAULT_FOLDERS: tuple[tuple[str, FolderRole], ...] = (
    ("INBOX", FolderRole.INBOX),
    ("Sent", FolderRole.SENT),
    ("Drafts", FolderRole.DRAFTS),
    ("Junk", FolderRole.JUNK),
    ("Trash", FolderRole.TRASH),
    ("Archive", FolderRole.ARCHIVE),
)

HIERARCHY_SEPARATOR = "/"


class FolderNameError(ValueError):
    """A folder name that cannot be used."""


def normalize_folder_name(name: str) -> str:
    """Validate a folder path; INBOX is case-insensitive (RFC 3501 §5.1)."""
    if not name or len(name) > 500:
        raise FolderNameError("folder name must be 1 to 500 characters")
    parts = name.split(HIERARCHY_SEPARATOR)
    if any(not part or part != part.strip() for part in parts):
        raise FolderNameError(f"invalid folder name {name!r}: empty or padded level")
    if any(ord(c) < 0x20 or c in "\x7f*%" for c in name):
        raise FolderNameError(f"invalid folder name {name!r}: control or wildcard character")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return HIERARCHY_SEPARATOR.join(parts)


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    address: str
    password_hash: str
    created_at: float
    quota_bytes: int = 0  # 0 means unlimited


@dataclass(frozen=True, slots=True)
class Alias:
    alias: str
    target: str


@dataclass(frozen=True, slots=True)
class Folder:
    user_id: str
    folder_id: str
    name: str
    role: FolderRole | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    subscribed: bool = True

    @property
    def parent(self) -> str | None:
        head, sep, _ = self.name.rpartition(HIERARCHY_SEPARATOR)
        return head if sep else None


@dataclass(frozen=True, slots=True)
class FolderCounts:
    total: int
    unread: int


@dataclass(frozen=True, slots=True)
class HeaderSummary:
    """The header fields kept on each record, so listings never need the raw bytes."""

    from_: str = ""
    to: str = ""
    cc: str = ""
    bcc: str = ""
    subject: str = ""
    date: float | None = None
    message_id: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What the store needs to file a message; uid, modseq and thread are allocated there."""

    blob_hash: str
    size: int
    internal_date: float
    headers: HeaderSummary
    snippet: str = ""
    has_attachments: bool = False
    flags: Flags = field(default_factory=Flags)
    spam_verdict: str = ""


@dataclass(frozen=True, slots=True)
class MessageRecord:
    user_id: str
    message_id: str
    folder_id: str
    uid: int
    modseq: int
    flags: Flags
    internal_date: float
    size: int
    blob_hash: str
    headers: HeaderSummary
    snippet: str
    has_attachments: bool
    thread_id: str
    spam_verdict: str = ""


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: who sent it and to whom, apart from the headers."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    client_ip: str = ""
    helo: str = ""
    authenticated_as: str = ""
