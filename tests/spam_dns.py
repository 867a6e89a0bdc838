"""dnsmasq as the DNS of the spam tests: TXT records (SPF, DKIM keys, DMARC) and A records
(DNSBL listings) on loopback, every other name NXDOMAIN (NOTES.md has the flags)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.resolver
import pytest


def _free_udp_tcp_port() -> int:
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def split_txt(text: str) -> list[str]:
    """A TXT value as strings of at most 255 octets (DKIM keys are longer)."""
    return [text[i:i + 255] for i in range(0, len(text), 255)] or [""]


@contextmanager
def dnsmasq(workdir: Path, txt: dict[str, str], hosts: dict[str, str] | None = None
            ) -> Iterator[int]:
    """Run dnsmasq with these records; yields its port."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        pytest.skip("dnsmasq (Debian dnsmasq-base) is not installed")
    port = _free_udp_tcp_port()
    args = [binary, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--local=/#/", f"--pid-file={workdir / 'dnsmasq.pid'}", "--user=root",
            "--group=root"]
    for name, value in txt.items():
        # On the command line dnsmasq keeps quotes literally; commas split the strings.
        assert "," not in value, "TXT values here cannot hold commas"
        args.append(f"--txt-record={name}," + ",".join(split_txt(value)))
    for name, address in (hosts or {}).items():
        args.append(f"--host-record={name},{address}")
    log = (workdir / "dnsmasq.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.nameserver_ports = {"127.0.0.1": port}
        resolver.lifetime = 1.0
        deadline = time.monotonic() + 20
        while True:
            try:
                resolver.resolve("probe.test", "A")
                break
            except dns.resolver.NXDOMAIN:
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not start: "
                                       + (workdir / "dnsmasq.log").read_text()) from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
