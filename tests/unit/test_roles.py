"""`postroom serve --roles`: which parts a node runs."""

from __future__ import annotations

import pytest

from postroom.cli import build_parser, settings_from
from postroom.config import ROLES, ConfigError, parse_roles
from postroom.listeners import LISTENER_ROLE, PROTOCOLS


def test_parse_roles() -> None:
    assert parse_roles("all") == frozenset(ROLES)
    assert parse_roles("") == frozenset(ROLES)
    assert parse_roles("smtp, Workers") == {"smtp", "workers"}
    with pytest.raises(ConfigError, match="unknown role"):
        parse_roles("smtp,mx")


def test_every_listener_has_a_role() -> None:
    assert set(LISTENER_ROLE) == set(PROTOCOLS)
    assert set(LISTENER_ROLE.values()) <= set(ROLES)


def test_roles_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSTROOM_ROLES", raising=False)
    args = build_parser().parse_args(["serve", "--roles", "http,workers"])
    assert parse_roles(settings_from(args).roles) == {"http", "workers"}
    assert settings_from(build_parser().parse_args(["serve"])).roles == "all"
    monkeypatch.setenv("POSTROOM_ROLES", "imap")
    assert settings_from(build_parser().parse_args(["serve"])).roles == "imap"
