"""Metadata store URLs: which store a URL builds and what reaches the driver."""

from __future__ import annotations

import pytest

from postroom.app import _postgres_dsn, make_metadata
from postroom.config import ConfigError
from postroom.store.errors import StoreError


def test_postgresql_url_builds_a_pooled_store() -> None:
    from postroom.store.postgres_metadata import PostgresMetadataStore

    store = make_metadata(
        "postgresql://mail@db.internal:6432/postroom?pool_min=2&pool_max=20&search_path=cell7"
    )
    assert isinstance(store, PostgresMetadataStore)
    assert (store.min_size, store.max_size) == (2, 20)
    # the pool sizes are ours; everything else goes to the server
    assert store.dsn == "postgresql://mail@db.internal:6432/postroom?search_path=cell7"
    assert isinstance(make_metadata("postgres://localhost/x"), PostgresMetadataStore)


def test_pool_size_must_be_a_number() -> None:
    with pytest.raises(ConfigError, match="pool_max"):
        make_metadata("postgresql://localhost/x?pool_max=many")


def test_unknown_scheme_names_both_choices() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        make_metadata("mysql://localhost/x")


def test_dsn_without_query_is_unchanged() -> None:
    assert _postgres_dsn("postgresql://u@h:5432/d") == "postgresql://u@h:5432/d"


async def test_unreachable_server_is_a_store_error() -> None:
    from postroom.store.postgres_metadata import PostgresMetadataStore

    # port 1 on loopback: nothing listens there, the connection is refused at once
    store = PostgresMetadataStore("postgresql://postgres:secret@127.0.0.1:1/none")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert "secret" not in str(caught.value)
    with pytest.raises(StoreError, match="not open"):
        await store.list_domains()
