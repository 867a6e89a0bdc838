"""The scale-out engines are chosen by URL: what each URL form builds, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.app import make_blobs, make_cache, make_events, make_queue
from postroom.config import ConfigError
from postroom.store.nats_queue import NatsQueue, item_id_of, item_token
from postroom.store.redis_cache import RedisCache, bucket_of, split_redis_url
from postroom.store.redis_events import RedisEventBus
from postroom.store.s3_blobs import S3BlobStore


def test_s3_url() -> None:
    store = make_blobs("s3://mail-blobs/eu/1?endpoint=http://127.0.0.1:8333&region=eu-west-1")
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.endpoint, store.region, store.prefix) == (
        "mail-blobs", "http://127.0.0.1:8333", "eu-west-1", "eu/1/")
    assert store.key_of("0" * 64) == "eu/1/" + "0" * 64
    plain = make_blobs("s3://mail-blobs")
    assert isinstance(plain, S3BlobStore)
    assert (plain.endpoint, plain.region, plain.prefix) == (None, "us-east-1", "")
    with pytest.raises(ConfigError):
        make_blobs("s3://No_Such_Bucket_Name")
    with pytest.raises(ValueError):
        plain.key_of("../etc/passwd")


def test_nats_url() -> None:
    queue = make_queue("nats://10.0.0.1:4222,10.0.0.2:4222?stream_prefix=mx_eu&ack_wait=5"
                       "&replicas=3")
    assert isinstance(queue, NatsQueue)
    assert queue.servers == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    assert (queue.prefix, queue.ack_wait, queue.replicas) == ("mx_eu", 5.0, 3)
    assert queue.stream_of("incoming") == "mx_eu_q_incoming"
    with pytest.raises(ConfigError):
        make_queue("nats://127.0.0.1:4222?stream_prefix=bad.prefix")
    with pytest.raises(ValueError):
        queue.stream_of("in.coming")


def test_item_tokens_round_trip() -> None:
    for item_id in ("01HZX3", "a_b-c", "with.dot", "a b", "ü", "*", ">", "=x", ""):
        token = item_token(item_id)
        assert all(ch not in token for ch in ".*> \t") and token
        assert item_id_of(token) == item_id
    assert item_token("01HZX3") == "01HZX3"


def test_redis_urls() -> None:
    cache = make_cache("redis://127.0.0.1:6379/2?prefix=pr:&max_ttl=60&socket_timeout=5")
    assert isinstance(cache, RedisCache)
    assert (cache.prefix, cache.max_ttl) == ("pr:", 60.0)
    assert cache.url == "redis://127.0.0.1:6379/2?socket_timeout=5"
    events = make_events("redis://127.0.0.1:6379/0?prefix=pr:")
    assert isinstance(events, RedisEventBus)
    assert events.channel_of("u1") == "pr:ev:u:u1"
    assert events.channel_of(None) == "pr:ev:all"
    assert split_redis_url("redis://h/0", "prefix") == ("redis://h/0", {})
    with pytest.raises(ConfigError):
        make_cache("redis://h/0?max_ttl=0")
    with pytest.raises(ConfigError):
        make_events("kafka://h")


def test_siblings_urls() -> None:
    from postroom.store.sibling_cache import SiblingCache
    from postroom.store.siblings import SiblingEventBus

    cache = make_cache("siblings:///var/lib/postroom/siblings?max_entries=500")
    assert isinstance(cache, SiblingCache)
    assert (str(cache.directory), cache.max_entries) == ("/var/lib/postroom/siblings", 500)
    events = make_events("siblings:///var/lib/postroom/siblings")
    assert isinstance(events, SiblingEventBus)
    assert str(events.group.directory) == "/var/lib/postroom/siblings"
    for make in (make_cache, make_events):
        with pytest.raises(ConfigError, match="no directory"):
            make("siblings://")


def test_cache_buckets() -> None:
    assert bucket_of("u:123:list:INBOX") == "u:123:"
    assert bucket_of("u:123:") == "u:123:"
    assert bucket_of("u:123") == ""
    assert bucket_of("plain") == ""


def test_file_blob_url(tmp_path: Path) -> None:
    from postroom.store.fs_blobs import PACK_MAX, FsBlobStore

    default = make_blobs(f"file://{tmp_path}/a")
    assert isinstance(default, FsBlobStore) and default.pack_max == PACK_MAX
    assert default.pack is not None and default.pack.path == f"{tmp_path}/a/pack/blobs.db"
    files_only = make_blobs(f"file://{tmp_path}/b?pack_max=0")
    assert isinstance(files_only, FsBlobStore) and files_only.pack is None
    assert make_blobs(f"file://{tmp_path}/c?pack_max=4096").pack_max == 4096  # type: ignore[attr-defined]
    for bad in ("pack_max=-1", "pack_max=big", "packmax=1"):
        with pytest.raises(ConfigError):
            make_blobs(f"file://{tmp_path}/d?{bad}")
