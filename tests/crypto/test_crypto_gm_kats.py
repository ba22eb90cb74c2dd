"""Known-answer tests of the GM suite (SM2, SM3, SM4), from the standards' examples."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto import get_suite, sm4_cbc_decrypt, sm4_cbc_encrypt
from trustfleet.crypto.sm2 import SM2Curve, SM2PrivateKey, SM2PublicKey
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


# -- SM2 on the GB/T 32918 Fp-256 *test* curve ------------------------------------------
# GB/T 32918.2-2016 annex A.2 (signature) and GB/T 32918.4-2016 annex A.2 (encryption)
# use this curve, not the recommended one; it is defined here only for these examples.

TEST_CURVE = SM2Curve(
    name="gbt32918-fp256-example",
    p=0x8542D69E_4C044F18_E8B92435_BF6FF7DE_45728391_5C45517D_722EDB8B_08F1DFC3,
    a=0x787968B4_FA32C3FD_2417842E_73BBFEFF_2F3C848B_6831D7E0_EC65228B_3937E498,
    b=0x63E4C6D3_B23B0C84_9CF84241_484BFE48_F61D59A5_B16BA06E_6E12D1DA_27C5249A,
    gx=0x421DEBD6_1B62EAB6_746434EB_C3CC315E_32220B3B_ADD50BDC_4C4E6C14_7FEDD43D,
    gy=0x0680512B_CBB42C07_D47349D2_153B70C4_E5D7FDFC_BFA36EA1_A85841B9_E46E09A2,
    n=0x8542D69E_4C044F18_E8B92435_BF6FF7DD_29772063_0485628D_5AE74EE7_C32E79B7,
)
ALICE_ID = b"ALICE123@YAHOO.COM"
SIGN_D = 0x128B2FA8_BD433C6C_068C8D80_3DFF7979_2A519A55_171B1B65_0C23661D_15897263
SIGN_K = 0x6CB28D99_385C175C_94F94E93_4817663F_C176D925_DD72B727_260DBAAE_1FB2F96F
SIGN_R = 0x40F1EC59_F793D9F4_9E09DCEF_49130D41_94F79FB1_EED2CAA5_5BACDB49_C4E755D1
SIGN_S = 0x6FC6DAC3_2C5D5CF1_0C77DFB2_0F7C2EB6_67A45787_2FB09EC5_6327A67E_C7DEEBE7
SIGN_PUBLIC = h(
    "04"
    "0AE4C7798AA0F119471BEE11825BE46202BB79E2A5844495E97C04FF4DF2548A"
    "7C0240F88F1CD4E16352A73C17B7F16F07353E53A176D684A9FE0C6BB798E857"
)


def test_sm2_signature_example_gbt32918_2() -> None:
    key = SM2PrivateKey(SIGN_D, uid=ALICE_ID, curve=TEST_CURVE)
    assert key.public_key().public_bytes() == SIGN_PUBLIC
    signature = key.sign(b"message digest", _rnd_fn=fixed(SIGN_K))
    assert decode_dss_signature(signature) == (SIGN_R, SIGN_S)

    public = SM2PublicKey.from_bytes(SIGN_PUBLIC, uid=ALICE_ID, curve=TEST_CURVE)
    public.verify(signature, b"message digest")
    with pytest.raises(InvalidSignature):  # Z binds the user ID
        public.with_uid(b"BOB@YAHOO.COM").verify(signature, b"message digest")
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"message digesT")


ENC_D = 0x1649AB77_A00637BD_5E2EFE28_3FBF3535_34AA7F7C_B89463F2_08DDBC29_20BB0DA0
ENC_K = 0x4C62EEFD_6ECFC2B9_5B92FD6C_3D957514_8AFA1742_5546D490_18E5388D_49DD7B4F
ENC_PUBLIC = h(
    "04"
    "435B39CCA8F3B508C1488AFC67BE491A0F7BA07E581A0E4849A5CF70628A7E0A"
    "75DDBA78F15FEECB4C7895E2C1CDF5FE01DEBB2CDBADF45399CCF77BBA076A42"
)
ENC_C1 = h(
    "04"
    "245C26FB68B1DDDDB12C4B6BF9F2B6D5FE60A383B0D18D1C4144ABF17F6252E7"
    "76CB9264C2A7E88E52B19903FDC47378F605E36811F5C07423A24B84400F01B8"
)
ENC_C2 = h("650053A89B41C418B0C3AAD00D886C00286467")
ENC_C3 = h("9C3D7360C30156FAB7C80A0276712DA9D8094A634B766D3A285E07480653426D")


def test_sm2_encryption_example_gbt32918_4() -> None:
    key = SM2PrivateKey(ENC_D, curve=TEST_CURVE)
    assert key.public_key().public_bytes() == ENC_PUBLIC
    ciphertext = key.public_key().encrypt(b"encryption standard", _rnd_fn=fixed(ENC_K))
    assert ciphertext == ENC_C1 + ENC_C3 + ENC_C2  # the 2016 order: C1 || C3 || C2
    assert key.decrypt(ciphertext) == b"encryption standard"


def test_sm2_decrypt_rejects_the_old_c1_c2_c3_order_and_tampering() -> None:
    key = SM2PrivateKey(ENC_D, curve=TEST_CURVE)
    with pytest.raises(DecryptionFailed):
        key.decrypt(ENC_C1 + ENC_C2 + ENC_C3)
    tampered = bytearray(ENC_C1 + ENC_C3 + ENC_C2)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        key.decrypt(bytes(tampered))


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
