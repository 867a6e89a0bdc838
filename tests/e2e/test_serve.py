"""`postroom serve` as an operator runs it: start, stop on signals, clear start-up errors."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ServerProcess, postroom_cmd


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_on_signal(tmp_path: Path, sig: int) -> None:
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    # clients still connected when the node stops: their connections end without an error
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for port in
               (srv.imap_port, srv.smtp_port, srv.submission_port, srv.pop3_port)]
    for client in clients:
        assert client.recv(1024)  # the greeting: the connection's handler is running
    assert srv.stop(sig) == 0
    log = srv.log()
    assert "postroom stopped" in log
    assert "Traceback" not in log and " ERROR " not in log, log
    for client in clients:
        client.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.base_url}/healthz", timeout=2)


def test_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*postroom_cmd(), "--data-dir", str(tmp_path / "d"), "serve",
             "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in result.stderr


def test_config_file_and_environment(tmp_path: Path) -> None:
    data = tmp_path / "from-config"
    config = tmp_path / "postroom.toml"
    config.write_text(f'data_dir = "{data}"\n[http]\nlisten = "127.0.0.1:1"\n')
    srv = ServerProcess(tmp_path / "unused")
    # the environment overrides the file; --http on the command line overrides both
    srv.env["POSTROOM_STORAGE__METADATA"] = f"sqlite:///{tmp_path}/env-metadata.db"
    subprocess.run([*postroom_cmd(), "--config", str(config), "domain", "add", "cfg.test"],
                   check=True, env=srv._env(), capture_output=True, timeout=60)
    assert (tmp_path / "env-metadata.db").exists()
    assert (data / "blobs").is_dir() and not (data / "metadata.db").exists()
    out = subprocess.run([*postroom_cmd(), "--config", str(config), "domain", "list"],
                         env=srv._env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["cfg.test"]


def test_bad_config_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[storage\n")
    result = subprocess.run([*postroom_cmd(), "--config", str(config), "domain", "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid TOML" in result.stderr
    config.write_text('[storage]\nmetadata = "mysql://x"\n')
    result = subprocess.run([*postroom_cmd(), "--config", str(config), "--data-dir",
                             str(tmp_path / "d"), "domain", "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unsupported metadata store" in result.stderr
