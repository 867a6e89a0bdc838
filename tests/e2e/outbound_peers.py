"""Real peers for the outbound delivery tests: dnsmasq as the DNS, Postfix as a receiving MTA.

Every receiving peer listens on the same test port (Postroom's `[delivery] port`) on its own
127.0.0.x address, as MX hosts on the internet all listen on port 25.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def port_free_on(port: int, addresses: Sequence[str]) -> bool:
    for address in addresses:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    return False
    return True


def shared_port(addresses: Sequence[str]) -> int:
    """A port free for TCP and UDP on every one of `addresses`."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port_free_on(port, addresses):
            return port
    raise RuntimeError("no shared free port")


def wait_port(address: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class Dnsmasq:
    """dnsmasq answering for *.test from command-line records only (NOTES.md)."""

    workdir: Path
    mx: list[tuple[str, str, int]] = field(default_factory=list)  # domain, host, preference
    hosts: list[tuple[str, str]] = field(default_factory=list)  # name, IPv4 address
    txt: list[tuple[str, list[str]]] = field(default_factory=list)  # name, strings
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = self.port or shared_port(["127.0.0.1"])
        args = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                "--no-resolv", "--no-hosts", "--local=/test/", "--log-queries",
                "--log-facility=-", f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                "--user=root", "--group=root"]
        args += [f"--mx-host={d},{h},{p}" for d, h, p in self.mx]
        args += [f"--host-record={n},{a}" for n, a in self.hosts]
        for name, strings in self.txt:
            args.append(f"--txt-record={name}," + ",".join(strings))  # no commas inside
        self.log_path = self.workdir / "dnsmasq.log"
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("wb"),
                                     stderr=subprocess.STDOUT)
        resolver = self.resolver()
        deadline = time.monotonic() + 20
        while True:
            try:
                resolver.resolve("probe.test", "A")
            except dns.resolver.NXDOMAIN:
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dnsmasq did not start: {self.log()}") from None
                time.sleep(0.1)

    def resolver(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 5
        return resolver

    def txt_lookup(self, name: bytes, timeout: float = 5) -> bytes | None:
        """A `dnsfunc` for dkimpy: the TXT record, as served by this dnsmasq."""
        try:
            answer = self.resolver().resolve(name.decode().rstrip("."), "TXT")
        except dns.exception.DNSException:
            return None
        for rdata in answer:
            return b"".join(rdata.strings)  # type: ignore[attr-defined, no-any-return]
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if hasattr(self, "log_path") else ""


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


@dataclass
class PostfixPeer:
    """A throwaway Postfix receiving mail for `domain` into one Maildir, STARTTLS offered."""

    address: str
    port: int
    domain: str
    defer: dict[str, str] = field(default_factory=dict)  # recipient -> 4xx reply
    # Not under pytest's temporary folder: every pytest run on the machine resets that to mode
    # 0700, and Postfix's unprivileged daemons must reach their files.
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="postroom-pf-")))

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    @property
    def maildir(self) -> Path:
        return self.workdir / "mail" / "box"

    def start(self) -> None:
        if shutil.which("postfix") is None and not Path("/usr/sbin/postfix").exists():
            raise RuntimeError("postfix is not installed (scripts/debian-packages.txt)")
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        self.workdir.chmod(0o755)
        for sub in ("etc", "spool", "data", "mail"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        os.chown(self.workdir / "data", uid, gid)
        os.chown(self.workdir / "mail", uid, gid)
        cert, key = self_signed(self.config_dir, f"mx.{self.domain}")
        (self.config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.address}:{self.port}"))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.workdir / "spool"),
            "data_directory": str(self.workdir / "data"),
            "mail_owner": "postfix",
            "myhostname": f"mx.{self.domain}",
            "mydomain": self.domain,
            "myorigin": self.domain,
            "mydestination": "",
            "inet_interfaces": "loopback-only",  # its own address is no interface of lo
            "proxy_interfaces": self.address,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.workdir / "mail"),
            "virtual_mailbox_maps": "static:box/",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "smtpd_recipient_restrictions": self._restrictions(),
            "smtpd_peername_lookup": "no",
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "maillog_file": str(self.workdir / "maillog"),
            "maillog_file_prefixes": str(self.workdir),
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_received_header": "yes",
            "shlib_directory": "/usr/lib/postfix",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": "/etc/postfix",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._postfix("start")
        wait_port(self.address, self.port)

    def _restrictions(self) -> str:
        access = ", ".join(f"{{ {rcpt} = {reply} }}" for rcpt, reply in self.defer.items())
        rules = [f"check_recipient_access inline:{{ {access} }}"] if access else []
        return ", ".join([*rules, "permit_mynetworks", "reject_unauth_destination"])

    def stop_deferring(self) -> None:
        """Accept the deferred recipients from now on."""
        self.defer = {}
        self.reconfigure(smtpd_recipient_restrictions=self._restrictions())

    def reconfigure(self, **settings: str) -> None:
        """Change main.cf settings. A restart, not a reload: a reload leaves open sessions (a
        sender's reused connection) on the old settings."""
        for key, value in settings.items():
            self._postfix("-e", f"{key}={value}", command="postconf")
        self._postfix("stop")
        self._postfix("start")
        wait_port(self.address, self.port)

    def _postfix(self, *args: str, command: str = "postfix") -> None:
        result = subprocess.run([command, "-c", str(self.config_dir), *args],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{command} {' '.join(args)} failed: {result.stderr}\n"
                               f"{self.log()}")

    def messages(self) -> list[email.message.EmailMessage]:
        found = []
        new = self.maildir / "new"
        for path in sorted(new.iterdir()) if new.exists() else []:
            found.append(email.message_from_bytes(path.read_bytes(),
                                                  policy=email.policy.default))
        return found  # type: ignore[return-value]

    def raw_messages(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config_dir), "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        path = self.workdir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""
