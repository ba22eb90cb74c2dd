"""Known-answer tests of the GM suite (SM2, SM3, SM4), from the standards' examples."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto import get_suite, sm4_cbc_decrypt, sm4_cbc_encrypt
from trustfleet.crypto.sm2 import SM2P256V1, SM2Curve, SM2PrivateKey, SM2PublicKey
from trustfleet.errors import DecryptionFailed, InvalidInput, InvalidKey, InvalidSignature

GM = get_suite("gm")
h = bytes.fromhex


def fixed(k: int):
    """An rnd_fn that always draws ``k``: the standards' examples fix the ephemeral k."""
    return lambda _bits: k


# -- SM3 (GB/T 32905-2016, appendix A examples 1 and 2) ---------------------------------


def test_sm3_example_1_abc() -> None:
    assert GM.hash(b"abc") == h("66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0")


def test_sm3_example_2_abcd_x16() -> None:
    assert GM.hash(b"abcd" * 16) == h(
        "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
    )


def test_hmac_sm3_matches_an_independent_hmac() -> None:
    # No standard HMAC-SM3 vector; cross-check against Python's own HMAC over OpenSSL's SM3.
    if "sm3" not in hashlib.algorithms_available:
        pytest.skip("hashlib has no SM3 here")
    key, data = b"k" * 70, b"message"  # a key longer than the block size gets hashed first
    assert GM.mac(key, data) == hmac.new(key, data, "sm3").digest()
    assert GM.digest_size == 32


# -- SM4 (GB/T 32907-2016, appendix A examples 1 and 2) ---------------------------------

_SM4_KEY = h("0123456789abcdeffedcba9876543210")


def test_sm4_example_1_single_block() -> None:
    encryptor = Cipher(algorithms.SM4(_SM4_KEY), modes.ECB()).encryptor()  # noqa: S305  (the standard's raw block)
    assert encryptor.update(_SM4_KEY) == h("681edf34d206965e86b3e94f536e4246")


def test_sm4_example_2_one_million_iterations() -> None:
    encryptor = Cipher(algorithms.SM4(_SM4_KEY), modes.ECB()).encryptor()  # noqa: S305  (the standard's raw block)
    block = _SM4_KEY
    for _ in range(1_000_000):
        block = encryptor.update(block)
    assert block == h("595298c7c6fd271f0402f804c33d3f66")


# -- SM4-GCM (RFC 8998 appendix A.1) ---------------------------------------------------


def test_sm4_gcm_rfc8998() -> None:
    nonce = h("00001234567800000000abcd")
    aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    plaintext = h(
        "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd"
        "eeeeeeeeeeeeeeeeffffffffffffffffeeeeeeeeeeeeeeeeaaaaaaaaaaaaaaaa"
    )
    expected = h(
        "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735"
        "d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d"
        "83de3541e4c2b58177e065a9bf7b62ec"  # tag
    )
    assert GM.aead_seal(_SM4_KEY, nonce, plaintext, aad) == expected
    assert GM.aead_open(_SM4_KEY, nonce, expected, aad) == plaintext
    with pytest.raises(DecryptionFailed):
        GM.aead_open(_SM4_KEY, nonce, expected, aad[:-1])


# -- SM2 on the recommended curve sm2p256v1 ---------------------------------------------
# GM/T 0003.5-2012 and GB/T 32918.5-2016, annex A (signature) and annex C (encryption):
# the standards' examples on the recommended curve, with the default user ID
# 1234567812345678 (GM/T 0009). The ephemeral k is fixed through ``_rnd_fn``.

KAT_D = 0x3945208F_7B2144B1_3F36E38A_C6D39F95_88939369_2860B51A_42FB81EF_4DF7C5B8
KAT_K = 0x59276E27_D506861A_16680F3A_D9C02DCC_EF3CC1FA_3CDBE4CE_6D54B80D_EAC1BC21
KAT_PUBLIC = h(
    "04"
    "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
    "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
)
SIGN_R = 0xF5A03B06_48D2C463_0EEAC513_E1BB81A1_5944DA38_27D5B741_43AC7EAC_EEE720B3
SIGN_S = 0xB1B6AA29_DF212FD8_763182BC_0D421CA1_BB9038FD_1F7F42D4_840B69C4_85BBC1AA
ENC_C1 = h(
    "04"
    "04EBFC718E8D1798620432268E77FEB6415E2EDE0E073C0F4F640ECD2E149A73"
    "E858F9D81E5430A57B36DAAB8F950A3C64E6EE6A63094D99283AFF767E124DF0"
)
ENC_C3 = h("59983C18F809E262923C53AEC295D30383B54E39D609D160AFCB1908D0BD8766")
ENC_C2 = h("21886CA989CA9C7D58087307CA93092D651EFA")


def test_sm2_signature_example_gmt0003_5_annex_a() -> None:
    key = SM2PrivateKey(KAT_D)
    assert key.uid == b"1234567812345678"
    assert key.public_key().public_bytes() == KAT_PUBLIC
    signature = key.sign(b"message digest", _rnd_fn=fixed(KAT_K))
    assert decode_dss_signature(signature) == (SIGN_R, SIGN_S)

    public = SM2PublicKey.from_bytes(KAT_PUBLIC)
    published = encode_dss_signature(SIGN_R, SIGN_S)
    public.verify(published, b"message digest")
    with pytest.raises(InvalidSignature):  # Z binds the user ID
        public.with_uid(b"ALICE123@YAHOO.COM").verify(published, b"message digest")
    with pytest.raises(InvalidSignature):
        public.verify(published, b"message digesT")


def test_sm2_encryption_example_gmt0003_5_annex_c() -> None:
    key = SM2PrivateKey(KAT_D)
    ciphertext = key.public_key().encrypt(b"encryption standard", _rnd_fn=fixed(KAT_K))
    assert ciphertext == ENC_C1 + ENC_C3 + ENC_C2  # the 2016 order: C1 || C3 || C2
    assert key.decrypt(ENC_C1 + ENC_C3 + ENC_C2) == b"encryption standard"


def test_sm2_decrypt_rejects_the_old_c1_c2_c3_order_and_tampering() -> None:
    key = SM2PrivateKey(KAT_D)
    with pytest.raises(DecryptionFailed):
        key.decrypt(ENC_C1 + ENC_C2 + ENC_C3)
    for index in (1, 65, 96, -1):  # C1's x, first and last byte of C3, last byte of C2
        tampered = bytearray(ENC_C1 + ENC_C3 + ENC_C2)
        tampered[index] ^= 1
        with pytest.raises(DecryptionFailed):
            key.decrypt(bytes(tampered))


# -- the GB/T 32918 Fp-256 *test* curve: refused ------------------------------------------
# GB/T 32918.2-2016 and .4-2016, annex A, give their examples on this curve, not on the
# recommended one. The C implementation behind trustfleet.crypto.sm2 (gmalglib) is built
# for sm2p256v1 only, so those examples cannot run; the annex A/C examples above cover
# signature and encryption on the curve that trustfleet uses.

TEST_CURVE = SM2Curve(
    name="gbt32918-fp256-example",
    p=0x8542D69E_4C044F18_E8B92435_BF6FF7DE_45728391_5C45517D_722EDB8B_08F1DFC3,
    a=0x787968B4_FA32C3FD_2417842E_73BBFEFF_2F3C848B_6831D7E0_EC65228B_3937E498,
    b=0x63E4C6D3_B23B0C84_9CF84241_484BFE48_F61D59A5_B16BA06E_6E12D1DA_27C5249A,
    gx=0x421DEBD6_1B62EAB6_746434EB_C3CC315E_32220B3B_ADD50BDC_4C4E6C14_7FEDD43D,
    gy=0x0680512B_CBB42C07_D47349D2_153B70C4_E5D7FDFC_BFA36EA1_A85841B9_E46E09A2,
    n=0x8542D69E_4C044F18_E8B92435_BF6FF7DD_29772063_0485628D_5AE74EE7_C32E79B7,
)
#: GB/T 32918.2-2016 annex A.2's private key (also in range on sm2p256v1)
TEST_CURVE_D = 0x128B2FA8_BD433C6C_068C8D80_3DFF7979_2A519A55_171B1B65_0C23661D_15897263


def test_sm2_keys_on_another_curve_are_refused() -> None:
    with pytest.raises(InvalidKey, match="sm2p256v1 only"):
        SM2PrivateKey(TEST_CURVE_D, curve=TEST_CURVE)
    with pytest.raises(InvalidKey, match="sm2p256v1 only"):
        SM2PrivateKey.from_bytes(TEST_CURVE_D.to_bytes(32, "big"), curve=TEST_CURVE)
    with pytest.raises(InvalidKey, match="sm2p256v1 only"):  # a valid sm2p256v1 point
        SM2PublicKey.from_bytes(KAT_PUBLIC, curve=TEST_CURVE)
    assert SM2PrivateKey(TEST_CURVE_D).curve is SM2P256V1


# -- SM4-CBC helpers (PKCS#7), cross-checked with the openssl CLI ------------------------

_CBC_IV = bytes(range(16))


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 100])
def test_sm4_cbc_round_trip_pads_to_whole_blocks(length: int) -> None:
    data = bytes(range(length))
    encrypted = sm4_cbc_encrypt(_SM4_KEY, _CBC_IV, data)
    assert len(encrypted) == (length // 16 + 1) * 16  # PKCS#7 always adds padding
    assert sm4_cbc_decrypt(_SM4_KEY, _CBC_IV, encrypted) == data


def test_sm4_cbc_matches_openssl_enc(openssl) -> None:
    plain = openssl.write("plain", b"hello sm4 cbc world!")
    result = openssl.run(
        "enc", "-sm4-cbc", "-K", _SM4_KEY.hex(), "-iv", _CBC_IV.hex(), "-in", plain
    )
    assert result.stdout == sm4_cbc_encrypt(_SM4_KEY, _CBC_IV, b"hello sm4 cbc world!")


def test_sm4_cbc_bad_padding_and_sizes() -> None:
    encrypted = sm4_cbc_encrypt(_SM4_KEY, _CBC_IV, b"x")
    # flipping the IV's last byte turns the 0x0f padding byte into 0x0e: invalid PKCS#7
    with pytest.raises(DecryptionFailed):
        sm4_cbc_decrypt(_SM4_KEY, _CBC_IV[:-1] + bytes([_CBC_IV[-1] ^ 1]), encrypted)
    for bad in (b"", encrypted[:-1], encrypted + b"\x00"):
        with pytest.raises(DecryptionFailed):
            sm4_cbc_decrypt(_SM4_KEY, _CBC_IV, bad)
    with pytest.raises(InvalidKey):
        sm4_cbc_encrypt(_SM4_KEY[:15], _CBC_IV, b"x")
    with pytest.raises(InvalidInput):
        sm4_cbc_encrypt(_SM4_KEY, _CBC_IV[:12], b"x")
