"""Behaviour both key store backends share, run on each (``keystore`` fixture): the soft
store, and the PKCS#11 backend as configured (signing keys in the token, every other key
sealed under it, each operation in the token where SoftHSM2 can run it and in process
otherwise): callers see no difference."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import algorithms

from trustfleet.crypto import (
    KeyAlgorithm,
    SM2PrivateKey,
    generate_private_key,
    load_public_key,
    private_key_to_der,
    public_key_to_der,
    suite_for_algorithm,
)
from trustfleet.errors import (
    DecryptionFailed,
    InvalidInput,
    InvalidKey,
    InvalidSignature,
    KeyNotExportable,
    KeyNotFound,
    KeyUsageNotAllowed,
)
from trustfleet.keystore.base import KeyStore, KeyUsage

from .conftest import backend_cases

pytestmark = pytest.mark.parametrize(
    ("backend_name", "database_url"), backend_cases(), indirect=["database_url"]
)

U = KeyUsage
A = KeyAlgorithm
SIGNING = [A.EC_P256, A.ED25519, A.RSA_2048, A.SM2]
AEAD = U.ENCRYPT | U.DECRYPT


# -- signatures ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", SIGNING, ids=str)
def test_signatures_verify_with_the_public_key_and_the_suite(
    keystore: KeyStore, algorithm: KeyAlgorithm
) -> None:
    key = keystore.generate(algorithm, U.SIGN, label="device-7")
    suite = suite_for_algorithm(algorithm)
    signature = keystore.sign(key.handle, b"firmware image")

    public = keystore.public_key(key.handle)
    suite.verify(public, b"firmware image", signature)
    assert key.public_key_der == public_key_to_der(public)
    assert load_public_key(key.public_key_der) == public
    with pytest.raises(InvalidSignature):
        suite.verify(public, b"firmware imagE", signature)
    info = keystore.info(key.handle)
    assert (info.algorithm, info.usage, info.label, info.exportable) == (
        algorithm,
        U.SIGN,
        "device-7",
        False,
    )
    assert info.backend == keystore.backend


def test_signing_key_generated_elsewhere_can_be_imported(keystore: KeyStore) -> None:
    private = generate_private_key(A.EC_P256)
    key = keystore.import_key(A.EC_P256, private_key_to_der(private), U.SIGN)
    assert keystore.public_key(key.handle) == private.public_key()
    suite_for_algorithm(A.EC_P256).verify(
        private.public_key(), b"m", keystore.sign(key.handle, b"m")
    )


def test_import_rejects_junk_and_the_wrong_algorithm(keystore: KeyStore) -> None:
    with pytest.raises(InvalidKey):
        keystore.import_key(A.EC_P256, b"\x30\x03\x02\x01\x00", U.SIGN)
    ed = generate_private_key(A.ED25519)
    with pytest.raises(InvalidKey):
        keystore.import_key(A.EC_P256, private_key_to_der(ed), U.SIGN)
    with pytest.raises(InvalidKey):
        keystore.import_key(A.AES_256, os.urandom(16), U.ENCRYPT)
    with pytest.raises(InvalidKey):  # 2-key TDES with K1 == K2 is single DES
        keystore.import_key(A.TDES, b"\x01" * 16, U.MAC)


# -- usage flags -----------------------------------------------------------------------


def test_usage_flags_are_enforced_on_every_operation(keystore: KeyStore) -> None:
    signer = keystore.generate(A.EC_P256, U.SIGN)
    aes = keystore.generate(A.AES_256, U.ENCRYPT)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.mac(aes.handle, b"x")
    with pytest.raises(KeyUsageNotAllowed):
        keystore.decrypt(aes.handle, keystore.encrypt(aes.handle, b"x"))
    kek = keystore.generate(A.AES_256, U.WRAP)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.wrap(aes.handle, under=kek.handle)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.wrap(signer.handle, under=keystore.public_key(signer.handle))
    mac_only = keystore.generate(A.HMAC_SHA256, U.MAC)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.encrypt(mac_only.handle, b"x")
    with pytest.raises(KeyUsageNotAllowed):
        keystore.sign(aes.handle, b"x")
    with pytest.raises(KeyUsageNotAllowed):
        keystore.unwrap(aes.handle, b"\x00" * 24, A.AES_128, U.MAC)


def test_usage_the_algorithm_cannot_serve_is_refused_at_creation(keystore: KeyStore) -> None:
    with pytest.raises(InvalidInput):
        keystore.generate(A.ED25519, U.SIGN | U.DECRYPT)
    with pytest.raises(InvalidInput):
        keystore.generate(A.AES_128, U.SIGN)
    with pytest.raises(InvalidInput):
        keystore.generate(A.TDES, U.SIGN)
    with pytest.raises(InvalidInput):
        keystore.generate(A.AES_128, U.MAC, label="x" * 201)


# -- export ----------------------------------------------------------------------------


def test_non_exportable_keys_cannot_be_exported(keystore: KeyStore) -> None:
    secret = keystore.generate(A.AES_128, AEAD)
    private = keystore.generate(A.EC_P256, U.SIGN | U.WRAPPABLE)
    for handle in (secret.handle, private.handle):
        with pytest.raises(KeyNotExportable):
            keystore.export(handle)


def test_exportable_keys_export_material_that_works_elsewhere(keystore: KeyStore) -> None:
    secret = keystore.generate(A.HMAC_SHA256, U.MAC, exportable=True)
    raw = keystore.export(secret.handle)
    assert keystore.mac(secret.handle, b"data") == hmac.new(raw, b"data", "sha256").digest()

    private = keystore.generate(A.EC_P256, U.SIGN, exportable=True)
    reimported = keystore.import_key(A.EC_P256, keystore.export(private.handle), U.SIGN)
    assert keystore.public_key(reimported.handle) == keystore.public_key(private.handle)


# -- symmetric encryption and MACs -----------------------------------------------------


def test_aead_round_trip_is_bound_to_info_and_detects_tampering(keystore: KeyStore) -> None:
    key = keystore.generate(A.AES_256, AEAD)
    sealed = keystore.encrypt(key.handle, b"meter reading 42", info=b"meter-9")
    assert keystore.decrypt(key.handle, sealed, info=b"meter-9") == b"meter reading 42"
    assert sealed != keystore.encrypt(key.handle, b"meter reading 42", info=b"meter-9")
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(key.handle, sealed, info=b"meter-8")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(key.handle, flipped, info=b"meter-9")
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(key.handle, sealed[:20], info=b"meter-9")
    other = keystore.generate(A.AES_256, AEAD)
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(other.handle, sealed, info=b"meter-9")


@pytest.mark.parametrize(
    ("algorithm", "secret", "reference"),
    [
        (A.AES_128, bytes(range(16)), lambda k, d: _cmac(algorithms.AES(k), d)),
        (A.AES_256, bytes(range(32)), lambda k, d: _cmac(algorithms.AES(k), d)),
        (A.HMAC_SHA256, bytes(range(32)), lambda k, d: hmac.new(k, d, "sha256").digest()),
        (A.TDES, bytes(range(1, 17)), lambda k, d: _tdes_cmac(k, d)),
        (A.SM4, bytes(range(16)), lambda k, d: _cmac(algorithms.SM4(k), d)),
        (A.HMAC_SM3, bytes(range(32)), lambda k, d: hmac.new(k, d, "sm3").digest()),
    ],
    ids=str,
)
def test_macs_match_the_standard_algorithms(
    keystore: KeyStore, algorithm: KeyAlgorithm, secret: bytes, reference: object
) -> None:
    key = keystore.import_key(algorithm, secret, U.MAC)
    tag = keystore.mac(key.handle, b"PIN block")
    assert callable(reference)
    assert tag == reference(secret, b"PIN block")
    keystore.mac_verify(key.handle, b"PIN block", tag)
    with pytest.raises(InvalidSignature):
        keystore.mac_verify(key.handle, b"PIN blocK", tag)


def _cmac(cipher: algorithms.AES | algorithms.SM4, data: bytes) -> bytes:
    c = cmac.CMAC(cipher)
    c.update(data)
    return c.finalize()


def _tdes_cmac(key: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

    c = cmac.CMAC(TripleDES(key + key[:8]))
    c.update(data)
    return c.finalize()


# -- wrapping --------------------------------------------------------------------------


def test_wrap_unwrap_round_trip_under_an_aes_key(keystore: KeyStore) -> None:
    kek = keystore.generate(A.AES_256, U.WRAP | U.UNWRAP)
    inner = keystore.generate(A.HMAC_SHA256, U.MAC | U.WRAPPABLE)
    wrapped = keystore.wrap(inner.handle, under=kek.handle)
    copy = keystore.unwrap(kek.handle, wrapped, A.HMAC_SHA256, U.MAC, label="copy")
    assert copy.handle != inner.handle
    assert keystore.info(copy.handle).label == "copy"
    assert keystore.mac(copy.handle, b"x") == keystore.mac(inner.handle, b"x")
    with pytest.raises(DecryptionFailed):
        keystore.unwrap(kek.handle, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), A.HMAC_SHA256, U.MAC)
    other = keystore.generate(A.AES_256, U.UNWRAP)
    with pytest.raises(DecryptionFailed):
        keystore.unwrap(other.handle, wrapped, A.HMAC_SHA256, U.MAC)


def test_only_wrappable_keys_leave_wrapped_and_rfc5649_takes_no_info(keystore: KeyStore) -> None:
    kek = keystore.generate(A.AES_256, U.WRAP | U.UNWRAP)
    stuck = keystore.generate(A.AES_128, AEAD)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.wrap(stuck.handle, under=kek.handle)
    movable = keystore.generate(A.AES_128, AEAD | U.WRAPPABLE)
    with pytest.raises(InvalidInput):
        keystore.wrap(movable.handle, under=kek.handle, info=b"session-1")
    with pytest.raises(InvalidInput):
        keystore.wrap(kek.handle, under=kek.handle)
    not_a_kek = keystore.generate(A.HMAC_SHA256, U.MAC)
    with pytest.raises(KeyUsageNotAllowed):
        keystore.wrap(movable.handle, under=not_a_kek.handle)


def test_private_keys_wrap_as_pkcs8(keystore: KeyStore) -> None:
    from cryptography.hazmat.primitives import keywrap

    kek = keystore.import_key(A.AES_256, bytes(range(32)), U.WRAP)
    private = keystore.generate(A.EC_P256, U.SIGN | U.WRAPPABLE)
    pkcs8 = keywrap.aes_key_unwrap_with_padding(
        bytes(range(32)), keystore.wrap(private.handle, under=kek.handle)
    )
    from trustfleet.crypto import load_private_key

    assert load_private_key(pkcs8).public_key() == keystore.public_key(private.handle)


def test_wrap_to_a_public_key_is_bound_to_info(keystore: KeyStore) -> None:
    inner = keystore.generate(A.AES_128, AEAD | U.WRAPPABLE, exportable=True)
    recipient = generate_private_key(A.EC_P256)
    blob = keystore.wrap(inner.handle, under=recipient.public_key(), info=b"s1")
    suite = suite_for_algorithm(A.EC_P256)
    assert suite.kem_unwrap(recipient, blob, b"s1") == keystore.export(inner.handle)
    with pytest.raises(DecryptionFailed):
        suite.kem_unwrap(recipient, blob, b"s2")


@pytest.mark.parametrize("algorithm", [A.EC_P256, A.X25519, A.RSA_2048, A.SM2], ids=str)
def test_unwrap_with_a_private_key_imports_what_was_sent(
    keystore: KeyStore, algorithm: KeyAlgorithm
) -> None:
    receiver = keystore.generate(algorithm, U.UNWRAP)
    secret = os.urandom(32)
    blob = suite_for_algorithm(algorithm).kem_wrap(
        keystore.public_key(receiver.handle), secret, b"tmk-session"
    )
    key = keystore.unwrap(receiver.handle, blob, A.HMAC_SHA256, U.MAC, info=b"tmk-session")
    assert keystore.mac(key.handle, b"d") == hmac.new(secret, b"d", "sha256").digest()
    with pytest.raises(DecryptionFailed):
        keystore.unwrap(receiver.handle, blob, A.HMAC_SHA256, U.MAC, info=b"other-session")


def test_asymmetric_decrypt_is_the_suite_kem(keystore: KeyStore) -> None:
    algorithm = A.EC_P256
    key = keystore.generate(algorithm, U.DECRYPT)
    blob = suite_for_algorithm(algorithm).kem_wrap(keystore.public_key(key.handle), b"k", b"i")
    assert keystore.decrypt(key.handle, blob, info=b"i") == b"k"
    with pytest.raises(DecryptionFailed):
        keystore.decrypt(key.handle, blob, info=b"j")


# -- derivation ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [A.EC_P256, A.X25519], ids=str)
def test_derive_is_hkdf_of_the_key_agreement(keystore: KeyStore, algorithm: KeyAlgorithm) -> None:
    mine = keystore.generate(algorithm, U.DERIVE)
    peer = generate_private_key(algorithm)
    derived = keystore.derive(
        mine.handle, A.AES_256, AEAD, peer_public=peer.public_key(), info=b"ctx", exportable=True
    )
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    my_public = keystore.public_key(mine.handle)
    if isinstance(peer, ec.EllipticCurvePrivateKey):
        assert isinstance(my_public, ec.EllipticCurvePublicKey)
        shared = peer.exchange(ec.ECDH(), my_public)
    else:
        assert isinstance(peer, x25519.X25519PrivateKey)
        assert isinstance(my_public, x25519.X25519PublicKey)
        shared = peer.exchange(my_public)
    expected = HKDF(hashes.SHA256(), 32, None, b"ctx").derive(shared)
    assert keystore.export(derived.handle) == expected
    assert keystore.info(derived.handle).algorithm is A.AES_256
    with pytest.raises(InvalidInput):
        keystore.derive(mine.handle, A.AES_256, AEAD)  # no peer


def test_derive_from_a_secret_key(keystore: KeyStore) -> None:
    master = keystore.generate(A.HMAC_SHA256, U.DERIVE)
    a = keystore.derive(master.handle, A.HMAC_SHA256, U.MAC, info=b"terminal-1")
    b = keystore.derive(master.handle, A.HMAC_SHA256, U.MAC, info=b"terminal-1")
    c = keystore.derive(master.handle, A.HMAC_SHA256, U.MAC, info=b"terminal-2")
    assert keystore.mac(a.handle, b"x") == keystore.mac(b.handle, b"x")
    assert keystore.mac(a.handle, b"x") != keystore.mac(c.handle, b"x")
    with pytest.raises(KeyNotExportable):
        keystore.export(a.handle)


# -- lifecycle -------------------------------------------------------------------------


def test_destroyed_keys_are_gone_for_every_call(keystore: KeyStore) -> None:
    key = keystore.generate(A.EC_P256, U.SIGN)
    keystore.sign(key.handle, b"warm the cache")
    keystore.destroy(key.handle)
    for call in (
        lambda: keystore.sign(key.handle, b"x"),
        lambda: keystore.info(key.handle),
        lambda: keystore.public_key(key.handle),
        lambda: keystore.destroy(key.handle),
    ):
        with pytest.raises(KeyNotFound):
            call()
    assert key.handle not in {k.handle for k in keystore.list()}


@pytest.mark.parametrize(
    "handle",
    [
        "",
        "nope",
        "soft:",
        "pkcs11:",
        "pkcs11:zz",
        "soft:" + "0" * 32,
        "sealed:" + "0" * 32,
        "pkcs11:" + "0" * 32,
    ],
)
def test_unknown_handles_are_not_found(keystore: KeyStore, handle: str) -> None:
    with pytest.raises(KeyNotFound):
        keystore.sign(handle, b"x")
    with pytest.raises(KeyNotFound):
        keystore.info(handle)


def test_list_shows_live_keys_without_material(keystore: KeyStore) -> None:
    a = keystore.generate(A.AES_128, AEAD, label="a")
    b = keystore.generate(A.EC_P256, U.SIGN, label="b")
    listed = {k.handle: k for k in keystore.list()}
    assert listed[a.handle].label == "a"
    assert listed[a.handle].public_key_der is None
    assert listed[b.handle].public_key_der == b.public_key_der
    assert listed[b.handle].created_at.tzinfo is not None


def test_a_working_store_answers_ping(keystore: KeyStore) -> None:
    keystore.generate(A.AES_128, AEAD)
    keystore.ping()


def test_secret_keys_have_no_public_key(keystore: KeyStore) -> None:
    key = keystore.generate(A.AES_128, AEAD)
    with pytest.raises(InvalidInput):
        keystore.public_key(key.handle)


def test_sm4_keys_encrypt_and_sm2_keys_sign(keystore: KeyStore) -> None:
    sm4 = keystore.generate(A.SM4, AEAD)
    sealed = keystore.encrypt(sm4.handle, b"gm", info=b"i")
    assert keystore.decrypt(sm4.handle, sealed, info=b"i") == b"gm"
    sm2 = keystore.generate(A.SM2, U.SIGN | U.DECRYPT)
    suite = suite_for_algorithm(A.SM2)
    suite.verify(keystore.public_key(sm2.handle), b"m", keystore.sign(sm2.handle, b"m"))
    blob = suite.kem_wrap(keystore.public_key(sm2.handle), b"secret", b"ctx")
    assert keystore.decrypt(sm2.handle, blob, info=b"ctx") == b"secret"

    raw = SM2PrivateKey.generate()
    imported = keystore.import_key(A.SM2, raw.private_bytes(), U.SIGN)  # raw 32-byte scalar
    assert keystore.public_key(imported.handle) == raw.public_key()


def test_signature_digest_is_over_the_whole_message(keystore: KeyStore) -> None:
    """ECDSA hashing happens once (not twice) in both backends: verify against pyca."""
    key = keystore.generate(A.EC_P256, U.SIGN)
    public = keystore.public_key(key.handle)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    data = hashlib.sha256(b"x").digest() * 100
    from cryptography.hazmat.primitives import hashes

    public.verify(keystore.sign(key.handle, data), data, ec.ECDSA(hashes.SHA256()))
