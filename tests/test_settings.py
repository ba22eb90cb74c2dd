"""Settings: defaults < TOML file < TRUSTFLEET_* environment < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustfleet.errors import ConfigurationError
from trustfleet.settings import load_settings


def test_layers_override_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TRUSTFLEET_PORT",
        "TRUSTFLEET_HOST",
        "TRUSTFLEET_DATABASE_URL",
        "TRUSTFLEET_CONFIG",
    ):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "trustfleet.toml").write_text('port = 9000\nhost = "127.0.0.2"\n')
    assert load_settings(tmp_path).port == 9000
    monkeypatch.setenv("TRUSTFLEET_PORT", "9100")
    settings = load_settings(tmp_path)
    assert (settings.port, settings.host) == (9100, "127.0.0.2")
    assert load_settings(tmp_path, port=9200).port == 9200
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'trustfleet.db'}"
    assert settings.resolved_master_key_file == tmp_path / "master.key"


def test_data_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTFLEET_DATA_DIR", str(tmp_path / "d"))
    assert load_settings().data_dir == tmp_path / "d"


@pytest.mark.parametrize(
    "toml",
    ["prot = 1\n", "port = 'eighty'\n", "port = [\n"],
    ids=["unknown-key", "bad-value", "bad-toml"],
)
def test_bad_configuration_is_a_clear_error(tmp_path: Path, toml: str) -> None:
    (tmp_path / "trustfleet.toml").write_text(toml)
    with pytest.raises(ConfigurationError):
        load_settings(tmp_path)


def test_the_tmk_session_lifetime_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRUSTFLEET_CONFIG", raising=False)
    monkeypatch.setenv("TRUSTFLEET_TMK_SESSION_SECONDS", "15")
    assert load_settings(tmp_path).tmk_session_seconds == 15
    for value in ("9", "601"):
        monkeypatch.setenv("TRUSTFLEET_TMK_SESSION_SECONDS", value)
        with pytest.raises(ConfigurationError, match="tmk_session_seconds"):
            load_settings(tmp_path)


def test_the_oldest_tmk_protocol_version_is_1_or_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRUSTFLEET_CONFIG", raising=False)
    assert load_settings(tmp_path).tmk_min_protocol_version == 1  # both accepted by default
    monkeypatch.setenv("TRUSTFLEET_TMK_MIN_PROTOCOL_VERSION", "2")
    assert load_settings(tmp_path).tmk_min_protocol_version == 2
    for value in ("0", "3"):
        monkeypatch.setenv("TRUSTFLEET_TMK_MIN_PROTOCOL_VERSION", value)
        with pytest.raises(ConfigurationError, match="tmk_min_protocol_version"):
            load_settings(tmp_path)


@pytest.mark.parametrize(
    "toml, setting",
    [
        ("audit_checkpoint_every = -1\n", "audit_checkpoint_every"),
        ("audit_syslog = 'tcp://127.0.0.1:514'\n", "audit_syslog"),
    ],
)
def test_audit_device_settings_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, setting: str
) -> None:
    monkeypatch.delenv("TRUSTFLEET_CONFIG", raising=False)
    (tmp_path / "trustfleet.toml").write_text(toml)
    with pytest.raises(ConfigurationError, match=setting):
        load_settings(tmp_path)
    (tmp_path / "trustfleet.toml").write_text(
        "audit_file = '/var/log/trustfleet/audit.jsonl'\naudit_syslog = 'unix:///dev/log'\n"
    )
    settings = load_settings(tmp_path)
    assert settings.audit_syslog == "unix:///dev/log" and settings.audit_checkpoint_every == 1000


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("max_header_bytes", ("4095", "16777217")),
        ("header_read_timeout", ("0", "3601")),
        ("keep_alive_timeout", ("0", "3601")),
        ("refusal_audit_window", ("0", "3601")),
        ("refusal_audit_clients", ("0", "-1")),
    ],
)
def test_the_hostile_request_limits_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, bad: tuple[str, ...]
) -> None:
    """A limit of 0 would refuse every client (or, for the audit, none)."""
    monkeypatch.delenv("TRUSTFLEET_CONFIG", raising=False)
    defaults = load_settings(tmp_path)
    assert (defaults.max_header_bytes, defaults.header_read_timeout) == (65_536, 10)
    for value in bad:
        monkeypatch.setenv(f"TRUSTFLEET_{name.upper()}", value)
        with pytest.raises(ConfigurationError, match=name):
            load_settings(tmp_path)
