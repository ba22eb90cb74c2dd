"""Key generation, PEM/DER import and export, and interoperability with OpenSSL 3."""

from __future__ import annotations

import os

import pytest
from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa

from trustfleet.crypto import (
    SM2PrivateKey,
    SM2PublicKey,
    algorithm_of,
    generate_private_key,
    get_suite,
    load_private_key,
    load_public_key,
    private_key_to_der,
    private_key_to_pem,
    public_key_to_der,
    public_key_to_pem,
    suite_for_algorithm,
)
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.sm2 import DEFAULT_UID, SM2P256V1
from trustfleet.errors import DecryptionFailed, InvalidKey, InvalidSignature, UnsupportedAlgorithm

from .conftest import ASYMMETRIC, OpenSSL, key_of

SYMMETRIC = [alg for alg in KeyAlgorithm if not alg.is_asymmetric]
EXPECTED_SUITE = {
    KeyAlgorithm.EC_P256: "p256",
    KeyAlgorithm.ED25519: "ed25519",
    KeyAlgorithm.X25519: "ed25519",
    KeyAlgorithm.RSA_2048: "rsa",
    KeyAlgorithm.RSA_3072: "rsa",
    KeyAlgorithm.SM2: "gm",
}
SIGNING = [a for a in ASYMMETRIC if a is not KeyAlgorithm.X25519]


# -- generation, algorithms, suites ----------------------------------------------------


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_generated_key_has_the_requested_algorithm(alg: KeyAlgorithm) -> None:
    key = key_of(alg)
    assert algorithm_of(key) is alg
    assert algorithm_of(key.public_key()) is alg


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_suite_for_algorithm(alg: KeyAlgorithm) -> None:
    assert suite_for_algorithm(alg) is get_suite(EXPECTED_SUITE[alg])


@pytest.mark.parametrize("alg", SIGNING, ids=str)
def test_suite_for_algorithm_signs_with_a_generated_key(alg: KeyAlgorithm) -> None:
    key, suite = key_of(alg), suite_for_algorithm(alg)
    suite.verify(key.public_key(), b"data", suite.sign(key, b"data"))


@pytest.mark.parametrize("alg", SYMMETRIC, ids=str)
def test_secret_key_algorithms_have_no_suite_and_no_key_pair(alg: KeyAlgorithm) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        suite_for_algorithm(alg)
    with pytest.raises(UnsupportedAlgorithm):
        generate_private_key(alg)


def test_fresh_keys_differ() -> None:
    a, b = (generate_private_key(KeyAlgorithm.SM2) for _ in range(2))
    assert a.public_key() != b.public_key()


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa-1024"),  # noqa: S505
        pytest.param(lambda: rsa.generate_private_key(65537, 2560), id="rsa-2560"),
        pytest.param(ed448.Ed448PrivateKey.generate, id="ed448"),
        pytest.param(lambda: b"not a key", id="bytes"),
    ],
)
def test_algorithm_of_unsupported_keys_is_invalid(key) -> None:
    with pytest.raises(InvalidKey):
        algorithm_of(key())


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_private_key_der_and_pem_round_trip(alg: KeyAlgorithm) -> None:
    key = key_of(alg)
    der = private_key_to_der(key)
    pem = private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert asn1_keys.PrivateKeyInfo.load(der, strict=True)["version"].native == 0  # PKCS#8
    for loaded in (load_private_key(der), load_private_key(pem)):
        assert algorithm_of(loaded) is alg
        assert public_key_to_der(loaded.public_key()) == public_key_to_der(key.public_key())
        assert private_key_to_der(loaded) == der


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_public_key_der_and_pem_round_trip(alg: KeyAlgorithm) -> None:
    public = key_of(alg).public_key()
    der = public_key_to_der(public)
    pem = public_key_to_pem(public)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    asn1_keys.PublicKeyInfo.load(der, strict=True).native  # noqa: B018  (SPKI parses)
    for loaded in (load_public_key(der), load_public_key(pem)):
        assert loaded == public
        assert algorithm_of(loaded) is alg


@pytest.mark.parametrize("alg", SIGNING, ids=str)
def test_loaded_private_key_signs_for_the_original_public_key(alg: KeyAlgorithm) -> None:
    key, suite = key_of(alg), suite_for_algorithm(alg)
    loaded = load_private_key(private_key_to_pem(key))
    suite.verify(key.public_key(), b"data", suite.sign(loaded, b"data"))


def test_sm2_der_uses_ec_public_key_with_the_sm2_curve_oid() -> None:
    key = key_of(KeyAlgorithm.SM2)
    spki = asn1_keys.PublicKeyInfo.load(public_key_to_der(key.public_key()))
    assert spki["algorithm"]["algorithm"].dotted == "1.2.840.10045.2.1"
    assert spki["algorithm"]["parameters"].chosen.dotted == "1.2.156.10197.1.301"
    pkcs8 = asn1_keys.PrivateKeyInfo.load(private_key_to_der(key))
    assert pkcs8["private_key_algorithm"]["parameters"].chosen.dotted == "1.2.156.10197.1.301"
    sec1 = pkcs8["private_key"].parsed
    assert len(sec1["private_key"].contents) == 32  # full-width scalar, as SEC1 demands


# -- passwords -------------------------------------------------------------------------


def test_encrypted_pkcs8_needs_the_right_password() -> None:
    key = key_of(KeyAlgorithm.EC_P256)
    encrypted = key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    assert load_private_key(encrypted, b"correct horse").public_key() == key.public_key()
    with pytest.raises(InvalidKey, match="password"):
        load_private_key(encrypted)
    with pytest.raises(InvalidKey, match="password"):
        load_private_key(encrypted, b"wrong horse")
    with pytest.raises(InvalidKey, match="not encrypted"):
        load_private_key(private_key_to_pem(key), b"correct horse")


# -- malformed and unsupported input ---------------------------------------------------


def _spki_with_point(point: bytes) -> bytes:
    der = public_key_to_der(key_of(KeyAlgorithm.SM2).public_key())
    return der[: -len(point)] + point


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"\x30\x03\x02\x01\x00", id="tiny-der"),
        pytest.param(b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", id="bad-b64"),
        pytest.param(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n", id="cert"),
        pytest.param("not bytes", id="str"),
    ],
)
def test_malformed_keys_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidKey):
        load_private_key(data)
    with pytest.raises(InvalidKey):
        load_public_key(data)


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_truncated_der_is_invalid(alg: KeyAlgorithm) -> None:
    key = key_of(alg)
    with pytest.raises(InvalidKey):
        load_private_key(private_key_to_der(key)[:-3])
    with pytest.raises(InvalidKey):
        load_public_key(public_key_to_der(key.public_key())[:-3])


def test_public_key_pem_is_not_a_private_key() -> None:
    pem = public_key_to_pem(key_of(KeyAlgorithm.EC_P256).public_key())
    with pytest.raises(InvalidKey, match="no private key"):
        load_private_key(pem)


def test_sm2_public_key_off_the_curve_is_invalid() -> None:
    point = bytearray(key_of(KeyAlgorithm.SM2).public_key().public_bytes())  # type: ignore[union-attr]
    point[-1] ^= 1
    with pytest.raises(InvalidKey, match="point"):
        load_public_key(_spki_with_point(bytes(point)))
    with pytest.raises(InvalidKey):
        SM2PublicKey.from_bytes(bytes(point))


def test_sm2_public_key_bytes_are_checked() -> None:
    good = key_of(KeyAlgorithm.SM2).public_key().public_bytes()  # type: ignore[union-attr]
    for bad in (good[:-1], b"\x02" + good[1:33], b"\x05" + good[1:], bytes(65)):
        with pytest.raises(InvalidKey):
            SM2PublicKey.from_bytes(bad)
    # x = p is outside the field even though x mod p may look fine to naive arithmetic
    outside = b"\x04" + SM2P256V1.p.to_bytes(32, "big") + good[33:]
    with pytest.raises(InvalidKey):
        SM2PublicKey.from_bytes(outside)


@pytest.mark.parametrize("d", [0, SM2P256V1.n - 1, SM2P256V1.n, -1])
def test_sm2_private_scalar_out_of_range_is_invalid(d: int) -> None:
    with pytest.raises(InvalidKey):
        SM2PrivateKey(d)


#: an SM2 scalar whose big-endian bytes start with 0x00 (1 key in 256)
SM2_D_WITH_LEADING_ZERO = 0xB32CCBB0_AEEB8DDD_0FFF6C02_77EDC98F_82D08887_22303EC8_9ABEBE83_4B6E4E


def test_sm2_private_scalar_is_exported_at_full_width() -> None:
    key = SM2PrivateKey(SM2_D_WITH_LEADING_ZERO)
    assert key.private_bytes()[0] == 0
    der = private_key_to_der(key)
    assert b"\x04\x20" + key.private_bytes() in der  # OCTET STRING of 32 bytes (RFC 5915)
    assert load_private_key(der).private_bytes() == key.private_bytes()  # type: ignore[union-attr]


def test_openssl_reencodes_a_short_sm2_scalar_as_we_do(openssl_sm2: OpenSSL) -> None:
    key = SM2PrivateKey(SM2_D_WITH_LEADING_ZERO)
    private = openssl_sm2.write("key.pem", private_key_to_pem(key))
    der = openssl_sm2.run("pkcs8", "-topk8", "-nocrypt", "-in", private, "-outform", "DER")
    assert der.stdout == private_key_to_der(key)


def test_sm2_private_key_with_a_mismatched_embedded_public_key_is_invalid() -> None:
    der = private_key_to_der(key_of(KeyAlgorithm.SM2))
    other_point = generate_private_key(KeyAlgorithm.SM2).public_key().public_bytes()  # type: ignore[union-attr]
    tampered = der[: -len(other_point)] + other_point
    with pytest.raises(InvalidKey, match="does not match"):
        load_private_key(tampered)


def test_sm2_pkcs8_with_a_malformed_inner_key_is_invalid() -> None:
    algorithm = asn1_keys.PrivateKeyAlgorithm(
        {
            "algorithm": "ec",
            "parameters": asn1_keys.ECDomainParameters(name="named", value="1.2.156.10197.1.301"),
        }
    ).dump()
    body = b"\x02\x01\x00" + algorithm + b"\x04\x07garbage"
    pkcs8 = b"\x30" + bytes([len(body)]) + body
    with pytest.raises(InvalidKey, match="SM2 private key is malformed"):
        load_private_key(pkcs8)


def test_sm2_user_id_length_is_limited() -> None:
    key = key_of(KeyAlgorithm.SM2)
    key.with_uid(b"u" * 8191)  # type: ignore[union-attr]
    with pytest.raises(InvalidKey):
        key.with_uid(b"u" * 8192)  # type: ignore[union-attr]


def test_sm2_private_key_repr_hides_the_scalar() -> None:
    key = key_of(KeyAlgorithm.SM2)
    secret_hex = key.private_bytes().hex()  # type: ignore[union-attr]
    assert secret_hex not in repr(key)
    assert str(int(secret_hex, 16)) not in repr(key)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p384"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa-1024"),  # noqa: S505
        pytest.param(ed448.Ed448PrivateKey.generate, id="ed448"),
        pytest.param(lambda: dsa.generate_private_key(2048), id="dsa"),
    ],
)
def test_unsupported_kinds_are_refused_on_load(key) -> None:
    private = key()
    pkcs8 = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidKey):
        load_private_key(pkcs8)
    with pytest.raises(InvalidKey):
        load_public_key(spki)


def test_export_checks_public_versus_private() -> None:
    key = key_of(KeyAlgorithm.SM2)
    with pytest.raises(InvalidKey):
        private_key_to_der(key.public_key())  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        public_key_to_der(key)  # type: ignore[arg-type]


# -- OpenSSL 3 interoperability --------------------------------------------------------


@pytest.mark.parametrize("alg", ASYMMETRIC, ids=str)
def test_openssl_reads_our_keys(request: pytest.FixtureRequest, alg: KeyAlgorithm) -> None:
    openssl: OpenSSL = request.getfixturevalue(
        "openssl_sm2" if alg is KeyAlgorithm.SM2 else "openssl"
    )
    key = key_of(alg)
    private = openssl.write("key.pem", private_key_to_pem(key))
    public = openssl.write("pub.pem", public_key_to_pem(key.public_key()))
    openssl.run("pkey", "-in", private, "-noout")
    openssl.run("pkey", "-pubin", "-in", public, "-noout")
    # and writes back exactly our encoding
    der = openssl.run("pkcs8", "-topk8", "-nocrypt", "-in", private, "-outform", "DER").stdout
    assert der == private_key_to_der(key)
    assert openssl.run("pkey", "-pubin", "-in", public, "-outform", "DER").stdout == (
        public_key_to_der(key.public_key())
    )


def test_openssl_reads_our_sm2_public_key_as_sm2(openssl_sm2: OpenSSL) -> None:
    openssl = openssl_sm2
    public = openssl.write("pub.pem", public_key_to_pem(key_of(KeyAlgorithm.SM2).public_key()))
    text = openssl.run("pkey", "-pubin", "-in", public, "-noout", "-text").stdout
    assert b"ASN1 OID: SM2" in text


def test_we_read_openssl_sm2_keys_in_every_container(openssl_sm2: OpenSSL) -> None:
    openssl = openssl_sm2
    openssl.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:SM2",
                "-out", openssl.workdir / "pkcs8.pem")  # fmt: skip
    pkcs8 = (openssl.workdir / "pkcs8.pem").read_bytes()
    reference = load_private_key(pkcs8)
    assert isinstance(reference, SM2PrivateKey)

    sec1 = openssl.run("ec", "-in", openssl.workdir / "pkcs8.pem").stdout
    assert b"SM2 PRIVATE KEY" in sec1
    encrypted = openssl.run("pkcs8", "-topk8", "-in", openssl.workdir / "pkcs8.pem",
                            "-v2", "aes-256-cbc", "-passout", "pass:s3cret").stdout  # fmt: skip
    public = openssl.run("pkey", "-in", openssl.workdir / "pkcs8.pem", "-pubout").stdout
    der = openssl.run("pkey", "-in", openssl.workdir / "pkcs8.pem", "-outform", "DER").stdout

    for other in (load_private_key(sec1), load_private_key(encrypted, b"s3cret"),
                  load_private_key(der)):  # fmt: skip
        assert other.public_key() == reference.public_key()
    assert load_public_key(public) == reference.public_key()
    with pytest.raises(InvalidKey, match="password"):
        load_private_key(encrypted, b"wrong")
    with pytest.raises(InvalidKey, match="password"):
        load_private_key(encrypted)


def test_openssl_ecparam_genkey_output_with_parameters_block_loads(openssl_sm2: OpenSSL) -> None:
    openssl = openssl_sm2
    pem = openssl.run("ecparam", "-name", "SM2", "-genkey").stdout
    assert pem.index(b"PARAMETERS") < pem.index(b"PRIVATE KEY")
    assert isinstance(load_private_key(pem), SM2PrivateKey)
    p256 = openssl.run("ecparam", "-name", "prime256v1", "-genkey").stdout
    assert algorithm_of(load_private_key(p256)) is KeyAlgorithm.EC_P256


@pytest.mark.parametrize("uid", [DEFAULT_UID, b"alice@example.com"])
def test_sm2_signatures_interoperate_with_openssl(openssl_sm2: OpenSSL, uid: bytes) -> None:
    openssl = openssl_sm2
    suite = get_suite("gm")
    key = key_of(KeyAlgorithm.SM2).with_uid(uid)  # type: ignore[union-attr]
    private = openssl.write("key.pem", private_key_to_pem(key))
    public = openssl.write("pub.pem", public_key_to_pem(key.public_key()))
    message = openssl.write("msg", b"meter firmware")
    distid = "distid:" + uid.decode()  # OpenSSL 3.0's pkeyutl default ID is empty

    ours = openssl.write("ours.sig", suite.sign(key, b"meter firmware"))
    verified = openssl.run("pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin",
                           "-digest", "sm3", "-pkeyopt", distid, "-in", message,
                           "-sigfile", ours, check=False)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    other_id = openssl.run("pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin",
                           "-digest", "sm3", "-pkeyopt", "distid:someone else", "-in", message,
                           "-sigfile", ours, check=False)  # fmt: skip
    assert other_id.returncode != 0  # the user ID is part of what was signed

    theirs = openssl.run("pkeyutl", "-sign", "-inkey", private, "-rawin", "-digest", "sm3",
                         "-pkeyopt", distid, "-in", message).stdout  # fmt: skip
    suite.verify(key.public_key(), b"meter firmware", theirs)
    with pytest.raises(InvalidSignature):
        suite.verify(key.public_key(), b"meter firmwarE", theirs)
    with pytest.raises(InvalidSignature):
        suite.verify(key.public_key().with_uid(b"someone else"), b"meter firmware", theirs)


class _GMT0009Ciphertext(asn1_core.Sequence):  # type: ignore[misc]
    """GM/T 0009 SM2 ciphertext, what OpenSSL's SM2 encryption writes:
    SEQUENCE { x INTEGER, y INTEGER, hash OCTET STRING (C3), ciphertext OCTET STRING (C2) }.
    """

    _fields = [
        ("x", asn1_core.Integer),
        ("y", asn1_core.Integer),
        ("hash", asn1_core.OctetString),
        ("ciphertext", asn1_core.OctetString),
    ]


def _from_gmt0009(der: bytes) -> bytes:
    """OpenSSL's DER ciphertext as our C1 || C3 || C2."""
    value = _GMT0009Ciphertext.load(der, strict=True)
    x, y = value["x"].native, value["y"].native
    c1 = b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")
    return c1 + value["hash"].native + value["ciphertext"].native


def _to_gmt0009(ciphertext: bytes) -> bytes:
    """Our C1 || C3 || C2 as OpenSSL's DER ciphertext."""
    return _GMT0009Ciphertext(
        {
            "x": int.from_bytes(ciphertext[1:33], "big"),
            "y": int.from_bytes(ciphertext[33:65], "big"),
            "hash": ciphertext[65:97],
            "ciphertext": ciphertext[97:],
        }
    ).dump()


@pytest.mark.parametrize("length", [1, 16, 100])
def test_sm2_encryption_interoperates_with_openssl(openssl_sm2: OpenSSL, length: int) -> None:
    openssl = openssl_sm2
    key = key_of(KeyAlgorithm.SM2)
    assert isinstance(key, SM2PrivateKey)
    private = openssl.write("key.pem", private_key_to_pem(key))
    public = openssl.write("pub.pem", public_key_to_pem(key.public_key()))
    message = bytes(range(1, length + 1))

    ours = openssl.write("ours.der", _to_gmt0009(key.public_key().encrypt(message)))
    decrypted = openssl.run("pkeyutl", "-decrypt", "-inkey", private, "-in", ours, check=False)
    assert decrypted.returncode == 0, decrypted.stderr
    assert decrypted.stdout == message

    plain = openssl.write("plain", message)
    theirs = openssl.run("pkeyutl", "-encrypt", "-pubin", "-inkey", public, "-in", plain).stdout
    converted = _from_gmt0009(theirs)
    assert len(converted) == 65 + 32 + length
    assert key.decrypt(converted) == message
    tampered = bytearray(converted)
    tampered[70] ^= 1  # in C3
    with pytest.raises(DecryptionFailed):
        key.decrypt(bytes(tampered))


def test_gm_kem_wrapped_key_interoperates_with_openssl(openssl_sm2: OpenSSL) -> None:
    """The gm KEM's first 113 bytes are a plain SM2 ciphertext of its SM4 key."""
    openssl = openssl_sm2
    suite = get_suite("gm")
    key = key_of(KeyAlgorithm.SM2)
    private = openssl.write("key.pem", private_key_to_pem(key))
    public = openssl.write("pub.pem", public_key_to_pem(key.public_key()))
    zero_nonce = bytes(12)

    blob = suite.kem_wrap(key.public_key(), b"tmk bytes", b"ctx")
    wrapped_key = openssl.write("wrapped.der", _to_gmt0009(blob[:113]))
    content_key = openssl.run("pkeyutl", "-decrypt", "-inkey", private, "-in", wrapped_key).stdout
    assert suite.aead_open(content_key, zero_nonce, blob[113:], b"ctx") == b"tmk bytes"

    content_key = os.urandom(16)
    plain = openssl.write("content_key", content_key)
    theirs = openssl.run("pkeyutl", "-encrypt", "-pubin", "-inkey", public, "-in", plain).stdout
    blob = _from_gmt0009(theirs) + suite.aead_seal(content_key, zero_nonce, b"tmk", b"ctx")
    assert suite.kem_unwrap(key, blob, b"ctx") == b"tmk"


def test_rsa_oaep_label_and_pss_salt_interoperate_with_openssl(openssl: OpenSSL) -> None:
    suite = get_suite("rsa")
    key = key_of(KeyAlgorithm.RSA_3072)
    private = openssl.write("key.pem", private_key_to_pem(key))
    wrapped = openssl.write("wrapped", suite.kem_wrap(key.public_key(), b"k" * 16, b"label-1"))
    unwrapped = openssl.run("pkeyutl", "-decrypt", "-inkey", private, "-in", wrapped,
                            "-pkeyopt", "rsa_padding_mode:oaep",
                            "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256",
                            "-pkeyopt", "rsa_oaep_label:" + b"label-1".hex()).stdout  # fmt: skip
    assert unwrapped == b"k" * 16

    message = openssl.write("msg", b"data")
    signature = openssl.write("sig", suite.sign(key, b"data"))
    verified = openssl.run("pkeyutl", "-verify", "-inkey", private, "-rawin", "-digest",
                           "sha256", "-in", message, "-sigfile", signature,
                           "-pkeyopt", "rsa_padding_mode:pss",
                           "-pkeyopt", "rsa_pss_saltlen:32", check=False)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
