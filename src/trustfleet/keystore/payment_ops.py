"""Payment-key operations on secret key material held by the soft store: KCVs, TR-31 key
blocks and raw block-cipher calls (PIN blocks). Thin calls into pyca and ``crypto.payment.tr31``."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment import kcv as kcvs
from trustfleet.crypto.payment import tr31
from trustfleet.errors import InvalidInput, UnsupportedAlgorithm

#: TR-31 header algorithm letter of each key algorithm a key block may carry
TR31_ALGORITHM = {
    KeyAlgorithm.AES_128: "A",
    KeyAlgorithm.AES_256: "A",
    KeyAlgorithm.TDES: "T",
    KeyAlgorithm.HMAC_SHA256: "H",
}
#: which TR-31 version each key block protection key algorithm makes
TR31_VERSION = {KeyAlgorithm.AES_128: "D", KeyAlgorithm.AES_256: "D", KeyAlgorithm.TDES: "B"}


def kcv(algorithm: KeyAlgorithm, key: bytes) -> bytes:
    return kcvs.kcv(algorithm, key)


def check_tr31_header(
    key_algorithm: KeyAlgorithm, kbpk: KeyAlgorithm, header: tr31.KeyBlockHeader
) -> None:
    letter = TR31_ALGORITHM.get(key_algorithm)
    if letter is None:
        raise UnsupportedAlgorithm(f"{key_algorithm.value} keys cannot travel in TR-31 blocks")
    if header.algorithm != letter:
        raise InvalidInput(
            f"the header says algorithm {header.algorithm!r}; the key is {key_algorithm.value}"
        )
    version = TR31_VERSION.get(kbpk)
    if version is None:
        raise UnsupportedAlgorithm(f"{kbpk.value} keys cannot protect TR-31 key blocks")
    if header.version_id != version:
        raise InvalidInput(
            f"a {kbpk.value} key block protection key makes version {version} blocks"
        )


def algorithm_of_block_key(header: tr31.KeyBlockHeader, key: bytes) -> KeyAlgorithm:
    """The key algorithm of a key read out of a TR-31 block."""
    if header.algorithm == "T":
        return KeyAlgorithm.TDES
    if header.algorithm == "H":
        return KeyAlgorithm.HMAC_SHA256
    if header.algorithm == "A" and len(key) in (16, 32):
        return KeyAlgorithm.AES_128 if len(key) == 16 else KeyAlgorithm.AES_256
    raise UnsupportedAlgorithm(
        f"TR-31 algorithm {header.algorithm!r} with a {len(key)}-byte key cannot be stored here"
    )


def unwrap_tr31(
    kbpk: bytes,
    block: str,
    expected_usage: str | Iterable[str],
    expected_modes: Iterable[str],
) -> tuple[tr31.KeyBlockHeader, bytes]:
    return tr31.unwrap_for(
        kbpk, block, expected_usage=expected_usage, expected_modes=expected_modes
    )


BLOCK_SIZES = {
    KeyAlgorithm.AES_128: 16,
    KeyAlgorithm.AES_256: 16,
    KeyAlgorithm.SM4: 16,
    KeyAlgorithm.TDES: 8,
}


def check_block_input(algorithm: KeyAlgorithm, data: bytes, mode: str, iv: bytes) -> None:
    """What :func:`block_cipher` accepts, checked before any key is used."""
    block = BLOCK_SIZES.get(algorithm)
    if block is None:
        raise UnsupportedAlgorithm(f"{algorithm.value} keys are not block cipher keys")
    if not data or len(data) % block:
        raise InvalidInput(f"data must be a non-empty multiple of {block} bytes")
    if mode == "ecb":
        if iv:
            raise InvalidInput("ECB takes no IV")
    elif mode == "cbc":
        if len(iv) != block:
            raise InvalidInput(f"CBC needs a {block}-byte IV")
    else:
        raise InvalidInput("mode is ecb or cbc")


def block_cipher(
    algorithm: KeyAlgorithm, key: bytes, data: bytes, *, decrypt: bool, mode: str, iv: bytes
) -> bytes:
    check_block_input(algorithm, data, mode, iv)
    cipher_algorithm = _block_algorithm(algorithm, key)
    operation: CipherContext
    if mode == "ecb":
        # single PIN blocks and KCVs are ECB by their standards
        ecb = Cipher(cipher_algorithm, modes.ECB())  # noqa: S305
        operation = ecb.decryptor() if decrypt else ecb.encryptor()
    else:
        cbc = Cipher(cipher_algorithm, modes.CBC(iv))
        operation = cbc.decryptor() if decrypt else cbc.encryptor()
    return operation.update(data) + operation.finalize()


def _block_algorithm(
    algorithm: KeyAlgorithm, key: bytes
) -> algorithms.AES | algorithms.SM4 | TripleDES:
    if algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        return algorithms.AES(key)
    if algorithm is KeyAlgorithm.SM4:
        return algorithms.SM4(key)
    if algorithm is KeyAlgorithm.TDES:
        return TripleDES(kcvs.tdes_cipher_key(key))
    raise UnsupportedAlgorithm(f"{algorithm.value} keys are not block cipher keys")
