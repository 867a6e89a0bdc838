"""Search index URLs: which index a URL builds and what reaches the driver."""

from __future__ import annotations

import pytest

from postroom.app import make_search
from postroom.config import ConfigError
from postroom.store.errors import StoreError


def test_postgresql_url_builds_a_pooled_index() -> None:
    from postroom.store.postgres_search import PostgresSearchIndex

    index = make_search("postgresql://mail@db:6432/postroom?pool_max=20&search_path=cell7")
    assert isinstance(index, PostgresSearchIndex)
    assert (index.min_size, index.max_size) == (1, 20)
    assert index.dsn == "postgresql://mail@db:6432/postroom?search_path=cell7"


def test_unknown_scheme_names_both_choices() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        make_search("elasticsearch://localhost:9200")


async def test_unreachable_server_is_a_store_error() -> None:
    from postroom.store.postgres_search import PostgresSearchIndex

    index = PostgresSearchIndex("postgresql://postgres:secret@127.0.0.1:1/none")
    with pytest.raises(StoreError) as caught:
        await index.open()
    assert "secret" not in str(caught.value)
    with pytest.raises(StoreError, match="not open"):
        await index.indexed_ids("u")
