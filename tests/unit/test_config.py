from __future__ import annotations

from pathlib import Path

import pytest

from postroom.config import ConfigError, load_settings, parse_hostport


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("POSTROOM_"):
            monkeypatch.delenv(key)
    s = load_settings()
    assert s.data_dir == Path("postroom-data")
    assert s.storage.metadata.startswith("sqlite://") and s.storage.blobs.startswith("file://")
    assert s.storage.queue.startswith("sqlite://")
    assert s.storage.cache.startswith("siblings://{data_dir}/siblings")
    assert s.storage.events == "siblings://{data_dir}/siblings"
    assert s.storage.search.startswith("sqlite://")
    assert s.http.listen == "127.0.0.1:8080"


def test_file_then_environment_then_overrides(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('hostname = "file.example"\n[storage]\nblobs = "file:///from/file"\n'
                   'queue = "sqlite:///from/file.db"\n[http]\nlisten = "127.0.0.1:9000"\n')
    monkeypatch.setenv("POSTROOM_STORAGE__QUEUE", "sqlite:///from/env.db")
    monkeypatch.setenv("POSTROOM_DATA_DIR", str(tmp_path / "env-data"))
    s = load_settings(cfg, **{"http.listen": "127.0.0.1:9001"})
    assert s.hostname == "file.example"
    assert s.storage.blobs == "file:///from/file"  # file value kept beside the env's key
    assert s.storage.queue == "sqlite:///from/env.db"
    assert s.data_dir == tmp_path / "env-data"
    assert s.http.listen == "127.0.0.1:9001"
    assert s.storage_url("metadata") == f"sqlite:///{(tmp_path / 'env-data').resolve()}/metadata.db"


@pytest.mark.parametrize("bad", ["[http]\nlisten = 'nope'\n", "unknown_key = 1\n", "x = [\n"])
def test_invalid_files(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(bad)
    with pytest.raises(ConfigError):
        load_settings(cfg)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/postroom.toml")


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:25", ("127.0.0.1", 25)), (":8080", ("127.0.0.1", 8080)),
    ("[::1]:993", ("::1", 993)), ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["localhost", "a:b", "1.2.3.4:70000"])
def test_bad_hostport(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text)
