"""Blobs on S3-compatible object storage (`s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME`).

Content-addressed as on disk: the object key is `PREFIX` + the sha256 hex digest, so a message
sent to many recipients is stored once, and a put of bytes already stored is only a HEAD (or,
once the object is older than a minute, a fresh upload: its Last-Modified is then the last put,
which keeps the blob collector off a blob that is being referred to again).

Collection: the collector copies a blob it means to delete to `PREFIX` + `quarantine/` + digest
and deletes the original; a put meanwhile stores it afresh and a get brings the copy back.

Durability: `put` sends the bytes with their SHA-256 as `x-amz-checksum-sha256`, so the store
verifies them against the very digest that names them and refuses a torn or altered upload; it
returns only once the store has answered 200, i.e. acknowledged the object. `get` checks the
bytes it reads against the digest too, so a damaged object is an error, never wrong mail.

Credentials come from the standard AWS sources (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
profiles, instance roles) as botocore finds them. Addressing is path-style, which every
S3-compatible server (SeaweedFS, MinIO, Ceph RGW) understands. The bucket is created when
missing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from postroom.store.blobs import DIGEST, blob_hash, check_digest
from postroom.store.errors import NotFound, StoreError

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_QUARANTINE = "quarantine/"  # blobs the collector moved aside
_REFRESH_AFTER = 60.0  # seconds: a put of an older object uploads it again (a new put time)
# S3 bucket naming rules (the common subset every implementation accepts).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3BlobStore:
    """`BlobStore` on an S3 bucket."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        max_connections: int = 32,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        if _BUCKET.fullmatch(bucket) is None:
            raise ValueError(f"invalid S3 bucket name: {bucket!r}")
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region
        self.prefix = prefix
        self.max_connections = max_connections
        # None: botocore's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles...).
        self._access_key = access_key
        self._secret_key = secret_key
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        """`s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT&region=us-east-1`."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.hostname:
            raise ValueError(f"{url!r}: expected s3://BUCKET[/PREFIX]?endpoint=URL")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        prefix = unquote(parts.path.lstrip("/"))
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(
            parts.hostname,
            endpoint=query.get("endpoint") or None,
            region=query.get("region", "us-east-1"),
            prefix=prefix,
            max_connections=int(query.get("max_connections", "32")),
        )

    def key_of(self, digest: str) -> str:
        return self.prefix + check_digest(digest)

    # Lifecycle

    async def open(self) -> None:
        if self._client is not None:
            return
        config = AioConfig(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            connect_timeout=10,
            read_timeout=120,
            retries={"max_attempts": 4, "mode": "standard"},
            max_pool_connections=self.max_connections,
        )
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=self.region,
                    config=config,
                    aws_access_key_id=self._access_key,
                    aws_secret_access_key=self._secret_key,
                )
            )
            await self._ensure_bucket()
        except BaseException as exc:
            self._client = None
            await stack.aclose()
            if isinstance(exc, (ClientError, BotoCoreError)):
                raise StoreError(f"S3 bucket {self.bucket}: {exc}") from exc
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _NOT_FOUND and _code(exc) != "NoSuchBucket":
                raise
        try:
            await self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # Another node made it between our HEAD and CREATE.
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    # The BlobStore protocol

    def shares_log_with(self, metadata: object) -> bool:
        return False  # every put is durable on its own

    async def put(self, data: bytes, *, sync: bool = True) -> str:
        data = bytes(data)
        digest = blob_hash(data)
        key = self.key_of(digest)
        head = await self._head(key)
        if head is not None and _age(head) < _REFRESH_AFTER:
            return digest  # content-addressed: the key always holds these very bytes
        checksum = base64.b64encode(bytes.fromhex(digest)).decode()
        try:
            await self._s3().put_object(
                Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=checksum
            )
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 put {digest}: {exc}") from exc
        return digest

    async def get(self, digest: str) -> bytes:
        try:
            return await self._get(self.key_of(digest), digest)
        except NotFound:
            pass
        # the collector moved it aside while someone came to refer to it: bring it back
        data = await self._get(self.quarantine_key_of(digest), digest)
        await self.restore(digest)
        return data

    def quarantine_key_of(self, digest: str) -> str:
        return self.prefix + _QUARANTINE + check_digest(digest)

    async def quarantine(self, digest: str, untouched_for: float) -> bool:
        key = self.key_of(digest)
        head = await self._head(key)
        if head is None or _age(head) < untouched_for:
            return False
        await self._copy(key, self.quarantine_key_of(digest))
        await self._delete(key)
        return True

    async def restore(self, digest: str) -> None:
        held = self.quarantine_key_of(digest)
        if not await self._exists(self.key_of(digest)):
            if not await self._exists(held):
                return
            await self._copy(held, self.key_of(digest))
        await self._delete(held)

    async def purge(self, digest: str) -> None:
        await self._delete(self.quarantine_key_of(digest))

    async def scan(self, untouched_for: float) -> AsyncIterator[str]:
        before = time.time() - untouched_for
        paginator = self._s3().get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for entry in page.get("Contents", []):
                    digest = str(entry["Key"])[len(self.prefix):]
                    modified = entry.get("LastModified")
                    if DIGEST.fullmatch(digest) is None or not isinstance(
                            modified, datetime.datetime) or modified.timestamp() >= before:
                        continue  # quarantined (another "directory"), foreign or recent
                    yield digest
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 list {self.bucket}/{self.prefix}: {exc}") from exc

    async def _copy(self, source: str, target: str) -> None:
        try:
            await self._s3().copy_object(Bucket=self.bucket, Key=target,
                                         CopySource={"Bucket": self.bucket, "Key": source})
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"S3 copy {source} -> {target}: {exc}") from exc

    async def _get(self, key: str, digest: str) -> bytes:
        try:
            response = await self._s3().get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise NotFound(f"blob {digest}") from None
            raise StoreError(f"S3 get {digest}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 get {digest}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"S3 object {key} does not match its digest")
        return data

    async def exists(self, digest: str) -> bool:
        return await self._exists(self.key_of(digest))

    async def delete(self, digest: str) -> None:
        await self._delete(self.key_of(digest))

    async def _delete(self, key: str) -> None:
        try:
            await self._s3().delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return
            raise StoreError(f"S3 delete {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 delete {key}: {exc}") from exc

    # Helpers

    def _s3(self) -> Any:
        if self._client is None:
            raise StoreError("blob store is not open")
        return self._client

    async def _exists(self, key: str) -> bool:
        return await self._head(key) is not None

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = await self._s3().head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise StoreError(f"S3 head {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 head {key}: {exc}") from exc
        return head


def _age(head: dict[str, Any]) -> float:
    """Seconds since the object was last written (0 when the store does not say)."""
    modified = head.get("LastModified")
    if not isinstance(modified, datetime.datetime):
        return 0.0
    return time.time() - modified.timestamp()
