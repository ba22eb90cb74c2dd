"""The POS flow with the PKCS#11 key store, as an operator runs it from the first command:
`trustfleet init` with the token configured (no master key file), a real server node, and
terminals downloading over HTTP; working keys, a PIN block checked by the server, and the
keys' custody as `trustfleet keystore list` and the API show it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import Node, SoftHsmToken, pkcs11_environment, run_cli, start_node, stop, wait_ready
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.tmk.terminal import HttpTransport, PosTerminal

pytestmark = [pytest.mark.pkcs11, pytest.mark.slow]

PAN = "4761739001010010"
TERMINALS = (("HSM-P256", KeyAlgorithm.EC_P256), ("HSM-RSA", KeyAlgorithm.RSA_2048))


@pytest.fixture
def hsm_env(softhsm_conf: tuple[SoftHsmToken, Path]) -> dict[str, str]:
    token, conf = softhsm_conf
    return {**pkcs11_environment(token, conf), "TRUSTFLEET_LOG_LEVEL": "WARNING"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def admin_token(data_dir: Path, hsm_env: dict[str, str]) -> str:
    result = run_cli(data_dir, "init", env=hsm_env)
    return result.stdout.strip().splitlines()[-1].strip()


@pytest.fixture
def node(data_dir: Path, hsm_env: dict[str, str], admin_token: str) -> Iterator[Node]:
    env = {**os.environ, **hsm_env}
    env.pop("TRUSTFLEET_MASTER_KEY", None)
    env.pop("TRUSTFLEET_CONFIG", None)
    started = start_node("hsm", env, data_dir)
    try:
        wait_ready(started)
        yield started
    finally:
        stop(started)


def test_the_pos_flow_over_http_with_keys_in_the_token_and_no_master_key_file(
    node: Node, admin_token: str, data_dir: Path, tmp_path: Path, hsm_env: dict[str, str]
) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=node.url, timeout=30) as client:
        tokens = {
            role: client.post(
                "/v1/tokens", json={"name": role, "role": role}, headers=admin
            ).json()["token"]
            for role in ("manufacturer", "device-gateway", "operator")
        }
        root = client.post("/v1/tmk/identity", headers=admin).json()["ksrcrt_pem"].encode()
        terminals = {}
        for sn, algorithm in (
            ("HSM-P256", KeyAlgorithm.EC_P256),
            ("HSM-RSA", KeyAlgorithm.RSA_2048),
        ):
            directory = tmp_path / sn
            PosTerminal.factory(directory, sn, algorithm, root_pem=root)
            imported = client.post(
                "/v1/tmk/terminals/import",
                content=(directory / "record.ndjson").read_bytes(),
                headers={
                    "Authorization": f"Bearer {tokens['manufacturer']}",
                    "Content-Type": "application/x-ndjson",
                },
            )
            assert imported.json()["accepted"] == 1, imported.text
            terminals[sn] = PosTerminal.open(directory)

        gateway = HttpTransport(client, tokens["device-gateway"])
        for terminal in terminals.values():
            result = terminal.download(gateway, crls=[terminal.fetch_crl(gateway)])
            assert result.kcv == terminal.scm.tmk_kcv

        operator = {"Authorization": f"Bearer {tokens['operator']}"}
        for sn, terminal in terminals.items():
            for usage in ("P0", "M3", "D0"):
                issued = client.post(
                    f"/v1/tmk/terminals/{sn}/working-keys", json={"usage": usage}, headers=operator
                )
                assert issued.status_code == 201, issued.text
                terminal.install_working_key(issued.json()["key_block"], usage)
            pin_block = terminal.encrypt_pin("2468", PAN)
            verdict = client.post(
                f"/v1/tmk/terminals/{sn}/pin-blocks/verify",
                json={"pin_block": pin_block.hex(), "pan": PAN, "pin": "2468"},
                headers=operator,
            )
            assert verdict.json() == {"match": True}
            wrong = client.post(
                f"/v1/tmk/terminals/{sn}/pin-blocks/verify",
                json={"pin_block": pin_block.hex(), "pan": PAN, "pin": "2469"},
                headers=operator,
            )
            assert wrong.json() == {"match": False}

        # rotation of the work certificate, then a new TMK for one terminal, on the token
        rotated = client.post("/v1/tmk/identity/rotate-work-cert", headers=admin)
        assert rotated.status_code == 200, rotated.text
        revoked = client.post("/v1/tmk/identity/revoke-work-cert", headers=admin)
        assert revoked.status_code == 200, revoked.text
        first = terminals["HSM-P256"]
        asked = client.post("/v1/tmk/terminals/HSM-P256/rotate-tmk", json={}, headers=operator)
        assert asked.status_code in (200, 202), asked.text
        assert first.download(gateway, crls=[first.fetch_crl(gateway)]).kcv == first.scm.tmk_kcv

        keys = client.get("/v1/keystore/keys", headers=admin).json()
        assert keys["backend"] == "pkcs11"
        custody = {k["label"].split(":")[0]: k for k in keys["keys"]}
        assert custody["tmk-work-key"]["custody"] == "token"
        assert custody["tmk-work-key"]["extractable"] is False
        assert custody["pki-ca"]["custody"] == "token"
        assert custody["tmk"]["custody"] == "sealed"
        assert "kcv" in custody["tmk"]["token_operations"]
        assert custody["tmk-ticket-key"]["token_operations"] == ["mac"]
        forbidden = client.get(
            "/v1/keystore/keys", headers={"Authorization": f"Bearer {tokens['operator']}"}
        )
        assert forbidden.status_code == 403

    assert not list(data_dir.rglob("master.key"))
    listing = run_cli(data_dir, "keystore", "list", env=hsm_env).stdout
    assert "token" in listing and "sealed" in listing
