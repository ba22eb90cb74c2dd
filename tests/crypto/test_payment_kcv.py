"""Key check values against the openssl CLI and the values every HSM prints."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.kcv import kcv, kcv_aes_cmac, kcv_tdes
from trustfleet.errors import InvalidKey, UnsupportedAlgorithm

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


def _openssl(args: list[str], data: bytes) -> bytes:
    assert OPENSSL is not None
    result = subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=False)
    return result.stdout if result.returncode == 0 else b""


def openssl_tdes_ecb_zeros(key: bytes) -> bytes:
    cipher = "-des-ede" if len(key) == 16 else "-des-ede3"
    args = ["enc", cipher, "-K", key.hex(), "-nopad"]
    # OpenSSL 3 builds that moved DES to the legacy provider need it loaded explicitly
    output = _openssl(args, bytes(8)) or _openssl(
        ["enc", "-provider", "legacy", "-provider", "default", *args[1:]], bytes(8)
    )
    assert len(output) == 8, "openssl could not run TDES-ECB"
    return output


def openssl_aes_cmac_zeros(key: bytes) -> bytes:
    cipher = f"AES-{len(key) * 8}-CBC"
    output = _openssl(
        ["mac", "-cipher", cipher, "-macopt", f"hexkey:{key.hex()}", "CMAC"], bytes(16)
    )
    return bytes.fromhex(output.decode().strip())


@needs_openssl
@pytest.mark.parametrize("length", [16, 24, 16, 24])
def test_tdes_kcv_matches_openssl(length: int) -> None:
    key = os.urandom(length)
    assert kcv_tdes(key) == openssl_tdes_ecb_zeros(key)[:3]
    assert kcv_tdes(key, 8) == openssl_tdes_ecb_zeros(key)


@needs_openssl
@pytest.mark.parametrize("length", [16, 32, 16, 32])
def test_aes_cmac_kcv_matches_openssl(length: int) -> None:
    key = os.urandom(length)
    assert kcv_aes_cmac(key) == openssl_aes_cmac_zeros(key)[:5]
    assert kcv_aes_cmac(key, 16) == openssl_aes_cmac_zeros(key)


def test_known_tdes_kcv() -> None:
    # the textbook double-length test key; HSMs print KCV 08D7B4 for it
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    assert kcv_tdes(key).hex().upper() == "08D7B4"
    # a 2-key key is the 3-key key K1|K2|K1
    assert kcv_tdes(key) == kcv_tdes(key + key[:8])


def test_kcv_dispatches_on_the_algorithm() -> None:
    tdes, aes128, aes256 = os.urandom(16), os.urandom(16), os.urandom(32)
    assert kcv(KeyAlgorithm.TDES, tdes) == kcv_tdes(tdes)
    assert len(kcv(KeyAlgorithm.TDES, tdes)) == 3
    assert kcv(KeyAlgorithm.AES_128, aes128) == kcv_aes_cmac(aes128)
    assert len(kcv(KeyAlgorithm.AES_256, aes256)) == 5
    # the same 16 bytes as a TDES key and as an AES key give different values
    assert kcv(KeyAlgorithm.TDES, aes128) != kcv(KeyAlgorithm.AES_128, aes128)[:3]


@pytest.mark.parametrize(
    ("algorithm", "length"),
    [
        (KeyAlgorithm.TDES, 8),
        (KeyAlgorithm.TDES, 32),
        (KeyAlgorithm.AES_128, 32),
        (KeyAlgorithm.AES_256, 16),
    ],
)
def test_wrong_key_length_is_refused(algorithm: KeyAlgorithm, length: int) -> None:
    with pytest.raises(InvalidKey):
        kcv(algorithm, os.urandom(length))


def test_algorithms_without_a_kcv_are_refused() -> None:
    with pytest.raises(UnsupportedAlgorithm):
        kcv(KeyAlgorithm.HMAC_SHA256, os.urandom(32))


def test_kcv_changes_with_the_key() -> None:
    key = bytearray(os.urandom(16))
    before = kcv_aes_cmac(bytes(key))
    key[0] ^= 0x80
    assert kcv_aes_cmac(bytes(key)) != before
