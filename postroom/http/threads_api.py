"""GET /v1/threads/{thread_id}: one conversation of the user, every folder, oldest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query
from pydantic import BaseModel

from postroom.http.api import UserDep
from postroom.http.schemas import MessageSummary
from postroom.service import MailService


class ThreadOut(BaseModel):
    id: str
    messages: list[MessageSummary]


def add_thread_routes(app: FastAPI, service: MailService) -> None:
    @app.get("/v1/threads/{thread_id}", response_model=ThreadOut, tags=["messages"],
             response_model_by_alias=True)
    async def get_thread(user: UserDep, thread_id: str,
                         limit: Annotated[int, Query(ge=1, le=500)] = 200) -> ThreadOut:
        """The thread's messages (list summaries) in every folder, Sent and Trash included,
        oldest first; 404 when the thread has none of this user's messages."""
        records = await service.list_thread(user, thread_id, limit)
        return ThreadOut(id=thread_id, messages=[MessageSummary.of(r) for r in records])
