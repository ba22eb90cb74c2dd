"""Key generation, import and export for every key kind trustfleet handles.

pyca/cryptography reads and writes everything except SM2, whose curve it does not know;
SM2 keys are encoded here with asn1crypto in the same containers OpenSSL 3 uses:
SubjectPublicKeyInfo and PKCS#8 with ``id-ecPublicKey`` and the named curve
1.2.156.10197.1.301, and SEC1 ``ECPrivateKey`` for the traditional form.
"""

from __future__ import annotations

from collections.abc import Callable

from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from asn1crypto import pem as asn1_pem
from cryptography.exceptions import UnsupportedAlgorithm as _PycaUnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from trustfleet.crypto import _pkcs8
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey, Suite
from trustfleet.crypto.ed25519 import ED25519
from trustfleet.crypto.gm import GM
from trustfleet.crypto.p256 import P256
from trustfleet.crypto.rsa import RSA, generate_rsa_key
from trustfleet.crypto.sm2 import SM2PrivateKey, SM2PublicKey
from trustfleet.errors import InvalidKey, UnsupportedAlgorithm

SM2_CURVE_OID = "1.2.156.10197.1.301"
_EC_PUBLIC_KEY_OID = "1.2.840.10045.2.1"
_PRIVATE_KEY_LABELS = frozenset(
    {"PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "EC PRIVATE KEY", "SM2 PRIVATE KEY", "RSA PRIVATE KEY"}
)
_PUBLIC_KEY_LABELS = frozenset({"PUBLIC KEY", "RSA PUBLIC KEY"})

if SM2_CURVE_OID not in asn1_keys.NamedCurve._map:
    # asn1crypto needs the curve's scalar size to encode SEC1 private keys at full width.
    asn1_keys.NamedCurve.register("sm2p256v1", SM2_CURVE_OID, 32)

_SUITES: dict[KeyAlgorithm, Suite] = {
    KeyAlgorithm.EC_P256: P256,
    KeyAlgorithm.ED25519: ED25519,
    KeyAlgorithm.X25519: ED25519,
    KeyAlgorithm.RSA_2048: RSA,
    KeyAlgorithm.RSA_3072: RSA,
    KeyAlgorithm.SM2: GM,
}

_GENERATORS: dict[KeyAlgorithm, Callable[[], PrivateKey]] = {
    KeyAlgorithm.EC_P256: lambda: ec.generate_private_key(ec.SECP256R1()),
    KeyAlgorithm.ED25519: ed25519.Ed25519PrivateKey.generate,
    KeyAlgorithm.X25519: x25519.X25519PrivateKey.generate,
    KeyAlgorithm.RSA_2048: lambda: generate_rsa_key(2048),
    KeyAlgorithm.RSA_3072: lambda: generate_rsa_key(3072),
    KeyAlgorithm.SM2: SM2PrivateKey.generate,
}

_PRIVATE_TYPES = (
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    x25519.X25519PrivateKey,
    rsa.RSAPrivateKey,
    SM2PrivateKey,
)
_PUBLIC_TYPES = (
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    x25519.X25519PublicKey,
    rsa.RSAPublicKey,
    SM2PublicKey,
)

_RSA_SIZES = {2048: KeyAlgorithm.RSA_2048, 3072: KeyAlgorithm.RSA_3072}


# -- algorithms and suites -------------------------------------------------------------


def algorithm_of(key: PrivateKey | PublicKey) -> KeyAlgorithm:
    """The :class:`KeyAlgorithm` of a private or public key; ``InvalidKey`` if unsupported."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyAlgorithm.EC_P256
        raise InvalidKey(f"EC keys must be on P-256, not {key.curve.name}")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey):
        return KeyAlgorithm.X25519
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size in _RSA_SIZES:
            return _RSA_SIZES[key.key_size]
        raise InvalidKey(f"RSA keys must be 2048 or 3072 bits, not {key.key_size}")
    if isinstance(key, SM2PrivateKey | SM2PublicKey):  # sm2p256v1 only (see crypto.sm2)
        return KeyAlgorithm.SM2
    raise InvalidKey(f"unsupported kind of key: {type(key).__name__}")


def suite_for_algorithm(alg: KeyAlgorithm) -> Suite:
    """The suite that signs, verifies and kem-wraps with keys of ``alg``."""
    try:
        return _SUITES[alg]
    except KeyError:
        raise UnsupportedAlgorithm(f"no suite uses {alg} keys") from None


def generate_private_key(alg: KeyAlgorithm) -> PrivateKey:
    """A fresh private key of an asymmetric algorithm."""
    try:
        generate = _GENERATORS[alg]
    except KeyError:
        raise UnsupportedAlgorithm(f"{alg} is not an asymmetric key algorithm") from None
    return generate()


# -- import ----------------------------------------------------------------------------


def load_private_key(data: bytes, password: bytes | None = None) -> PrivateKey:
    """Load a private key from PEM or DER: PKCS#8 (optionally encrypted), SEC1 or PKCS#1."""
    der = _der_of(data, _PRIVATE_KEY_LABELS, "private key")
    if not _pkcs8.is_encrypted(der):
        if password is not None:
            raise InvalidKey("the private key is not encrypted, but a password was given")
        return _load_plain_private_key(der)
    if password is None:
        raise InvalidKey("the private key is encrypted: give its password")
    try:
        return _narrow_private(serialization.load_der_private_key(der, password))
    except _PycaUnsupportedAlgorithm:
        # pyca decrypted it but does not know the key inside (an SM2 key, we hope)
        return _load_plain_private_key(_pkcs8.decrypt(der, password))
    except (ValueError, TypeError):
        raise InvalidKey("cannot decrypt the private key: wrong password or corrupt data") from None


#: the DER of the SM2 curve's OID 1.2.156.10197.1.301, which every SM2 SPKI contains
_SM2_CURVE_OID_DER = bytes.fromhex("06082a811ccf5501822d")


def load_public_key(data: bytes) -> PublicKey:
    """Load a public key from PEM or DER SubjectPublicKeyInfo (or PKCS#1 for RSA)."""
    der = _der_of(data, _PUBLIC_KEY_LABELS, "public key")
    sm2_key = _sm2_public_key(der)
    if sm2_key is not None:
        return sm2_key
    try:
        key = serialization.load_der_public_key(der)
    except _PycaUnsupportedAlgorithm:
        raise InvalidKey("the public key is of an unsupported algorithm or curve") from None
    except ValueError:
        raise InvalidKey("the public key is malformed") from None
    if isinstance(key, _PUBLIC_TYPES):
        algorithm_of(key)
        return key
    raise InvalidKey(f"unsupported kind of public key: {type(key).__name__}")


def _load_plain_private_key(der: bytes) -> PrivateKey:
    sm2_key = _sm2_private_key(der)
    if sm2_key is not None:
        return sm2_key
    try:
        key = serialization.load_der_private_key(der, None)
    except _PycaUnsupportedAlgorithm:
        raise InvalidKey("the private key is of an unsupported algorithm or curve") from None
    except (ValueError, TypeError):
        raise InvalidKey("the private key is malformed") from None
    return _narrow_private(key)


def _narrow_private(key: object) -> PrivateKey:
    if isinstance(key, _PRIVATE_TYPES):
        algorithm_of(key)
        return key
    raise InvalidKey(f"unsupported kind of private key: {type(key).__name__}")


def _der_of(data: bytes, labels: frozenset[str], what: str) -> bytes:
    """The DER inside ``data``: the first PEM block with one of ``labels``, or ``data``."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise InvalidKey(f"the {what} is empty or not bytes")
    if not asn1_pem.detect(data):
        return bytes(data)
    try:
        blocks = list(asn1_pem.unarmor(bytes(data), multiple=True))
    except ValueError:
        raise InvalidKey(f"the {what} PEM is malformed") from None
    for label, headers, der in blocks:
        if label in labels:
            if "Proc-Type" in headers:
                raise InvalidKey(f"legacy encrypted PEM is not supported; use PKCS#8 ({what})")
            return bytes(der)
    found = ", ".join(label for label, _, _ in blocks) or "none"
    raise InvalidKey(f"no {what} block in the PEM (found: {found})")


# -- SM2 ASN.1 -------------------------------------------------------------------------


def _is_sm2_algorithm(algorithm: asn1_keys.PublicKeyAlgorithm) -> bool:
    oid = algorithm["algorithm"].dotted
    if oid == SM2_CURVE_OID:  # some encoders put the curve OID in the algorithm field
        return True
    if oid != _EC_PUBLIC_KEY_OID:
        return False
    return _is_sm2_parameters(algorithm["parameters"])


def _is_sm2_parameters(parameters: asn1_keys.ECDomainParameters) -> bool:
    return bool(parameters.name == "named" and parameters.chosen.dotted == SM2_CURVE_OID)


def _sm2_public_key(der: bytes) -> SM2PublicKey | None:
    """An SM2 key if ``der`` is an SM2 SubjectPublicKeyInfo, else None."""
    if _SM2_CURVE_OID_DER not in der:  # skips the ASN.1 parse for every other key
        return None
    try:
        info = asn1_keys.PublicKeyInfo.load(der, strict=True)
        if not _is_sm2_algorithm(info["algorithm"]):
            return None
        point = bytes(info["public_key"].cast(asn1_keys.ECPointBitString).native)
    except (ValueError, TypeError, KeyError):
        return None
    return SM2PublicKey.from_bytes(point)


def _sm2_private_key(der: bytes) -> SM2PrivateKey | None:
    """An SM2 key if ``der`` is an SM2 PKCS#8 or SEC1 private key, else None."""
    sec1_der = _sm2_pkcs8_content(der)
    if sec1_der is None:
        if not _is_sm2_sec1(der):
            return None
        sec1_der = der
    try:
        sec1 = asn1_keys.ECPrivateKey.load(sec1_der, strict=True)
        parameters = sec1["parameters"]
        d = sec1["private_key"].native
        embedded = sec1["public_key"].native
    except (ValueError, TypeError, KeyError):
        raise InvalidKey("the SM2 private key is malformed") from None
    if not isinstance(d, int) or not (parameters.native is None or _is_sm2_parameters(parameters)):
        raise InvalidKey("the SM2 private key is malformed")
    key = SM2PrivateKey(d)
    if embedded is not None and bytes(embedded) != key.public_key().public_bytes():
        raise InvalidKey("the SM2 private key's embedded public key does not match it")
    return key


class _RawPrivateKeyInfo(asn1_core.Sequence):  # type: ignore[misc]
    """PKCS#8 with the inner key left as bytes (asn1crypto's own class parses it eagerly)."""

    _fields = [
        ("version", asn1_core.Integer),
        ("private_key_algorithm", asn1_keys.PrivateKeyAlgorithm),
        ("private_key", asn1_core.OctetString),
        ("attributes", asn1_keys.Attributes, {"implicit": 0, "optional": True}),
    ]


def _sm2_pkcs8_content(der: bytes) -> bytes | None:
    """The SEC1 ECPrivateKey inside an SM2 PKCS#8 PrivateKeyInfo, else None."""
    try:
        info = _RawPrivateKeyInfo.load(der, strict=True)
        if not _is_sm2_algorithm(info["private_key_algorithm"]):
            return None
        return bytes(info["private_key"].native)
    except (ValueError, TypeError, KeyError):
        return None


def _is_sm2_sec1(der: bytes) -> bool:
    try:
        parameters = asn1_keys.ECPrivateKey.load(der, strict=True)["parameters"]
        return parameters.native is not None and _is_sm2_parameters(parameters)
    except (ValueError, TypeError, KeyError):
        return False


def _sm2_algorithm_parameters() -> asn1_keys.ECDomainParameters:
    return asn1_keys.ECDomainParameters(name="named", value=SM2_CURVE_OID)


def _sm2_spki(key: SM2PublicKey) -> bytes:
    algorithm = asn1_keys.PublicKeyAlgorithm(
        {"algorithm": "ec", "parameters": _sm2_algorithm_parameters()}
    )
    info = asn1_keys.PublicKeyInfo({"algorithm": algorithm, "public_key": key.public_bytes()})
    return bytes(info.dump())


def _sm2_pkcs8(key: SM2PrivateKey) -> bytes:
    sec1 = asn1_keys.ECPrivateKey(
        {
            "version": "ecPrivkeyVer1",
            "private_key": int.from_bytes(key.private_bytes(), "big"),
            "public_key": key.public_key().public_bytes(),
        }
    )
    # RFC 5915: the scalar at the curve's full width, also when it starts with zero bytes
    # (asn1crypto would infer the width from this one value)
    sec1.set_key_size(len(key.private_bytes()))
    algorithm = asn1_keys.PrivateKeyAlgorithm(
        {"algorithm": "ec", "parameters": _sm2_algorithm_parameters()}
    )
    info = asn1_keys.PrivateKeyInfo(
        {"version": 0, "private_key_algorithm": algorithm, "private_key": sec1}
    )
    return bytes(info.dump())


# -- export ----------------------------------------------------------------------------


def private_key_to_der(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER."""
    _check_private(key)
    if isinstance(key, SM2PrivateKey):
        return _sm2_pkcs8(key)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_to_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    return bytes(asn1_pem.armor("PRIVATE KEY", private_key_to_der(key)))


def public_key_to_der(key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo DER."""
    _check_public(key)
    if isinstance(key, SM2PublicKey):
        return _sm2_spki(key)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_to_pem(key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``)."""
    return bytes(asn1_pem.armor("PUBLIC KEY", public_key_to_der(key)))


def _check_private(key: object) -> None:
    if not isinstance(key, _PRIVATE_TYPES):
        raise InvalidKey(f"expected a private key, not {type(key).__name__}")
    algorithm_of(key)


def _check_public(key: object) -> None:
    if not isinstance(key, _PUBLIC_TYPES):
        raise InvalidKey(f"expected a public key, not {type(key).__name__}")
    algorithm_of(key)
