"""Payment-key operations behind the key store: KCVs, TR-31 blocks, raw block cipher."""

from __future__ import annotations

import psec.tr31
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.crypto.payment.tr31 import KeyBlockHeader, Tr31ModeMismatch, Tr31UsageMismatch
from trustfleet.errors import InvalidInput, KeyUsageNotAllowed, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keystore.soft import SoftKeyStore

U = KeyUsage
# X9.24 example key and its well-known check value
TDES_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def _pin_key_header(version: str = "D", algorithm: str = "A") -> KeyBlockHeader:
    return KeyBlockHeader(
        version_id=version, key_usage="P0", algorithm=algorithm, mode_of_use="E", exportability="N"
    )


def test_kcv_matches_the_published_tdes_value_and_the_aes_cmac_rule(
    soft_store: SoftKeyStore,
) -> None:
    tdes = soft_store.import_key(KeyAlgorithm.TDES, TDES_KEY, U.MAC)
    assert soft_store.kcv(tdes.handle).hex().upper() == "08D7B4"
    aes = soft_store.generate(KeyAlgorithm.AES_256, U.MAC, exportable=True)
    assert soft_store.kcv(aes.handle) == kcvs.kcv_aes_cmac(soft_store.export(aes.handle))
    rsa = soft_store.generate(KeyAlgorithm.EC_P256, U.SIGN)
    with pytest.raises(UnsupportedAlgorithm):
        soft_store.kcv(rsa.handle)


def test_tr31_block_made_in_the_store_is_read_by_psec(soft_store: SoftKeyStore) -> None:
    kbpk = soft_store.generate(KeyAlgorithm.AES_256, U.WRAP | U.UNWRAP, exportable=True)
    pin_key = soft_store.generate(KeyAlgorithm.AES_128, U.WRAPPABLE | U.DECRYPT, exportable=True)
    block = soft_store.wrap_tr31(pin_key.handle, under=kbpk.handle, header=_pin_key_header())
    header, key = psec.tr31.unwrap(soft_store.export(kbpk.handle), block)
    assert key == soft_store.export(pin_key.handle)
    assert (header.key_usage, header.mode_of_use, header.exportability) == ("P0", "E", "N")


def test_tr31_import_enforces_usage_and_mode_and_keeps_the_key_inside(
    soft_store: SoftKeyStore,
) -> None:
    kbpk = soft_store.generate(KeyAlgorithm.TDES, U.WRAP | U.UNWRAP, exportable=True)
    clear = bytes.fromhex("F039121BEC83D26B169BDCD5B22AAF8F")
    block = psec.tr31.wrap(
        soft_store.export(kbpk.handle), psec.tr31.Header("B", "M3", "T", "C", "00", "N"), clear
    )
    with pytest.raises(Tr31UsageMismatch):
        soft_store.unwrap_tr31(
            kbpk.handle, block, expected_usage="P0", expected_modes="C", usage=U.MAC
        )
    with pytest.raises(Tr31ModeMismatch):
        soft_store.unwrap_tr31(
            kbpk.handle, block, expected_usage="M3", expected_modes="G", usage=U.MAC
        )
    header, info = soft_store.unwrap_tr31(
        kbpk.handle, block, expected_usage="M3", expected_modes="CG", usage=U.MAC
    )
    assert info.algorithm is KeyAlgorithm.TDES and not info.exportable
    assert header.key_usage == "M3"
    assert soft_store.kcv(info.handle) == kcvs.kcv_tdes(clear)


def test_tr31_refuses_wrong_usage_flags_and_mismatched_headers(soft_store: SoftKeyStore) -> None:
    kbpk = soft_store.generate(KeyAlgorithm.AES_128, U.WRAP)
    not_wrappable = soft_store.generate(KeyAlgorithm.AES_128, U.DECRYPT)
    with pytest.raises(KeyUsageNotAllowed):
        soft_store.wrap_tr31(not_wrappable.handle, under=kbpk.handle, header=_pin_key_header())
    tdes = soft_store.generate(KeyAlgorithm.TDES, U.WRAPPABLE)
    with pytest.raises(InvalidInput):  # header says AES, the key is TDES
        soft_store.wrap_tr31(tdes.handle, under=kbpk.handle, header=_pin_key_header())
    no_wrap = soft_store.generate(KeyAlgorithm.AES_128, U.MAC)
    wrappable = soft_store.generate(KeyAlgorithm.AES_128, U.WRAPPABLE)
    with pytest.raises(KeyUsageNotAllowed):
        soft_store.wrap_tr31(wrappable.handle, under=no_wrap.handle, header=_pin_key_header())
    with pytest.raises(InvalidInput):  # an AES KBPK makes version D, not B
        soft_store.wrap_tr31(wrappable.handle, under=kbpk.handle, header=_pin_key_header("B"))


def test_block_cipher_matches_pyca_and_checks_usage(soft_store: SoftKeyStore) -> None:
    key = soft_store.generate(KeyAlgorithm.AES_128, U.ENCRYPT | U.DECRYPT, exportable=True)
    block = bytes(range(16))
    ours = soft_store.block_cipher(key.handle, block, decrypt=False)
    encryptor = Cipher(algorithms.AES(soft_store.export(key.handle)), modes.ECB()).encryptor()  # noqa: S305
    assert ours == encryptor.update(block) + encryptor.finalize()
    assert soft_store.block_cipher(key.handle, ours, decrypt=True) == block
    iv = bytes(16)
    cbc = soft_store.block_cipher(key.handle, block * 2, decrypt=False, mode="cbc", iv=iv)
    assert soft_store.block_cipher(key.handle, cbc, decrypt=True, mode="cbc", iv=iv) == block * 2
    with pytest.raises(InvalidInput):
        soft_store.block_cipher(key.handle, b"short", decrypt=False)
    with pytest.raises(InvalidInput):
        soft_store.block_cipher(key.handle, block, decrypt=False, mode="cbc")
    encrypt_only = soft_store.generate(KeyAlgorithm.AES_128, U.ENCRYPT)
    with pytest.raises(KeyUsageNotAllowed):
        soft_store.block_cipher(encrypt_only.handle, block, decrypt=True)


@pytest.mark.pkcs11
def test_pkcs11_store_says_it_cannot_do_payment_operations(pkcs11_store: KeyStore) -> None:
    key = pkcs11_store.generate(KeyAlgorithm.AES_128, U.ENCRYPT | U.WRAP)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.kcv(key.handle)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.block_cipher(key.handle, bytes(16), decrypt=False)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.wrap_tr31(key.handle, under=key.handle, header=_pin_key_header())
