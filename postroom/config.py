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
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


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
    cache: str = "memory://?max_entries=10000"
    events: str = "local://"


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
    imap: str = ""
    imaps: str = ""
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


class Pop3Settings(BaseModel):
    # What DELE does at QUIT: "expunge" (gone for good, as POP3 users expect) or "trash".
    delete_action: Literal["expunge", "trash"] = "expunge"
    # RFC 1939 §3: an inactivity autologout timer of at least 10 minutes.
    idle_timeout: float = 600.0


class MailSettings(BaseModel):
    max_message_bytes: int = 50 * 1024 * 1024
    workers: int = 2


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="POSTROOM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Path("./postroom-data")
    hostname: str = Field(default_factory=socket.getfqdn)
    log_level: str = "info"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    listeners: ListenerSettings = Field(default_factory=ListenerSettings)
    mail: MailSettings = Field(default_factory=MailSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    pop3: Pop3Settings = Field(default_factory=Pop3Settings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)

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
