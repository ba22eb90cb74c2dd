"""ISO 9564-1 PIN blocks: format 4 (AES, 16-byte blocks) and format 0 (TDES, 8-byte blocks).

The formats are field layouts around a block cipher; the cipher itself is passed in as
``encrypt``/``decrypt`` callables over whole blocks (ECB of one block), so the same code
runs on the terminal (pyca over the key the secure module holds, :func:`ecb_cipher`) and on
the server (``keystore.block_cipher`` over a key handle).

Format 4 (ISO 9564-1:2017)::

    PIN field  = 4 | N | PIN digits | A-fill to nibble 16 | 16 random nibbles   (16 bytes)
    PAN field  = M | PAN digits | 0-fill                                        (16 bytes)
                 (M = PAN length - 12; PANs shorter than 12 digits are left-padded with 0)
    block      = E(E(PIN field) XOR PAN field)

Format 0 (ISO 9564-1, "ISO-0", ANSI X9.8)::

    PIN field  = 0 | N | PIN digits | F-fill                                    (8 bytes)
    PAN field  = 0000 | 12 rightmost PAN digits excluding the check digit       (8 bytes)
    block      = E(PIN field XOR PAN field)

A PAN is 12 to 19 digits here, on the terminal and on the server alike (a card number is
never shorter; the standard's padding of shorter ones is not used). Deciphering checks
every fixed nibble; any mismatch raises :class:`PinBlockInvalid` without
saying which check failed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.crypto.payment.kcv import tdes_cipher_key
from trustfleet.errors import CryptoError, InvalidInput

BlockFunction = Callable[[bytes], bytes]
RandomSource = Callable[[int], bytes]

MIN_PIN, MAX_PIN = 4, 12
MIN_PAN, MAX_PAN = 12, 19
#: the one rule for PINs and PANs, on the terminal and on the server (the API's patterns)
PIN_PATTERN = f"^[0-9]{{{MIN_PIN},{MAX_PIN}}}$"
PAN_PATTERN = f"^[0-9]{{{MIN_PAN},{MAX_PAN}}}$"
_PIN = re.compile(PIN_PATTERN)
_PAN = re.compile(PAN_PATTERN)
FORMAT_0 = "iso-0"
FORMAT_4 = "iso-4"
#: the PIN block format each working-key algorithm uses
FORMAT_FOR_ALGORITHM = {
    KeyAlgorithm.AES_128: FORMAT_4,
    KeyAlgorithm.AES_256: FORMAT_4,
    KeyAlgorithm.TDES: FORMAT_0,
}
BLOCK_SIZE = {FORMAT_0: 8, FORMAT_4: 16}


class PinBlockInvalid(CryptoError):
    code = "pin-block-invalid"
    title = "The PIN block does not decipher to a well-formed PIN field"


def check_pin(pin: str) -> str:
    if not isinstance(pin, str) or not _PIN.fullmatch(pin):
        raise InvalidInput(f"a PIN is {MIN_PIN}-{MAX_PIN} decimal digits")
    return pin


def check_pan(pan: str) -> str:
    if not isinstance(pan, str) or not _PAN.fullmatch(pan):
        raise InvalidInput(f"a PAN is {MIN_PAN}-{MAX_PAN} decimal digits")
    return pan


# -- format 4 (AES) -------------------------------------------------------------------


def _format4_pin_field(pin: str, random: RandomSource) -> bytes:
    nibbles = f"4{len(pin):X}{pin}".ljust(16, "A")
    return bytes.fromhex(nibbles) + random(8)


def _format4_pan_field(pan: str) -> bytes:
    digits = pan.rjust(MIN_PAN, "0")
    return bytes.fromhex(f"{len(digits) - MIN_PAN}{digits}".ljust(32, "0"))


def format4_encipher(
    encrypt: BlockFunction, pin: str, pan: str, *, random: RandomSource = os.urandom
) -> bytes:
    pin_field = _format4_pin_field(check_pin(pin), random)
    intermediate = encrypt(pin_field)
    return encrypt(_xor(intermediate, _format4_pan_field(check_pan(pan))))


def format4_decipher(decrypt: BlockFunction, block: bytes, pan: str) -> str:
    _check_block(block, FORMAT_4)
    intermediate = _xor(decrypt(block), _format4_pan_field(check_pan(pan)))
    nibbles = decrypt(intermediate)[:8].hex().upper()
    return _pin_from(nibbles, control="4", fill="A")


# -- format 0 (TDES) ------------------------------------------------------------------


def _format0_pan_field(pan: str) -> bytes:
    account = pan[:-1].rjust(12, "0")[-12:]  # without the check digit
    return bytes.fromhex("0000" + account)


def format0_encipher(encrypt: BlockFunction, pin: str, pan: str) -> bytes:
    pin_field = bytes.fromhex(f"0{len(check_pin(pin)):X}{pin}".ljust(16, "F"))
    return encrypt(_xor(pin_field, _format0_pan_field(check_pan(pan))))


def format0_decipher(decrypt: BlockFunction, block: bytes, pan: str) -> str:
    _check_block(block, FORMAT_0)
    nibbles = _xor(decrypt(block), _format0_pan_field(check_pan(pan))).hex().upper()
    return _pin_from(nibbles, control="0", fill="F")


# -- by format name -------------------------------------------------------------------


def encipher(
    pin_format: str,
    encrypt: BlockFunction,
    pin: str,
    pan: str,
    *,
    random: RandomSource = os.urandom,
) -> bytes:
    if pin_format == FORMAT_4:
        return format4_encipher(encrypt, pin, pan, random=random)
    if pin_format == FORMAT_0:
        return format0_encipher(encrypt, pin, pan)
    raise InvalidInput(f"unknown PIN block format {pin_format!r}")


def decipher(pin_format: str, decrypt: BlockFunction, block: bytes, pan: str) -> str:
    if pin_format == FORMAT_4:
        return format4_decipher(decrypt, block, pan)
    if pin_format == FORMAT_0:
        return format0_decipher(decrypt, block, pan)
    raise InvalidInput(f"unknown PIN block format {pin_format!r}")


def ecb_cipher(algorithm: KeyAlgorithm, key: bytes) -> tuple[BlockFunction, BlockFunction]:
    """(encrypt, decrypt) of single blocks under a raw AES or TDES key, with pyca.

    ECB over one block is what ISO 9564-1 specifies for PIN blocks (format 4 chains its two
    encryptions through the PAN field itself)."""
    cipher_algorithm: algorithms.AES | TripleDES
    if algorithm in (KeyAlgorithm.AES_128, KeyAlgorithm.AES_256):
        cipher_algorithm = algorithms.AES(key)
    elif algorithm is KeyAlgorithm.TDES:
        cipher_algorithm = TripleDES(tdes_cipher_key(key))
    else:
        raise InvalidInput(f"{algorithm.value} keys do not make PIN blocks")
    cipher = Cipher(cipher_algorithm, modes.ECB())  # noqa: S305 - one block, per ISO 9564-1

    def encrypt(block: bytes) -> bytes:
        operation = cipher.encryptor()
        return operation.update(block) + operation.finalize()

    def decrypt(block: bytes) -> bytes:
        operation = cipher.decryptor()
        return operation.update(block) + operation.finalize()

    return encrypt, decrypt


# -- helpers --------------------------------------------------------------------------


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _check_block(block: bytes, pin_format: str) -> None:
    if not isinstance(block, bytes) or len(block) != BLOCK_SIZE[pin_format]:
        raise InvalidInput(f"an {pin_format} PIN block is {BLOCK_SIZE[pin_format]} bytes")


def _pin_from(nibbles: str, *, control: str, fill: str) -> str:
    """The PIN of a deciphered 16-nibble PIN field, or PinBlockInvalid."""
    length = int(nibbles[1], 16)
    well_formed = (
        nibbles[0] == control
        and MIN_PIN <= length <= MAX_PIN
        and nibbles[2 : 2 + length].isdigit()
        and nibbles[2 + length : 16] == fill * (14 - length)
    )
    if not well_formed:
        raise PinBlockInvalid()
    return nibbles[2 : 2 + length]
