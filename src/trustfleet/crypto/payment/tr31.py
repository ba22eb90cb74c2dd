"""TR-31 / ANSI X9.143 key blocks, versions B (TDES) and D (AES), sans I/O.

A key block carries a symmetric key together with its attributes (usage, algorithm, mode
of use, exportability...) under a key block protection key (KBPK). Both versions use the
*key derivation binding method*:

- KBEK (encryption) and KBAK (authentication) keys are derived from the KBPK with CMAC in
  counter mode (one CMAC call per cipher block of KBPK length, NIST SP 800-108);
- the MAC is CMAC(KBAK, header text || clear key field), 8 bytes for B, 16 for D;
- the key field is encrypted with CBC under the KBEK, the MAC being the IV.

The MAC covers the *clear* key field, so a block is decrypted before its MAC can be
checked; nothing of the decrypted field is looked at (no padding, no length) until the
MAC has been compared in constant time, and every failure is the same error.

:func:`unwrap` authenticates a block and returns its header and key; :func:`unwrap_for`
also enforces what the caller expects (usage, mode of use, KBPK strength, exportability).
Every malformed input raises :class:`Tr31Malformed`; no other exception escapes.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

from trustfleet.crypto.payment.kcv import tdes_cipher_key
from trustfleet.errors import CryptoError

# --- errors -------------------------------------------------------------------------


class Tr31Error(CryptoError):
    code = "tr31-error"
    title = "The TR-31 key block was refused"


class Tr31Malformed(Tr31Error):
    code = "tr31-malformed"
    title = "The TR-31 key block or header is malformed"


class Tr31MacMismatch(Tr31Error):
    code = "tr31-mac-mismatch"
    title = "The TR-31 key block does not authenticate under this KBPK"


class Tr31UnsupportedVersion(Tr31Error):
    code = "tr31-unsupported-version"
    title = "Only TR-31 key block versions B and D are supported"


class Tr31KbpkMismatch(Tr31Error):
    code = "tr31-kbpk-mismatch"
    title = "The KBPK does not fit the key block version or is weaker than the key"


class Tr31InvalidKeyLength(Tr31Error):
    code = "tr31-invalid-key-length"
    title = "The key length does not fit the key block's algorithm"


class Tr31UsageMismatch(Tr31Error):
    code = "tr31-usage-mismatch"
    title = "The key block's key usage is not the expected one"


class Tr31ModeMismatch(Tr31Error):
    code = "tr31-mode-mismatch"
    title = "The key block's mode of use is not allowed here"


class Tr31NotExportable(Tr31Error):
    code = "tr31-not-exportable"
    title = "The key block does not allow exporting its key"


# --- header -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyBlockHeader:
    """The attributes of a key block.

    ``optional_blocks`` are (two-character id, printable ASCII data) pairs in order; the
    padding block ``PB`` is framing, added by :func:`wrap` and dropped by :func:`unwrap`.
    ``context`` is the X9.143 key context digit (TR-31:2018 reserved it as ``0``).
    """

    version_id: str
    key_usage: str
    algorithm: str
    mode_of_use: str
    key_version: str = "00"
    exportability: str = "N"
    optional_blocks: list[tuple[str, str]] = field(default_factory=list)
    context: str = "0"


SUPPORTED_VERSIONS = frozenset({"B", "D"})
KEY_USAGES = frozenset(
    {"B0", "B1", "B2", "B3", "C0", "D0", "D1", "D2", "D3", "I0", "K0", "K1", "K2", "K3"}
    | {"P0", "P1", "S0", "S1", "S2"}
    | {f"E{n}" for n in range(7)}
    | {f"M{n}" for n in range(9)}
    | {f"V{n}" for n in range(5)}
)
ALGORITHMS = frozenset("ADEHRST")
MODES_OF_USE = frozenset("BCDEGNSTVXY")
EXPORTABILITY = frozenset("ENS")
EXPORTABLE = frozenset("ES")
CONTEXTS = frozenset("012")
PADDING_BLOCK_ID = "PB"

# TR-31:2018 table of the modes of use each key usage admits; "N" (no restriction beyond
# the usage) fits every usage. Usages not listed (proprietary) are not cross-checked.
_MODES_BY_USAGE: dict[str, str] = {
    "B0": "X",
    "B1": "X",
    "B2": "X",
    "C0": "CGV",
    "D0": "BDE",
    "D1": "BDE",
    "D2": "BDE",
    "I0": "N",
    "K0": "BDE",
    "K1": "BDE",
    "K2": "BDE",
    "K3": "BDEX",
    "P0": "BDE",
    "S0": "SV",
    "S1": "SV",
    "S2": "SVTBDE",
    **{f"E{n}": "X" for n in range(7)},
    **{f"M{n}": "CGV" for n in range(9)},
    **{f"V{n}": "CGV" for n in range(5)},
}

_BLOCK_SIZE = {"B": 8, "D": 16}
_MAC_LENGTH = {"B": 8, "D": 16}
# KDF algorithm indicator by KBPK length (TR-31:2018, key derivation input data)
_KDF_ALGORITHM = {"B": {16: 0x0000, 24: 0x0001}, "D": {16: 0x0002, 24: 0x0003, 32: 0x0004}}
_KDF_ENCRYPTION = 0x0000
_KDF_AUTHENTICATION = 0x0001
# key lengths each algorithm admits, and the length keys are padded to (length masking)
_KEY_LENGTHS = {"T": (16, 24), "A": (16, 24, 32), "D": (8,)}
_MASKED_KEY_LENGTH = {"T": 24, "A": 32, "D": 24}
_MAX_BLOCK_LENGTH = 9999
_FIXED_HEADER_LENGTH = 16

_TWO_ALNUM = re.compile(r"[0-9A-Za-z]{2}")
_TWO_DIGITS = re.compile(r"[0-9]{2}")
_ONE_DIGIT = re.compile(r"[0-9]")
_FOUR_DIGITS = re.compile(r"[0-9]{4}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
# TR-31 hex fields are uppercase; refusing lowercase keeps one encoding per block
_HEX_BYTES = re.compile(r"(?:[0-9A-F]{2})*")
_HEX_PAIR = re.compile(r"[0-9A-F]{2}")


def _matches(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _is_code(value: object, known: frozenset[str], proprietary: re.Pattern[str]) -> bool:
    return isinstance(value, str) and (value in known or _matches(proprietary, value))


def _validate_header(header: KeyBlockHeader) -> None:
    if header.version_id not in SUPPORTED_VERSIONS:
        raise Tr31UnsupportedVersion()
    checks = (
        ("key usage", _is_code(header.key_usage, KEY_USAGES, _TWO_DIGITS)),
        ("algorithm", _is_code(header.algorithm, ALGORITHMS, _ONE_DIGIT)),
        ("mode of use", _is_code(header.mode_of_use, MODES_OF_USE, _ONE_DIGIT)),
        ("key version number", _matches(_TWO_ALNUM, header.key_version)),
        ("exportability", _is_code(header.exportability, EXPORTABILITY, _ONE_DIGIT)),
        ("key context", isinstance(header.context, str) and header.context in CONTEXTS),
    )
    for name, valid in checks:
        if not valid:
            raise Tr31Malformed(f"the {name} field is not valid")
    _validate_optional_blocks(header.optional_blocks)


def _validate_optional_blocks(blocks: object) -> None:
    if not isinstance(blocks, list):
        raise Tr31Malformed("optional blocks must be a list of (id, data) pairs")
    seen: set[str] = set()
    for entry in blocks:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise Tr31Malformed("optional blocks must be a list of (id, data) pairs")
        block_id, data = entry
        if not _matches(_TWO_ALNUM, block_id) or not _matches(_PRINTABLE, data):
            raise Tr31Malformed("an optional block id or its data is not valid")
        if block_id == PADDING_BLOCK_ID:
            raise Tr31Malformed("the padding block PB is added by the encoder")
        if block_id in seen:
            raise Tr31Malformed(f"optional block {block_id} appears twice")
        seen.add(block_id)


def _check_mode_fits_usage(header: KeyBlockHeader) -> None:
    allowed = _MODES_BY_USAGE.get(header.key_usage)
    if allowed is not None and header.mode_of_use not in allowed + "N":
        raise Tr31ModeMismatch(
            f"mode of use {header.mode_of_use} is not defined for key usage {header.key_usage}"
        )


# --- encoding -----------------------------------------------------------------------


def _encode_optional_block(block_id: str, data: str) -> str:
    length = len(data) + 4
    if length <= 0xFF:
        return f"{block_id}{length:02X}{data}"
    # extended length: "00", the length of the length (2 bytes), then the length
    length = len(data) + 10
    if length > 0xFFFF:
        raise Tr31Malformed(f"optional block {block_id} is too long")
    return f"{block_id}0002{length:04X}{data}"


def _encode_optional_blocks(blocks: list[tuple[str, str]], block_size: int) -> tuple[int, str]:
    text = "".join(_encode_optional_block(block_id, data) for block_id, data in blocks)
    count = len(blocks)
    if (_FIXED_HEADER_LENGTH + len(text)) % block_size:
        pad = -(_FIXED_HEADER_LENGTH + len(text) + 4) % block_size
        text += f"{PADDING_BLOCK_ID}{pad + 4:02X}" + "0" * pad
        count += 1
    if count > 99:
        raise Tr31Malformed("a key block has at most 99 optional blocks")
    return count, text


def _encode_header(header: KeyBlockHeader, key_field_length: int) -> str:
    version = header.version_id
    count, blocks = _encode_optional_blocks(header.optional_blocks, _BLOCK_SIZE[version])
    total = _FIXED_HEADER_LENGTH + len(blocks) + 2 * (key_field_length + _MAC_LENGTH[version])
    if total > _MAX_BLOCK_LENGTH:
        raise Tr31Malformed(f"the key block would be longer than {_MAX_BLOCK_LENGTH}")
    return (
        f"{version}{total:04d}{header.key_usage}{header.algorithm}{header.mode_of_use}"
        f"{header.key_version}{header.exportability}{count:02d}{header.context}0{blocks}"
    )


def _key_field(header: KeyBlockHeader, key: bytes) -> bytes:
    """2-byte key length in bits || key || random padding to the masked length."""
    masked = max(_MASKED_KEY_LENGTH.get(header.algorithm, 0), len(key))
    padding = masked - len(key) + (-(2 + masked) % _BLOCK_SIZE[header.version_id])
    return (len(key) * 8).to_bytes(2, "big") + key + os.urandom(padding)


# --- decoding -----------------------------------------------------------------------


@dataclass(frozen=True)
class _ParsedBlock:
    header: KeyBlockHeader
    header_text: str  # the exact characters the MAC covers
    encrypted_key_field: bytes
    mac: bytes


def _parse_block(block: object) -> _ParsedBlock:
    if not isinstance(block, str) or not block.isascii():
        raise Tr31Malformed("a key block is an ASCII string")
    if len(block) < _FIXED_HEADER_LENGTH:
        raise Tr31Malformed("the key block is shorter than its header")
    version = block[0]
    if version not in SUPPORTED_VERSIONS:
        raise Tr31UnsupportedVersion()
    if not _matches(_FOUR_DIGITS, block[1:5]) or int(block[1:5]) != len(block):
        raise Tr31Malformed("the key block length field does not match its length")
    if not _matches(_TWO_DIGITS, block[12:14]) or block[15] != "0":
        raise Tr31Malformed("the optional block count or reserved field is not valid")
    blocks, header_end = _parse_optional_blocks(block, int(block[12:14]))
    header = KeyBlockHeader(
        version_id=version,
        key_usage=block[5:7],
        algorithm=block[7],
        mode_of_use=block[8],
        key_version=block[9:11],
        exportability=block[11],
        optional_blocks=blocks,
        context=block[14],
    )
    _validate_header(header)
    encrypted, mac = _split_body(version, block, header_end)
    return _ParsedBlock(header, block[:header_end], encrypted, mac)


def _parse_optional_blocks(block: str, count: int) -> tuple[list[tuple[str, str]], int]:
    blocks: list[tuple[str, str]] = []
    position = _FIXED_HEADER_LENGTH
    for index in range(count):
        block_id, data, position = _parse_optional_block(block, position)
        if block_id == PADDING_BLOCK_ID:
            if index != count - 1 or not _matches(_PRINTABLE, data):
                raise Tr31Malformed("the padding block PB must be the last optional block")
        else:
            blocks.append((block_id, data))
    return blocks, position


def _parse_optional_block(block: str, start: int) -> tuple[str, str, int]:
    block_id, length_text = block[start : start + 2], block[start + 2 : start + 4]
    if not _matches(_TWO_ALNUM, block_id) or not _matches(_HEX_PAIR, length_text):
        raise Tr31Malformed("an optional block id or length is not valid")
    length, data_start = int(length_text, 16), start + 4
    if length == 0:
        length_length_text = block[start + 4 : start + 6]
        if not _matches(_HEX_PAIR, length_length_text) or length_length_text == "00":
            raise Tr31Malformed(f"optional block {block_id} has a bad extended length")
        data_start = start + 6 + 2 * int(length_length_text, 16)
        extended = block[start + 6 : data_start]
        if not _matches(_HEX_BYTES, extended) or len(extended) != data_start - start - 6:
            raise Tr31Malformed(f"optional block {block_id} has a bad extended length")
        length = int(extended, 16)
    end = start + length
    if end < data_start or end > len(block):
        raise Tr31Malformed(f"optional block {block_id} overruns the key block")
    return block_id, block[data_start:end], end


def _split_body(version: str, block: str, header_end: int) -> tuple[bytes, bytes]:
    block_size, mac_hex_length = _BLOCK_SIZE[version], 2 * _MAC_LENGTH[version]
    if header_end % block_size:
        raise Tr31Malformed("the header is not a multiple of the cipher block size")
    encrypted_hex = block[header_end : len(block) - mac_hex_length]
    mac_hex = block[len(block) - mac_hex_length :]
    if not encrypted_hex or len(encrypted_hex) % (2 * block_size):
        raise Tr31Malformed("the encrypted key field is not whole cipher blocks")
    if not _matches(_HEX_BYTES, encrypted_hex) or not _matches(_HEX_BYTES, mac_hex):
        raise Tr31Malformed("the key field and MAC must be uppercase hexadecimal")
    return bytes.fromhex(encrypted_hex), bytes.fromhex(mac_hex)


def _key_from_field(key_field: bytes) -> bytes:
    bits = int.from_bytes(key_field[:2], "big")
    if bits == 0 or bits % 8 or bits // 8 > len(key_field) - 2:
        raise Tr31Malformed("the key length inside the key block is not valid")
    return key_field[2 : 2 + bits // 8]


# --- cryptography -------------------------------------------------------------------


def _cipher_algorithm(version: str, key: bytes) -> BlockCipherAlgorithm:
    return TripleDES(tdes_cipher_key(key)) if version == "B" else algorithms.AES(key)


def _cmac(version: str, key: bytes, data: bytes) -> bytes:
    mac = cmac.CMAC(_cipher_algorithm(version, key))
    mac.update(data)
    return mac.finalize()


def _derive(version: str, kbpk: bytes, key_usage: int) -> bytes:
    """One TR-31 derived key: CMAC(KBPK, counter || usage || 00 || algorithm || bits)."""
    suffix = (
        key_usage.to_bytes(2, "big")
        + b"\x00"
        + _KDF_ALGORITHM[version][len(kbpk)].to_bytes(2, "big")
        + (len(kbpk) * 8).to_bytes(2, "big")
    )
    calls = -(-len(kbpk) // _BLOCK_SIZE[version])
    output = b"".join(
        _cmac(version, kbpk, bytes([counter]) + suffix) for counter in range(1, calls + 1)
    )
    return output[: len(kbpk)]


def _check_kbpk(version: str, kbpk: object) -> None:
    if not isinstance(kbpk, bytes) or len(kbpk) not in _KDF_ALGORITHM[version]:
        kind = "2-key or 3-key TDES" if version == "B" else "AES-128, AES-192 or AES-256"
        raise Tr31KbpkMismatch(f"a version {version} KBPK is a {kind} key")


def _cbc(version: str, kbek: bytes, iv: bytes) -> Cipher[modes.CBC]:
    return Cipher(_cipher_algorithm(version, kbek), modes.CBC(iv[: _BLOCK_SIZE[version]]))


def _strength_bits(algorithm: str, length: int) -> int | None:
    """Security strength (NIST SP 800-57) of a key, None where it is not comparable."""
    if algorithm == "T":
        return 80 if length == 16 else 112
    if algorithm == "D":
        return 56
    if algorithm == "A":
        return length * 8
    return None


def _check_key_fits(header: KeyBlockHeader, kbpk: bytes, key: bytes) -> None:
    """The key's length suits its algorithm, and the KBPK is at least as strong."""
    lengths = _KEY_LENGTHS.get(header.algorithm)
    if not key or (lengths is not None and len(key) not in lengths):
        raise Tr31InvalidKeyLength(
            f"a {len(key)}-byte key does not fit algorithm {header.algorithm}"
        )
    key_strength = _strength_bits(header.algorithm, len(key))
    kbpk_strength = _strength_bits("T" if header.version_id == "B" else "A", len(kbpk))
    if key_strength is not None and kbpk_strength is not None and key_strength > kbpk_strength:
        raise Tr31KbpkMismatch("the KBPK is weaker than the key it would protect")


# --- API ----------------------------------------------------------------------------


def wrap(kbpk: bytes, header: KeyBlockHeader, key: bytes) -> str:
    """Protect ``key`` under ``kbpk`` in a version B or D key block described by ``header``.

    The key length is masked: TDES and DES keys are padded to 24 bytes, AES keys to 32,
    with random bytes; the length field inside the encrypted key field keeps the truth.
    """
    if not isinstance(header, KeyBlockHeader):
        raise Tr31Malformed("the header must be a KeyBlockHeader")
    _validate_header(header)
    _check_kbpk(header.version_id, kbpk)
    if not isinstance(key, bytes):
        raise Tr31InvalidKeyLength("the key must be bytes")
    _check_key_fits(header, kbpk, key)
    _check_mode_fits_usage(header)
    version = header.version_id
    key_field = _key_field(header, key)
    header_text = _encode_header(header, len(key_field))
    mac = _cmac(
        version, _derive(version, kbpk, _KDF_AUTHENTICATION), _mac_input(header_text, key_field)
    )
    encryptor = _cbc(version, _derive(version, kbpk, _KDF_ENCRYPTION), mac).encryptor()
    encrypted = encryptor.update(key_field) + encryptor.finalize()
    return header_text + encrypted.hex().upper() + mac.hex().upper()


def _mac_input(header_text: str, key_field: bytes) -> bytes:
    return header_text.encode("ascii") + key_field


def unwrap(kbpk: bytes, block: str) -> tuple[KeyBlockHeader, bytes]:
    """Authenticate ``block`` under ``kbpk``; return its header and the key.

    Checks the format and the MAC only; use :func:`unwrap_for` to also enforce what the
    key may be used for.
    """
    parsed = _parse_block(block)
    version = parsed.header.version_id
    _check_kbpk(version, kbpk)
    decryptor = _cbc(version, _derive(version, kbpk, _KDF_ENCRYPTION), parsed.mac).decryptor()
    key_field = decryptor.update(parsed.encrypted_key_field) + decryptor.finalize()
    kbak = _derive(version, kbpk, _KDF_AUTHENTICATION)
    expected_mac = _cmac(version, kbak, _mac_input(parsed.header_text, key_field))
    if not hmac.compare_digest(expected_mac, parsed.mac):
        raise Tr31MacMismatch()
    return parsed.header, _key_from_field(key_field)


def unwrap_for(
    kbpk: bytes,
    block: str,
    *,
    expected_usage: Iterable[str] | str,
    expected_modes: Iterable[str],
    allow_export: bool = False,
) -> tuple[KeyBlockHeader, bytes]:
    """:func:`unwrap`, then refuse the key unless it is what the caller is about to use.

    - the key usage is ``expected_usage`` (or one of them),
    - the mode of use is one of ``expected_modes`` (listed exactly: ``{"D"}`` refuses a
      ``B`` key) and is one TR-31 defines for that usage,
    - the key length suits the header's algorithm and the KBPK is at least as strong as
      the key (a TDES KBPK cannot carry an AES key, 2-key TDES cannot carry 3-key TDES),
    - with ``allow_export=True`` (the caller is going to export the key) the block must be
      exportable (``E`` or ``S``).
    """
    usages = {expected_usage} if isinstance(expected_usage, str) else set(expected_usage)
    modes_of_use = set(expected_modes)
    header, key = unwrap(kbpk, block)
    if header.key_usage not in usages:
        raise Tr31UsageMismatch(
            f"key usage {header.key_usage} is not one of {', '.join(sorted(usages))}"
        )
    if header.mode_of_use not in modes_of_use:
        raise Tr31ModeMismatch(
            f"mode of use {header.mode_of_use} is not one of {', '.join(sorted(modes_of_use))}"
        )
    _check_mode_fits_usage(header)
    _check_key_fits(header, kbpk, key)
    if allow_export and header.exportability not in EXPORTABLE:
        raise Tr31NotExportable(f"exportability is {header.exportability}")
    return header, key
