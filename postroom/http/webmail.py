"""The webmail: static HTML, CSS and JavaScript modules shipped inside the package
(`postroom/http/webmail/`), served at `/` (the page) and `/webmail/...` (its files).

Explicit routes rather than a mount at `/`, so no API route can ever be shadowed. Every response
carries the page's security headers: a Content-Security-Policy that allows only our own scripts
and styles (so an injected tag cannot run), no framing (frame-ancestors), no referrer, nosniff.
The mail itself is shown in a sandboxed iframe without scripts (see webmail/reader.js).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse

from postroom.service import NotFoundError

WEBMAIL_DIR = Path(__file__).parent / "webmail"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# The reading pane's iframe inlines frame.css; the page's CSP (which a srcdoc frame inherits)
# allows that exact text by its hash and no other inline style.
_FRAME_CSS_HASH = "'sha256-{}'".format(base64.b64encode(hashlib.sha256(
    (WEBMAIL_DIR / "frame.css").read_bytes()).digest()).decode())
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def security_headers(request: Request) -> dict[str, str]:
    host = request.headers.get("host", "")
    sockets = f" ws://{host} wss://{host}" if _HOST.match(host) else ""
    csp = ("default-src 'none'; script-src 'self';"
           f" style-src 'self' {_FRAME_CSS_HASH}; img-src 'self' data: blob:;"
           f" connect-src 'self'{sockets}; frame-src 'self'; child-src 'self'; font-src 'self';"
           " base-uri 'none'; form-action 'none'; object-src 'none'; frame-ancestors 'none';"
           " manifest-src 'self'")
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
        "Cache-Control": "no-cache",
    }


def add_webmail_routes(app: FastAPI) -> None:
    root = WEBMAIL_DIR.resolve()

    def _file(request: Request, relative: str) -> Response:
        path = (root / relative).resolve()
        if root not in path.parents or not path.is_file() or path.suffix not in _TYPES:
            raise NotFoundError("no such file")
        return FileResponse(path, media_type=_TYPES[path.suffix],
                            headers=security_headers(request))

    @app.get("/", include_in_schema=False)
    async def webmail_page(request: Request) -> Response:
        return _file(request, "index.html")

    @app.get("/webmail/{relative:path}", include_in_schema=False)
    async def webmail_file(request: Request, relative: str) -> Response:
        return _file(request, relative)
