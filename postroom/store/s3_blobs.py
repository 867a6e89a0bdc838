"""Blobs on S3-compatible object storage (`s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME`).

Content-addressed as on disk: the object key is `PREFIX` + the sha256 hex digest, so a message
sent to many recipients is stored once, and a put of bytes already stored is only a HEAD.

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
import hashlib
import re
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from postroom.store.blobs import blob_hash, check_digest
from postroom.store.errors import NotFound, StoreError

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
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

    async def put(self, data: bytes) -> str:
        data = bytes(data)
        digest = blob_hash(data)
        key = self.key_of(digest)
        if await self._exists(key):
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
        key = self.key_of(digest)
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
        key = self.key_of(digest)
        try:
            await self._s3().delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return
            raise StoreError(f"S3 delete {digest}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 delete {digest}: {exc}") from exc

    # Helpers

    def _s3(self) -> Any:
        if self._client is None:
            raise StoreError("blob store is not open")
        return self._client

    async def _exists(self, key: str) -> bool:
        try:
            await self._s3().head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise StoreError(f"S3 head {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 head {key}: {exc}") from exc
        return True
