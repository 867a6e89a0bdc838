"""The REST API v1 (FastAPI). Thin: it parses requests, calls MailService, formats JSON."""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from postroom import __version__
from postroom.core.models import User
from postroom.http.sanitize import sanitize_html
from postroom.http.schemas import (
    AttachmentOut,
    ErrorResponse,
    FolderCreate,
    FolderList,
    FolderOut,
    FolderPatch,
    Health,
    MessageOut,
    MessagePage,
    MessagePatch,
    MessageSummary,
    SendRequest,
    SendResponse,
    SpamListEntry,
    SpamListEntryIn,
    SpamListOut,
    TokenRequest,
    TokenResponse,
)
from postroom.service import (
    AuthFailed,
    ConflictError,
    Draft,
    Forbidden,
    InvalidInput,
    MailService,
    NotFoundError,
    OutgoingAttachment,
    RateLimited,
    ServiceError,
    TooManyAttempts,
)
from postroom.store.errors import NotFound, StoreError

log = logging.getLogger(__name__)

_STATUS = {
    NotFoundError: 404,
    ConflictError: 409,
    InvalidInput: 400,
    AuthFailed: 401,
    Forbidden: 403,
    TooManyAttempts: 429,
    RateLimited: 429,
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429)
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _unauthorized(message: str) -> JSONResponse:
    return error_response(401, "unauthorized", message,
                          {"WWW-Authenticate": 'Basic realm="postroom", charset="UTF-8"'})


async def current_user(request: Request) -> User:
    """The user of a request: HTTP Basic credentials or a bearer token."""
    service: MailService = request.app.state.service
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    client = request.client.host if request.client else ""
    if scheme.lower() == "bearer" and credentials:
        return await service.user_for_token(credentials.strip())
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthFailed("malformed Basic credentials") from None
        address, sep, password = decoded.partition(":")
        if not sep:
            raise AuthFailed("malformed Basic credentials")
        return await service.authenticate(address, password, client=client)
    raise AuthFailed("authentication required")


UserDep = Annotated[User, Depends(current_user)]


def create_app(service: MailService, max_request_bytes: int = 50 * 1024 * 1024) -> FastAPI:
    app = FastAPI(
        title="Postroom API",
        version=__version__,
        description="Read, organise and send mail. Authenticate with HTTP Basic or a bearer "
                    "token from POST /v1/auth/token.",
        responses=_ERRORS,
    )
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = _STATUS.get(type(exc), 400)
        if status == 401:
            return _unauthorized(str(exc))
        return error_response(status, exc.code, str(exc))

    @app.exception_handler(NotFound)
    async def _store_not_found(request: Request, exc: NotFound) -> JSONResponse:
        # A blob or row that vanished between lookups (concurrent expunge): plain 404.
        return error_response(404, "not_found", "not found")

    @app.exception_handler(StoreError)
    async def _store_unavailable(request: Request, exc: StoreError) -> JSONResponse:
        # An engine is down or unreachable: nothing was lost, the client tries again.
        log.warning("%s %s: storage unavailable: %s", request.method, request.url.path, exc)
        return error_response(503, "unavailable", "storage is unavailable; try again later",
                              {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        code = "invalid_json" if any(e.get("type") == "json_invalid" for e in exc.errors()) \
            else "invalid_request"
        return error_response(400, code, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() \
                and (len(length) > 18 or int(length) > max_request_bytes):
            return error_response(413, "too_large",
                                  f"request body exceeds {max_request_bytes} bytes")
        response: Response = await call_next(request)
        return response

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        return Health(status="ok", version=__version__)

    @app.post("/v1/auth/token", response_model=TokenResponse, tags=["auth"])
    async def issue_token(user: UserDep, body: TokenRequest | None = None) -> TokenResponse:
        """Exchange Basic credentials for a bearer token (shown once, stored hashed)."""
        token, expires_at = await service.issue_token(user, body.ttl_seconds if body else None)
        return TokenResponse(token=token, expires_at=datetime.fromtimestamp(expires_at, UTC))

    @app.delete("/v1/auth/token", status_code=204, tags=["auth"])
    async def revoke_token(request: Request, user: UserDep) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise InvalidInput("revoke with the bearer token itself")
        await service.revoke_token(token.strip())
        return Response(status_code=204)

    @app.get("/v1/folders", response_model=FolderList, tags=["folders"])
    async def list_folders(user: UserDep) -> FolderList:
        folders = await service.list_folders(user)
        return FolderList(folders=[FolderOut.of(f, c) for f, c in folders])

    @app.post("/v1/folders", response_model=FolderOut, status_code=201, tags=["folders"])
    async def create_folder(user: UserDep, body: FolderCreate) -> FolderOut:
        folder = await service.create_folder(user, body.name)
        return await _folder_out(user, folder.folder_id)

    async def _folder_out(user: User, folder_id: str) -> FolderOut:
        for folder, counts in await service.list_folders(user):
            if folder.folder_id == folder_id:
                return FolderOut.of(folder, counts)
        raise NotFoundError("no such folder")

    @app.get("/v1/folders/{folder_id}", response_model=FolderOut, tags=["folders"])
    async def get_folder(user: UserDep, folder_id: str) -> FolderOut:
        folder = await service.get_folder(user, folder_id)
        return await _folder_out(user, folder.folder_id)

    @app.patch("/v1/folders/{folder_id}", response_model=FolderOut, tags=["folders"])
    async def patch_folder(user: UserDep, folder_id: str, body: FolderPatch) -> FolderOut:
        folder = await service.get_folder(user, folder_id)
        if body.name is not None and body.name != folder.name:
            folder = await service.rename_folder(user, folder.folder_id, body.name)
        if body.subscribed is not None:
            await service.set_subscribed(user, folder.folder_id, body.subscribed)
        return await _folder_out(user, folder.folder_id)

    @app.delete("/v1/folders/{folder_id}", status_code=204, tags=["folders"])
    async def delete_folder(user: UserDep, folder_id: str) -> Response:
        await service.delete_folder(user, folder_id)
        return Response(status_code=204)

    from postroom.http.search_api import add_search_routes

    add_search_routes(app, service)

    from postroom.http.drafts_api import add_draft_routes
    from postroom.http.events_ws import add_event_routes
    from postroom.http.webmail import add_webmail_routes

    add_draft_routes(app, service)
    add_event_routes(app, service)
    from postroom.http.threads_api import add_thread_routes

    add_thread_routes(app, service)
    from postroom.http.image_proxy import add_image_routes

    add_image_routes(app, service)
    add_webmail_routes(app)

    @app.get("/v1/folders/{folder_id}/messages", response_model=MessagePage, tags=["messages"],
             response_model_by_alias=True)
    async def list_messages(
        user: UserDep,
        folder_id: str,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: str | None = None,
    ) -> MessagePage:
        """Newest first; pass `next_cursor` back as `cursor` for the next page."""
        page = await service.list_messages(user, folder_id, limit, cursor)
        return MessagePage(messages=[MessageSummary.of(r) for r in page.messages],
                           next_cursor=page.next_cursor)

    @app.post("/v1/messages", response_model=SendResponse, status_code=201, tags=["messages"])
    async def send_message(user: UserDep, body: SendRequest) -> SendResponse:
        attachments = []
        for n, att in enumerate(body.attachments):
            try:
                data = base64.b64decode(att.content_base64, validate=True)
            except binascii.Error:
                raise InvalidInput(f"attachments.{n}.content_base64: not valid base64") from None
            attachments.append(OutgoingAttachment(att.filename, att.content_type, data))
        if body.text is None and body.html is None and not attachments:
            body.text = ""
        result = await service.send(user, Draft(
            to=tuple(body.to), cc=tuple(body.cc), bcc=tuple(body.bcc), subject=body.subject,
            text=body.text, html=body.html, attachments=tuple(attachments),
            in_reply_to=body.in_reply_to,
        ))
        return SendResponse(id=result.sent.message_id, folder_id=result.sent.folder_id,
                            message_id_header=result.sent.headers.message_id,
                            delivered=list(result.delivered), queued=list(result.queued))

    @app.get("/v1/messages/{message_id}", response_model=MessageOut, tags=["messages"],
             response_model_by_alias=True)
    async def get_message(user: UserDep, message_id: str) -> MessageOut:
        detail = await service.message_detail(user, message_id)
        summary = MessageSummary.of(detail.record)
        parsed = detail.parsed
        html = sanitize_html(parsed.html) if parsed.html else None
        return MessageOut(
            **summary.model_dump(),
            bcc=detail.record.headers.bcc,
            in_reply_to=detail.record.headers.in_reply_to,
            references=list(detail.record.headers.references),
            headers=[(k, v) for k, v in parsed.header_items],
            text=parsed.text,
            html=html.html if html else None,
            remote_images_blocked=html.remote_images_blocked if html else 0,
            remote_images=list(html.remote_images) if html else [],
            attachments=[
                AttachmentOut(
                    index=a.index, filename=a.filename, content_type=a.content_type,
                    size=a.size, content_id=a.content_id, disposition=a.disposition,
                    url=f"/v1/messages/{message_id}/attachments/{a.index}",
                )
                for a in parsed.attachments
            ],
        )

    @app.get("/v1/messages/{message_id}/raw", tags=["messages"],
             responses={200: {"content": {"message/rfc822": {}}}})
    async def raw_message(user: UserDep, message_id: str) -> Response:
        """The message exactly as received, byte for byte."""
        raw = await service.raw_message(user, message_id)
        return Response(raw, media_type="message/rfc822")

    @app.get("/v1/messages/{message_id}/attachments/{index}", tags=["messages"])
    async def attachment(user: UserDep, message_id: str, index: int) -> Response:
        part = await service.attachment(user, message_id, index)
        filename = part.filename or f"attachment-{index}"
        quoted = filename.replace("\\", "_").replace('"', "_")
        ascii_name = quoted.encode("ascii", "replace").decode().replace("?", "_")
        disposition = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"
        # Never let a browser render mail content as a page of ours.
        return Response(part.data, media_type=part.content_type,
                        headers={"Content-Disposition": disposition,
                                 "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "sandbox"})

    @app.patch("/v1/messages/{message_id}", response_model=MessageSummary, tags=["messages"],
               response_model_by_alias=True)
    async def patch_message(user: UserDep, message_id: str, body: MessagePatch) -> MessageSummary:
        record = await service.get_message(user, message_id)
        add: list[str] = []
        remove: list[str] = []
        for value, flag in ((body.seen, "\\Seen"), (body.flagged, "\\Flagged"),
                            (body.answered, "\\Answered")):
            if value is True:
                add.append(flag)
            elif value is False:
                remove.append(flag)
        if body.folder is not None:
            target = await service.get_folder(user, body.folder)  # 404 before any change
            if target.folder_id != record.folder_id:
                moved = await service.move(user, [message_id], target.folder_id)
                if not moved:
                    raise NotFoundError("no such message")
                message_id = moved[0].message_id
        if add or remove:
            await service.set_flags(user, [message_id], add=add, remove=remove)
        return MessageSummary.of(await service.get_message(user, message_id))

    @app.post("/v1/messages/{message_id}/spam", response_model=MessageSummary,
              tags=["spam"], response_model_by_alias=True)
    async def report_spam(user: UserDep, message_id: str) -> MessageSummary:
        """Moves the message to Junk and trains the user's filter on it as spam."""
        records = await service.report_spam(user, [message_id], spam=True)
        return MessageSummary.of(records[0])

    @app.post("/v1/messages/{message_id}/not-spam", response_model=MessageSummary,
              tags=["spam"], response_model_by_alias=True)
    async def report_not_spam(user: UserDep, message_id: str) -> MessageSummary:
        """Moves the message to INBOX and trains the user's filter on it as ham."""
        records = await service.report_spam(user, [message_id], spam=False)
        return MessageSummary.of(records[0])

    @app.get("/v1/spam/lists", response_model=SpamListOut, tags=["spam"])
    async def get_spam_lists(user: UserDep) -> SpamListOut:
        """The user's own block and allow lists (addresses, domains, IP addresses)."""
        entries = await service.spam_list(user)
        return SpamListOut(block=[v for v, a in entries if a == "block"],
                           allow=[v for v, a in entries if a == "allow"])

    @app.put("/v1/spam/lists/{value}", response_model=SpamListEntry, tags=["spam"])
    async def put_spam_list_entry(user: UserDep, value: str,
                                  body: SpamListEntryIn) -> SpamListEntry:
        """Block or allow a sender (ADDRESS, DOMAIN or IP) for this user."""
        stored = await service.set_spam_list_entry(user, value, body.action)
        return SpamListEntry(value=stored, action=body.action)

    @app.delete("/v1/spam/lists/{value}", status_code=204, tags=["spam"])
    async def delete_spam_list_entry(user: UserDep, value: str) -> Response:
        await service.remove_spam_list_entry(user, value)
        return Response(status_code=204)

    @app.delete("/v1/messages/{message_id}", status_code=204, tags=["messages"])
    async def delete_message(user: UserDep, message_id: str) -> Response:
        """Moves to Trash; deleting from Trash removes the message for good."""
        await service.delete(user, message_id)
        return Response(status_code=204)

    return app
