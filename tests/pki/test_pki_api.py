"""The /v1/ca routes: who may call them, what they return, and what bad requests get."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from trustfleet.keystore.base import KeyStore
from trustfleet.pki.service import PkiService
from trustfleet.server.app import create_app
from trustfleet.server.auth import create_token
from trustfleet.server.context import AppContext
from trustfleet.settings import Settings
from trustfleet.store import Database

from .helpers import Hierarchy, ec_public_key


@pytest.fixture
def client(tmp_path: Path, db: Database, keystore: KeyStore) -> Iterator[TestClient]:
    context = AppContext(Settings(data_dir=tmp_path), db, keystore)
    with TestClient(create_app(context), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def auth(db: Database) -> dict[str, dict[str, str]]:
    """An Authorization header per role."""
    return {
        role: {"Authorization": f"Bearer {create_token(db, f'test {role}', role)[0]}"}
        for role in ("admin", "operator", "manufacturer")
    }


def _public_pem() -> str:
    return ec_public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def _csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM).decode()


def _problem(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_operators_and_admins_list_the_cas_with_their_pems(
    client: TestClient, auth: dict[str, dict[str, str]], hierarchy: Hierarchy
) -> None:
    for role in ("admin", "operator"):
        response = client.get("/v1/ca", headers=auth[role])
        assert response.status_code == 200
        body = response.json()
        assert [ca["name"] for ca in body] == ["root", "issuing"]
        assert body[1]["parent"] == "root" and body[1]["serial"] == hierarchy.issuing.serial_hex
        assert body[0]["certificate_pem"] == hierarchy.root.pem
        assert "key_handle" not in body[0]
    _problem(client.get("/v1/ca"), 401, "authentication-required")
    _problem(client.get("/v1/ca", headers=auth["manufacturer"]), 403, "forbidden")


def test_anyone_fetches_a_crl_without_a_token(
    client: TestClient, pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    pki.revoke(leaf.serial_hex, "key_compromise")

    response = client.get("/v1/ca/issuing/crl")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.content)
    assert crl.issuer == hierarchy.issuing.certificate.subject
    assert crl.get_revoked_certificate_by_serial_number(leaf.certificate.serial_number)
    _problem(client.get("/v1/ca/nowhere/crl"), 404, "ca-not-found")
    assert client.get("/v1/ca/Bad_Name/crl").status_code == 422


def test_an_admin_issues_a_server_certificate_with_its_chain(
    client: TestClient, auth: dict[str, dict[str, str]], pki: PkiService, hierarchy: Hierarchy
) -> None:
    body = {
        "kind": "server",
        "public_key_pem": _public_pem(),
        "dns_names": ["api.example.org"],
        "ips": ["192.0.2.10"],
        "validity_days": 30,
    }
    response = client.post("/v1/ca/issuing/issue", json=body, headers=auth["admin"])

    assert response.status_code == 201, response.text
    issued = response.json()
    assert issued["kind"] == "server" and issued["issuer"] == "issuing"
    assert issued["chain_pem"] == [hierarchy.issuing.pem, hierarchy.root.pem]
    leaf = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    validated = pki.validate(
        leaf.public_bytes(Encoding.DER),
        [hierarchy.issuing.certificate_der],
        hierarchy.root.certificate_der,
        server_name="192.0.2.10",
    )
    assert validated.leaf.serial_number == int(issued["serial"], 16)
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days in (30, 31)


def test_an_admin_issues_a_device_certificate_from_a_csr(
    client: TestClient, auth: dict[str, dict[str, str]], hierarchy: Hierarchy
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    body = {"kind": "device", "csr_pem": _csr_pem(key), "device_id": "meter-17"}
    response = client.post("/v1/ca/issuing/issue", json=body, headers=auth["admin"])

    assert response.status_code == 201, response.text
    leaf = x509.load_pem_x509_certificate(response.json()["certificate_pem"].encode())
    assert response.json()["subject"] == "serialNumber=meter-17,CN=meter-17"
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-17"
    assert leaf.public_key() == key.public_key()


def test_only_admins_issue_and_revoke(
    client: TestClient, auth: dict[str, dict[str, str]], hierarchy: Hierarchy
) -> None:
    body = {"kind": "device", "public_key_pem": _public_pem(), "device_id": "d1"}
    for headers, status in ((auth["operator"], 403), ({}, 401)):
        assert client.post("/v1/ca/issuing/issue", json=body, headers=headers).status_code == (
            status
        )
        revoke = {"serial": hierarchy.issuing.serial_hex}
        assert client.post("/v1/ca/revoke", json=revoke, headers=headers).status_code == status


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "device", "device_id": "d1"},
        {"kind": "device", "device_id": "d1", "public_key_pem": "x", "csr_pem": "y"},
        {"kind": "device", "public_key_pem": "x"},
        {"kind": "device", "public_key_pem": "x", "device_id": "d1", "dns_names": ["a.org"]},
        {"kind": "server", "public_key_pem": "x"},
        {"kind": "server", "public_key_pem": "x", "dns_names": ["a.org"], "device_id": "d1"},
        {"kind": "server", "public_key_pem": "x", "dns_names": [f"h{i}.org" for i in range(101)]},
        {"kind": "server", "public_key_pem": "x", "dns_names": ["a.org"], "validity_days": 0},
        {"kind": "server", "public_key_pem": "x" * 20000, "dns_names": ["a.org"]},
        {"kind": "root", "public_key_pem": "x", "dns_names": ["a.org"]},
        {"kind": "device", "public_key_pem": "x", "device_id": "d1", "is_ca": True},
    ],
)
def test_malformed_issue_requests_are_refused_by_the_schema(
    client: TestClient, auth: dict[str, dict[str, str]], hierarchy: Hierarchy, body: Any
) -> None:
    response = client.post("/v1/ca/issuing/issue", json=body, headers=auth["admin"])
    assert response.status_code == 422, response.text


def test_bad_keys_and_names_get_stable_error_codes(
    client: TestClient, auth: dict[str, dict[str, str]], hierarchy: Hierarchy
) -> None:
    def issue(ca: str, **body: Any) -> Any:
        return client.post(f"/v1/ca/{ca}/issue", json=body, headers=auth["admin"])

    pem = _public_pem()
    _problem(issue("issuing", kind="device", csr_pem="garbage", device_id="d1"), 400, "csr-invalid")
    _problem(
        issue("issuing", kind="device", public_key_pem="garbage", device_id="d1"),
        400,
        "invalid-key",
    )
    _problem(
        issue("issuing", kind="device", public_key_pem=pem, device_id="d_1"), 400, "invalid-subject"
    )
    _problem(
        issue("issuing", kind="server", public_key_pem=pem, ips=["1.2.3"]), 400, "invalid-subject"
    )
    _problem(
        issue("nowhere", kind="device", public_key_pem=pem, device_id="d1"), 404, "ca-not-found"
    )
    _problem(
        issue("issuing", kind="device", public_key_pem=pem, device_id="d1", validity_days=3650),
        400,
        "invalid-validity",
    )


def test_an_admin_revokes_and_the_crl_lists_it_at_once(
    client: TestClient, auth: dict[str, dict[str, str]], pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    assert len(x509.load_der_x509_crl(client.get("/v1/ca/issuing/crl").content)) == 0

    body = {"serial": leaf.serial_hex.upper(), "reason": "key_compromise"}
    response = client.post("/v1/ca/revoke", json=body, headers=auth["admin"])

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    assert response.json()["revocation_reason"] == "key_compromise"
    crl = x509.load_der_x509_crl(client.get("/v1/ca/issuing/crl").content)
    assert crl.get_revoked_certificate_by_serial_number(leaf.certificate.serial_number)
    _problem(
        client.post("/v1/ca/revoke", json=body, headers=auth["admin"]),
        409,
        "certificate-already-revoked",
    )
    missing = {"serial": "abcdef"}
    _problem(
        client.post("/v1/ca/revoke", json=missing, headers=auth["admin"]),
        404,
        "certificate-not-found",
    )
    bad_reason = {"serial": leaf.serial_hex, "reason": "certificate_hold"}
    assert client.post("/v1/ca/revoke", json=bad_reason, headers=auth["admin"]).status_code == 422
