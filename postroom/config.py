"""Settings: one TOML file (`--config FILE`) plus `POSTROOM_*` environment variables.

Environment variables win over the file; nested keys use a double underscore, e.g.
`POSTROOM_STORAGE__METADATA=postgresql://...` or `POSTROOM_HTTP__LISTEN=0.0.0.0:8080`.
Storage URLs may contain `{data_dir}`, which is replaced by the data directory.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class ConfigError(ValueError):
    """The configuration cannot be used."""


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT` -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(f"expected HOST:PORT, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in {value!r}")
    return host or default_host, port


class StorageSettings(BaseModel):
    metadata: str = "sqlite:///{data_dir}/metadata.db"
    blobs: str = "file:///{data_dir}/blobs"
    search: str = "sqlite:///{data_dir}/search.db"
    queue: str = "sqlite:///{data_dir}/queue.db"
    # Shared by every process on this data dir (the server, its sibling nodes, the CLI's
    # `postroom import`): docs/OPERATIONS.md. memory:// and local:// keep them in one process.
    cache: str = "siblings://{data_dir}/siblings?max_entries=10000"
    events: str = "siblings://{data_dir}/siblings"
    # Blob collection (postroom/blob_collector.py): every `blob_collect_interval` seconds (0:
    # never), blobs whose last reference went more than `blob_grace` seconds ago are deleted.
    blob_collect_interval: float = Field(default=3600.0, ge=0)
    blob_grace: float = Field(default=3600.0, ge=0)


class HttpSettings(BaseModel):
    listen: str = "127.0.0.1:8080"
    token_ttl: float = 30 * 24 * 3600.0
    max_request_bytes: int = 50 * 1024 * 1024

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_hostport(value)
        return value


class ListenerSettings(BaseModel):
    """Listeners of later protocol servers; empty means disabled."""

    smtp: str = "127.0.0.1:2525"  # MX; port 25 in production
    submission: str = "127.0.0.1:5870"  # STARTTLS; port 587 in production
    submissions: str = "127.0.0.1:4650"  # implicit TLS; port 465 in production
    imap: str = "127.0.0.1:1143"  # STARTTLS; 143 in production
    imaps: str = "127.0.0.1:9930"  # implicit TLS; 993 in production
    pop3: str = "127.0.0.1:1110"  # STLS; 110 in production
    pop3s: str = "127.0.0.1:9950"  # implicit TLS; 995 in production


class TlsSettings(BaseModel):
    """Certificate and key (PEM files) for STARTTLS and implicit TLS; a self-signed pair is
    generated once in the data dir when these are empty."""

    cert: str = ""
    key: str = ""


class AuthSettings(BaseModel):
    # Plaintext logins (SMTP AUTH, IMAP LOGIN, POP3 USER/PASS) need TLS, except from a loopback
    # address, which counts as secure (as Dovecot treats it).
    plaintext_on_loopback: bool = True


class SmtpSettings(BaseModel):
    """Limits of the SMTP listeners (MX and submission); each refusal has its own reply."""

    max_recipients: int = 100  # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
    max_line_length: int = 10_000  # octets per DATA line with CRLF (RFC 5321 says 1000)
    max_command_length: int = 2048  # command line with its extension parameters
    max_junk_commands: int = 100  # NOOP/RSET/VRFY/HELO... before a transaction makes progress
    max_errors: int = 10  # bad commands before the session is closed
    connections_per_ip: int = 50
    max_connections: int = 2000
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: the server waits 5 minutes
    data_timeout: float = 600.0


class ImapSettings(BaseModel):
    """Limits of the IMAP listeners; each refusal has its own reply (APPENDLIMIT is
    mail.max_message_bytes)."""

    max_line_length: int = 65536  # octets per command line, literals apart
    commands_per_second: int = 2000  # per connection; more gets NO [LIMIT]
    idle_timeout: float = 1800.0  # RFC 3501 §5.4: at least 30 minutes; IDLE is exempt
    connections_per_user: int = 50
    max_connections: int = 20000
    # SO_REUSEPORT: several nodes on one machine listen on the same IMAP port and the kernel
    # spreads the connections over them (their events and cache then go through Redis)
    reuse_port: bool = False


class Pop3Settings(BaseModel):
    # What DELE does at QUIT: "expunge" (gone for good, as POP3 users expect) or "trash".
    delete_action: Literal["expunge", "trash"] = "expunge"
    # RFC 1939 §3: an inactivity autologout timer of at least 10 minutes.
    idle_timeout: float = 600.0
    # Sessions at once, all clients and per client address; more get -ERR [SYS/TEMP].
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=20, ge=1)


class MailSettings(BaseModel):
    max_message_bytes: int = 50 * 1024 * 1024
    workers: int = 2


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or a string with a unit: `90`, `30s`, `5m`, `4h`, `5d`."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        scale = units.get(text[-1:], 1.0) if text else 1.0
        number = text[:-1] if text[-1:] in units else text
        try:
            seconds = float(number) * scale
        except ValueError:
            raise ValueError(f"invalid duration {value!r} (e.g. 30s, 5m, 4h, 5d)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}")
    return seconds


def _split_list(value: Any) -> Any:
    """Lists from the environment may be JSON or plain comma-separated text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class DnsSettings(BaseModel):
    """Where outbound delivery looks up MX and address records."""

    # Nameservers as HOST or HOST:PORT; empty uses the system resolver (/etc/resolv.conf).
    servers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    timeout: float = 10.0

    _split = field_validator("servers", mode="before")(_split_list)

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for server in value:
            parse_nameserver(server)
        return value


def parse_nameserver(server: str) -> tuple[str, int]:
    """`HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address -> (host, port), port 53 default."""
    if server.startswith("[") or server.count(":") == 1:
        return parse_hostport(server)
    if not server.strip():
        raise ConfigError("empty nameserver address")
    return server.strip(), 53


class DeliverySettings(BaseModel):
    """Outbound delivery: the workers that send the outgoing queue to the internet's MX hosts."""

    port: int = Field(default=25, ge=1, le=65535)  # destination port (tests use another one)
    workers: int = Field(default=4, ge=1)  # queue items in delivery at once
    max_connections: int = Field(default=20, ge=1)  # SMTP connections, all destinations
    connections_per_domain: int = Field(default=4, ge=1)
    # Delay before each retry after a temporary failure; the last one repeats until max_age.
    schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0])
    max_age: float = 5 * 86400.0  # then the message bounces (RFC 5321 §4.5.4.1: 4-5 days)
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2: 5 minutes per command
    data_timeout: float = 600.0  # RFC 5321 §4.5.3.2.6: 10 minutes for the final reply
    idle_timeout: float = 30.0  # an idle connection is kept this long for the next message
    # How long a taken item stays a worker's without news; extended while it is delivered, so
    # after a crash the item is due again this soon after a restart (never lost, maybe doubled).
    lease: float = Field(default=30.0, gt=0)
    # A "delayed" DSN (RFC 3464) to the sender once per message still undelivered after this
    # long; 0 turns it off.
    delay_notice: float = Field(default=4 * 3600.0, ge=0)
    tls: Literal["opportunistic", "none"] = "opportunistic"  # STARTTLS whenever offered
    # Verify MX hosts' certificates (name and chain): TLS becomes required and a host whose
    # certificate does not verify is not used. Off by default: opportunistic TLS (RFC 7435).
    tls_verify: bool = False
    # CA certificates (PEM) that verification trusts; empty: the system's store.
    tls_ca_file: str = ""
    # A relay host (HOST:PORT) that replaces MX routing, with optional AUTH.
    smarthost: str = ""
    smarthost_tls: Literal["starttls", "implicit", "opportunistic", "none"] = "starttls"
    smarthost_username: str = ""
    smarthost_password: str = ""
    # Verify the smarthost's certificate (it is one host we chose, unlike MX hosts).
    smarthost_tls_verify: bool = False
    # The local IP outbound mail leaves from (a dedicated sending address); empty: the default.
    source_address: str = ""

    @field_validator("schedule", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        value = _split_list(value)
        if isinstance(value, list):
            return [parse_duration(v) for v in value]
        return value

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("the delivery schedule needs at least one delay")
        return value

    @field_validator("max_age", "delay_notice", "lease", mode="before")
    @classmethod
    def _max_age(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("smarthost")
    @classmethod
    def _check_smarthost(cls, value: str) -> str:
        if value:
            parse_hostport(value)
        return value


class SpamSettings(BaseModel):
    """Spam filtering of mail from the internet (postroom.spam), and per-user outbound limits.

    Scores are log-odds: 0 is "as likely spam as not" (docs/ARCHITECTURE.md, mail processing).
    """

    enabled: bool = True
    # The global content model; empty: DATA_DIR/spam-model.npz when `postroom spam train` made
    # one, else the model shipped in the package.
    model: str = ""
    junk_threshold: float = 0.0  # at or above: the recipient's Junk folder
    reject_threshold: float = 15.0  # at or above: 550 5.7.1 at SMTP time
    dmarc_reject: Literal["smtp", "junk"] = "smtp"  # a failing message under p=reject
    check_auth: bool = True  # SPF, DKIM, ARC and DMARC through the [dns] resolver
    dnsbl: Annotated[list[str], NoDecode] = Field(default_factory=list)  # blocklist zones
    # Clients whose mail skips the DNS checks and is never filed to Junk (still scored): local
    # relays and tools. Empty to filter everything.
    trusted_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    reputation_half_life: float = 30 * 86400.0
    messages_per_hour: int = Field(default=200, ge=0)  # outbound, per user; 0: no limit
    recipients_per_day: int = Field(default=1000, ge=0)
    # Outbound mail held for the admin (`postroom queue held|release|delete`) instead of
    # queued: content scored at or above hold_score (0: never by content), or a burst of more
    # than burst_messages from one user within burst_minutes (0: no burst limit).
    hold_score: float = 8.0
    burst_messages: int = Field(default=50, ge=0)
    burst_minutes: float = Field(default=10.0, ge=0)

    @field_validator("dnsbl", "trusted_networks", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)


# What one `postroom serve` node runs, so front ends and workers scale separately.
ROLES = ("smtp", "submission", "imap", "pop3", "http", "workers")


def parse_roles(value: str) -> frozenset[str]:
    """`all` (the default) or a comma-separated list of ROLES."""
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    if not names or names == {"all"}:
        return frozenset(ROLES)
    unknown = names - set(ROLES)
    if unknown:
        raise ConfigError(f"unknown role(s) {', '.join(sorted(unknown))}; "
                          f"choose from {', '.join(ROLES)} or all")
    return frozenset(names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POSTROOM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Path("./postroom-data")
    hostname: str = Field(default_factory=socket.getfqdn)
    log_level: str = "info"
    roles: str = "all"  # see ROLES; `postroom serve --roles smtp,workers`
    storage: StorageSettings = Field(default_factory=StorageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    listeners: ListenerSettings = Field(default_factory=ListenerSettings)
    mail: MailSettings = Field(default_factory=MailSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    pop3: Pop3Settings = Field(default_factory=Pop3Settings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    spam: SpamSettings = Field(default_factory=SpamSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: it overrides what the TOML file (passed as init values) says.
        return (env_settings, init_settings)

    def storage_url(self, key: str) -> str:
        url: str = getattr(self.storage, key)
        return url.replace("{data_dir}", str(self.data_dir.resolve()))


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), then the environment; command-line overrides win over both."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    try:
        settings = Settings(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if overrides:
        data = settings.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        try:
            settings = Settings.model_validate(data)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return settings
