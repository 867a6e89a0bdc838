from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess

PASSWORD_A = "alice-secret-1"
PASSWORD_B = "bob-secret-22"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A running server with domain example.test and users alice and bob."""
    base: Path = tmp_path_factory.mktemp("postroom")
    srv = ServerProcess(base / "data")
    srv.cli("domain", "add", "example.test")
    srv.cli("user", "add", "alice@example.test", "--password", PASSWORD_A)
    srv.cli("user", "add", "bob@example.test", input=PASSWORD_B + "\n")
    srv.start()
    yield srv
    srv.stop()
