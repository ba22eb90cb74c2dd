"""Payment-key operations behind the key store: KCVs, TR-31 blocks, raw block cipher."""

from __future__ import annotations

from collections.abc import Iterator

import psec.tr31
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from harness import SoftHsmToken
from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.crypto.payment.tr31 import KeyBlockHeader, Tr31ModeMismatch, Tr31UsageMismatch
from trustfleet.errors import InvalidInput, KeyUsageNotAllowed, UnsupportedAlgorithm
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.keystore.hsm import HsmKeyStore
from trustfleet.keystore.master import MasterKey, MasterKeyring
from trustfleet.keystore.soft import SoftKeyStore
from trustfleet.store import Database

U = KeyUsage
# X9.24 example key and its well-known check value
TDES_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")


def _pin_key_header(version: str = "D", algorithm: str = "A") -> KeyBlockHeader:
    return KeyBlockHeader(
        version_id=version, key_usage="P0", algorithm=algorithm, mode_of_use="E", exportability="N"
    )


@pytest.fixture(params=["soft", pytest.param("pkcs11", marks=pytest.mark.pkcs11)])
def store(request: pytest.FixtureRequest, db: Database) -> Iterator[KeyStore]:
    """The soft store, and the PKCS#11 backend as configured (its payment keys sealed, their
    KCVs and block cipher calls in SoftHSM2, TR-31 in process)."""
    if request.param == "soft":
        yield SoftKeyStore(db, MasterKeyring([MasterKey.new()]))
        return
    token: SoftHsmToken = request.getfixturevalue("softhsm_token")
    hsm = HsmKeyStore(db, token.module, token.label, token.user_pin)
    yield hsm
    hsm.close()


def test_kcv_matches_the_published_tdes_value_and_the_aes_cmac_rule(
    store: KeyStore,
) -> None:
    tdes = store.import_key(KeyAlgorithm.TDES, TDES_KEY, U.MAC)
    assert store.kcv(tdes.handle).hex().upper() == "08D7B4"
    aes = store.generate(KeyAlgorithm.AES_256, U.MAC, exportable=True)
    assert store.kcv(aes.handle) == kcvs.kcv_aes_cmac(store.export(aes.handle))
    rsa = store.generate(KeyAlgorithm.EC_P256, U.SIGN)
    with pytest.raises(UnsupportedAlgorithm):
        store.kcv(rsa.handle)


def test_tr31_block_made_in_the_store_is_read_by_psec(store: KeyStore) -> None:
    kbpk = store.generate(KeyAlgorithm.AES_256, U.WRAP | U.UNWRAP, exportable=True)
    pin_key = store.generate(KeyAlgorithm.AES_128, U.WRAPPABLE | U.DECRYPT, exportable=True)
    block = store.wrap_tr31(pin_key.handle, under=kbpk.handle, header=_pin_key_header())
    header, key = psec.tr31.unwrap(store.export(kbpk.handle), block)
    assert key == store.export(pin_key.handle)
    assert (header.key_usage, header.mode_of_use, header.exportability) == ("P0", "E", "N")


def test_tr31_import_enforces_usage_and_mode_and_keeps_the_key_inside(
    store: KeyStore,
) -> None:
    kbpk = store.generate(KeyAlgorithm.TDES, U.WRAP | U.UNWRAP, exportable=True)
    clear = bytes.fromhex("F039121BEC83D26B169BDCD5B22AAF8F")
    block = psec.tr31.wrap(
        store.export(kbpk.handle), psec.tr31.Header("B", "M3", "T", "C", "00", "N"), clear
    )
    with pytest.raises(Tr31UsageMismatch):
        store.unwrap_tr31(kbpk.handle, block, expected_usage="P0", expected_modes="C", usage=U.MAC)
    with pytest.raises(Tr31ModeMismatch):
        store.unwrap_tr31(kbpk.handle, block, expected_usage="M3", expected_modes="G", usage=U.MAC)
    header, info = store.unwrap_tr31(
        kbpk.handle, block, expected_usage="M3", expected_modes="CG", usage=U.MAC
    )
    assert info.algorithm is KeyAlgorithm.TDES and not info.exportable
    assert header.key_usage == "M3"
    assert store.kcv(info.handle) == kcvs.kcv_tdes(clear)


def test_tr31_refuses_wrong_usage_flags_and_mismatched_headers(store: KeyStore) -> None:
    kbpk = store.generate(KeyAlgorithm.AES_128, U.WRAP)
    not_wrappable = store.generate(KeyAlgorithm.AES_128, U.DECRYPT)
    with pytest.raises(KeyUsageNotAllowed):
        store.wrap_tr31(not_wrappable.handle, under=kbpk.handle, header=_pin_key_header())
    tdes = store.generate(KeyAlgorithm.TDES, U.WRAPPABLE)
    with pytest.raises(InvalidInput):  # header says AES, the key is TDES
        store.wrap_tr31(tdes.handle, under=kbpk.handle, header=_pin_key_header())
    no_wrap = store.generate(KeyAlgorithm.AES_128, U.MAC)
    wrappable = store.generate(KeyAlgorithm.AES_128, U.WRAPPABLE)
    with pytest.raises(KeyUsageNotAllowed):
        store.wrap_tr31(wrappable.handle, under=no_wrap.handle, header=_pin_key_header())
    with pytest.raises(InvalidInput):  # an AES KBPK makes version D, not B
        store.wrap_tr31(wrappable.handle, under=kbpk.handle, header=_pin_key_header("B"))


def test_block_cipher_matches_pyca_and_checks_usage(store: KeyStore) -> None:
    key = store.generate(KeyAlgorithm.AES_128, U.ENCRYPT | U.DECRYPT, exportable=True)
    block = bytes(range(16))
    ours = store.block_cipher(key.handle, block, decrypt=False)
    encryptor = Cipher(algorithms.AES(store.export(key.handle)), modes.ECB()).encryptor()  # noqa: S305
    assert ours == encryptor.update(block) + encryptor.finalize()
    assert store.block_cipher(key.handle, ours, decrypt=True) == block
    iv = bytes(16)
    cbc = store.block_cipher(key.handle, block * 2, decrypt=False, mode="cbc", iv=iv)
    assert store.block_cipher(key.handle, cbc, decrypt=True, mode="cbc", iv=iv) == block * 2
    with pytest.raises(InvalidInput):
        store.block_cipher(key.handle, b"short", decrypt=False)
    with pytest.raises(InvalidInput):
        store.block_cipher(key.handle, block, decrypt=False, mode="cbc")
    encrypt_only = store.generate(KeyAlgorithm.AES_128, U.ENCRYPT)
    with pytest.raises(KeyUsageNotAllowed):
        store.block_cipher(encrypt_only.handle, block, decrypt=True)


@pytest.mark.pkcs11
def test_the_token_object_layer_alone_cannot_do_payment_operations(
    pkcs11_store: KeyStore,
) -> None:
    """Token objects only (what the PKCS#11 backend was before sealed keys): SoftHSM2 has no
    TR-31 and the layer no KCV; the backend as configured does them with sealed keys."""
    key = pkcs11_store.generate(KeyAlgorithm.AES_128, U.ENCRYPT | U.WRAP)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.kcv(key.handle)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.block_cipher(key.handle, bytes(16), decrypt=False)
    with pytest.raises(UnsupportedAlgorithm):
        pkcs11_store.wrap_tr31(key.handle, under=key.handle, header=_pin_key_header())
