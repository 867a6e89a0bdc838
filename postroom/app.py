"""Wires the configured backends and services together; start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from postroom.analysis import AnalysisPool
from postroom.config import ConfigError, Settings
from postroom.service import MailService
from postroom.store.blobs import BlobStore
from postroom.store.cache import Cache
from postroom.store.events import EventBus
from postroom.store.metadata import MetadataStore
from postroom.store.migrations import MigrationOutcome
from postroom.store.queue import Queue
from postroom.store.search import SearchIndex
from postroom.store.sqlite_file import SqliteFile

if TYPE_CHECKING:
    from postroom.mailflow.outgoing import OutboundDelivery

log = logging.getLogger(__name__)


def _sqlite_path(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path
    if not path or path == "/":
        raise ConfigError(f"{url!r}: no file path")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def _query_int(url: str, key: str, default: int) -> int:
    values = parse_qs(urlsplit(url).query).get(key)
    try:
        return int(values[0]) if values else default
    except ValueError:
        raise ConfigError(f"{url!r}: {key} must be an integer") from None


# query parameters of a postgresql:// URL that size the pool; the others go to the server
_POOL_PARAMS = ("pool_min", "pool_max")


def _postgres_dsn(url: str) -> str:
    """The URL without the pool parameters (asyncpg sends unknown ones as server settings)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _POOL_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def make_metadata(url: str) -> MetadataStore:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from postroom.store.sqlite_metadata import SqliteMetadataStore

        return SqliteMetadataStore(_sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        from postroom.store.postgres_metadata import PostgresMetadataStore

        return PostgresMetadataStore(
            _postgres_dsn(url),
            min_size=_query_int(url, "pool_min", 1),
            max_size=_query_int(url, "pool_max", 10),
        )
    raise ConfigError(
        f"unsupported metadata store {url!r}"
        " (embedded: sqlite:///PATH; scale-out: postgresql://USER@HOST:PORT/DB)"
    )


async def migrate_metadata(
    url: str, target: int | None = None, status_only: bool = False
) -> MigrationOutcome:
    """Bring the metadata schema at url up to date (or to target); `postroom migrate`."""
    from postroom.store import migrations

    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        path = _sqlite_path(url)
        return await asyncio.to_thread(migrations.migrate_sqlite_file, path, target, status_only)
    if scheme in ("postgresql", "postgres"):
        return await migrations.migrate_postgres_dsn(
            _postgres_dsn(url), target, status_only, where=f"{scheme}://{urlsplit(url).hostname}"
        )
    raise ConfigError(f"unsupported metadata store {url!r}")


def make_blobs(url: str, pack_path: str | None = None,
               pack_engine: SqliteFile | None = None) -> BlobStore:
    """The blob store; for file://, `pack_path` is the SQLite file to keep small blobs in
    (the metadata's, when it is SQLite: see postroom/store/sqlite_blobs.py), and
    `pack_engine` that file's store, whose connections the pack then shares."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        from postroom.store.fs_blobs import PACK_MAX, FsBlobStore

        Path(parts.path).mkdir(parents=True, exist_ok=True)
        options = parse_qs(parts.query)
        unknown = set(options) - {"pack_max"}
        if unknown:
            raise ConfigError(f"blob store {url!r}: unknown option {sorted(unknown)[0]!r}"
                              " (file:///DIR?pack_max=BYTES)")
        try:
            pack_max = int(options.get("pack_max", [str(PACK_MAX)])[-1])
            if pack_max < 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"blob store {url!r}: pack_max must be a number of bytes,"
                              " 0 for none") from None
        return FsBlobStore(parts.path, pack_max=pack_max, pack_path=pack_path,
                           pack_engine=pack_engine)
    if parts.scheme == "s3":
        from postroom.store.s3_blobs import S3BlobStore

        try:
            return S3BlobStore.from_url(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    raise ConfigError(
        f"unsupported blob store {url!r}"
        " (embedded: file:///DIR; scale-out: s3://BUCKET?endpoint=URL)"
    )


def make_queue(url: str) -> Queue:
    if urlsplit(url).scheme == "sqlite":
        from postroom.store.sqlite_queue import SqliteQueue

        return SqliteQueue(_sqlite_path(url))
    if urlsplit(url).scheme in ("nats", "tls"):
        from postroom.store.nats_queue import NatsQueue

        try:
            return NatsQueue.from_url(url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    raise ConfigError(
        f"unsupported queue {url!r}"
        " (embedded: sqlite:///PATH; scale-out: nats://HOST:PORT?stream_prefix=NAME)"
    )


def _sibling_dir(url: str) -> str:
    path = urlsplit(url).path
    if not path or path == "/":
        raise ConfigError(f"{url!r}: no directory path")
    return path


def make_cache(url: str) -> Cache:
    if urlsplit(url).scheme == "siblings":
        from postroom.store.sibling_cache import SiblingCache

        return SiblingCache(_sibling_dir(url), _query_int(url, "max_entries", 10000))
    if urlsplit(url).scheme == "memory":
        from postroom.store.memory_cache import LruCache

        return LruCache(_query_int(url, "max_entries", 10000))
    if urlsplit(url).scheme in ("redis", "rediss", "unix"):
        from postroom.store.redis_cache import RedisCache

        try:
            return RedisCache.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None
    raise ConfigError(
        f"unsupported cache {url!r}"
        " (embedded: memory://, or siblings:///DIR for processes sharing a data dir;"
        " scale-out: redis://HOST:PORT/DB?prefix=NAME:)"
    )


def make_search(url: str) -> SearchIndex:
    if urlsplit(url).scheme == "sqlite":
        from postroom.store.sqlite_search import SqliteSearchIndex

        return SqliteSearchIndex(_sqlite_path(url))
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        from postroom.store.postgres_search import PostgresSearchIndex

        return PostgresSearchIndex(
            _postgres_dsn(url),
            min_size=_query_int(url, "pool_min", 1),
            max_size=_query_int(url, "pool_max", 10),
        )
    raise ConfigError(
        f"unsupported search index {url!r}"
        " (embedded: sqlite:///PATH; scale-out: postgresql://USER@HOST:PORT/DB)"
    )


def make_events(url: str) -> EventBus:
    if urlsplit(url).scheme == "siblings":
        from postroom.store.siblings import SiblingEventBus, SiblingGroup

        return SiblingEventBus(SiblingGroup(_sibling_dir(url)))
    if urlsplit(url).scheme == "local":
        from postroom.store.local_events import LocalEventBus

        return LocalEventBus()
    if urlsplit(url).scheme in ("redis", "rediss", "unix"):
        from postroom.store.redis_events import RedisEventBus

        try:
            return RedisEventBus.from_url(url)
        except ValueError as exc:
            raise ConfigError(f"{url!r}: {exc}") from None
    raise ConfigError(
        f"unsupported event bus {url!r}"
        " (embedded: local://, or siblings:///DIR for processes sharing a data dir;"
        " scale-out: redis://HOST:PORT/DB?prefix=NAME:)"
    )


class Postroom:
    """One node: the backends, the MailService over them, and the background workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.metadata = make_metadata(settings.storage_url("metadata"))
        # small blobs in the metadata's SQLite file: an APPEND then waits for one fsync
        engine = self.metadata if isinstance(self.metadata, SqliteFile) else None
        self.blobs = make_blobs(settings.storage_url("blobs"),
                                pack_path=engine.path if engine is not None else None,
                                pack_engine=engine)
        self.queue = make_queue(settings.storage_url("queue"))
        self.cache = make_cache(settings.storage_url("cache"))
        self.events = make_events(settings.storage_url("events"))
        self.search = make_search(settings.storage_url("search"))
        self.service = MailService(
            metadata=self.metadata,
            blobs=self.blobs,
            queue=self.queue,
            cache=self.cache,
            events=self.events,
            hostname=settings.hostname,
            token_ttl=settings.http.token_ttl,
            max_message_bytes=settings.mail.max_message_bytes,
            max_recipients=settings.smtp.max_recipients,
        )
        self.service.use_search_index(self.search)
        # Parsing, indexing texts and spam scoring of received mail, in worker processes
        # (started by the MX listener or the incoming workers, if this node runs either).
        self.analysis = AnalysisPool()
        self.service.analysis = self.analysis
        if settings.spam.enabled:
            from postroom.spam.setup import make_spam_filter

            self.service.spam = make_spam_filter(settings, self.metadata, self.blobs,
                                                 self.analysis)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._opened: list[Any] = []
        self.delivery: OutboundDelivery | None = None

    async def open(self) -> None:
        for backend in (self.metadata, self.blobs, self.queue, self.cache, self.events,
                        self.search):
            await backend.open()
            self._opened.append(backend)

    async def offload_search_writes(self) -> None:
        """The embedded search index writes in a process of its own from now on (a serving
        node; see SqliteSearchIndex.start_writer_process). Other indexes write over the
        network already, and one-off commands keep their writer thread."""
        start = getattr(self.search, "start_writer_process", None)
        if start is not None:
            await start()

    async def start_workers(self) -> None:
        from postroom.mailflow.incoming import run_incoming_worker

        await self.analysis.start()
        for n in range(max(1, self.settings.mail.workers)):
            self._tasks.append(asyncio.create_task(
                run_incoming_worker(self.service, self.queue, self._stop),
                name=f"incoming-worker-{n}",
            ))
        from postroom.mailflow.outgoing import OutboundDelivery, run_delivery_worker

        storage = self.settings.storage
        if storage.blob_collect_interval > 0:
            from postroom.blob_collector import run_blob_collector

            self._tasks.append(asyncio.create_task(
                run_blob_collector(self.metadata, self.blobs, self.queue, self._stop,
                                   interval=storage.blob_collect_interval,
                                   grace=storage.blob_grace),
                name="blob-collector",
            ))
        self.delivery = OutboundDelivery(self.service, self.queue, self.settings)
        for n in range(self.settings.delivery.workers):
            self._tasks.append(asyncio.create_task(
                run_delivery_worker(self.delivery, self.queue, self._stop),
                name=f"delivery-worker-{n}",
            ))

    async def close(self) -> None:
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("worker %s ended with %r", task.get_name(), task.exception())
        self._tasks.clear()
        if self.delivery is not None:
            with contextlib.suppress(Exception):
                await self.delivery.close()
        if self.service.indexer is not None:  # queued index writes (IMAP) before it closes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.service.indexer.settled(), 10)
        self.analysis.close()
        while self._opened:
            backend = self._opened.pop()
            try:
                await backend.close()
            except Exception:
                log.exception("closing %r failed", backend)

    async def __aenter__(self) -> Postroom:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
