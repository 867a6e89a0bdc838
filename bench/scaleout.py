"""The scale-out engine set for a benchmark's `--scale` run: a fresh PostgreSQL database on the
machine's server (127.0.0.1:5432, or POSTROOM_BENCH_PG), NATS JetStream and Redis (4222 and 6379,
or POSTROOM_BENCH_NATS / POSTROOM_BENCH_REDIS) under names unique to the run, and blobs on a
SeaweedFS S3 gateway started for the run. Everything is removed again at the end.

    with scaleout.engines(work) as env:   # POSTROOM_STORAGE__* and AWS_* variables
        ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

PG = os.environ.get("POSTROOM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NATS = os.environ.get("POSTROOM_BENCH_NATS", "nats://127.0.0.1:4222")
REDIS = os.environ.get("POSTROOM_BENCH_REDIS", "redis://127.0.0.1:6379/0")

# Set while `engines` runs, so a benchmark's server start-up can add it to its environment.
ACTIVE: dict[str, str] = {}


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run to completion on a loop of its own (the caller may be inside one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _pg(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _drop_stream_and_keys(prefix: str) -> None:
    import nats
    from redis.asyncio import Redis

    nc = await nats.connect(NATS)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(prefix + "_"):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()
    client = Redis.from_url(REDIS)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + ":*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i:i + 1000])
    finally:
        await client.aclose()


@contextlib.contextmanager
def engines(work: Path) -> Iterator[dict[str, str]]:
    from tests.engines import start_s3

    name = f"bench_{secrets.token_hex(5)}"
    _run(_pg(f'CREATE DATABASE "{name}"'))
    s3 = start_s3(work / "s3")
    dsn = PG.rsplit("/", 1)[0] + "/" + name
    env = {
        **s3.env(),
        "POSTROOM_STORAGE__METADATA": dsn,
        "POSTROOM_STORAGE__BLOBS": s3.url(name.replace("_", "-")),
        "POSTROOM_STORAGE__QUEUE": f"{NATS}?stream_prefix={name}",
        "POSTROOM_STORAGE__CACHE": f"{REDIS}?prefix={name}:",
        "POSTROOM_STORAGE__EVENTS": f"{REDIS}?prefix={name}:",
    }
    ACTIVE.update(env)
    try:
        yield env
    finally:
        ACTIVE.clear()
        s3.stop()
        with contextlib.suppress(Exception):
            _run(_drop_stream_and_keys(name))
        with contextlib.suppress(Exception):
            _run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def describe() -> str:
    return "PostgreSQL + S3 (SeaweedFS) + NATS JetStream + Redis" if ACTIVE else "embedded"
