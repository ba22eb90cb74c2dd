"""trustfleet.crypto.sm2 over gmalglib: what the wrapper itself adds to the C library."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from gmalglib import sm2 as gmalglib_sm2

from trustfleet.crypto.sm2 import SM2P256V1, SM2PrivateKey, SM2PublicKey
from trustfleet.errors import CryptoError, InvalidKey, InvalidSignature

from .test_crypto_gm_kats import KAT_D, KAT_K, KAT_PUBLIC, fixed

N = SM2P256V1.n
P = SM2P256V1.p
#: For KAT_D's public key and a one-byte message, k = 470 makes the KDF output t = 0x00
#: (GB/T 32918.4 A5: draw k again). Found by search; the test checks it independently.
DEGENERATE_K = 470


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def test_sm2p256v1_is_the_curve_gmalglib_implements() -> None:
    assert _int(gmalglib_sm2.SM2_PARAMS_P) == SM2P256V1.p
    assert _int(gmalglib_sm2.SM2_PARAMS_A) == SM2P256V1.a
    assert _int(gmalglib_sm2.SM2_PARAMS_B) == SM2P256V1.b
    assert tuple(map(_int, gmalglib_sm2.SM2_PARAMS_G)) == (SM2P256V1.gx, SM2P256V1.gy)
    assert _int(gmalglib_sm2.SM2_PARAMS_N) == SM2P256V1.n


def _kdf_first_byte(k: int) -> int:
    """For KAT_D's public key P_B and ephemeral k, the first byte of the KDF output t:
    SM3(x2 || y2 || 00000001) where (x2, y2) = k·P_B."""
    shared = SM2PrivateKey(k * KAT_D % N).public_key().public_bytes()  # (k·d)·G = k·P_B
    digest = hashes.Hash(hashes.SM3())
    digest.update(shared[1:] + (1).to_bytes(4, "big"))
    return digest.finalize()[0]


def test_encryption_draws_k_again_when_the_kdf_output_is_all_zero() -> None:
    key = SM2PrivateKey(KAT_D)
    public = key.public_key()
    assert _kdf_first_byte(DEGENERATE_K) == 0
    assert _kdf_first_byte(KAT_K) != 0

    draws = iter([DEGENERATE_K, KAT_K])
    ciphertext = public.encrypt(b"m", _rnd_fn=lambda _bits: next(draws))
    assert ciphertext[:65] == SM2PrivateKey(KAT_K).public_key().public_bytes()  # C1 = k·G
    assert key.decrypt(ciphertext) == b"m"
    assert ciphertext == public.encrypt(b"m", _rnd_fn=fixed(KAT_K))


def test_encryption_gives_up_when_every_k_is_degenerate() -> None:
    public = SM2PublicKey.from_bytes(KAT_PUBLIC)
    with pytest.raises(CryptoError, match="degenerate"):
        public.encrypt(b"m", _rnd_fn=fixed(DEGENERATE_K))


def test_random_one_byte_messages_always_decrypt() -> None:
    # 1 in 256 one-byte encryptions meets t = 0: 1,000 tries meet it about 4 times
    key = SM2PrivateKey.generate()
    public = key.public_key()
    for i in range(1000):
        message = bytes([i % 256])
        assert key.decrypt(public.encrypt(message)) == message


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 1), (1, 0), (N, 1), (1, N), (1 << 256, 1), (1, 1 << 256)],
)
def test_signature_values_out_of_range_do_not_verify(r: int, s: int) -> None:
    public = SM2PublicKey.from_bytes(KAT_PUBLIC)
    with pytest.raises(InvalidSignature):
        public.verify(encode_dss_signature(r, s), b"message digest")


def test_verify_checks_r_plus_s() -> None:
    # t = r + s = n is refused by GB/T 32918.2 B5 even though r and s are in range
    public = SM2PublicKey.from_bytes(KAT_PUBLIC)
    with pytest.raises(InvalidSignature):
        public.verify(encode_dss_signature(1, N - 1), b"message digest")


def _point_with_small_x() -> tuple[int, int]:
    for x in range(1, 100):  # y^2 = x^3 + ax + b; p = 3 (mod 4), so y = rhs^((p+1)/4)
        rhs = (x**3 + SM2P256V1.a * x + SM2P256V1.b) % P
        y = pow(rhs, (P + 1) // 4, P)
        if y * y % P == rhs:
            return x, y
    raise AssertionError("no point with a small x")


def test_public_key_coordinates_must_be_reduced() -> None:
    # gmalglib reduces x modulo p before its on-curve check; the encoding must not need it
    x, y = _point_with_small_x()
    SM2PublicKey(x, y)
    with pytest.raises(InvalidKey):
        SM2PublicKey(x + P, y)
    with pytest.raises(InvalidKey):
        SM2PublicKey.from_bytes(b"\x04" + (x + P).to_bytes(32, "big") + y.to_bytes(32, "big"))


def test_generated_keys_pair_the_scalar_with_its_point() -> None:
    key = SM2PrivateKey.generate(uid=b"alice")
    assert key.uid == b"alice"
    again = SM2PrivateKey.from_bytes(key.private_bytes(), uid=b"alice")
    assert again.public_key() == key.public_key()
    key.public_key().verify(key.sign(b"m"), b"m")


def test_signatures_are_randomised() -> None:
    key = SM2PrivateKey(KAT_D)
    first, second = key.sign(b"m"), key.sign(b"m")
    assert first != second
    for signature in (first, second):
        key.public_key().verify(signature, b"m")
