"""PKCS#11 object attributes for trustfleet keys: templates, the algorithm read back from a
key's attributes, and conversions between token objects and pyca keys (the scheme is
described in :mod:`trustfleet.keystore.pkcs11`)."""

from __future__ import annotations

import ctypes
from typing import Any

import pkcs11
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey
from trustfleet.errors import UnsupportedAlgorithm
from trustfleet.keystore.base import KeyUsage

P256_PARAMS = encode_named_curve_parameters("1.2.840.10045.3.1.7")
ED25519_PARAMS = encode_named_curve_parameters("1.3.101.112")
# Some tokens name Edwards curves with a PrintableString instead of the RFC 8410 OID.
ED25519_PARAMS_ALT = b"\x13\x0cedwards25519"


KEY_TYPES = {
    KeyAlgorithm.EC_P256: KeyType.EC,
    KeyAlgorithm.ED25519: KeyType.EC_EDWARDS,
    KeyAlgorithm.RSA_2048: KeyType.RSA,
    KeyAlgorithm.RSA_3072: KeyType.RSA,
    KeyAlgorithm.AES_128: KeyType.AES,
    KeyAlgorithm.AES_256: KeyType.AES,
    KeyAlgorithm.HMAC_SHA256: KeyType.GENERIC_SECRET,
}

PRIVATE_FLAGS = {
    KeyUsage.SIGN: Attribute.SIGN,
    KeyUsage.DECRYPT: Attribute.DECRYPT,
    KeyUsage.UNWRAP: Attribute.UNWRAP,
    KeyUsage.DERIVE: Attribute.DERIVE,
}
SECRET_FLAGS = {
    KeyUsage.ENCRYPT: Attribute.ENCRYPT,
    KeyUsage.DECRYPT: Attribute.DECRYPT,
    KeyUsage.MAC: Attribute.SIGN,
    KeyUsage.WRAP: Attribute.WRAP,
    KeyUsage.UNWRAP: Attribute.UNWRAP,
    KeyUsage.DERIVE: Attribute.DERIVE,
}
PUBLIC_FLAGS = {
    KeyUsage.SIGN: Attribute.VERIFY,
    KeyUsage.DECRYPT: Attribute.ENCRYPT,
    KeyUsage.UNWRAP: Attribute.WRAP,
}


PUBLIC_ONLY_ATTRIBUTES = (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP)


def common_template(key_id: bytes, label: str) -> dict[Attribute, Any]:
    return {Attribute.ID: key_id, Attribute.LABEL: label, Attribute.TOKEN: True}


def private_template(
    key_id: bytes, label: str, usage: KeyUsage, exportable: bool
) -> dict[Attribute, Any]:
    template = common_template(key_id, label)
    template.update({attr: flag in usage for flag, attr in PRIVATE_FLAGS.items()})
    template.update(
        {
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: not exportable,
            # PKCS#11 reveals CKA_VALUE only of extractable keys: exportable implies WRAPPABLE
            Attribute.EXTRACTABLE: exportable or KeyUsage.WRAPPABLE in usage,
        }
    )
    return template


def public_template(key_id: bytes, label: str, usage: KeyUsage) -> dict[Attribute, Any]:
    template = common_template(key_id, label)
    template.update({attr: flag in usage for flag, attr in PUBLIC_FLAGS.items()})
    template[Attribute.PRIVATE] = False
    return template


def secret_template(
    key_id: bytes, label: str, usage: KeyUsage, exportable: bool
) -> dict[Attribute, Any]:
    template = common_template(key_id, label)
    template.update({attr: flag in usage for flag, attr in SECRET_FLAGS.items()})
    template.update(
        {
            Attribute.VERIFY: KeyUsage.MAC in usage,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: not exportable,
            # PKCS#11 reveals CKA_VALUE only of extractable keys: exportable implies WRAPPABLE
            Attribute.EXTRACTABLE: exportable or KeyUsage.WRAPPABLE in usage,
        }
    )
    return template


def secret_generation_mechanism(algorithm: KeyAlgorithm) -> Mechanism:
    if algorithm is KeyAlgorithm.TDES:
        return Mechanism.DES2_KEY_GEN
    if algorithm is KeyAlgorithm.HMAC_SHA256:
        return Mechanism.GENERIC_SECRET_KEY_GEN
    return Mechanism.AES_KEY_GEN


def key_type_for_unwrap(algorithm: KeyAlgorithm, wrapped: bytes) -> KeyType:
    if algorithm is KeyAlgorithm.TDES:
        # RFC 5649 output is 8 bytes longer than a 16-byte key padded to 16 (24) and than a
        # 24-byte key (32); OAEP hides the length, so assume 2-key TDES there.
        return KeyType.DES3 if len(wrapped) == 32 else KeyType.DES2
    return KEY_TYPES[algorithm]


def flags_of(obj: pkcs11.Key) -> dict[KeyUsage, Attribute]:
    return SECRET_FLAGS if isinstance(obj, pkcs11.SecretKey) else PRIVATE_FLAGS


# -- algorithms and key conversion -----------------------------------------------------


def algorithm_of_objects(obj: pkcs11.Key, public: pkcs11.PublicKey | None) -> KeyAlgorithm:
    key_type = obj.key_type
    if isinstance(obj, pkcs11.SecretKey):
        return secret_algorithm(obj, key_type)
    if public is None:
        raise UnsupportedAlgorithm("a private key without its public key object")
    if key_type == KeyType.EC:
        if bytes(public[Attribute.EC_PARAMS]) == P256_PARAMS:
            return KeyAlgorithm.EC_P256
    elif key_type == KeyType.EC_EDWARDS:
        if bytes(public[Attribute.EC_PARAMS]) in (ED25519_PARAMS, ED25519_PARAMS_ALT):
            return KeyAlgorithm.ED25519
    elif key_type == KeyType.RSA:
        bits = len(bytes(public[Attribute.MODULUS]).lstrip(b"\x00")) * 8
        if bits in (2048, 3072):
            return KeyAlgorithm.RSA_2048 if bits == 2048 else KeyAlgorithm.RSA_3072
    raise UnsupportedAlgorithm(f"a {key_type.name} key of a kind trustfleet does not use")


def secret_algorithm(obj: pkcs11.Key, key_type: KeyType) -> KeyAlgorithm:
    if key_type == KeyType.AES:
        length = int(obj[Attribute.VALUE_LEN])
        if length in (16, 32):
            return KeyAlgorithm.AES_128 if length == 16 else KeyAlgorithm.AES_256
    elif key_type in (KeyType.DES2, KeyType.DES3):
        return KeyAlgorithm.TDES
    elif key_type in (KeyType.GENERIC_SECRET, KeyType.SHA256_HMAC):
        return KeyAlgorithm.HMAC_SHA256
    raise UnsupportedAlgorithm(f"a {key_type.name} secret key of a kind trustfleet does not use")


def public_key_of(algorithm: KeyAlgorithm, public: pkcs11.PublicKey) -> PublicKey:
    if algorithm is KeyAlgorithm.EC_P256:
        point = ec_point(bytes(public[Attribute.EC_POINT]))
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(
            ec_point(bytes(public[Attribute.EC_POINT]))
        )
    attrs = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
    n = int.from_bytes(attrs[Attribute.MODULUS], "big")
    e = int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


def ec_point(encoded: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING (some tokens give the raw point)."""
    if encoded[:1] == b"\x04" and len(encoded) > 2 and encoded[1] == len(encoded) - 2:
        return bytes(OctetString.load(encoded).native)
    return encoded


def private_key_of(algorithm: KeyAlgorithm, obj: pkcs11.Key) -> PrivateKey:
    """The clear private key of an exportable (CKA_SENSITIVE=FALSE) token key."""
    if algorithm is KeyAlgorithm.EC_P256:
        d = int.from_bytes(obj[Attribute.VALUE], "big")
        return ec.derive_private_key(d, ec.SECP256R1())
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(obj[Attribute.VALUE]))
    names = [
        Attribute.MODULUS,
        Attribute.PUBLIC_EXPONENT,
        Attribute.PRIVATE_EXPONENT,
        Attribute.PRIME_1,
        Attribute.PRIME_2,
        Attribute.EXPONENT_1,
        Attribute.EXPONENT_2,
        Attribute.COEFFICIENT,
    ]
    n, e, d, p, q, dp, dq, qi = (
        int.from_bytes(v, "big") for v in obj.get_attributes(names).values()
    )
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()


def int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def asymmetric_attributes(
    key: PrivateKey,
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """(private, public) object attributes holding ``key``'s material."""
    private: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    public: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        point = key.public_key().public_numbers()
        raw_point = b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
        shared = {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: P256_PARAMS}
        private.update(shared)
        private[Attribute.VALUE] = key.private_numbers().private_value.to_bytes(32, "big")
        public.update(shared)
        public[Attribute.EC_POINT] = OctetString(raw_point).dump()
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        shared = {Attribute.KEY_TYPE: KeyType.EC_EDWARDS, Attribute.EC_PARAMS: ED25519_PARAMS}
        private.update(shared)
        private[Attribute.VALUE] = key.private_bytes(
            ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()
        )
        public.update(shared)
        public[Attribute.EC_POINT] = OctetString(
            key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
        ).dump()
    elif isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        pub = numbers.public_numbers
        shared = {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: int_bytes(pub.n),
            Attribute.PUBLIC_EXPONENT: int_bytes(pub.e),
        }
        private.update(shared)
        private.update(
            {
                Attribute.PRIVATE_EXPONENT: int_bytes(numbers.d),
                Attribute.PRIME_1: int_bytes(numbers.p),
                Attribute.PRIME_2: int_bytes(numbers.q),
                Attribute.EXPONENT_1: int_bytes(numbers.dmp1),
                Attribute.EXPONENT_2: int_bytes(numbers.dmq1),
                Attribute.COEFFICIENT: int_bytes(numbers.iqmp),
            }
        )
        public.update(shared)
    else:
        raise UnsupportedAlgorithm("the PKCS#11 backend cannot import this kind of key")
    return private, public


def secret_attributes(algorithm: KeyAlgorithm, secret: bytes) -> dict[Attribute, Any]:
    if algorithm is KeyAlgorithm.TDES:
        key_type = KeyType.DES2 if len(secret) == 16 else KeyType.DES3
    else:
        key_type = KEY_TYPES[algorithm]
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: key_type,
        Attribute.VALUE: secret,
    }


# -- what the token can do ---------------------------------------------------------------


class _MechanismInfo(ctypes.Structure):
    _fields_ = (
        ("min_key_size", ctypes.c_ulong),
        ("max_key_size", ctypes.c_ulong),
        ("flags", ctypes.c_ulong),
    )


_FLAG_BITS = 0xFFFFFFFF  # every CKF_* mechanism flag fits in 32 bits


def mechanism_flags(module_path: str, slot: pkcs11.Slot) -> dict[int, int]:
    """Each mechanism of ``slot`` and its ``CKF_*`` flags (what it can be used for).

    Read with the module's own ``C_GetMechanismInfo`` into a zeroed structure: python-pkcs11
    passes an uninitialised one, and SoftHSM2 ORs the flags of some mechanisms (AES-ECB,
    AES-GCM, ...) into what it finds there, so the flags python-pkcs11 returns for them are
    garbage. The module is already initialised by python-pkcs11 in this process; loading it
    again with ctypes gives the same library. A module that does not export the function
    falls back on python-pkcs11, keeping only plausible answers (garbage has bits above the
    32 the flags use, and such a mechanism is then treated as absent).
    """
    try:
        function = ctypes.CDLL(module_path).C_GetMechanismInfo
        function.argtypes = (ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_MechanismInfo))
        function.restype = ctypes.c_ulong
    except (OSError, AttributeError):
        function = None
    flags: dict[int, int] = {}
    for mechanism in slot.get_mechanisms():
        value = int(mechanism)
        if function is not None:
            info = _MechanismInfo()
            if function(slot.slot_id, value, ctypes.byref(info)) == 0:
                flags[value] = int(info.flags) & _FLAG_BITS
            continue
        try:
            reported = int(slot.get_mechanism_info(mechanism).flags)
        except pkcs11.PKCS11Error:
            continue
        flags[value] = reported if reported <= _FLAG_BITS else 0
    return flags
