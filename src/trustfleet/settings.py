"""Settings from the environment (``TRUSTFLEET_*``) over a TOML file over defaults.

The TOML file is ``<data dir>/trustfleet.toml`` unless ``TRUSTFLEET_CONFIG`` names another.
Keys in the file are the field names below; environment variables are the upper-cased
field names prefixed with ``TRUSTFLEET_`` (``TRUSTFLEET_DATABASE_URL``...).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from trustfleet.errors import ConfigurationError

ENV_PREFIX = "TRUSTFLEET_"
#: the file ``trustfleet init`` writes last, once the data directory is complete
INITIALISED_MARKER = ".initialised"


def default_data_dir() -> Path:
    return Path(user_data_dir("trustfleet", appauthor=False))


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str = ""  # empty: SQLite file in the data directory
    host: str = "127.0.0.1"
    port: int = 8080
    keystore_backend: str = "soft"  # "soft" or "pkcs11"
    master_key_file: str = ""  # empty: <data dir>/master.key
    pkcs11_module: str = ""
    pkcs11_token_label: str = "trustfleet"  # noqa: S105 - a label, not a secret
    pkcs11_user_pin: str = ""
    #: "sealed": keys outside the token are unwrapped in process for what the token cannot
    #: run; "in-token": such operations are refused (docs/configuration.md)
    pkcs11_policy: str = "sealed"
    max_body_bytes: int = 1_048_576
    max_import_bytes: int = 268_435_456  # streamed bulk imports
    #: the request line and headers together; larger ones get 431 (trustfleet's HTTP
    #: protocol, docs/configuration.md)
    max_header_bytes: int = 65_536
    #: seconds from a connection's first byte (or from its opening) to a request's
    #: complete headers; slower ones get 408 and are closed
    header_read_timeout: int = 10
    #: seconds an idle keep-alive connection stays open after a response
    keep_alive_timeout: int = 5
    #: refused requests (bad tokens, forged webhook signatures) are audited one record per
    #: client per window, the rest counted into one aggregate record (docs/api.md)
    refusal_audit_window: int = 60
    #: how many clients per window get their first refusal written as its own record
    refusal_audit_clients: int = 100
    log_level: str = "INFO"
    tmk_session_seconds: int = 60  # how long a TMK download session lives (10..600)
    #: seconds before each delivery attempt of the outbox (Standard Webhooks' schedule);
    #: after the last one a message is dead-lettered
    outbox_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    outbox_request_timeout: int = 10  # seconds per delivery attempt
    outbox_worker: bool = True  # `trustfleet serve` runs a delivery worker in process
    #: extra number ranges accepted as M2M MDNs (E.164 prefixes with their total digit
    #: counts, e.g. "+86:13,+4915:14"): libphonenumber rejects many real M2M numbers
    keysync_m2m_ranges: str = "+86:13"
    #: the oldest TMK download protocol version the key server accepts (1 or 2); 2 refuses
    #: version 1 requests, whose key delivery the server does not sign
    tmk_min_protocol_version: int = 1
    #: audit devices (docs/audit.md): a JSON Lines file every record is appended to
    #: (fsynced) before its transaction commits, and/or syslog (``udp://host:port`` or
    #: ``unix:///dev/log``); a device that cannot be written fails the request
    audit_file: str = ""
    audit_syslog: str = ""
    #: sign a checkpoint of the audit chain's head every this many records (0: never)
    audit_checkpoint_every: int = 1000
    #: and when the node made none for this many seconds (0: never)
    audit_checkpoint_seconds: int = 3600

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'trustfleet.db'}"

    @property
    def resolved_master_key_file(self) -> Path:
        return Path(self.master_key_file) if self.master_key_file else self.data_dir / "master.key"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def initialised(self) -> bool:
        """Whether ``trustfleet init`` has completed in the data directory."""
        return (self.data_dir / INITIALISED_MARKER).is_file()


def _coerce(name: str, raw: Any, target: Any) -> Any:
    try:
        if isinstance(target, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in {"1", "true", "yes"}
        if isinstance(target, int):
            return int(raw)
        if isinstance(target, Path):
            return Path(raw).expanduser()
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"setting {name!r} has an invalid value") from exc


def load_settings(data_dir: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then the TOML file, then ``TRUSTFLEET_*`` variables, then ``overrides``."""
    base = Settings()
    env_dir = os.environ.get(ENV_PREFIX + "DATA_DIR")
    chosen_dir = data_dir or (Path(env_dir).expanduser() if env_dir else base.data_dir)
    values: dict[str, Any] = {"data_dir": chosen_dir}
    config_path = Path(os.environ.get(ENV_PREFIX + "CONFIG", chosen_dir / "trustfleet.toml"))
    if config_path.is_file():
        try:
            values.update(tomllib.loads(config_path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{config_path} is not valid TOML: {exc}") from exc
    for f in fields(Settings):
        env_value = os.environ.get(ENV_PREFIX + f.name.upper())
        if env_value is not None and f.name != "data_dir":
            values[f.name] = env_value
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: getattr(base, f.name) for f in fields(Settings)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
    values["data_dir"] = chosen_dir if "data_dir" not in overrides else values["data_dir"]
    coerced = {k: _coerce(k, v, known[k]) for k, v in values.items()}
    return _checked(replace(base, **coerced))


#: a TMK download session lives long enough for a terminal on a slow link, and short
#: enough that a captured challenge soon expires
TMK_SESSION_SECONDS = range(10, 601)
#: the TMK download protocol versions there are (trustfleet.tmk.protocol speaks them all)
TMK_PROTOCOL_VERSIONS = range(1, 3)


#: bounds of the HTTP limits: below these, ordinary clients would be refused
HEADER_BYTES = range(4_096, 16_777_217)
TIMEOUT_SECONDS = range(1, 3_601)


def _checked(settings: Settings) -> Settings:
    if settings.max_header_bytes not in HEADER_BYTES:
        raise ConfigurationError(
            f"max_header_bytes must be {HEADER_BYTES.start}..{HEADER_BYTES.stop - 1}"
        )
    for name in ("header_read_timeout", "keep_alive_timeout", "refusal_audit_window"):
        if getattr(settings, name) not in TIMEOUT_SECONDS:
            raise ConfigurationError(
                f"{name} must be {TIMEOUT_SECONDS.start}..{TIMEOUT_SECONDS.stop - 1} seconds"
            )
    if settings.refusal_audit_clients < 1:
        raise ConfigurationError("refusal_audit_clients must be at least 1")
    seconds = TMK_SESSION_SECONDS
    if settings.tmk_session_seconds not in seconds:
        raise ConfigurationError(f"tmk_session_seconds must be {seconds.start}..{seconds.stop - 1}")
    versions = TMK_PROTOCOL_VERSIONS
    if settings.tmk_min_protocol_version not in versions:
        raise ConfigurationError(
            f"tmk_min_protocol_version must be {versions.start}..{versions.stop - 1}"
        )
    if settings.audit_checkpoint_every < 0:
        raise ConfigurationError("audit_checkpoint_every must be 0 (never) or more")
    if settings.audit_checkpoint_seconds < 0:
        raise ConfigurationError("audit_checkpoint_seconds must be 0 (never) or more")
    if settings.audit_syslog and not settings.audit_syslog.startswith(("udp://", "unix://")):
        raise ConfigurationError("audit_syslog must be udp://host:port or unix:///path")
    return settings
