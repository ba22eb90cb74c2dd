"""The CA hierarchy with its keys in a PKCS#11 token (SoftHSM2): the token's raw ECDSA and
RSA-PSS signatures end up in certificates and CRLs that OpenSSL and pyca accept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import SoftHsmToken, init_softhsm_token
from trustfleet.errors import CertificateRevoked
from trustfleet.keystore.base import KeyStore
from trustfleet.pki.service import PkiService
from trustfleet.store import Database

from .helpers import crl_pem, ec_public_key, openssl, write

pytestmark = pytest.mark.pkcs11


@pytest.fixture(scope="module")
def module_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftHsmToken, Path]:
    """A SoftHSM2 token of this module's own (``harness.init_softhsm_token``)."""
    return init_softhsm_token(tmp_path_factory.mktemp("pki-softhsm"), "pki-test")


@pytest.fixture
def keystore(
    module_token: tuple[SoftHsmToken, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[KeyStore]:
    from trustfleet.keystore.pkcs11 import Pkcs11KeyStore

    token, conf = module_token
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    store = Pkcs11KeyStore(token.module, token.label, token.user_pin)
    yield store
    store.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_token_backed_hierarchy_issues_and_revokes(
    db: Database, keystore: KeyStore, tmp_path: Path
) -> None:
    pki = PkiService(db, keystore)
    root = pki.create_root_ca("hsm-root", "rsa-3072")
    issuing = pki.create_intermediate_ca("hsm-issuing", "hsm-root", "ec-p256")
    leaf = pki.issue_server_certificate(
        "hsm-issuing", public_key=ec_public_key(), dns_names=["hsm.example.org"]
    )
    files = [
        write(tmp_path / name, pem)
        for name, pem in (("root.pem", root.pem), ("int.pem", issuing.pem), ("leaf.pem", leaf.pem))
    ]
    verify: list[str | Path] = [
        "verify",
        "-CAfile",
        files[0],
        "-untrusted",
        files[1],
        "-purpose",
        "sslserver",
    ]
    assert openssl(*verify, files[2]).stdout.strip().endswith(": OK")
    pki.validate(leaf.der, [issuing.certificate_der], root.certificate_der)

    pki.revoke(leaf.serial_hex, "key_compromise")
    crls = [pki.crl("hsm-issuing"), pki.crl("hsm-root")]
    crl_file = write(tmp_path / "crl.pem", crl_pem(crls[0]) + crl_pem(crls[1]))
    result = openssl(*verify, "-crl_check_all", "-CRLfile", crl_file, files[2])
    assert "certificate revoked" in result.stdout + result.stderr
    with pytest.raises(CertificateRevoked):
        pki.validate(leaf.der, [issuing.certificate_der], root.certificate_der, crl_ders=crls)
