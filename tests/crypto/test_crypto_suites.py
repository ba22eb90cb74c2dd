"""Behaviour every suite shares, and the attacks and bad input each must refuse.

Errors are always trustfleet's own (pytest.raises with our class fails on any pyca
exception leaking out).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from trustfleet.crypto import SUITES, get_suite
from trustfleet.crypto.base import KeyAlgorithm, Suite
from trustfleet.errors import (
    DecryptionFailed,
    InvalidInput,
    InvalidKey,
    InvalidSignature,
    UnsupportedAlgorithm,
)

from .conftest import SuiteKeys, keys_for

MESSAGE = b"firmware image 1.2.3"
INFO = b"session 42"


def flip(data: bytes, index: int = -1) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- the registry ----------------------------------------------------------------------


def test_the_four_suites_are_registered_by_name() -> None:
    assert set(SUITES) == {"p256", "ed25519", "rsa", "gm"}
    for name, suite in SUITES.items():
        assert suite.name == name
        assert get_suite(name) is suite  # one shared instance
        assert isinstance(suite, Suite)


@pytest.mark.parametrize("name", ["P256", "sm2", "", "aes"])
def test_unknown_suite_name_is_unsupported(name: str) -> None:
    with pytest.raises(UnsupportedAlgorithm):
        get_suite(name)


def test_suite_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        SUITES["evil"] = SUITES["p256"]  # type: ignore[index]


# -- signatures ------------------------------------------------------------------------


def test_sign_verify_round_trip(suite_keys: SuiteKeys) -> None:
    suite, key = suite_keys.suite, suite_keys.signing
    signature = suite.sign(key, MESSAGE)
    suite.verify(key.public_key(), MESSAGE, signature)


def test_signing_key_has_the_declared_algorithm(suite_keys: SuiteKeys) -> None:
    from trustfleet.crypto import algorithm_of

    suite = suite_keys.suite
    assert algorithm_of(suite_keys.signing) is suite.signing_algorithm
    assert algorithm_of(suite_keys.kem) is suite.kem_algorithm


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda sig, msg: (flip(sig), msg), id="tampered-signature"),
        pytest.param(lambda sig, msg: (flip(sig, 10), msg), id="tampered-middle"),
        pytest.param(lambda sig, msg: (sig, msg + b"!"), id="other-message"),
        pytest.param(lambda sig, msg: (sig[:-1], msg), id="truncated"),
        pytest.param(lambda sig, msg: (b"", msg), id="empty"),
        pytest.param(lambda sig, msg: (b"\x30\x00", msg), id="empty-der"),
        pytest.param(lambda sig, msg: (sig + b"\x00", msg), id="trailing-byte"),
    ],
)
def test_forged_signatures_are_rejected(suite_keys: SuiteKeys, forge) -> None:
    suite, key = suite_keys.suite, suite_keys.signing
    signature, message = forge(suite.sign(key, MESSAGE), MESSAGE)
    with pytest.raises(InvalidSignature):
        suite.verify(key.public_key(), message, signature)


def test_signature_of_another_key_is_rejected(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    signature = suite.sign(suite_keys.other_signing, MESSAGE)
    with pytest.raises(InvalidSignature):
        suite.verify(suite_keys.signing.public_key(), MESSAGE, signature)


# -- key transport ---------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"\x00" * 16, b"k" * 32, b"x"], ids=len)
def test_kem_round_trip(suite_keys: SuiteKeys, plaintext: bytes) -> None:
    suite, key = suite_keys.suite, suite_keys.kem
    wrapped = suite.kem_wrap(key.public_key(), plaintext, INFO)
    if len(plaintext) >= 16:  # a short plaintext may show up in random bytes by chance
        assert plaintext not in wrapped
    assert suite.kem_unwrap(key, wrapped, INFO) == plaintext


def test_kem_wrap_is_randomised(suite_keys: SuiteKeys) -> None:
    suite, public = suite_keys.suite, suite_keys.kem.public_key()
    assert suite.kem_wrap(public, b"k" * 16, INFO) != suite.kem_wrap(public, b"k" * 16, INFO)


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(lambda ct, info: (flip(ct), info), id="tampered-last-byte"),
        pytest.param(lambda ct, info: (flip(ct, 0), info), id="tampered-first-byte"),
        pytest.param(lambda ct, info: (flip(ct, len(ct) // 2), info), id="tampered-middle"),
        pytest.param(lambda ct, info: (ct, info + b"x"), id="other-info"),
        pytest.param(lambda ct, info: (ct, b""), id="empty-info"),
        pytest.param(lambda ct, info: (ct[:-1], info), id="truncated"),
        pytest.param(lambda ct, info: (ct[:20], info), id="much-too-short"),
        pytest.param(lambda ct, info: (b"", info), id="empty"),
        pytest.param(lambda ct, info: (ct + b"\x00", info), id="trailing-byte"),
    ],
)
def test_kem_unwrap_refuses_tampering(suite_keys: SuiteKeys, attack) -> None:
    suite, key = suite_keys.suite, suite_keys.kem
    ciphertext, info = attack(suite.kem_wrap(key.public_key(), b"k" * 16, INFO), INFO)
    with pytest.raises(DecryptionFailed):
        suite.kem_unwrap(key, ciphertext, info)


def test_kem_unwrap_with_another_key_fails(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    wrapped = suite.kem_wrap(suite_keys.kem.public_key(), b"k" * 16, INFO)
    with pytest.raises(DecryptionFailed):
        suite.kem_unwrap(suite_keys.other_kem, wrapped, INFO)


# -- AEAD ------------------------------------------------------------------------------


def _aead_inputs(suite: Suite) -> tuple[bytes, bytes]:
    return bytes(range(suite.aead_key_size)), b"\x07" * suite.aead_nonce_size


@pytest.mark.parametrize("plaintext", [b"", b"meter reading 42", b"\xaa" * 1000], ids=len)
def test_aead_round_trip(suite_keys: SuiteKeys, plaintext: bytes) -> None:
    suite = suite_keys.suite
    key, nonce = _aead_inputs(suite)
    sealed = suite.aead_seal(key, nonce, plaintext, b"header")
    assert len(sealed) == len(plaintext) + 16
    assert suite.aead_open(key, nonce, sealed, b"header") == plaintext


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(lambda k, n, c, a: (k, n, flip(c), a), id="tampered-tag"),
        pytest.param(lambda k, n, c, a: (k, n, flip(c, 0), a), id="tampered-body"),
        pytest.param(lambda k, n, c, a: (k, n, c, a + b"x"), id="other-aad"),
        pytest.param(lambda k, n, c, a: (k, flip(n), c, a), id="other-nonce"),
        pytest.param(lambda k, n, c, a: (flip(k), n, c, a), id="other-key"),
        pytest.param(lambda k, n, c, a: (k, n, c[:15], a), id="shorter-than-tag"),
        pytest.param(lambda k, n, c, a: (k, n, b"", a), id="empty"),
    ],
)
def test_aead_open_refuses_tampering(suite_keys: SuiteKeys, attack) -> None:
    suite = suite_keys.suite
    key, nonce = _aead_inputs(suite)
    sealed = suite.aead_seal(key, nonce, b"meter reading 42", b"header")
    key, nonce, sealed, aad = attack(key, nonce, sealed, b"header")
    with pytest.raises(DecryptionFailed):
        suite.aead_open(key, nonce, sealed, aad)


def test_aead_refuses_wrong_key_and_nonce_sizes(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    key, nonce = _aead_inputs(suite)
    for bad_key in (key[:-1], key + b"\x00", b""):
        with pytest.raises(InvalidKey):
            suite.aead_seal(bad_key, nonce, b"p", b"")
        with pytest.raises(InvalidKey):
            suite.aead_open(bad_key, nonce, b"\x00" * 32, b"")
    for bad_nonce in (nonce[:-1], nonce + b"\x00", b""):
        with pytest.raises(InvalidInput):
            suite.aead_seal(key, bad_nonce, b"p", b"")
        with pytest.raises(InvalidInput):
            suite.aead_open(key, bad_nonce, b"\x00" * 32, b"")


# -- MAC, CMAC, hash, KDF --------------------------------------------------------------


def test_mac_depends_on_key_and_data(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    tag = suite.mac(b"key-1", b"data")
    assert len(tag) == suite.digest_size
    assert tag == suite.mac(b"key-1", b"data")
    assert tag != suite.mac(b"key-2", b"data")
    assert tag != suite.mac(b"key-1", b"date")
    suite.mac_verify(b"key-1", b"data", tag)
    for forged in (flip(tag), tag[:-1], b""):
        with pytest.raises(InvalidSignature):
            suite.mac_verify(b"key-1", b"data", forged)


def test_cmac_is_a_block_mac_with_checked_key(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    tag = suite.cmac(b"\x01" * 16, b"data")
    assert len(tag) == 16
    assert tag != suite.cmac(b"\x02" * 16, b"data")
    for bad_key in (b"", b"\x01" * 15, b"\x01" * 17):
        with pytest.raises(InvalidKey):
            suite.cmac(bad_key, b"data")


def test_hash_has_the_declared_size(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    assert len(suite.hash(b"")) == suite.digest_size
    assert suite.hash(b"a") != suite.hash(b"b")


def test_kdf_separates_by_info_and_salt_and_checks_length(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    base = suite.kdf(b"secret", salt=b"s", info=b"enc", length=32)
    assert len(base) == 32
    assert base != suite.kdf(b"secret", salt=b"s", info=b"mac", length=32)
    assert base != suite.kdf(b"secret", salt=b"t", info=b"enc", length=32)
    assert suite.kdf(b"secret", salt=b"s", info=b"enc", length=16) == base[:16]
    for bad_length in (0, -1, 255 * suite.digest_size + 1):
        with pytest.raises(InvalidInput):
            suite.kdf(b"secret", salt=b"s", info=b"enc", length=bad_length)


# -- wrong key types -------------------------------------------------------------------


def _foreign_keys(suite: Suite) -> list[object]:
    """Private keys of every *other* suite, plus keys no suite accepts."""
    foreign: list[object] = [keys_for(name).signing for name in SUITES if name != suite.name]
    foreign += [ec.generate_private_key(ec.SECP384R1()), b"raw bytes", None]
    return foreign


def test_keys_of_the_wrong_kind_are_invalid(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    signature = suite.sign(suite_keys.signing, MESSAGE)
    wrapped = suite.kem_wrap(suite_keys.kem.public_key(), b"k" * 16, INFO)
    for foreign in _foreign_keys(suite):
        foreign_public = foreign.public_key() if hasattr(foreign, "public_key") else foreign
        with pytest.raises(InvalidKey):
            suite.sign(foreign, MESSAGE)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            suite.verify(foreign_public, MESSAGE, signature)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            suite.kem_wrap(foreign_public, b"k" * 16, INFO)  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            suite.kem_unwrap(foreign, wrapped, INFO)  # type: ignore[arg-type]


def test_private_key_is_not_accepted_where_a_public_key_is_needed(suite_keys: SuiteKeys) -> None:
    suite = suite_keys.suite
    signature = suite.sign(suite_keys.signing, MESSAGE)
    with pytest.raises(InvalidKey):
        suite.verify(suite_keys.signing, MESSAGE, signature)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        suite.kem_wrap(suite_keys.kem, b"k" * 16, INFO)  # type: ignore[arg-type]


def test_ed25519_suite_keeps_signing_and_kem_keys_apart() -> None:
    suite = get_suite("ed25519")
    signing, kem = suite.generate_signing_key(), suite.generate_kem_key()
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    assert isinstance(kem, x25519.X25519PrivateKey)
    with pytest.raises(InvalidKey):
        suite.kem_wrap(signing.public_key(), b"k", INFO)
    with pytest.raises(InvalidKey):
        suite.sign(kem, MESSAGE)


# -- key agreement ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p256", "ed25519"])
def test_key_agreement_gives_both_sides_the_same_secret(name: str) -> None:
    suite = get_suite(name)
    alice, bob, eve = (suite.generate_kem_key() for _ in range(3))
    shared = suite.key_agreement(alice, bob.public_key())
    assert shared == suite.key_agreement(bob, alice.public_key())
    assert len(shared) == 32
    assert shared != suite.key_agreement(eve, bob.public_key())


@pytest.mark.parametrize("name", ["rsa", "gm"])
def test_key_agreement_is_unsupported_without_static_dh(name: str) -> None:
    keys = keys_for(name)
    with pytest.raises(UnsupportedAlgorithm):
        keys.suite.key_agreement(keys.kem, keys.other_kem.public_key())


def test_key_agreement_refuses_other_curves_and_low_order_points() -> None:
    p256, x = get_suite("p256"), get_suite("ed25519")
    mine = p256.generate_kem_key()
    with pytest.raises(InvalidKey):
        p256.key_agreement(mine, ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(InvalidKey):
        x.key_agreement(x.generate_kem_key(), x25519.X25519PublicKey.from_public_bytes(bytes(32)))
    with pytest.raises(InvalidKey):
        x.key_agreement(x.generate_kem_key(), mine.public_key())


# -- suite specifics -------------------------------------------------------------------


def test_suites_declare_their_algorithms() -> None:
    declared = {
        name: (s.signing_algorithm, s.kem_algorithm, s.aead_key_size, s.digest_size)
        for name, s in SUITES.items()
    }
    assert declared == {
        "p256": (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P256, 16, 32),
        "ed25519": (KeyAlgorithm.ED25519, KeyAlgorithm.X25519, 32, 32),
        "rsa": (KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_3072, 16, 32),
        "gm": (KeyAlgorithm.SM2, KeyAlgorithm.SM2, 16, 32),
    }
    assert all(s.aead_nonce_size == 12 for s in SUITES.values())


def test_p256_signatures_are_der_ecdsa_sha256() -> None:
    from cryptography.hazmat.primitives import hashes

    keys = keys_for("p256")
    signature = keys.suite.sign(keys.signing, MESSAGE)
    assert signature[0] == 0x30  # DER SEQUENCE
    keys.signing.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, union-attr]


def test_rsa_refuses_keys_under_2048_bits_and_accepts_2048() -> None:
    suite = get_suite("rsa")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    with pytest.raises(InvalidKey):
        suite.sign(small, MESSAGE)
    with pytest.raises(InvalidKey):
        suite.verify(small.public_key(), MESSAGE, b"\x00" * 128)
    with pytest.raises(InvalidKey):
        suite.kem_wrap(small.public_key(), b"k" * 16, INFO)
    with pytest.raises(InvalidKey):
        suite.kem_unwrap(small, b"\x00" * 128, INFO)

    legacy = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    suite.verify(legacy.public_key(), MESSAGE, suite.sign(legacy, MESSAGE))
    wrapped = suite.kem_wrap(legacy.public_key(), b"k" * 16, INFO)
    assert len(wrapped) == 256
    assert suite.kem_unwrap(legacy, wrapped, INFO) == b"k" * 16


def test_rsa_new_keys_are_3072_bits() -> None:
    keys = keys_for("rsa")
    assert keys.signing.key_size == 3072  # type: ignore[union-attr]
    assert keys.kem.key_size == 3072  # type: ignore[union-attr]


def test_rsa_kem_refuses_plaintext_too_long_for_oaep() -> None:
    keys = keys_for("rsa")
    longest = 384 - 2 * 32 - 2  # RFC 8017 7.1.1: k - 2 hLen - 2
    keys.suite.kem_wrap(keys.kem.public_key(), b"k" * longest, INFO)
    with pytest.raises(InvalidInput):
        keys.suite.kem_wrap(keys.kem.public_key(), b"k" * (longest + 1), INFO)


def test_rsa_pss_and_oaep_parameters_match_pyca_spelled_out() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    keys = keys_for("rsa")
    private: rsa.RSAPrivateKey = keys.signing  # type: ignore[assignment]
    mgf = padding.MGF1(hashes.SHA256())
    signature = keys.suite.sign(private, MESSAGE)
    private.public_key().verify(
        signature, MESSAGE, padding.PSS(mgf=mgf, salt_length=32), hashes.SHA256()
    )
    own = private.sign(MESSAGE, padding.PSS(mgf=mgf, salt_length=32), hashes.SHA256())
    keys.suite.verify(private.public_key(), MESSAGE, own)

    wrapped = keys.suite.kem_wrap(private.public_key(), b"k" * 16, INFO)
    oaep = padding.OAEP(mgf=mgf, algorithm=hashes.SHA256(), label=INFO)
    assert private.decrypt(wrapped, oaep) == b"k" * 16


def test_gm_kem_format_is_sm2_wrapped_sm4_key_then_sm4_gcm() -> None:
    from trustfleet.crypto._common import sm4_gcm_open

    keys = keys_for("gm")
    wrapped = keys.suite.kem_wrap(keys.kem.public_key(), b"p" * 20, INFO)
    assert len(wrapped) == 113 + 20 + 16
    assert wrapped[0] == 0x04  # C1 is an uncompressed point
    content_key = keys.kem.decrypt(wrapped[:113])  # type: ignore[union-attr]
    assert len(content_key) == 16
    assert sm4_gcm_open(content_key, bytes(12), wrapped[113:], INFO) == b"p" * 20


def test_gm_signs_under_the_key_uid() -> None:
    from trustfleet.crypto.sm2 import DEFAULT_UID

    keys = keys_for("gm")
    suite, key = keys.suite, keys.signing
    assert key.uid == DEFAULT_UID  # type: ignore[union-attr]
    alice = key.with_uid(b"alice@example.com")  # type: ignore[union-attr]
    signature = suite.sign(alice, MESSAGE)
    suite.verify(alice.public_key(), MESSAGE, signature)
    with pytest.raises(InvalidSignature):
        suite.verify(key.public_key(), MESSAGE, signature)


@pytest.mark.parametrize(
    ("name", "bad_enc"),
    [
        ("p256", b"\x04" + bytes(64)),  # not on the curve
        ("ed25519", bytes(32)),  # low-order X25519 point
    ],
)
def test_hpke_unwrap_refuses_invalid_ephemeral_keys(name: str, bad_enc: bytes) -> None:
    keys = keys_for(name)
    wrapped = keys.suite.kem_wrap(keys.kem.public_key(), b"k" * 16, INFO)
    with pytest.raises(DecryptionFailed):
        keys.suite.kem_unwrap(keys.kem, bad_enc + wrapped[len(bad_enc) :], INFO)
