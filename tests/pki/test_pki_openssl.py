"""Our certificates and CRLs as OpenSSL sees them: chains verify for the right purpose,
extensions are there, a revoked leaf and a forged signature are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from trustfleet.pki.service import CertificateInfo, PkiService

from .helpers import (
    Hierarchy,
    crl_pem,
    der_to_pem,
    ec_public_key,
    flip_signature_byte,
    openssl,
    write,
)

CA_ALGORITHMS = pytest.mark.parametrize("ca_algorithm", ["ec-p256", "rsa-3072"])


@pytest.fixture
def ca_algorithm() -> str:
    """EC unless a test asks for both CA key algorithms (RSA keys are slow to make)."""
    return "ec-p256"


@pytest.fixture
def chain(pki: PkiService, ca_algorithm: str) -> Hierarchy:
    root = pki.create_root_ca("tf-root", ca_algorithm)
    return Hierarchy(root, pki.create_intermediate_ca("tf-issuing", "tf-root", ca_algorithm))


def _files(tmp_path: Path, chain: Hierarchy, leaf: CertificateInfo) -> tuple[Path, Path, Path]:
    return (
        write(tmp_path / "root.pem", chain.root.pem),
        write(tmp_path / "intermediate.pem", chain.issuing.pem),
        write(tmp_path / "leaf.pem", leaf.pem),
    )


def _verify(root: Path, intermediate: Path, leaf: Path, *extra: str | Path) -> str:
    result = openssl("verify", "-CAfile", root, "-untrusted", intermediate, *extra, leaf)
    return result.stdout + result.stderr


@CA_ALGORITHMS
def test_openssl_verifies_a_server_certificate_for_tls_servers_only(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_server_certificate(
        "tf-issuing", public_key=ec_public_key(), dns_names=["api.example.org"], ips=["192.0.2.7"]
    )
    root, intermediate, leaf_path = _files(tmp_path, chain, leaf)

    assert _verify(root, intermediate, leaf_path).strip().endswith(": OK")
    assert ": OK" in _verify(root, intermediate, leaf_path, "-purpose", "sslserver")
    assert "unsuitable certificate purpose" in _verify(
        root, intermediate, leaf_path, "-purpose", "sslclient"
    )


@CA_ALGORITHMS
def test_openssl_verifies_a_device_certificate_for_tls_clients_only(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(65537, 2048).public_key()
    leaf = pki.issue_device_certificate("tf-issuing", "meter-0042", public_key=key)
    root, intermediate, leaf_path = _files(tmp_path, chain, leaf)

    assert ": OK" in _verify(root, intermediate, leaf_path, "-purpose", "sslclient")
    assert "unsuitable certificate purpose" in _verify(
        root, intermediate, leaf_path, "-purpose", "sslserver"
    )


def test_openssl_does_not_trust_a_chain_without_our_root(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_device_certificate("tf-issuing", "dev-1", public_key=ec_public_key())
    stranger = pki.create_root_ca("other-root")
    _, intermediate, leaf_path = _files(tmp_path, chain, leaf)
    other = write(tmp_path / "other.pem", stranger.pem)

    assert ": OK" not in _verify(other, intermediate, leaf_path)


@CA_ALGORITHMS
def test_openssl_refuses_a_revoked_certificate_listed_in_our_crl(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_server_certificate(
        "tf-issuing", public_key=ec_public_key(), dns_names=["gw.example.org"]
    )
    root, intermediate, leaf_path = _files(tmp_path, chain, leaf)
    root_crl = write(tmp_path / "root-crl.pem", crl_pem(pki.crl("tf-root")))
    crl_before = write(tmp_path / "crl-before.pem", crl_pem(pki.crl("tf-issuing")))
    assert ": OK" in _verify(root, intermediate, leaf_path, "-crl_check", "-CRLfile", crl_before)

    pki.revoke(leaf.serial_hex, "key_compromise")
    crl_after = write(tmp_path / "crl.pem", crl_pem(pki.crl("tf-issuing")))

    output = _verify(root, intermediate, leaf_path, "-crl_check", "-CRLfile", crl_after)
    assert "certificate revoked" in output
    both = write(tmp_path / "both.pem", crl_after.read_text() + root_crl.read_text())
    assert "certificate revoked" in _verify(
        root, intermediate, leaf_path, "-crl_check_all", "-CRLfile", both
    )


def test_openssl_verifies_the_whole_chain_against_both_crls(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_device_certificate("tf-issuing", "dev-7", public_key=ec_public_key())
    root, intermediate, leaf_path = _files(tmp_path, chain, leaf)
    crls = write(
        tmp_path / "crls.pem", crl_pem(pki.crl("tf-issuing")) + crl_pem(pki.crl("tf-root"))
    )
    output = _verify(root, intermediate, leaf_path, "-crl_check_all", "-CRLfile", crls)
    assert output.strip().endswith(": OK"), output


@CA_ALGORITHMS
def test_openssl_reads_our_crl_fields_and_its_signature(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_device_certificate("tf-issuing", "dev-9", public_key=ec_public_key())
    pki.revoke(leaf.serial_hex, "superseded")
    crl = write(tmp_path / "crl.pem", crl_pem(pki.crl("tf-issuing")))
    write(tmp_path / "intermediate.pem", chain.issuing.pem)

    result = openssl("crl", "-in", crl, "-noout", "-text", "-CAfile", tmp_path / "intermediate.pem")
    text = result.stdout + result.stderr

    assert "verify OK" in text
    assert "X509v3 CRL Number" in text
    assert "X509v3 Authority Key Identifier" in text
    assert "Next Update" in text
    assert leaf.serial_hex.upper().lstrip("0") in text.replace(":", "").upper()
    assert "Superseded" in text


def test_openssl_shows_the_extensions_of_each_profile(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    server = pki.issue_server_certificate(
        "tf-issuing", public_key=ec_public_key(), dns_names=["a.example.org"], ips=["2001:db8::1"]
    )
    device = pki.issue_device_certificate("tf-issuing", "sm-77", public_key=ec_public_key())

    def text(pem: str, name: str) -> str:
        return openssl("x509", "-in", write(tmp_path / name, pem), "-noout", "-text").stdout

    root_text, issuing_text = text(chain.root.pem, "r.pem"), text(chain.issuing.pem, "i.pem")
    server_text, device_text = text(server.pem, "s.pem"), text(device.pem, "d.pem")

    assert "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:1" in root_text
    assert "CA:TRUE, pathlen:0" in issuing_text
    for ca_text in (root_text, issuing_text):
        assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in ca_text
        assert "X509v3 Subject Key Identifier" in ca_text
        assert "X509v3 Authority Key Identifier" in ca_text
    for leaf_text in (server_text, device_text):
        assert "CA:FALSE" in leaf_text
        assert "X509v3 Key Usage: critical\n                Digital Signature, Key Agreement" in (
            leaf_text
        )
        assert "X509v3 Subject Key Identifier" in leaf_text
        assert "X509v3 Authority Key Identifier" in leaf_text
    assert "TLS Web Server Authentication" in server_text
    assert "DNS:a.example.org, IP Address:2001:DB8:0:0:0:0:0:1" in server_text
    assert "TLS Web Client Authentication" in device_text
    assert "URI:urn:trustfleet:device:sm-77" in device_text
    assert "Subject: CN = sm-77, serialNumber = sm-77" in device_text


def test_openssl_refuses_a_certificate_with_a_forged_signature(
    pki: PkiService, chain: Hierarchy, tmp_path: Path
) -> None:
    leaf = pki.issue_server_certificate(
        "tf-issuing", public_key=ec_public_key(), dns_names=["a.example.org"]
    )
    forged = der_to_pem(flip_signature_byte(leaf.der))
    root, intermediate, _ = _files(tmp_path, chain, leaf)
    output = _verify(root, intermediate, write(tmp_path / "forged.pem", forged))
    assert ": OK" not in output
    assert "signature" in output.lower()
