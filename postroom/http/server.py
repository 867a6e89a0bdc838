"""The uvicorn server as Postroom runs it: inside our event loop, beside the other listeners."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


class HttpServer(uvicorn.Server):
    """uvicorn's Server without its own signal handling: `postroom serve` owns SIGTERM/SIGINT
    and shuts every listener and worker down in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
