"""The ``trustfleet`` command line, run as a user runs it (a subprocess per verb)."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import pkcs11_environment, run_cli

TOKEN_PREFIX = "tf_"


run = run_cli


def _tokens(output: str) -> list[str]:
    return [w for w in output.split() if w.startswith(TOKEN_PREFIX)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "data"
    first = run(directory, "init")
    assert len(_tokens(first.stdout)) == 1, "init prints the admin token once"
    return directory


def test_init_makes_a_private_master_key_and_is_idempotent(data_dir: Path) -> None:
    mode = stat.S_IMODE((data_dir / "master.key").stat().st_mode)
    assert mode == 0o600
    again = run(data_dir, "init")
    assert "already initialised" in again.stdout
    assert _tokens(again.stdout) == []


def test_tokens_are_created_listed_shown_and_revoked(data_dir: Path) -> None:
    created = run(data_dir, "token", "create", "--name", "tms", "--role", "operator")
    (token,) = _tokens(created.stdout)
    listed = run(data_dir, "token", "list")
    assert "tms" in listed.stdout and token not in listed.stdout
    bad = run(data_dir, "token", "create", "--name", "x", "--role", "root", check=False)
    assert bad.returncode == 2 and "'root' is not one of" in bad.stderr
    again = run(data_dir, "token", "create", "--name", "tms", "--role", "admin", check=False)
    assert again.returncode == 1 and "error [token-name-taken]" in again.stderr
    shown = json.loads(run(data_dir, "token", "show", "tms", "-o", "json").stdout)
    assert (shown["name"], shown["role"], shown["active"]) == ("tms", "operator", True)
    assert "revoked" in run(data_dir, "token", "revoke", "tms").stdout
    assert json.loads(
        run(data_dir, "token", "show", "--id", str(shown["id"]), "-o", "json").stdout
    )["revoked_at"]
    missing = run(data_dir, "token", "revoke", "nobody", check=False)
    assert missing.returncode == 1 and "token-not-found" in missing.stderr
    expiring = run(
        data_dir, "token", "create", "--name", "temp", "--role", "auditor", "--ttl", "8h"
    )
    assert "expires" in expiring.stdout
    whoami = run(data_dir, "whoami", "-o", "json")
    assert json.loads(whoami.stdout)["actor"] == "cli"


def test_issued_certificate_verifies_with_openssl(data_dir: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pub = tmp_path / "pub.pem"
    pub.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    leaf = tmp_path / "leaf.pem"
    run(
        data_dir,
        "ca",
        "issue",
        "--kind",
        "server",
        "--public-key",
        str(pub),
        "--dns",
        "node1.example",
        "--out",
        str(leaf),
    )
    ca = data_dir / "ca"
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca / "root.pem"),
            "-untrusted",
            str(ca / "intermediate.pem"),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.stdout.strip().endswith("OK"), verify.stderr


def test_master_key_rotation_keeps_every_key_usable(data_dir: Path) -> None:
    before = (data_dir / "master.key").read_bytes()
    rotated = run(data_dir, "keystore", "rotate-master")
    assert "re-wrapped" in rotated.stdout
    assert (data_dir / "master.key").read_bytes() != before
    assert stat.S_IMODE((data_dir / "master.key").stat().st_mode) == 0o600
    run(data_dir, "ca", "crl", "--out", str(data_dir / "crl.pem"))  # signs with a re-wrapped key


def test_audit_verify_detects_an_edited_record(data_dir: Path, tmp_path: Path) -> None:
    assert "chain intact" in run(data_dir, "audit", "verify").stdout
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(data_dir), str(copy)], check=True)
    with sqlite3.connect(copy / "trustfleet.db") as db:
        db.execute("UPDATE audit_log SET actor = 'someone else' WHERE seq = 2")
    tampered = run(copy, "audit", "verify", check=False)
    assert tampered.returncode == 1
    assert "record 2" in tampered.stderr and "TAMPERED" in tampered.stderr


def test_usage_errors_exit_non_zero(data_dir: Path) -> None:
    assert run(data_dir, "token", "revoke", "--id", "not-a-number", check=False).returncode == 2
    assert run(data_dir, "no-such-verb", check=False).returncode == 2


@pytest.mark.slow
@pytest.mark.parametrize("keystore", ["soft", pytest.param("pkcs11", marks=pytest.mark.pkcs11)])
def test_demo_runs_end_to_end(
    tmp_path: Path, keystore: str, request: pytest.FixtureRequest
) -> None:
    extra = {}
    if keystore == "pkcs11":  # the token as configured by docs/configuration.md
        extra = pkcs11_environment(*request.getfixturevalue("softhsm_conf"))
    result = run(tmp_path, "demo", env=extra)
    assert "demo complete" in result.stdout
    assert "certificate revoked" in result.stdout
    assert "gateway-2 power-up refused: [se-bound-elsewhere]" in result.stdout
    assert "gateway-2 asks for a signature: SE answers 6982" in result.stdout
    assert "reported by gateway-1 (device-gateway token), 0 flags" in result.stdout
    assert "[foreign-failure] SE" in result.stdout
    assert "bound to gateway-1 failed in gateway-2: likely theft" in result.stdout
    assert "acknowledged flag #1 (acknowledged)" in result.stdout


@pytest.mark.pkcs11
def test_keystore_seal_moves_an_initialised_soft_store_under_the_token(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data_dir = tmp_path / "data"
    run(data_dir, "init")  # a soft store: master.key and the CA keys under it
    assert (data_dir / "master.key").exists()
    hsm = pkcs11_environment(*request.getfixturevalue("softhsm_conf"))
    listed = run(data_dir, "keystore", "list", env=hsm).stdout
    assert "database" in listed  # still under the master key, opened with it meanwhile
    sealed = run(data_dir, "keystore", "seal", env=hsm)
    assert "sealed 2 keys" in sealed.stdout and "master key file removed" in sealed.stdout
    assert not (data_dir / "master.key").exists()
    again = run(data_dir, "keystore", "seal", env=hsm)
    assert "sealed 0 keys" in again.stdout
    listed = run(data_dir, "keystore", "list", env=hsm).stdout
    assert "sealed" in listed and "database" not in listed
    crl = tmp_path / "crl.pem"  # the issuing CA's key, now sealed, still signs
    run(data_dir, "ca", "crl", "--out", str(crl), env=hsm)
    assert crl.read_text().startswith("-----BEGIN X509 CRL-----")
    refused = run(data_dir, "keystore", "list", check=False)  # soft again: no master key
    assert refused.returncode == 2 and "master-key-error" in refused.stderr  # set-up


def test_audit_verify_compares_the_database_with_the_device_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    device = tmp_path / "audit.jsonl"
    env = {"TRUSTFLEET_AUDIT_FILE": str(device), "TRUSTFLEET_AUDIT_CHECKPOINT_EVERY": "3"}
    run(data, "init", env=env)
    for i in range(4):
        run(data, "token", "create", "--name", f"t{i}", "--role", "operator", env=env)
    intact = run(data, "audit", "verify", env=env)
    assert "chain intact" in intact.stdout and "1 device(s) agree" in intact.stdout
    with sqlite3.connect(data / "trustfleet.db") as db:
        (last,) = db.execute("SELECT max(seq) FROM audit_log").fetchone()
        db.execute("DELETE FROM audit_log WHERE seq = ?", (last,))
    # the node's own file device names the deleted record
    tampered = run(data, "audit", "verify", env=env, check=False)
    assert tampered.returncode == 1
    assert f"record {last}: is in {device} line" in tampered.stderr
    assert "not in the database (deleted)" in tampered.stderr
    # a node without the setting is given the file (or each node's file) with --device
    alone = run(data, "audit", "verify", "--device", str(device), "-o", "json", check=False)
    assert alone.returncode == 1
    report = json.loads(alone.stdout)
    assert report["ok"] is False and report["devices"] == [str(device)]
    assert [p["seq"] for p in report["problems"]] == [last]
    missing = run(data, "audit", "verify", "--device", str(tmp_path / "none"), check=False)
    assert missing.returncode == 2 and "cannot read the audit device" in missing.stderr
