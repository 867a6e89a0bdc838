"""Drafts for the webmail: saved to the Drafts folder (flagged \\Draft) as the user types.

POST /v1/drafts stores a draft; PUT /v1/drafts/{id} stores the new version and removes the old
one (a message's bytes never change, so a new version is a new message); DELETE discards it.
A draft may have no recipient yet, which sending refuses, so drafts are formatted here with the
standard library rather than by the sending path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Annotated

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from postroom.core.compose import make_message_id
from postroom.core.models import Flag, FolderRole, User
from postroom.http.api import UserDep
from postroom.http.schemas import AttachmentIn
from postroom.service import InvalidInput, MailService, NotFoundError


class DraftIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: list[Annotated[str, Field(max_length=998)]] = Field(default_factory=list)
    cc: list[Annotated[str, Field(max_length=998)]] = Field(default_factory=list)
    bcc: list[Annotated[str, Field(max_length=998)]] = Field(default_factory=list)
    subject: str = Field(default="", max_length=998)
    text: str = ""
    in_reply_to: str | None = Field(default=None, max_length=998)
    attachments: list[AttachmentIn] = Field(default_factory=list)

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


class DraftOut(BaseModel):
    id: str
    folder_id: str


def _header_value(value: str) -> str:
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def draft_bytes(user: User, body: DraftIn, hostname: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = user.address
    for name, values in (("To", body.to), ("Cc", body.cc), ("Bcc", body.bcc)):
        cleaned = [_header_value(v) for v in values if v.strip()]
        if cleaned:
            msg[name] = ", ".join(cleaned)
    msg["Subject"] = _header_value(body.subject)
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_message_id(hostname)
    if body.in_reply_to and body.in_reply_to.startswith("<"):
        msg["In-Reply-To"] = _header_value(body.in_reply_to)
    msg.set_content(body.text)
    for n, att in enumerate(body.attachments):
        try:
            data = base64.b64decode(att.content_base64, validate=True)
        except binascii.Error:
            raise InvalidInput(f"attachments.{n}.content_base64: not valid base64") from None
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=att.filename)
    try:
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"cannot format the draft: {exc}") from None


def add_draft_routes(app: FastAPI, service: MailService) -> None:
    async def _save(user: User, body: DraftIn) -> DraftOut:
        # a draft's fields are free text: count the addresses they list
        service.check_recipient_count(sum(v.count(",") + 1 for field in (body.to, body.cc,
                                                                        body.bcc)
                                          for v in field if v.strip()))
        drafts = await service.folder_by_role(user, FolderRole.DRAFTS)
        # on a thread: encoding 50 MB of attachments takes seconds
        raw = await asyncio.to_thread(draft_bytes, user, body, service.hostname)
        record = await service.append(user, drafts.folder_id, raw, flags=["\\Draft", "\\Seen"])
        return DraftOut(id=record.message_id, folder_id=record.folder_id)

    async def _own_draft(user: User, draft_id: str) -> str:
        record = await service.get_message(user, draft_id)
        drafts = await service.folder_by_role(user, FolderRole.DRAFTS)
        if record.folder_id != drafts.folder_id or Flag.DRAFT not in record.flags:
            raise NotFoundError("no such draft")
        return record.message_id

    @app.post("/v1/drafts", response_model=DraftOut, status_code=201, tags=["drafts"])
    async def create_draft(user: UserDep, body: DraftIn) -> DraftOut:
        """Save a draft in Drafts (flagged \\Draft and \\Seen)."""
        return await _save(user, body)

    @app.put("/v1/drafts/{draft_id}", response_model=DraftOut, tags=["drafts"])
    async def replace_draft(user: UserDep, draft_id: str, body: DraftIn) -> DraftOut:
        """Save a new version of a draft; the old version is removed. The new id answers."""
        old = await _own_draft(user, draft_id)
        saved = await _save(user, body)
        await service.expunge(user, [old])
        return saved

    @app.delete("/v1/drafts/{draft_id}", status_code=204, tags=["drafts"])
    async def discard_draft(user: UserDep, draft_id: str) -> Response:
        await service.expunge(user, [await _own_draft(user, draft_id)])
        return Response(status_code=204)
