"""GET /v1/keystore/keys: every key with where it lives, never its material; admin only."""

from __future__ import annotations

from fastapi.testclient import TestClient

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage

from .conftest import assert_problem, bearer


def test_admins_see_each_keys_custody_and_nobody_sees_material(
    client: TestClient, tokens: dict[str, str], keystore: KeyStore
) -> None:
    secret = keystore.import_key(KeyAlgorithm.AES_128, bytes(range(16)), KeyUsage.MAC)
    signer = keystore.generate(KeyAlgorithm.EC_P256, KeyUsage.SIGN)
    answer = client.get("/v1/keystore/keys", headers=bearer(tokens["admin"]))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["backend"] == "soft"
    keys = {k["handle"]: k for k in body["keys"]}
    assert keys[secret.handle]["custody"] == "database"
    assert keys[secret.handle]["usage"] == ["mac"]
    assert keys[secret.handle]["extractable"] is False
    assert keys[secret.handle]["token_operations"] == []
    assert set(keys[secret.handle]["process_operations"]) == {"kcv", "mac"}
    assert keys[signer.handle]["process_operations"] == ["sign"]
    assert bytes(range(16)).hex() not in answer.text
    for role in ("operator", "manufacturer", "device-gateway"):
        refused = client.get("/v1/keystore/keys", headers=bearer(tokens[role]))
        assert_problem(refused, 403, "forbidden")
