"""Chain validation: pyca path validation plus our revocation check, and every way a chain
must be refused (wrong root, expired, revoked, forged, missing or forged CRL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import CertificateInvalid, CertificateRevoked
from trustfleet.keystore.base import KeyStore
from trustfleet.pki import x509 as px
from trustfleet.pki.errors import CrlInvalid
from trustfleet.pki.service import CertificateInfo, PkiService
from trustfleet.pki.x509 import Purpose, RevocationReason

from .helpers import Hierarchy, ec_public_key, flip_signature_byte


def _server(pki: PkiService, name: str = "api.example.org") -> CertificateInfo:
    return pki.issue_server_certificate("issuing", public_key=ec_public_key(), dns_names=[name])


def _device(pki: PkiService, device_id: str = "dev-1") -> CertificateInfo:
    return pki.issue_device_certificate("issuing", device_id, public_key=ec_public_key())


def _crls(pki: PkiService) -> list[bytes]:
    return [pki.crl("issuing"), pki.crl("root")]


def _validate(
    pki: PkiService,
    h: Hierarchy,
    leaf: bytes,
    *,
    at: datetime | None = None,
    crl_ders: list[bytes] | None = None,
    purpose: Purpose | None = None,
    server_name: str | None = None,
) -> px.ValidatedChain:
    return pki.validate(
        leaf,
        [h.issuing.certificate_der],
        h.root.certificate_der,
        at,
        crl_ders,
        purpose=purpose,
        server_name=server_name,
    )


def test_a_good_server_chain_validates_with_crls(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = _server(pki)
    validated = _validate(pki, hierarchy, leaf.der, crl_ders=_crls(pki))
    assert validated.purpose is Purpose.SERVER
    assert [c.subject for c in validated.chain] == [
        leaf.certificate.subject,
        hierarchy.issuing.certificate.subject,
        hierarchy.root.certificate.subject,
    ]


def test_a_good_device_chain_validates_against_the_database(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    assert _validate(pki, hierarchy, _device(pki).der).purpose is Purpose.DEVICE


def test_the_pure_validator_needs_no_database(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf, crls = _device(pki), _crls(pki)
    validated = px.validate_chain(
        leaf.der,
        [hierarchy.issuing.certificate_der],
        hierarchy.root.certificate_der,
        at=datetime.now(UTC),
        crl_ders=crls,
    )
    assert validated.leaf.serial_number == leaf.certificate.serial_number


def test_a_chain_to_another_root_is_invalid(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = _server(pki)
    other = pki.create_root_ca("other-root")
    with pytest.raises(CertificateInvalid) as caught:
        pki.validate(leaf.der, [hierarchy.issuing.certificate_der], other.certificate_der)
    assert caught.type is CertificateInvalid


def test_an_expired_certificate_is_invalid(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = pki.issue_device_certificate(
        "issuing", "dev-1", public_key=ec_public_key(), validity=timedelta(days=1)
    )
    later = leaf.not_after + timedelta(seconds=1)
    with pytest.raises(CertificateInvalid) as caught:
        _validate(pki, hierarchy, leaf.der, at=later)
    assert caught.type is CertificateInvalid
    assert _validate(pki, hierarchy, leaf.der, at=leaf.not_after).purpose is Purpose.DEVICE


def test_a_certificate_is_invalid_before_its_validity(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = _device(pki)
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, leaf.der, at=leaf.not_before - timedelta(seconds=1))


def test_a_revoked_leaf_is_refused_by_crl_and_by_database(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = _server(pki)
    pki.revoke(leaf.serial_hex, RevocationReason.KEY_COMPROMISE)
    with pytest.raises(CertificateRevoked):
        _validate(pki, hierarchy, leaf.der, crl_ders=_crls(pki))
    with pytest.raises(CertificateRevoked):
        _validate(pki, hierarchy, leaf.der)


def test_a_leaf_under_a_revoked_intermediate_is_refused(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = _device(pki)
    pki.revoke(hierarchy.issuing.serial_hex, "ca_compromise")
    with pytest.raises(CertificateRevoked) as caught:
        _validate(pki, hierarchy, leaf.der, crl_ders=_crls(pki))
    assert hierarchy.issuing.serial_hex in str(caught.value)


def test_the_newest_crl_wins_over_an_older_one(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = _device(pki)
    old = pki.crl("issuing")
    pki.revoke(leaf.serial_hex)
    new = pki.crl("issuing")
    with pytest.raises(CertificateRevoked):
        _validate(pki, hierarchy, leaf.der, crl_ders=[old, new, pki.crl("root")])


@pytest.mark.parametrize("which", ["leaf", "intermediate"])
def test_a_forged_signature_is_refused(pki: PkiService, hierarchy: Hierarchy, which: str) -> None:
    leaf = _server(pki).der
    intermediate = hierarchy.issuing.certificate_der
    if which == "leaf":
        leaf = flip_signature_byte(leaf)
    else:
        intermediate = flip_signature_byte(intermediate)
    with pytest.raises(CertificateInvalid):
        pki.validate(leaf, [intermediate], hierarchy.root.certificate_der, crl_ders=_crls(pki))


def test_a_server_certificate_is_checked_against_the_server_name(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = pki.issue_server_certificate(
        "issuing", public_key=ec_public_key(), dns_names=["*.example.org"], ips=["192.0.2.1"]
    )
    assert _validate(pki, hierarchy, leaf.der, server_name="a.example.org")
    assert _validate(pki, hierarchy, leaf.der, server_name="192.0.2.1")
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, leaf.der, server_name="a.example.com")
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, leaf.der, server_name="192.0.2.2")


def test_a_certificate_is_not_accepted_for_the_other_purpose(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, _device(pki).der, purpose=Purpose.SERVER, server_name="dev-1")
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, _server(pki).der, purpose=Purpose.DEVICE)


def test_a_missing_crl_for_an_issuer_is_refused(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = _device(pki)
    with pytest.raises(CrlInvalid):
        _validate(pki, hierarchy, leaf.der, crl_ders=[pki.crl("issuing")])  # no root CRL
    with pytest.raises(CrlInvalid):
        _validate(pki, hierarchy, leaf.der, crl_ders=[])


def test_a_stale_crl_is_refused(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = pki.issue_device_certificate("issuing", "dev-1", public_key=ec_public_key())
    crls = _crls(pki)
    next_update = x509.load_der_x509_crl(crls[0]).next_update_utc
    assert next_update is not None
    with pytest.raises(CrlInvalid):
        _validate(pki, hierarchy, leaf.der, crl_ders=crls, at=next_update + timedelta(seconds=1))


def test_a_crl_signed_by_another_key_under_the_same_name_is_ignored(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    """An attacker's empty CRL in the issuer's name must not hide a revocation."""
    leaf = _device(pki)
    pki.revoke(leaf.serial_hex, "key_compromise")
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = px.build_crl(
        px.self_issuer(
            hierarchy.issuing.certificate.subject,
            attacker.public_key(),
            KeyAlgorithm.EC_P256,
            lambda data: attacker.sign(data, ec.ECDSA(hashes.SHA256())),
        ),
        number=10**6,
        this_update=datetime.now(UTC),
        next_update=datetime.now(UTC) + timedelta(days=1),
        revoked=[],
    ).public_bytes(Encoding.DER)

    with pytest.raises(CrlInvalid):
        _validate(pki, hierarchy, leaf.der, crl_ders=[forged, pki.crl("root")])
    with pytest.raises(CertificateRevoked):
        _validate(pki, hierarchy, leaf.der, crl_ders=[forged, *_crls(pki)])


def test_malformed_input_is_invalid_not_a_crash(pki: PkiService, hierarchy: Hierarchy) -> None:
    leaf = _device(pki)
    with pytest.raises(CertificateInvalid):
        _validate(pki, hierarchy, b"\x30\x03\x02\x01\x01")
    with pytest.raises(CrlInvalid):
        _validate(pki, hierarchy, leaf.der, crl_ders=[b"not a crl"])


def test_database_revocation_check_refuses_certificates_it_has_no_record_of(
    keystore: KeyStore, pki: PkiService, hierarchy: Hierarchy
) -> None:
    """A certificate signed by our CA key but unknown to the database (say, a restored
    backup) cannot be checked there: refused, while CRLs still work."""
    now = datetime.now(UTC).replace(microsecond=0)
    issuer = px.issuer_from_certificate(
        hierarchy.issuing.certificate,
        KeyAlgorithm.EC_P256,
        lambda data: keystore.sign(hierarchy.issuing.key_handle, data),
    )
    profile = px.device_profile(
        ec_public_key(), "ghost", not_before=now, not_after=now + timedelta(days=1)
    )
    unrecorded = px.issue_certificate(profile, issuer, px.random_serial())
    der = unrecorded.public_bytes(Encoding.DER)

    assert _validate(pki, hierarchy, der, crl_ders=_crls(pki)).purpose is Purpose.DEVICE
    with pytest.raises(CertificateInvalid, match="not issued here"):
        _validate(pki, hierarchy, der)


# -- a capability's own chain policy ----------------------------------------------------


def _with_policy(
    h: Hierarchy, leaf: bytes, policy: px.ChainPolicy, **options: object
) -> px.ValidatedChain:
    return px.validate_chain(
        leaf,
        [h.issuing.certificate_der],
        [h.root.certificate_der],
        at=datetime.now(UTC),
        policy=policy,
        crls=px.CrlCheck.WHEN_GIVEN,
        **options,  # type: ignore[arg-type]
    )


def test_a_policy_checks_what_the_leaf_asserts_instead_of_a_webpki_purpose(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = _server(pki)  # keyUsage digitalSignature + keyAgreement, EKU serverAuth
    signing = px.ChainPolicy(key_usage=("digital_signature", "key_agreement"))
    assert _with_policy(hierarchy, leaf.der, signing).purpose is None
    server_eku = px.ChainPolicy(extended_key_usage=(x509.ExtendedKeyUsageOID.SERVER_AUTH,))
    assert _with_policy(hierarchy, leaf.der, server_eku).leaf == leaf.certificate

    refused = [
        px.ChainPolicy(key_usage=("key_encipherment",)),
        px.ChainPolicy(extended_key_usage=(x509.ExtendedKeyUsageOID.CLIENT_AUTH,)),
        px.ChainPolicy(policy_oid=x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")),
        px.ChainPolicy(max_intermediates=0),  # the issuing CA stands between
    ]
    for policy in refused:
        with pytest.raises(CertificateInvalid):
            _with_policy(hierarchy, leaf.der, policy)


def test_a_policy_refuses_a_ca_as_the_leaf_unless_it_allows_one(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    issuing = hierarchy.issuing.certificate_der
    root = [hierarchy.root.certificate_der]
    at = datetime.now(UTC)
    with pytest.raises(CertificateInvalid):
        px.validate_chain(
            issuing, [], root, at=at, policy=px.ChainPolicy(), crls=px.CrlCheck.WHEN_GIVEN
        )
    allowed = px.ChainPolicy(leaf_may_be_ca=True)
    px.validate_chain(issuing, [], root, at=at, policy=allowed, crls=px.CrlCheck.WHEN_GIVEN)


def test_crls_when_given_check_only_the_issuers_that_have_one(
    pki: PkiService, hierarchy: Hierarchy
) -> None:
    leaf = _device(pki)
    policy = px.ChainPolicy(key_usage=("digital_signature",))
    _with_policy(hierarchy, leaf.der, policy)  # no CRL at all: nothing to check
    pki.revoke(leaf.serial_hex, RevocationReason.KEY_COMPROMISE)
    only_issuing = [pki.crl("issuing")]
    with pytest.raises(CertificateRevoked):
        _with_policy(hierarchy, leaf.der, policy, crl_ders=only_issuing)
    other = _device(pki, "dev-2")
    with pytest.raises(CrlInvalid):  # REQUIRED: the root's CRL is missing
        px.validate_chain(
            other.der,
            [hierarchy.issuing.certificate_der],
            hierarchy.root.certificate_der,
            at=datetime.now(UTC),
            crl_ders=only_issuing,
        )
