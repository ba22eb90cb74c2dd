"""Known-answer tests of the international suites, from the standards' own examples.

Each vector is typed in from the document named in its comment, and run through the
trustfleet suite API wherever the API can express it, so a wrong wiring (wrong hash,
wrong AEAD, wrong HPKE parameters) fails here.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from trustfleet.crypto import get_suite
from trustfleet.crypto.ed25519 import _HPKE as ED25519_HPKE
from trustfleet.crypto.p256 import _HPKE as P256_HPKE
from trustfleet.errors import InvalidSignature

P256 = get_suite("p256")
ED25519 = get_suite("ed25519")
RSA = get_suite("rsa")
SHA256_SUITES = [P256, ED25519, RSA]

h = bytes.fromhex


# -- SHA-256 (FIPS 180-2, appendix B.1 "abc") -------------------------------------------


@pytest.mark.parametrize("suite", SHA256_SUITES, ids=lambda s: s.name)
def test_sha256_abc(suite) -> None:
    assert suite.hash(b"abc") == h(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# -- HMAC-SHA256 (RFC 4231, test cases 1 and 2) ----------------------------------------


@pytest.mark.parametrize("suite", SHA256_SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("key", "data", "mac"),
    [
        (
            b"\x0b" * 20,
            b"Hi There",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
    ],
    ids=["rfc4231-1", "rfc4231-2"],
)
def test_hmac_sha256(suite, key: bytes, data: bytes, mac: str) -> None:
    assert suite.mac(key, data) == h(mac)
    suite.mac_verify(key, data, h(mac))
    with pytest.raises(InvalidSignature):
        suite.mac_verify(key, data + b"!", h(mac))


# -- HKDF-SHA256 (RFC 5869, test case 1) -----------------------------------------------


@pytest.mark.parametrize("suite", SHA256_SUITES, ids=lambda s: s.name)
def test_hkdf_sha256_rfc5869_case1(suite) -> None:
    okm = suite.kdf(
        b"\x0b" * 22,
        salt=h("000102030405060708090a0b0c"),
        info=h("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )
    assert okm == h(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


# -- AES-GCM (McGrew & Viega, "The GCM mode of operation", test cases 2 and 4) ----------


@pytest.mark.parametrize("suite", [P256, RSA], ids=lambda s: s.name)
def test_aes_128_gcm_test_case_2(suite) -> None:
    sealed = suite.aead_seal(bytes(16), bytes(12), bytes(16), b"")
    assert sealed == h("0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf")


@pytest.mark.parametrize("suite", [P256, RSA], ids=lambda s: s.name)
def test_aes_128_gcm_test_case_4(suite) -> None:
    key = h("feffe9928665731c6d6a8f9467308308")
    nonce = h("cafebabefacedbaddecaf888")
    plaintext = h(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    expected = h(
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
        "5bc94fbc3221a5db94fae95ae7121a47"  # tag
    )
    assert suite.aead_seal(key, nonce, plaintext, aad) == expected
    assert suite.aead_open(key, nonce, expected, aad) == plaintext


# -- AES-CMAC (RFC 4493 section 4 = NIST SP 800-38B D.1) -------------------------------

_CMAC_KEY = h("2b7e151628aed2a6abf7158809cf4f3c")
_CMAC_MESSAGE = h(
    "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
)


@pytest.mark.parametrize("suite", SHA256_SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("length", "mac"),
    [
        (0, "bb1d6929e95937287fa37d129b756746"),
        (16, "070a16b46b4d4144f79bdd9dd04a287c"),
        (40, "dfa66747de9ae63030ca32611497c827"),
        (64, "51f0bebf7e3b9d92fc49741779363cfe"),
    ],
)
def test_aes_cmac_rfc4493(suite, length: int, mac: str) -> None:
    assert suite.cmac(_CMAC_KEY, _CMAC_MESSAGE[:length]) == h(mac)


# -- ChaCha20-Poly1305 (RFC 8439 section 2.8.2) ----------------------------------------


def test_chacha20_poly1305_rfc8439() -> None:
    key = bytes(range(0x80, 0xA0))
    nonce = h("070000004041424344454647")
    aad = h("50515253c0c1c2c3c4c5c6c7")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
        b"for the future, sunscreen would be it."
    )
    expected = h(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691"  # tag
    )
    assert ED25519.aead_seal(key, nonce, plaintext, aad) == expected
    assert ED25519.aead_open(key, nonce, expected, aad) == plaintext


# -- Ed25519 (RFC 8032 section 7.1, tests 1 and 2) -------------------------------------


@pytest.mark.parametrize(
    ("secret", "public", "message", "signature"),
    [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ],
    ids=["test1", "test2"],
)
def test_ed25519_rfc8032(secret: str, public: str, message: str, signature: str) -> None:
    private_key = ed25519.Ed25519PrivateKey.from_private_bytes(h(secret))
    public_key = ed25519.Ed25519PublicKey.from_public_bytes(h(public))
    assert ED25519.sign(private_key, h(message)) == h(signature)
    ED25519.verify(public_key, h(message), h(signature))
    with pytest.raises(InvalidSignature):
        ED25519.verify(public_key, h(message) + b"x", h(signature))


# -- ECDSA P-256 with SHA-256 (RFC 6979 A.2.5) -----------------------------------------

_RFC6979_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
_RFC6979_UX = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
_RFC6979_UY = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299


@pytest.mark.parametrize(
    ("message", "r", "s"),
    [
        (
            b"sample",
            0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
            0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
        ),
        (
            b"test",
            0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
            0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
        ),
    ],
    ids=["sample", "test"],
)
def test_ecdsa_p256_rfc6979_a25_verifies(message: bytes, r: int, s: int) -> None:
    public = ec.EllipticCurvePublicNumbers(_RFC6979_UX, _RFC6979_UY, ec.SECP256R1()).public_key()
    private = ec.derive_private_key(_RFC6979_X, ec.SECP256R1())
    assert private.public_key() == public
    P256.verify(public, message, encode_dss_signature(r, s))
    with pytest.raises(InvalidSignature):
        P256.verify(public, message + b".", encode_dss_signature(r, s))
    with pytest.raises(InvalidSignature):
        P256.verify(public, message, encode_dss_signature(r, s ^ 1))


# -- HPKE (RFC 9180 A.3.1 and A.2.1, base mode, sequence 0) -----------------------------
# The published ciphertexts are sealed with aad "Count-0", which the one-shot public API
# cannot pass, so they are opened with pyca's private _decrypt_with_aad, using the very
# hpke.Suite objects the trustfleet suites use.

_HPKE_INFO = h("4f6465206f6e2061204772656369616e2055726e")  # "Ode on a Grecian Urn"
_HPKE_AAD = b"Count-0"
_HPKE_PLAINTEXT = b"Beauty is truth, truth beauty"


def test_hpke_rfc9180_a3_p256_sha256_aes128gcm() -> None:
    sk_r = ec.derive_private_key(
        int("f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2", 16),
        ec.SECP256R1(),
    )
    pk_rm = h(
        "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a82"
        "6a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0"
    )
    enc = h(
        "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac9"
        "8536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4"
    )
    ct = h(
        "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434"
    )
    assert sk_r.public_key() == ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pk_rm)
    opened = rust_openssl.hpke._decrypt_with_aad(
        P256_HPKE, enc + ct, sk_r, info=_HPKE_INFO, aad=_HPKE_AAD
    )
    assert opened == _HPKE_PLAINTEXT


def test_hpke_rfc9180_a2_x25519_sha256_chacha20poly1305() -> None:
    sk_r = x25519.X25519PrivateKey.from_private_bytes(
        h("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb")
    )
    enc = h("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a")
    ct = h(
        "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"
    )
    opened = rust_openssl.hpke._decrypt_with_aad(
        ED25519_HPKE, enc + ct, sk_r, info=_HPKE_INFO, aad=_HPKE_AAD
    )
    assert opened == _HPKE_PLAINTEXT


@pytest.mark.parametrize(
    ("suite", "hpke_suite"), [(P256, P256_HPKE), (ED25519, ED25519_HPKE)], ids=["p256", "ed25519"]
)
def test_kem_wrap_is_plain_hpke_base_mode(suite, hpke_suite) -> None:
    """What the suite wraps, a stock HPKE receiver with the same info opens, and back."""
    key = suite.generate_kem_key()
    wrapped = suite.kem_wrap(key.public_key(), b"session key", b"session-1")
    assert hpke_suite.decrypt(wrapped, key, info=b"session-1") == b"session key"
    sealed = hpke_suite.encrypt(b"other key", key.public_key(), info=b"session-2")
    assert suite.kem_unwrap(key, sealed, b"session-2") == b"other key"
