"""GET /v1/search: the user's mail matching a query, as folder-listing summaries plus a
highlighted snippet. A malformed query answers 400 with the position of the fault."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from postroom.http.api import UserDep
from postroom.http.schemas import MessageSummary
from postroom.service import BadQuery, MailService


class SearchHit(MessageSummary):
    highlight: str  # HTML: the matching text, escaped, with <mark> around each match
    score: float  # bm25 relevance (lower is better); 0 when sorted by date


class SearchPage(BaseModel):
    results: list[SearchHit]
    next_cursor: str | None


def add_search_routes(app: FastAPI, service: MailService) -> None:
    @app.get("/v1/search", response_model=SearchPage, tags=["search"],
             response_model_by_alias=True,
             responses={400: {"description": "malformed query: error.position says where"}})
    async def search(
        user: UserDep,
        q: str = "",
        sort: Literal["date", "relevance"] = "date",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> SearchPage | JSONResponse:
        """Query language: words (all must match), "a phrase", -word, OR, ( ), from: to: cc:
        bcc: subject: filename:, has:attachment, is:unread|read|starred|flagged, in:FOLDER
        (default: all but Trash and Junk; in:anywhere for all), before: after: (YYYY-MM-DD),
        older_than: newer_than: (7d, 2m, 1y), larger: smaller: (10K, 5M)."""
        try:
            page = await service.search(user, q, sort=sort, limit=limit, cursor=cursor)
        except BadQuery as exc:
            return JSONResponse({"error": {"code": exc.code, "message": str(exc),
                                           "position": exc.position}}, status_code=400)
        hits = []
        for result in page.results:
            summary = MessageSummary.of(result.record)
            hits.append(SearchHit(**summary.model_dump(), highlight=result.highlight,
                                  score=result.score))
        return SearchPage(results=hits, next_cursor=page.next_cursor)
