"""PKI use cases: CA hierarchy, issuing from keys and CSRs, bad input, revocation, CRLs,
audit records and the local CA made by ``trustfleet init``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from trustfleet.crypto import SM2PrivateKey
from trustfleet.errors import InvalidInput, InvalidKey, TrustfleetError, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.pki import service as pki_service
from trustfleet.pki.errors import (
    CaExists,
    CaKeyMismatch,
    CaNotFound,
    CaRevoked,
    CertificateAlreadyRevoked,
    CertificateNotFound,
    CsrInvalid,
    InvalidRevocationReason,
    InvalidSubject,
    InvalidValidity,
    PathLengthExceeded,
    RootNotRevocable,
)
from trustfleet.pki.models import CertificateAuthority, IssuedCertificate
from trustfleet.pki.service import PkiService, bootstrap
from trustfleet.store import Database
from trustfleet.store.audit import AuditRecord, iter_records, verify_chain

from .helpers import Hierarchy, ec_public_key, openssl


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil.example")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, algorithm)
    )
    return csr.public_bytes(Encoding.PEM)


def _audit(sessions: sessionmaker[Session], action: str | None = None) -> list[AuditRecord]:
    with sessions() as session:
        return [r for r in iter_records(session) if action is None or r.action == action]


def _rows(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as session:
        cas = len(session.scalars(select(CertificateAuthority)).all())
        return cas, len(session.scalars(select(IssuedCertificate)).all())


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey)
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


# --- CAs ----------------------------------------------------------------------------


def test_a_root_ca_key_lives_in_the_key_store_and_signs_its_own_certificate(
    pki: PkiService, keystore: KeyStore
) -> None:
    root = pki.create_root_ca("root")
    info = keystore.info(root.key_handle)
    cert = root.certificate

    assert info.usage == KeyUsage.SIGN and not info.exportable
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert _spki(cert.public_key()) == info.public_key_der
    assert pki.get_ca("root") == root and pki.list_cas() == [root]


def test_an_rsa_ca_signs_with_rsa_pss_exactly_as_the_key_store_does(pki: PkiService) -> None:
    root = pki.create_root_ca("root", "rsa-3072")
    parsed = asn1_x509.Certificate.load(root.certificate_der)
    inner = parsed["tbs_certificate"]["signature"]
    outer = parsed["signature_algorithm"]

    assert inner.dump() == outer.dump()
    params = outer["parameters"].native
    assert outer["algorithm"].native == "rsassa_pss"
    assert params["hash_algorithm"]["algorithm"] == "sha256"
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"] == "sha256"
    assert params["salt_length"] == 32
    assert root.certificate.public_key().key_size == 3072  # type: ignore[union-attr]


def test_an_existing_ca_name_is_refused_without_leaving_a_key_behind(
    pki: PkiService, keystore: KeyStore, sessions: sessionmaker[Session]
) -> None:
    pki.create_root_ca("root")
    keys_before = len(keystore.list())
    with pytest.raises(CaExists):
        pki.create_root_ca("root")
    with pytest.raises(CaExists):
        pki.create_intermediate_ca("root", "root")
    assert len(keystore.list()) == keys_before
    assert _rows(sessions) == (1, 1)


def test_a_ca_name_taken_between_the_check_and_the_insert_is_refused_without_a_key_left(
    pki: PkiService,
    keystore: KeyStore,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pki.create_root_ca("root")
    keys_before = len(keystore.list())
    # another node made "root" after both checks: the unique name refuses the insert
    monkeypatch.setattr(pki, "find_ca", lambda name: None)
    monkeypatch.setattr(pki, "_check_ca_absent", lambda work, name: None)
    with pytest.raises(CaExists, match="just created"):
        pki.create_root_ca("root")
    assert len(keystore.list()) == keys_before
    assert _rows(sessions) == (1, 1)


@pytest.mark.parametrize("name", ["", "Root", "a b", "-x", "x" * 64, "ca/../x"])
def test_bad_ca_names_are_refused(pki: PkiService, name: str) -> None:
    with pytest.raises(InvalidSubject):
        pki.create_root_ca(name)


@pytest.mark.parametrize("algorithm", ["ed25519", "sm2", "aes-256", "rsa-512", "x25519"])
def test_unsupported_ca_algorithms_are_refused(
    pki: PkiService, keystore: KeyStore, algorithm: str
) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        pki.create_root_ca("root", algorithm)
    assert keystore.list() == []


def test_path_length_limits_the_depth_of_the_hierarchy(
    pki: PkiService, keystore: KeyStore, hierarchy: Hierarchy
) -> None:
    keys_before = len(keystore.list())
    with pytest.raises(PathLengthExceeded):
        pki.create_intermediate_ca("sub", "issuing")
    with pytest.raises(PathLengthExceeded):
        pki.create_intermediate_ca("sub", "root", path_length=1)
    assert len(keystore.list()) == keys_before

    pki.create_root_ca("deep-root", path_length=2)
    middle = pki.create_intermediate_ca("middle", "deep-root", path_length=1)
    leafy = pki.create_intermediate_ca("leafy", "middle")
    assert [ca.name for ca in pki.ca_chain("leafy")] == ["leafy", "middle", "deep-root"]
    bc = leafy.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert middle.parent == "deep-root"


def test_an_intermediate_needs_an_existing_parent(pki: PkiService, keystore: KeyStore) -> None:
    with pytest.raises(CaNotFound):
        pki.create_intermediate_ca("issuing", "nowhere")
    assert keystore.list() == []


def test_a_key_store_signing_with_another_key_is_caught_and_the_key_destroyed(
    pki: PkiService,
    keystore: KeyStore,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())

    def sign_with_impostor(_handle: str, data: bytes) -> bytes:
        return impostor.sign(data, ec.ECDSA(hashes.SHA256()))

    monkeypatch.setattr(keystore, "sign", sign_with_impostor)
    with pytest.raises(CaKeyMismatch):
        pki.create_root_ca("root")
    assert keystore.list() == []
    assert _rows(sessions) == (0, 0)
    assert _audit(sessions) == []


# --- issuing ------------------------------------------------------------------------


def test_a_server_certificate_carries_exactly_the_requested_names(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    issued = pki.issue_server_certificate(
        "issuing",
        public_key=ec_public_key(),
        dns_names=["API.Example.org", "*.svc.example.org", "api.example.org"],
        ips=["192.0.2.1", "2001:db8::1"],
    )
    cert = issued.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.DNSName) == ["api.example.org", "*.svc.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.1", "2001:db8::1"]
    assert cert.subject.rfc4514_string() == "CN=api.example.org"
    assert issued.kind == "server" and issued.issuer == "issuing" and issued.status == "active"
    cert.verify_directly_issued_by(hierarchy.issuing.certificate)


def test_leaf_key_usage_follows_the_key_type(pki: PkiService, hierarchy: Hierarchy) -> None:
    def usage(key: object) -> x509.KeyUsage:
        issued = pki.issue_device_certificate("issuing", "d1", public_key=key)
        return issued.certificate.extensions.get_extension_for_class(x509.KeyUsage).value

    ec_usage = usage(ec_public_key())
    rsa_usage = usage(rsa.generate_private_key(65537, 2048).public_key())
    ed_usage = usage(ed25519.Ed25519PrivateKey.generate().public_key())

    assert ec_usage.digital_signature and ec_usage.key_agreement and not ec_usage.key_encipherment
    assert rsa_usage.digital_signature and rsa_usage.key_encipherment
    assert not rsa_usage.key_agreement
    assert ed_usage.digital_signature and not ed_usage.key_agreement
    assert not ed_usage.key_encipherment


def test_serials_are_random_159_bit_and_validity_is_utc(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    issued = [
        pki.issue_device_certificate(
            "issuing", f"d{i}", public_key=ec_public_key(), validity=timedelta(days=30)
        )
        for i in range(12)
    ]
    after = datetime.now(UTC).replace(microsecond=0)
    serials = [c.certificate.serial_number for c in issued]

    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**159 for s in serials)
    assert max(s.bit_length() for s in serials) >= 150  # fails only with odds of 2**-108
    for c in issued:
        assert c.not_before.tzinfo is not None and c.not_before <= before
        # twelve issuances can straddle a second boundary, so bracket the issue time
        assert before <= c.not_after - timedelta(days=30) <= after
        assert c.not_after.microsecond == 0


def test_a_device_certificate_names_the_device(pki: PkiService, hierarchy: Hierarchy) -> None:
    cert = pki.issue_device_certificate(
        "issuing", "EID-89049032:0042", public_key=ec_public_key()
    ).certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "EID-89049032:0042"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == (
        "EID-89049032:0042"
    )
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:trustfleet:device:EID-89049032:0042"
    ]


@pytest.mark.parametrize(
    "private_key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["p256", "rsa", "ed25519"],
)
def test_a_csr_gives_only_its_key_never_its_names_or_extensions(
    pki: PkiService,
    hierarchy: Hierarchy,
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> None:
    cert = pki.issue_server_certificate(
        "issuing", csr=_csr(private_key), dns_names=["good.example.org"]
    ).certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value

    assert _spki(cert.public_key()) == _spki(private_key.public_key())
    assert san.get_values_for_type(x509.DNSName) == ["good.example.org"]
    assert "evil" not in cert.subject.rfc4514_string()
    assert basic.ca is False


def test_a_csr_with_a_bad_signature_or_garbage_is_refused(
    pki: PkiService, hierarchy: Hierarchy, sessions: sessionmaker[Session]
) -> None:
    good = _csr(ec.generate_private_key(ec.SECP256R1()))
    der = x509.load_pem_x509_csr(good).public_bytes(Encoding.DER)
    tampered = der.replace(b"evil.example", b"evil.exampl3", 1)
    for bad in (tampered, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", b"\x00" * 40):
        with pytest.raises(CsrInvalid) as caught:
            pki.issue_device_certificate("issuing", "dev-1", csr=bad)
        assert caught.value.code == "csr-invalid" and caught.value.status == 400
    assert _rows(sessions) == (2, 2)


def test_keys_that_cannot_be_certified_are_refused(pki: PkiService, hierarchy: Hierarchy) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    x_key = x25519.X25519PrivateKey.generate().public_key()
    sm2 = SM2PrivateKey.generate().public_key()
    for key in (p384, x_key, sm2):
        with pytest.raises(UnsupportedAlgorithm):
            pki.issue_device_certificate("issuing", "dev-1", public_key=key)
    with pytest.raises(InvalidKey):
        pki.issue_device_certificate(
            "issuing",
            "dev-1",
            public_key=rsa.generate_private_key(65537, 1024).public_key(),  # noqa: S505 (must be refused)
        )
    with pytest.raises(InvalidKey):
        pki.issue_device_certificate("issuing", "dev-1", public_key=b"-----BEGIN PUBLIC KEY---")
    with pytest.raises(InvalidInput):
        pki.issue_device_certificate("issuing", "dev-1")
    with pytest.raises(InvalidInput):
        pki.issue_device_certificate(
            "issuing",
            "dev-1",
            public_key=ec_public_key(),
            csr=_csr(ed25519.Ed25519PrivateKey.generate()),
        )


def test_a_pem_public_key_is_accepted(pki: PkiService, hierarchy: Hierarchy) -> None:
    key = ec_public_key()
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    cert = pki.issue_device_certificate("issuing", "dev-1", public_key=pem).certificate
    assert _spki(cert.public_key()) == _spki(key)


@pytest.mark.parametrize(
    ("dns_names", "ips"),
    [
        ([], []),
        (["exa mple.org"], []),
        (["-bad.example.org"], []),
        (["bad-.example.org"], []),
        (["*.*.example.org"], []),
        (["a.*.example.org"], []),
        (["*.org"], []),
        (["xn--bcher-kva.example\u00e9.org"], []),
        (["192.0.2.1"], []),
        (["a" * 64 + ".example.org"], []),
        ([], ["999.0.0.1"]),
        ([], ["example.org"]),
        ([f"h{i}.example.org" for i in range(101)], []),
    ],
)
def test_bad_server_names_are_refused(
    pki: PkiService, hierarchy: Hierarchy, dns_names: list[str], ips: list[str]
) -> None:
    with pytest.raises(InvalidSubject):
        pki.issue_server_certificate(
            "issuing", public_key=ec_public_key(), dns_names=dns_names, ips=ips
        )


def test_a_long_name_goes_into_the_san_but_not_the_cn(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    long_name = ".".join(["a" * 60] * 3) + ".org"
    cert = pki.issue_server_certificate(
        "issuing", public_key=ec_public_key(), dns_names=[long_name]
    ).certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(cert.subject) == 0 and san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


@pytest.mark.parametrize("device_id", ["", "dev_1", "dev/1", "d" * 65, "-dev", "dév"])
def test_bad_device_ids_are_refused(pki: PkiService, hierarchy: Hierarchy, device_id: str) -> None:
    with pytest.raises(InvalidSubject):
        pki.issue_device_certificate("issuing", device_id, public_key=ec_public_key())


def test_validity_must_be_positive_and_within_the_issuer(
    pki: PkiService, hierarchy: Hierarchy, sessions: sessionmaker[Session]
) -> None:
    too_long = hierarchy.issuing.certificate.not_valid_after_utc - datetime.now(UTC)
    for validity in (timedelta(0), timedelta(days=-1), too_long + timedelta(days=1)):
        with pytest.raises(InvalidValidity):
            pki.issue_device_certificate(
                "issuing", "dev-1", public_key=ec_public_key(), validity=validity
            )
    with pytest.raises(InvalidValidity):
        pki.create_intermediate_ca("sub", "root", validity=timedelta(days=3651))
    assert _rows(sessions) == (2, 2)
    assert len(_audit(sessions)) == 2


def test_an_unknown_ca_cannot_issue(pki: PkiService) -> None:
    with pytest.raises(CaNotFound) as caught:
        pki.issue_device_certificate("nowhere", "dev-1", public_key=ec_public_key())
    assert caught.value.status == 404


def test_issuing_writes_one_audit_record_without_key_material(
    pki: PkiService, hierarchy: Hierarchy, sessions: sessionmaker[Session]
) -> None:
    key = ec_public_key()
    issued = pki.issue_device_certificate("issuing", "dev-1", public_key=key, actor="token:1:ops")
    records = _audit(sessions, "pki.certificate_issued")

    assert len(records) == 1
    record = records[0]
    details = json.loads(record.details)
    assert record.subject == issued.serial_hex and record.actor == "token:1:ops"
    assert details["ca"] == "issuing" and details["device_id"] == "dev-1"
    assert details["kind"] == "device" and details["key_algorithm"] == "ec-secp256r1"
    assert _spki(key).hex() not in record.details
    assert "BEGIN" not in record.details
    assert [r.action for r in _audit(sessions)].count("pki.ca_created") == 2
    with sessions() as session:
        assert verify_chain(iter_records(session)).ok


# --- revocation and CRLs ------------------------------------------------------------


def test_revocation_is_recorded_audited_and_final(
    pki: PkiService, hierarchy: Hierarchy, sessions: sessionmaker[Session]
) -> None:
    issued = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    colon_form = ":".join(
        f"{issued.certificate.serial_number:040X}"[i : i + 2] for i in range(0, 40, 2)
    )
    revoked = pki.revoke(colon_form, "key_compromise", actor="token:1:admin")

    assert revoked.status == "revoked" and revoked.revocation_reason == "key_compromise"
    assert revoked.revoked_at is not None
    assert pki.get_certificate(issued.serial_hex).status == "revoked"
    record = _audit(sessions, "pki.certificate_revoked")[0]
    assert record.subject == issued.serial_hex and record.actor == "token:1:admin"
    assert json.loads(record.details)["reason"] == "key_compromise"
    with pytest.raises(CertificateAlreadyRevoked):
        pki.revoke(issued.serial_hex)
    assert len(_audit(sessions, "pki.certificate_revoked")) == 1


def test_revoking_bad_serials_reasons_and_roots_is_refused(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    issued = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    with pytest.raises(CertificateNotFound):
        pki.revoke("0123abcd")
    for serial in ("zz", "", "1" * 41):
        with pytest.raises(InvalidInput):
            pki.revoke(serial)
    for reason in ("certificate_hold", "because", "remove_from_crl"):
        with pytest.raises(InvalidRevocationReason):
            pki.revoke(issued.serial_hex, reason)
    with pytest.raises(RootNotRevocable):
        pki.revoke(hierarchy.root.serial_hex)
    assert pki.get_certificate(issued.serial_hex).status == "active"


def test_a_revoked_ca_cannot_issue(pki: PkiService, hierarchy: Hierarchy) -> None:
    pki.revoke(hierarchy.issuing.serial_hex, "cessation_of_operation")
    with pytest.raises(CaRevoked):
        pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())


def test_a_crl_lists_every_revoked_certificate_of_its_ca_only(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaves = [
        pki.issue_device_certificate("issuing", f"d{i}", public_key=ec_public_key())
        for i in range(3)
    ]
    other_ca = pki.create_intermediate_ca("other", "root")
    pki.revoke(leaves[0].serial_hex, "key_compromise")
    pki.revoke(leaves[2].serial_hex)
    pki.revoke(other_ca.serial_hex, "superseded")

    crl = x509.load_der_x509_crl(pki.crl("issuing"))
    root_crl = x509.load_der_x509_crl(pki.crl("root"))
    listed = {r.serial_number: r for r in crl}

    assert set(listed) == {leaves[0].certificate.serial_number, leaves[2].certificate.serial_number}
    assert {r.serial_number for r in root_crl} == {other_ca.certificate.serial_number}
    reason = listed[leaves[0].certificate.serial_number].extensions
    assert (
        reason.get_extension_for_class(x509.CRLReason).value.reason
        == x509.ReasonFlags.key_compromise
    )
    with pytest.raises(x509.ExtensionNotFound):  # "unspecified" is left out (RFC 5280)
        listed[leaves[2].certificate.serial_number].extensions.get_extension_for_class(
            x509.CRLReason
        )
    assert crl.issuer == hierarchy.issuing.certificate.subject
    assert crl.is_signature_valid(hierarchy.issuing.certificate.public_key())  # type: ignore[arg-type]
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = hierarchy.issuing.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    assert aki.key_identifier == ski.digest


def test_crl_numbers_grow_and_a_fresh_crl_is_served_again(
    sessions: sessionmaker[Session], db: Database, keystore: KeyStore
) -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    pki = PkiService(db, keystore, clock=lambda: now[0])
    pki.create_root_ca("root")
    pki.create_intermediate_ca("issuing", "root")

    def number(der: bytes) -> int:
        crl = x509.load_der_x509_crl(der)
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    first = pki.crl("issuing")
    assert number(first) == 1
    assert pki.crl("issuing") == first  # within the refresh interval: no new signature
    crl = x509.load_der_x509_crl(first)
    assert crl.last_update_utc == now[0] and crl.next_update_utc == now[0] + timedelta(days=7)

    now[0] += timedelta(minutes=10)
    leaf = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    pki.revoke(leaf.serial_hex)
    after_revocation = pki.crl("issuing")
    assert number(after_revocation) == 2 and len(x509.load_der_x509_crl(after_revocation)) == 1

    now[0] += pki_service.CRL_REFRESH
    assert number(pki.crl("issuing")) == 3
    assert len(_audit(sessions, "pki.crl_published")) == 3


def test_a_crl_for_an_unknown_ca_is_not_found(pki: PkiService) -> None:
    with pytest.raises(CaNotFound):
        pki.crl("nowhere")


def test_certificates_can_be_listed_and_filtered(pki: PkiService, hierarchy: Hierarchy) -> None:
    device = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    server = pki.issue_server_certificate(
        "issuing", public_key=ec_public_key(), dns_names=["a.example.org"]
    )
    pki.revoke(device.serial_hex)

    assert [c.kind for c in pki.list_certificates()] == ["root", "intermediate", "device", "server"]
    assert [c.serial_hex for c in pki.list_certificates(kind="server")] == [server.serial_hex]
    assert [c.serial_hex for c in pki.list_certificates(status="revoked")] == [device.serial_hex]
    assert len(pki.list_certificates(issuer="issuing")) == 2
    assert len(pki.list_certificates(limit=1, offset=3)) == 1
    with pytest.raises(InvalidInput):
        pki.list_certificates(limit=0)


# --- the local CA of `trustfleet init` ----------------------------------------------


def test_bootstrap_creates_the_local_ca_once_and_writes_its_pems(
    db: Database, keystore: KeyStore, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "data" / "ca"
    first = bootstrap(db, keystore, ca_dir)
    second = bootstrap(db, keystore, ca_dir)

    assert first.root == second.root and first.issuing == second.issuing
    assert first.root.name == "trustfleet-root" and first.issuing.name == "trustfleet-issuing"
    assert first.issuing.parent == "trustfleet-root"
    assert (ca_dir / "root.pem").read_text() == first.root.pem
    assert (ca_dir / "intermediate.pem").read_text() == first.issuing.pem
    assert len(keystore.list()) == 2
    result = openssl("verify", "-CAfile", ca_dir / "root.pem", ca_dir / "intermediate.pem")
    assert result.stdout.strip().endswith(": OK"), result.stdout + result.stderr

    issued = PkiService(db, keystore).issue_server_certificate(
        "trustfleet-issuing", public_key=ec_public_key(), dns_names=["localhost"]
    )
    assert issued.certificate.issuer == first.issuing.certificate.subject


def test_errors_carry_stable_codes() -> None:
    codes = {
        cls.code
        for cls in (
            CaExists,
            CaKeyMismatch,
            CaNotFound,
            CaRevoked,
            CertificateAlreadyRevoked,
            CertificateNotFound,
            CsrInvalid,
            InvalidRevocationReason,
            InvalidSubject,
            InvalidValidity,
            PathLengthExceeded,
            RootNotRevocable,
        )
    }
    assert len(codes) == 12
    assert all(isinstance(c, str) and c == c.lower() for c in codes)
    assert issubclass(CsrInvalid, TrustfleetError)


def test_a_revocation_while_a_crl_is_being_signed_is_not_lost(
    pki: PkiService, keystore: KeyStore, hierarchy: Hierarchy, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaf = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    real_sign = keystore.sign
    revoked_meanwhile: list[str] = []

    def sign_and_revoke_once(handle: str, data: bytes) -> bytes:
        if not revoked_meanwhile:  # another admin revokes while the first CRL is signed
            revoked_meanwhile.append(pki.revoke(leaf.serial_hex).serial_hex)
        return real_sign(handle, data)

    monkeypatch.setattr(keystore, "sign", sign_and_revoke_once)
    crl = x509.load_der_x509_crl(pki.crl("issuing"))

    assert crl.get_revoked_certificate_by_serial_number(leaf.certificate.serial_number)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_bootstrap_writes_the_local_ca_pems_into_the_ca_directory(
    db: Database, keystore: KeyStore, tmp_path: Path
) -> None:
    local = pki_service.bootstrap(db, keystore, tmp_path / "ca")
    assert local.root_pem_path == tmp_path / "ca" / "root.pem"
    assert local.intermediate_pem_path.read_text() == local.issuing.pem
