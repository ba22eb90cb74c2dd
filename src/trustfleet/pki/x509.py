"""Pure X.509: certificate and CRL profiles, signing through the key store, chain validation.

No database and no clock here: every time is passed in. CA private keys never appear either.
pyca's builders need a private key to sign, so a certificate or CRL is built and signed with
a throwaway key of the CA's signature algorithm; only its to-be-signed bytes are kept, the
key store signs them under the CA's handle, and asn1crypto reassembles the DER (tbs,
signatureAlgorithm, signatureValue). The algorithm identifier in the TBS is the one pyca
wrote for the throwaway key, which is the CA's scheme (ECDSA-SHA256, or RSA-PSS with
SHA-256, MGF1-SHA-256 and a 32-byte salt: exactly what the key store signs with), and every
result is verified under the CA's public key before it is returned.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import TypeAlias

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature as PycaInvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as PycaUnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import (
    CertificateInvalid,
    CertificateRevoked,
    InvalidInput,
    InvalidKey,
    PkiError,
)
from trustfleet.errors import UnsupportedAlgorithm as TrustfleetUnsupportedAlgorithm
from trustfleet.pki.errors import (
    CaKeyMismatch,
    CrlInvalid,
    CsrInvalid,
    InvalidRevocationReason,
    InvalidSubject,
)
from trustfleet.wire import as_utc

SubjectPublicKey: TypeAlias = (
    ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
)
CaPublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
IPAddressValue: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Key algorithms a CA may have. Ed25519 is left out on purpose: pyca's chain verifier (the
#: WebPKI profile) refuses Ed25519 issuer keys, so such a CA could not be validated.
CA_ALGORITHMS = frozenset({KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_3072})
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_NAMES = 100
DEVICE_URN_PREFIX = "urn:trustfleet:device:"

_PSS_SHA256 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_CA_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62})")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,63}")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CN_MAX = 64


class CertificateKind(StrEnum):
    ROOT = "root"
    INTERMEDIATE = "intermediate"
    SERVER = "server"
    DEVICE = "device"

    @property
    def is_ca(self) -> bool:
        return self in (CertificateKind.ROOT, CertificateKind.INTERMEDIATE)


class Purpose(StrEnum):
    """What a leaf is validated for: a TLS server, or a device authenticating as a client."""

    SERVER = "server"
    DEVICE = "device"


class RevocationReason(StrEnum):
    """RFC 5280 reasons trustfleet accepts. ``certificateHold`` is left out: a revocation
    here is final."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "key_compromise"
    CA_COMPROMISE = "ca_compromise"
    AFFILIATION_CHANGED = "affiliation_changed"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessation_of_operation"
    PRIVILEGE_WITHDRAWN = "privilege_withdrawn"

    @property
    def flag(self) -> x509.ReasonFlags:
        return x509.ReasonFlags[self.name.lower()]


def parse_reason(value: str) -> RevocationReason:
    try:
        return RevocationReason(value)
    except ValueError:
        allowed = ", ".join(r.value for r in RevocationReason)
        raise InvalidRevocationReason(f"unknown revocation reason; use one of: {allowed}") from None


# --- names ----------------------------------------------------------------------------


def check_ca_name(name: str) -> str:
    if not _CA_NAME.fullmatch(name):
        raise InvalidSubject("a CA name is 1-63 lower-case letters, digits or '-'")
    return name


def check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise InvalidSubject("a device id is 1-64 letters, digits, '.', ':' or '-'")
    return device_id


def check_dns_name(name: str) -> str:
    """A lower-cased ASCII host name; a wildcard only as the whole left-most label."""
    lowered = name.lower()
    labels = lowered.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if len(lowered) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidSubject(f"not a valid DNS name: {name[:80]!r}")
    if _is_ip(lowered):
        raise InvalidSubject(f"{name!r} is an IP address: pass it as an IP")
    return lowered


def check_ip(value: str) -> IPAddressValue:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidSubject(f"not a valid IP address: {value[:80]!r}") from None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def subject_text(name: x509.Name) -> str:
    """RFC 4514 text of ``name``, with serialNumber by name rather than by OID."""
    return name.rfc4514_string({NameOID.SERIAL_NUMBER: "serialNumber"})


def common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


# --- subject keys ---------------------------------------------------------------------


def check_subject_key(key: object) -> SubjectPublicKey:
    """Accept P-256, RSA (2048-8192 bits) and Ed25519 public keys; refuse anything else."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise TrustfleetUnsupportedAlgorithm(f"EC curve {key.curve.name} is not supported")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise InvalidKey(f"RSA keys must have {MIN_RSA_BITS}-{MAX_RSA_BITS} bits")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise TrustfleetUnsupportedAlgorithm(
        f"{type(key).__name__} keys cannot be certified (use P-256, RSA or Ed25519)"
    )


def load_public_key_pem(pem: bytes) -> SubjectPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except PycaUnsupportedAlgorithm:
        raise TrustfleetUnsupportedAlgorithm(
            "the public key's algorithm is not supported"
        ) from None
    except ValueError:
        raise InvalidKey("not a PEM SubjectPublicKeyInfo public key") from None
    return check_subject_key(key)


def load_csr_public_key(data: bytes) -> SubjectPublicKey:
    """The public key of a PEM or DER CSR whose self-signature verifies.

    Only the key is taken: the subject and extensions come from the issuing request, never
    from the CSR.
    """
    try:
        csr = (
            x509.load_pem_x509_csr(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_csr(data)
        )
        key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except PycaUnsupportedAlgorithm:
        raise TrustfleetUnsupportedAlgorithm("the CSR's key algorithm is not supported") from None
    except ValueError:
        raise CsrInvalid("the CSR is not a well-formed PKCS#10 request") from None
    if not signature_ok:
        raise CsrInvalid("the CSR's signature does not verify under its public key")
    return check_subject_key(key)


# --- issuing --------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """A CA as a signer: its name, public key and a way to sign; never its private key."""

    name: x509.Name
    public_key: CaPublicKey
    algorithm: KeyAlgorithm
    key_identifier: bytes
    sign: Callable[[bytes], bytes]


@dataclass(frozen=True)
class Profile:
    """What goes into one certificate besides issuer, serial and signature."""

    kind: CertificateKind
    subject: x509.Name
    public_key: SubjectPublicKey
    not_before: datetime
    not_after: datetime
    path_length: int | None = None
    dns_names: tuple[str, ...] = ()
    ips: tuple[IPAddressValue, ...] = ()
    device_id: str | None = None


def ca_public_key(key: object, algorithm: KeyAlgorithm) -> CaPublicKey:
    if algorithm not in CA_ALGORITHMS:
        raise TrustfleetUnsupportedAlgorithm(
            f"a CA key must be one of {', '.join(sorted(CA_ALGORITHMS))}"
        )
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CaKeyMismatch("the key store returned a public key of another algorithm")
    return key


def key_identifier(key: SubjectPublicKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(key).digest


def self_issuer(
    name: x509.Name, key: CaPublicKey, algorithm: KeyAlgorithm, sign: Callable[[bytes], bytes]
) -> Issuer:
    return Issuer(name, key, algorithm, key_identifier(key), sign)


def issuer_from_certificate(
    cert: x509.Certificate, algorithm: KeyAlgorithm, sign: Callable[[bytes], bytes]
) -> Issuer:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    return Issuer(cert.subject, ca_public_key(cert.public_key(), algorithm), algorithm, ski, sign)


def ca_profile(
    kind: CertificateKind,
    name: str,
    key: CaPublicKey,
    *,
    path_length: int,
    not_before: datetime,
    not_after: datetime,
) -> Profile:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_ca_name(name))])
    return Profile(kind, subject, key, not_before, not_after, path_length=path_length)


def server_profile(
    key: SubjectPublicKey,
    dns_names: Iterable[str],
    ips: Iterable[str | IPAddressValue],
    *,
    not_before: datetime,
    not_after: datetime,
) -> Profile:
    names = tuple(dict.fromkeys(check_dns_name(n) for n in dns_names))
    addresses = tuple(dict.fromkeys(check_ip(str(a)) for a in ips))
    if not names and not addresses:
        raise InvalidSubject("a server certificate needs at least one DNS name or IP address")
    if len(names) + len(addresses) > MAX_NAMES:
        raise InvalidSubject(f"at most {MAX_NAMES} names and addresses per certificate")
    fitting = [n for n in (*names, *map(str, addresses)) if len(n) <= _CN_MAX]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fitting[0])] if fitting else [])
    return Profile(
        CertificateKind.SERVER, subject, key, not_before, not_after, dns_names=names, ips=addresses
    )


def device_profile(
    key: SubjectPublicKey, device_id: str, *, not_before: datetime, not_after: datetime
) -> Profile:
    device_id = check_device_id(device_id)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
        ]
    )
    return Profile(CertificateKind.DEVICE, subject, key, not_before, not_after, device_id=device_id)


def device_urn(device_id: str) -> str:
    return DEVICE_URN_PREFIX + device_id


def random_serial() -> int:
    """159 random bits from the OS: positive, at most 20 octets, unpredictable."""
    return x509.random_serial_number()


def issue_certificate(profile: Profile, issuer: Issuer, serial: int) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(profile.subject)
        .issuer_name(issuer.name)
        .public_key(profile.public_key)
        .serial_number(serial)
        .not_valid_before(profile.not_before)
        .not_valid_after(profile.not_after)
    )
    for extension, critical in _extensions(profile, issuer):
        builder = builder.add_extension(extension, critical)
    key, algorithm, rsa_padding = _throwaway_signer(issuer.algorithm)
    tbs = builder.sign(key, algorithm, rsa_padding=rsa_padding).tbs_certificate_bytes
    der = _assemble_certificate(tbs, issuer.sign(tbs))
    cert = x509.load_der_x509_certificate(der)
    _check_signed(issuer, cert.signature, cert.tbs_certificate_bytes, tbs)
    return cert


def _extensions(profile: Profile, issuer: Issuer) -> list[tuple[x509.ExtensionType, bool]]:
    is_ca = profile.kind.is_ca
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=is_ca, path_length=profile.path_length if is_ca else None), True),
        (_key_usage(profile), True),
        (x509.SubjectKeyIdentifier.from_public_key(profile.public_key), False),
        (x509.AuthorityKeyIdentifier(issuer.key_identifier, None, None), False),
    ]
    if profile.kind is CertificateKind.SERVER:
        general_names: list[x509.GeneralName] = [x509.DNSName(n) for n in profile.dns_names]
        general_names += [x509.IPAddress(a) for a in profile.ips]
        extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
        # RFC 5280 4.2.1.6: the SAN is critical when the subject is empty
        extensions.append((x509.SubjectAlternativeName(general_names), not profile.subject))
    elif profile.kind is CertificateKind.DEVICE:
        assert profile.device_id is not None
        urn = x509.UniformResourceIdentifier(device_urn(profile.device_id))
        extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False))
        extensions.append((x509.SubjectAlternativeName([urn]), False))
    return extensions


def _key_usage(profile: Profile) -> x509.KeyUsage:
    is_ca = profile.kind.is_ca
    key = profile.public_key
    return x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=not is_ca and isinstance(key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=not is_ca and isinstance(key, ec.EllipticCurvePublicKey),
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


# --- CRLs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime
    reason: RevocationReason


def build_crl(
    issuer: Issuer,
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
    revoked: Iterable[RevokedEntry],
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.name)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), False)
        .add_extension(x509.AuthorityKeyIdentifier(issuer.key_identifier, None, None), False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(_revoked_certificate(entry))
    key, algorithm, rsa_padding = _throwaway_signer(issuer.algorithm)
    tbs = builder.sign(key, algorithm, rsa_padding=rsa_padding).tbs_certlist_bytes
    der = _assemble_crl(tbs, issuer.sign(tbs))
    crl = x509.load_der_x509_crl(der)
    _check_signed(issuer, crl.signature, crl.tbs_certlist_bytes, tbs)
    return crl


def _revoked_certificate(entry: RevokedEntry) -> x509.RevokedCertificate:
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(entry.serial)
        .revocation_date(entry.revoked_at)
    )
    # RFC 5280 5.3.1: the reason code "unspecified" should be left out
    if entry.reason is not RevocationReason.UNSPECIFIED:
        builder = builder.add_extension(x509.CRLReason(entry.reason.flag), False)
    return builder.build()


# --- signing through the key store ----------------------------------------------------


_SignerTuple: TypeAlias = tuple[
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, hashes.SHA256, padding.PSS | None
]


def _throwaway_signer(algorithm: KeyAlgorithm) -> _SignerTuple:
    if algorithm is KeyAlgorithm.EC_P256:
        return _throwaway_key(algorithm), hashes.SHA256(), None
    if algorithm is KeyAlgorithm.RSA_3072:
        return _throwaway_key(algorithm), hashes.SHA256(), _PSS_SHA256
    raise TrustfleetUnsupportedAlgorithm(f"CAs cannot sign with {algorithm}")


@cache
def _throwaway_key(algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    # Only its algorithm identifier ends up in the TBS; its signature is thrown away. The
    # RSA-PSS identifier does not depend on the modulus size, so a 2048-bit key will do.
    if algorithm is KeyAlgorithm.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _assemble_certificate(tbs: bytes, signature: bytes) -> bytes:
    parsed = asn1_x509.TbsCertificate.load(tbs)
    algorithm = asn1_x509.SignedDigestAlgorithm.load(parsed["signature"].dump())
    certificate = asn1_x509.Certificate(
        {"tbs_certificate": parsed, "signature_algorithm": algorithm, "signature_value": signature}
    )
    return bytes(certificate.dump())


def _assemble_crl(tbs: bytes, signature: bytes) -> bytes:
    parsed = asn1_crl.TbsCertList.load(tbs)
    algorithm = asn1_x509.SignedDigestAlgorithm.load(parsed["signature"].dump())
    certificate_list = asn1_crl.CertificateList(
        {"tbs_cert_list": parsed, "signature_algorithm": algorithm, "signature": signature}
    )
    return bytes(certificate_list.dump())


def _check_signed(issuer: Issuer, signature: bytes, signed: bytes, expected_tbs: bytes) -> None:
    if signed != expected_tbs:
        raise PkiError("the reassembled structure does not carry the signed bytes")
    try:
        verify_signature(issuer.public_key, signature, signed)
    except PycaInvalidSignature:
        raise CaKeyMismatch() from None


def verify_signature(key: CaPublicKey, signature: bytes, data: bytes) -> None:
    """Raise pyca's InvalidSignature unless ``signature`` is the CA scheme's over ``data``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(signature, data, _PSS_SHA256, hashes.SHA256())


# --- validation -----------------------------------------------------------------------


#: trust anchors: DER, or certificates already parsed (a device keeps its roots parsed)
Roots: TypeAlias = bytes | Sequence[bytes | x509.Certificate]


#: intermediate CAs a chain may have between its leaf and its root, unless a policy says
MAX_INTERMEDIATES = 4


class CrlCheck(StrEnum):
    """How revocation is checked: every issuer of the chain needs a current CRL among
    those given (``required``), or only issuers that have a CRL among them are checked
    (``when-given``: a device that holds CRLs for some CAs only)."""

    REQUIRED = "required"
    WHEN_GIVEN = "when-given"


@dataclass(frozen=True)
class ChainPolicy:
    """A capability's own profile of the chains it accepts, in place of the WebPKI server or
    device purpose: what the leaf must assert (keyUsage bits by their pyca names, such as
    ``digital_signature``; extended key usages; a certificate policy OID), whether the leaf
    may be a CA, and how many intermediate CAs may stand between the leaf and the root.
    Every issuer must be a CA, and may sign certificates if it says what it may do."""

    key_usage: tuple[str, ...] = ()
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = ()
    policy_oid: x509.ObjectIdentifier | None = None
    leaf_may_be_ca: bool = False
    max_intermediates: int = MAX_INTERMEDIATES


@dataclass(frozen=True)
class ValidatedChain:
    """A chain that pyca's verifier accepted: leaf first, trust anchor last. ``purpose`` is
    the WebPKI purpose it was validated for, None under a :class:`ChainPolicy`."""

    chain: list[x509.Certificate]
    purpose: Purpose | None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise CertificateInvalid("a certificate is not well-formed DER") from None


def validate_chain(
    leaf_der: bytes,
    intermediates: Sequence[bytes],
    roots: Roots,
    *,
    at: datetime,
    crl_ders: Sequence[bytes | x509.CertificateRevocationList] = (),
    crls: CrlCheck = CrlCheck.REQUIRED,
    purpose: Purpose | None = None,
    server_name: str | None = None,
    policy: ChainPolicy | None = None,
) -> ValidatedChain:
    """Path validation by pyca plus a check of every chain certificate against the CRLs.

    The path is validated for the WebPKI ``purpose`` (default: what the leaf's
    extendedKeyUsage says), or, given a ``policy``, for that profile instead. With
    ``crls=REQUIRED`` each CA that issued a certificate of the chain needs a current,
    correctly signed CRL in ``crl_ders`` (a missing or stale one is :class:`CrlInvalid`);
    with ``WHEN_GIVEN`` only the CAs that have one there are checked. A listed certificate
    is :class:`CertificateRevoked`.
    """
    if policy is None:
        validated = verify_path(
            leaf_der, intermediates, roots, at=at, purpose=purpose, server_name=server_name
        )
    else:
        validated = _verify_for_policy(leaf_der, intermediates, roots, at, policy)
    check_crls(validated.chain, crl_ders, at=at, mode=crls)
    return validated


def _store(roots: Roots) -> Store:
    given = [roots] if isinstance(roots, bytes) else list(roots)
    if not given:
        raise CertificateInvalid("no trust anchor was given")
    return Store([r if isinstance(r, x509.Certificate) else load_certificate(r) for r in given])


def verify_path(
    leaf_der: bytes,
    intermediates: Sequence[bytes],
    roots: Roots,
    *,
    at: datetime,
    purpose: Purpose | None = None,
    server_name: str | None = None,
) -> ValidatedChain:
    """pyca's WebPKI path validation at time ``at``, without any revocation check.

    ``purpose`` defaults to what the leaf's extendedKeyUsage says. A server leaf is checked
    against ``server_name`` (DNS name or IP) when given, else against its own first SAN.
    """
    leaf = load_certificate(leaf_der)
    untrusted = [load_certificate(d) for d in intermediates]
    builder = PolicyBuilder().store(_store(roots)).time(at)
    purpose = purpose or _purpose_of(leaf)
    try:
        if purpose is Purpose.SERVER:
            subject = _server_subject(server_name, leaf)
            chain = builder.build_server_verifier(subject).verify(leaf, untrusted)
        else:
            chain = builder.build_client_verifier().verify(leaf, untrusted).chain
    except VerificationError as exc:
        raise CertificateInvalid(f"the chain does not validate: {exc}") from None
    return ValidatedChain(chain, purpose)


def _verify_for_policy(
    leaf_der: bytes,
    intermediates: Sequence[bytes],
    roots: Roots,
    at: datetime,
    policy: ChainPolicy,
) -> ValidatedChain:
    leaf = load_certificate(leaf_der)
    untrusted = [load_certificate(d) for d in intermediates]
    verifier = (
        PolicyBuilder()
        .store(_store(roots))
        .time(at)
        .max_chain_depth(policy.max_intermediates)
        .extension_policies(ca_policy=_CA_EXTENSIONS, ee_policy=_leaf_extensions(policy))
        .build_client_verifier()
    )
    try:
        chain = verifier.verify(leaf, untrusted).chain
    except VerificationError as exc:
        raise CertificateInvalid(f"the chain does not validate: {exc}") from None
    return ValidatedChain(chain, None)


def _require_ca(_policy: object, _cert: object, value: x509.BasicConstraints) -> None:
    if not value.ca:
        raise ValueError("an issuer must be a CA")


def _check_ca_key_usage(_policy: object, _cert: object, value: x509.KeyUsage | None) -> None:
    if value is not None and not value.key_cert_sign:
        raise ValueError("an issuer's keyUsage must allow keyCertSign")


_AGNOSTIC = Criticality.AGNOSTIC
_CA_EXTENSIONS = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, _AGNOSTIC, _require_ca)
    .may_be_present(x509.KeyUsage, _AGNOSTIC, _check_ca_key_usage)
)


def _leaf_extensions(policy: ChainPolicy) -> ExtensionPolicy:
    """pyca's extension policy for a leaf under ``policy`` (the validators raise ValueError,
    which pyca turns into a VerificationError)."""

    def key_usage(_policy: object, _cert: object, value: x509.KeyUsage | None) -> None:
        missing = [bit for bit in policy.key_usage if value is None or not getattr(value, bit)]
        if missing:
            raise ValueError(f"the leaf's keyUsage must allow {', '.join(missing)}")

    def extended(_policy: object, _cert: object, value: x509.ExtendedKeyUsage | None) -> None:
        missing = [oid for oid in policy.extended_key_usage if value is None or oid not in value]
        if missing:
            raise ValueError(f"the leaf's extendedKeyUsage lacks {missing[0].dotted_string}")

    def policies(_policy: object, _cert: object, value: x509.CertificatePolicies | None) -> None:
        oids = {info.policy_identifier for info in value or ()}
        if policy.policy_oid is not None and policy.policy_oid not in oids:
            raise ValueError(f"the leaf does not assert policy {policy.policy_oid.dotted_string}")

    def basic(_policy: object, _cert: object, value: x509.BasicConstraints | None) -> None:
        if value is not None and value.ca and not policy.leaf_may_be_ca:
            raise ValueError("the leaf must not be a CA")

    return (
        ExtensionPolicy.permit_all()
        .may_be_present(x509.KeyUsage, _AGNOSTIC, key_usage)
        .may_be_present(x509.ExtendedKeyUsage, _AGNOSTIC, extended)
        .may_be_present(x509.CertificatePolicies, _AGNOSTIC, policies)
        .may_be_present(x509.BasicConstraints, _AGNOSTIC, basic)
    )


def _purpose_of(leaf: x509.Certificate) -> Purpose:
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateInvalid("the leaf has no extendedKeyUsage: pass a purpose") from None
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        return Purpose.SERVER
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
        return Purpose.DEVICE
    raise CertificateInvalid("the leaf is neither for serverAuth nor for clientAuth")


def _server_subject(server_name: str | None, leaf: x509.Certificate) -> Subject:
    name = server_name if server_name is not None else _first_san(leaf)
    try:
        return x509.IPAddress(ipaddress.ip_address(name)) if _is_ip(name) else x509.DNSName(name)
    except ValueError:
        raise CertificateInvalid(f"not a valid server name: {name[:80]!r}") from None


def _first_san(leaf: x509.Certificate) -> str:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateInvalid("the server certificate has no subjectAltName") from None
    for dns in san.get_values_for_type(x509.DNSName):
        # a wildcard SAN matches any one label; checking a concrete name in its place
        # still exercises the verifier's name matching
        return "x" + dns[1:] if dns.startswith("*.") else dns
    for address in san.get_values_for_type(x509.IPAddress):
        return str(address)
    raise CertificateInvalid("the server certificate names no DNS name or IP address")


def load_crl(der: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_der_x509_crl(der)
    except ValueError:
        raise CrlInvalid("a CRL is not well-formed DER") from None


def check_crls(
    chain: Sequence[x509.Certificate],
    crl_ders: Sequence[bytes | x509.CertificateRevocationList],
    *,
    at: datetime,
    mode: CrlCheck = CrlCheck.REQUIRED,
) -> None:
    """Raise CertificateRevoked if a CRL lists a certificate of the (validated) chain; see
    :class:`CrlCheck` for which issuers need a CRL."""
    crls = [d if isinstance(d, x509.CertificateRevocationList) else load_crl(d) for d in crl_ders]
    for cert, issuer in itertools.pairwise(chain):
        if mode is CrlCheck.WHEN_GIVEN and not any(c.issuer == issuer.subject for c in crls):
            continue
        crl = _current_crl(issuer, crls, at)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateRevoked(
                f"certificate {serial_hex(cert.serial_number)} is revoked",
                serial=serial_hex(cert.serial_number),
            )


def _current_crl(
    issuer: x509.Certificate, crls: Sequence[x509.CertificateRevocationList], at: datetime
) -> x509.CertificateRevocationList:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CrlInvalid("the issuer's key type cannot sign CRLs here")
    signed = [c for c in crls if c.issuer == issuer.subject and c.is_signature_valid(key)]
    who = common_name(issuer.subject) or issuer.subject.rfc4514_string()
    if not signed:
        raise CrlInvalid(f"no correctly signed CRL from {who!r}")
    current = [c for c in signed if _in_force(c, as_utc(at))]
    if not current:
        raise CrlInvalid(f"no CRL from {who!r} is current")
    return max(current, key=_crl_order)


def _in_force(crl: x509.CertificateRevocationList, at: datetime) -> bool:
    next_update = crl.next_update_utc
    return crl.last_update_utc <= at and next_update is not None and at <= next_update


def _crl_order(crl: x509.CertificateRevocationList) -> tuple[int, datetime]:
    """Newest first by CRL number, then by issue time."""
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = -1
    return number, crl.last_update_utc


# --- small helpers --------------------------------------------------------------------


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def parse_serial(value: str) -> int:
    """Accept ``1a2b...``, ``0x1A2B...`` and openssl's ``1A:2B:...`` forms."""
    cleaned = value.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or len(cleaned) > 40 or not re.fullmatch(r"[0-9a-f]+", cleaned):
        raise InvalidInput("a serial number is up to 40 hexadecimal digits")
    return int(cleaned, 16)


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
