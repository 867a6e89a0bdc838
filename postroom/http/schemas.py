"""Request and response bodies of the REST API v1 (they make the OpenAPI document at /docs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from postroom.core.models import Flag, Folder, FolderCounts, MessageRecord


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_seconds: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)


class TokenResponse(BaseModel):
    token: str
    token_type: str = "bearer"
    expires_at: datetime


class FolderOut(BaseModel):
    id: str
    name: str
    parent: str | None
    role: str | None
    total: int
    unread: int
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    subscribed: bool

    @classmethod
    def of(cls, folder: Folder, counts: FolderCounts) -> FolderOut:
        return cls(
            id=folder.folder_id, name=folder.name, parent=folder.parent,
            role=folder.role.value if folder.role else None, total=counts.total,
            unread=counts.unread, uidvalidity=folder.uidvalidity, uidnext=folder.uidnext,
            highestmodseq=folder.highestmodseq, subscribed=folder.subscribed,
        )


class FolderList(BaseModel):
    folders: list[FolderOut]


class FolderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=500)


class FolderPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=500)
    subscribed: bool | None = None


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


class MessageSummary(BaseModel):
    id: str
    folder_id: str
    uid: int
    modseq: int
    thread_id: str
    from_: str = Field(serialization_alias="from")
    to: str
    cc: str
    subject: str
    date: datetime | None
    received_at: datetime
    size: int
    snippet: str
    has_attachments: bool
    seen: bool
    flagged: bool
    answered: bool
    draft: bool
    flags: list[str]
    message_id_header: str

    @classmethod
    def of(cls, record: MessageRecord) -> MessageSummary:
        h = record.headers
        return cls(
            id=record.message_id, folder_id=record.folder_id, uid=record.uid,
            modseq=record.modseq, thread_id=record.thread_id, from_=h.from_, to=h.to, cc=h.cc,
            subject=h.subject, date=_ts(h.date),
            received_at=datetime.fromtimestamp(record.internal_date, UTC), size=record.size,
            snippet=record.snippet, has_attachments=record.has_attachments,
            seen=Flag.SEEN in record.flags, flagged=Flag.FLAGGED in record.flags,
            answered=Flag.ANSWERED in record.flags, draft=Flag.DRAFT in record.flags,
            flags=record.flags.names(), message_id_header=h.message_id,
        )


class MessagePage(BaseModel):
    messages: list[MessageSummary]
    next_cursor: str | None


class AttachmentOut(BaseModel):
    index: int
    filename: str
    content_type: str
    size: int
    content_id: str
    disposition: str
    url: str


class MessageOut(MessageSummary):
    bcc: str
    in_reply_to: str
    references: list[str]
    headers: list[tuple[str, str]]
    text: str
    html: str | None
    remote_images_blocked: int
    # The blocked images' URLs; `<img src="remote-image:N">` in `html` is the Nth. Fetch one
    # through GET /v1/messages/{id}/image?url=... (the server fetches it; the reader stays hidden).
    remote_images: list[str] = []
    attachments: list[AttachmentOut]


class AttachmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(default="application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content_base64: str


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    subject: str = Field(default="", max_length=998)
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list)
    in_reply_to: str | None = None

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class SendResponse(BaseModel):
    id: str
    folder_id: str
    message_id_header: str
    delivered: list[str]
    queued: list[str]


class MessagePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seen: bool | None = None
    flagged: bool | None = None
    answered: bool | None = None
    folder: str | None = Field(default=None, description="id or name of the target folder")


class Health(BaseModel):
    status: str
    version: str


class SpamListOut(BaseModel):
    block: list[str]
    allow: list[str]


class SpamListEntryIn(BaseModel):
    action: Literal["block", "allow"]


class SpamListEntry(BaseModel):
    value: str
    action: str
