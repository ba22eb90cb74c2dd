"""The command line against a running server: the token comes from ``TRUSTFLEET_TOKEN``
or from the file ``trustfleet login`` writes, never from the command line; the POS flow,
listings, the audit log, the auditor role and ``--output json`` all work remotely."""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Served, run_cli, served, tokens_in

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("remote") / "data") as running:
        yield running


@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    """A working directory with no data directory: every verb must go to the server."""
    return tmp_path / "no-data-here"


def remote(
    server: Served,
    where: Path,
    *args: str,
    token: str | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    extra = {"TRUSTFLEET_ADDR": server.url, **(env or {})}
    if token is not None:
        extra["TRUSTFLEET_TOKEN"] = token
    result = run_cli(where, *args, check=check, env=extra)
    for secret in tokens_in(json.dumps(extra)):
        assert secret not in " ".join(args)  # never on the command line
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def new_token(server: Served, where: Path, name: str, role: str) -> str:
    created = remote(
        server, where, "token", "create", "--name", name, "--role", role, "-o", "json",
        token=server.admin_token,
    )  # fmt: skip
    return str(as_json(created)["token"])


def test_the_token_from_the_environment(server: Served, client_dir: Path) -> None:
    me = as_json(remote(server, client_dir, "whoami", "-o", "json", token=server.admin_token))
    assert (me["name"], me["role"], me["local"]) == ("bootstrap admin", "admin", False)
    assert not client_dir.exists()  # nothing local was touched


def test_login_keeps_the_token_in_a_private_file(server: Served, tmp_path: Path) -> None:
    config = tmp_path / "config"
    env = {"XDG_CONFIG_HOME": str(config)}
    token = new_token(server, tmp_path, "login test", "operator")
    login = run_cli(tmp_path, "login", "--server", server.url + "/", stdin=token + "\n", env=env)
    assert "logged in to" in login.stdout and "login test (operator)" in login.stdout
    kept = config / "trustfleet" / "credentials.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert token not in login.stdout + login.stderr
    me = as_json(remote(server, tmp_path / "x", "whoami", "-o", "json", env=env))
    assert (me["name"], me["role"]) == ("login test", "operator")
    # the environment wins over the file
    other = as_json(
        remote(server, tmp_path / "x", "whoami", "-o", "json", token=server.admin_token, env=env)
    )
    assert other["name"] == "bootstrap admin"
    kept.chmod(0o644)
    exposed = remote(server, tmp_path / "x", "whoami", env=env, check=False)
    assert exposed.returncode == 2 and "error [credentials-unsafe]" in exposed.stderr
    kept.chmod(0o600)
    assert "forgot" in run_cli(tmp_path, "--server", server.url, "logout", env=env).stdout
    gone = remote(server, tmp_path / "x", "whoami", env=env, check=False)
    assert gone.returncode == 2 and "error [no-token]" in gone.stderr


def test_login_refuses_a_bad_token_and_keeps_nothing(server: Served, tmp_path: Path) -> None:
    config = tmp_path / "config"
    refused = run_cli(
        tmp_path, "login", "--server", server.url, stdin="tf_" + "B" * 43 + "\n",
        env={"XDG_CONFIG_HOME": str(config)}, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "error [authentication-required]" in refused.stderr
    assert not (config / "trustfleet" / "credentials.json").exists()


def test_login_can_create_its_token_from_the_data_directory(server: Served) -> None:
    config = server.data_dir.parent / "bootstrap-config"
    made = run_cli(
        server.data_dir, "--server", server.url, "login", "--create-token", "ops laptop",
        "--role", "auditor", "--ttl", "1d", env={"XDG_CONFIG_HOME": str(config)},
    )  # fmt: skip
    assert "ops laptop (auditor)" in made.stdout and not tokens_in(made.stdout)
    me = as_json(
        remote(server, server.data_dir.parent / "x", "whoami", "-o", "json",
               env={"XDG_CONFIG_HOME": str(config)})
    )  # fmt: skip
    assert me["role"] == "auditor" and me["expires_at"] is not None


def test_the_pos_flow_remotely(server: Served, tmp_path: Path) -> None:
    admin = server.admin_token
    remote(server, tmp_path, "tmk", "identity", "init", token=admin)
    manufacturer = new_token(server, tmp_path, "remote manufacturer", "manufacturer")
    gateway = new_token(server, tmp_path, "remote gateway", "device-gateway")
    operator = new_token(server, tmp_path, "remote operator", "operator")
    pos = tmp_path / "pos1"
    factory = remote(server, tmp_path, "emulate", "pos", "factory", "--sn", "REMOTE-1",
                     "--out", str(pos))  # fmt: skip  # KSRCRT from the server: public
    assert "no KSRCRT" not in factory.stdout
    registered = remote(
        server, tmp_path, "tmk", "register", str(pos / "record.ndjson"), token=manufacturer
    )
    assert "terminal REMOTE-1 registered (ec-p256)" in registered.stdout
    downloaded = remote(server, tmp_path, "emulate", "pos", "download", "--dir", str(pos),
                        token=gateway)  # fmt: skip
    assert "active (KCV" in downloaded.stdout
    keys = remote(server, tmp_path, "emulate", "pos", "working-keys", "--dir", str(pos),
                  "--usage", "P0", token=operator)  # fmt: skip
    assert "P0 installed" in keys.stdout
    wrong_role = remote(server, tmp_path, "emulate", "pos", "download", "--dir", str(pos),
                        token=operator, check=False)  # fmt: skip
    assert wrong_role.returncode == 1
    assert "error [tmk-server-refused]" in wrong_role.stderr
    assert "device-gateway token" in wrong_role.stderr
    shown = as_json(remote(server, tmp_path, "tmk", "show", "REMOTE-1", "-o", "json",
                           token=operator))  # fmt: skip
    assert shown["active_tmk"]["status"] == "active"
    assert [k["usage"] for k in shown["working_keys"]] == ["P0"]


def test_listings_and_json_output(server: Served, tmp_path: Path) -> None:
    manufacturer = new_token(server, tmp_path, "listing manufacturer", "manufacturer")
    for i in range(3):
        pos = tmp_path / f"pos{i}"
        run_cli(tmp_path, "emulate", "pos", "factory", "--sn", f"LIST-{i}", "--out", str(pos),
                "--model", "M-odd" if i % 2 else "M-even")  # fmt: skip
        remote(server, tmp_path, "tmk", "register", str(pos / "record.ndjson"),
               token=manufacturer)  # fmt: skip
    auditor = new_token(server, tmp_path, "listing auditor", "auditor")
    page = as_json(remote(server, tmp_path, "tmk", "list", "--model", "M-even", "--limit", "1",
                          "-o", "json", token=auditor))  # fmt: skip
    assert set(page) == {"items", "next_cursor"}
    assert [t["sn"] for t in page["items"]] == ["LIST-0"]
    rest = as_json(remote(server, tmp_path, "tmk", "list", "--model", "M-even", "--cursor",
                          page["next_cursor"], "-o", "json", token=auditor))  # fmt: skip
    assert [t["sn"] for t in rest["items"]] == ["LIST-2"] and rest["next_cursor"] is None
    text = remote(server, tmp_path, "tmk", "list", "--model", "M-even", "--limit", "1",
                  token=auditor)  # fmt: skip
    assert "LIST-0" in text.stdout and "more: --cursor" in text.stderr

    actor = as_json(remote(server, tmp_path, "whoami", "-o", "json", token=manufacturer))["actor"]
    records = as_json(remote(server, tmp_path, "audit", "list", "--action", "tmk.*", "--actor",
                             actor, "-o", "json", token=auditor))  # fmt: skip
    assert [(r["action"], r["subject"]) for r in records["items"]] == [
        ("tmk.terminal_registered", f"LIST-{i}") for i in range(3)
    ]
    verify = as_json(remote(server, tmp_path, "audit", "verify", "-o", "json", token=auditor))
    assert verify["ok"] is True
    cas = as_json(remote(server, tmp_path, "ca", "show", "-o", "json", token=auditor))
    assert {"name", "parent", "algorithm", "subject", "not_before", "not_after"} <= set(cas[0])
    status = as_json(remote(server, tmp_path, "keystore", "status", "-o", "json",
                            token=auditor))  # fmt: skip
    assert status["reachable"] is True and status["backend"] == "soft"


def test_the_auditor_reads_and_changes_nothing(server: Served, tmp_path: Path) -> None:
    auditor = new_token(server, tmp_path, "auditor who tries", "auditor")
    assert "auditor who tries" in remote(server, tmp_path, "token", "list", token=auditor).stdout
    for args in (
        ("token", "create", "--name", "sneaky", "--role", "admin"),
        ("token", "revoke", "bootstrap admin"),
        ("tmk", "identity", "rotate-work-cert"),
        ("tmk", "sweep"),
    ):
        refused = remote(server, tmp_path, *args, token=auditor, check=False)
        assert refused.returncode == 1, args
        assert "error [forbidden]" in refused.stderr, (args, refused.stderr)


def test_imports_count_records_and_fail_on_rejects(server: Served, tmp_path: Path) -> None:
    manufacturer = new_token(server, tmp_path, "import manufacturer", "manufacturer")
    pos = tmp_path / "pos"
    run_cli(tmp_path, "emulate", "pos", "factory", "--sn", "IMPORT-1", "--out", str(pos))
    record = json.loads((pos / "record.ndjson").read_text())
    pem = record["public_key"]
    assert pem.count("\n") >= 3  # each quoted CSV cell spans several lines
    one = tmp_path / "one.csv"
    one.write_text(f'sn,model,public_key\nIMPORT-1,A920,"{pem}"\n')
    first = remote(server, tmp_path, "tmk", "import", str(one), token=manufacturer)
    assert "1 row: 1 registered, 0 unchanged, 0 rejected" in first.stdout
    assert "1/1" in first.stderr  # records, not lines

    mixed = tmp_path / "mixed.csv"
    mixed.write_text(
        "sn,model,public_key\n"
        f'IMPORT-1,A920,"{pem}"\n'
        'IMPORT-2,A920,"not a key"\n'
        f'IMPORT-1,A920,"{pem}"\n'
    )
    rejected = remote(server, tmp_path, "tmk", "import", str(mixed), token=manufacturer,
                      check=False)  # fmt: skip
    assert rejected.returncode == 1
    assert "3 rows: 0 registered, 1 unchanged, 2 rejected" in rejected.stdout
    assert "3/3" in rejected.stderr
    lines = mixed.with_name("mixed.csv.rejections.ndjson").read_text().splitlines()
    assert [(json.loads(r)["row"], json.loads(r)["code"]) for r in lines] == [
        (2, "malformed-key"),
        (3, "duplicate-sn"),
    ]
    allowed = remote(server, tmp_path, "tmk", "import", str(mixed), "--allow-rejects",
                     token=manufacturer)  # fmt: skip
    assert allowed.returncode == 0
