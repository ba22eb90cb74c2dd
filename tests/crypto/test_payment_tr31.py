"""TR-31 key blocks: published vectors, psec interop both ways, attacks and bad input."""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import psec
import pytest

from trustfleet.crypto.payment import tr31
from trustfleet.crypto.payment.tr31 import KeyBlockHeader
from trustfleet.errors import CryptoError


def psec_wrap(kbpk: bytes, header: Any, key: bytes) -> str:
    # psec imports TripleDES from its deprecated location; its warnings are not ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(psec.tr31.wrap(kbpk, header, key))


def psec_unwrap(kbpk: bytes, block: str) -> tuple[Any, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header, key = psec.tr31.unwrap(kbpk, block)
        return header, bytes(key)


def psec_header(header: KeyBlockHeader) -> Any:
    result = psec.tr31.Header(
        header.version_id,
        header.key_usage,
        header.algorithm,
        header.mode_of_use,
        header.key_version,
        header.exportability,
    )
    for block_id, data in header.optional_blocks:
        result.blocks[block_id] = data
    return result


def raises_code(code: str) -> Any:
    return pytest.raises(CryptoError, check=lambda error: error.code == code)


# --- published vectors --------------------------------------------------------------

# TR-31:2018 Annex A worked examples (versions B and D; the A and C examples are versions
# this module does not read), plus one third-party version B vector with the annex KBPK.
ANNEX_B_BLOCK = "B0080P0TE00E000094B420079CC80BA3461F86FE26EFC4A3B8E4FA4C5F5341176EED7B727B8A248E"
ANNEX_B_KS_KBPK = bytes.fromhex("1D22BF32387C600AD97F9B97A51311AC")
ANNEX_B_KS_BLOCK = (
    "B0104B0TX12S0100KS1800604B120F9292800000"
    "BB68BE8680A400D9191AD4ECE45B6E6C0D21C4738A52190E248719E24B433627"
)
ANNEX_D_BLOCK = (
    "D0112P0AE00E0000B82679114F470F540165EDFBF7E250FCEA43F810D215F8D2"
    "07E2E417C07156A27E8E31DA05F7425509593D03A457DC34"
)
PUBLISHED_VECTORS = [
    pytest.param(
        "DD7515F2BFC17F85CE48F3CA25CB21F6",
        "3F419E1CB7079442AA37474C2EFBF8B8",
        ANNEX_B_BLOCK,
        KeyBlockHeader("B", "P0", "T", "E", "00", "E"),
        id="annex-B-P0",
    ),
    pytest.param(
        "1D22BF32387C600AD97F9B97A51311AC",
        "E8BC63E5479455E26577F715D587FE68",
        ANNEX_B_KS_BLOCK,
        KeyBlockHeader("B", "B0", "T", "X", "12", "S", [("KS", "00604B120F9292800000")]),
        id="annex-B-B0-KS",
    ),
    pytest.param(
        "88E1AB2A2E3DD38C1FA039A536500CC8A87AB9D62DC92C01058FA79F44657DE6",
        "3F419E1CB7079442AA37474C2EFBF8B8",
        ANNEX_D_BLOCK,
        KeyBlockHeader("D", "P0", "A", "E", "00", "E"),
        id="annex-D-P0",
    ),
    pytest.param(
        "89E88CF7931444F334BD7547FC3F380C",
        "F039121BEC83D26B169BDCD5B22AAF8F",
        "B0120P0TE12E0100KS1800604B120F9292800000"
        "E6E28F097CB0350B2EB2DF520947F779FA34D9759CEE7E0DEEACF8353DB778D47FA4EC20DA3A9754",
        KeyBlockHeader("B", "P0", "T", "E", "12", "E", [("KS", "00604B120F9292800000")]),
        id="third-party-B-P0-KS",
    ),
]


@pytest.mark.parametrize(("kbpk", "key", "block", "header"), PUBLISHED_VECTORS)
def test_published_vectors_unwrap_to_the_published_key(
    kbpk: str, key: str, block: str, header: KeyBlockHeader
) -> None:
    got_header, got_key = tr31.unwrap(bytes.fromhex(kbpk), block)
    assert got_key.hex().upper() == key
    assert got_header == header
    # the vector text is confirmed independently
    assert psec_unwrap(bytes.fromhex(kbpk), block)[1].hex().upper() == key


# --- interop with psec --------------------------------------------------------------

KS = ("KS", "00604B120F9292800000")
INTEROP_CASES = [
    pytest.param(16, KeyBlockHeader("B", "P0", "T", "E", "00", "N"), 16, id="B-2key-P0"),
    pytest.param(24, KeyBlockHeader("B", "K0", "T", "B", "01", "E", [KS]), 16, id="B-3key-K0"),
    pytest.param(24, KeyBlockHeader("B", "M3", "T", "C", "00", "N"), 24, id="B-3key-M3"),
    pytest.param(
        24, KeyBlockHeader("B", "D0", "T", "D", "c1", "S", [("TT", "Hello")]), 24, id="B-PB"
    ),
    pytest.param(16, KeyBlockHeader("D", "D0", "A", "B", "00", "N"), 16, id="D-128-D0"),
    pytest.param(16, KeyBlockHeader("D", "P0", "T", "E", "00", "E", [KS]), 24, id="D-128-TDES"),
    pytest.param(24, KeyBlockHeader("D", "K1", "A", "D", "05", "N"), 24, id="D-192-K1"),
    pytest.param(32, KeyBlockHeader("D", "K0", "A", "E", "00", "E", [KS]), 32, id="D-256-K0"),
    pytest.param(
        32,
        KeyBlockHeader("D", "M7", "H", "C", "00", "N", [("HM", "21"), ("TT", "x" * 300)]),
        32,
        id="D-256-HMAC-extended-length",
    ),
    pytest.param(32, KeyBlockHeader("D", "B1", "A", "X", "00", "N", [KS]), 16, id="D-256-B1"),
]


@pytest.mark.parametrize(("kbpk_length", "header", "key_length"), INTEROP_CASES)
def test_psec_unwraps_our_blocks(kbpk_length: int, header: KeyBlockHeader, key_length: int) -> None:
    kbpk, key = os.urandom(kbpk_length), os.urandom(key_length)
    block = tr31.wrap(kbpk, header, key)
    theirs, their_key = psec_unwrap(kbpk, block)
    assert their_key == key
    assert (theirs.version_id, theirs.key_usage, theirs.algorithm) == (
        header.version_id,
        header.key_usage,
        header.algorithm,
    )
    assert (theirs.mode_of_use, theirs.version_num, theirs.exportability) == (
        header.mode_of_use,
        header.key_version,
        header.exportability,
    )
    assert dict(theirs.blocks) == dict(header.optional_blocks)


@pytest.mark.parametrize(("kbpk_length", "header", "key_length"), INTEROP_CASES)
def test_we_unwrap_psec_blocks(kbpk_length: int, header: KeyBlockHeader, key_length: int) -> None:
    kbpk, key = os.urandom(kbpk_length), os.urandom(key_length)
    block = psec_wrap(kbpk, psec_header(header), key)
    assert tr31.unwrap(kbpk, block) == (header, key)


def test_round_trip_keeps_every_header_field() -> None:
    header = KeyBlockHeader(
        "D", "K1", "A", "B", "7a", "E", [("KS", "ABC"), ("ZZ", " ~!"), ("TT", "y" * 400)], "2"
    )
    kbpk, key = os.urandom(32), os.urandom(32)
    block = tr31.wrap(kbpk, header, key)
    assert tr31.unwrap(kbpk, block) == (header, key)
    assert block[14] == "2"  # key context digit


def test_key_length_is_masked_and_padding_is_random() -> None:
    kbpk = os.urandom(32)
    tdes = KeyBlockHeader("D", "P0", "T", "E")
    aes = KeyBlockHeader("D", "P0", "A", "E")
    assert len(tr31.wrap(kbpk, tdes, os.urandom(16))) == len(tr31.wrap(kbpk, tdes, os.urandom(24)))
    assert len(tr31.wrap(kbpk, aes, os.urandom(16))) == len(tr31.wrap(kbpk, aes, os.urandom(32)))
    key = os.urandom(16)
    assert tr31.wrap(kbpk, aes, key) != tr31.wrap(kbpk, aes, key)


def test_our_code_emits_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kbpk = os.urandom(16)
        block = tr31.wrap(kbpk, KeyBlockHeader("B", "P0", "T", "E"), os.urandom(16))
        tr31.unwrap(kbpk, block)


# --- attacks --------------------------------------------------------------------------


def _flip_hex(block: str, index: int) -> str:
    flipped = "0" if block[index] != "0" else "1"
    return block[:index] + flipped + block[index + 1 :]


@pytest.fixture(params=["B", "D"])
def sample(request: pytest.FixtureRequest) -> tuple[bytes, str]:
    version = request.param
    kbpk = os.urandom(16 if version == "B" else 32)
    header = KeyBlockHeader(version, "P0", "T", "E", "00", "N", [KS])
    return kbpk, tr31.wrap(kbpk, header, os.urandom(16))


def test_flipped_mac_byte_is_refused(sample: tuple[bytes, str]) -> None:
    kbpk, block = sample
    with raises_code("tr31-mac-mismatch"):
        tr31.unwrap(kbpk, _flip_hex(block, len(block) - 1))


def test_flipped_ciphertext_byte_is_refused(sample: tuple[bytes, str]) -> None:
    kbpk, block = sample
    with raises_code("tr31-mac-mismatch"):
        tr31.unwrap(kbpk, _flip_hex(block, 45))


def test_edited_header_is_refused(sample: tuple[bytes, str]) -> None:
    kbpk, block = sample
    assert block[5:7] == "P0"
    with raises_code("tr31-mac-mismatch"):
        tr31.unwrap(kbpk, block[:5] + "D0" + block[7:])


def test_edited_optional_block_is_refused(sample: tuple[bytes, str]) -> None:
    kbpk, block = sample
    with raises_code("tr31-mac-mismatch"):
        tr31.unwrap(kbpk, block.replace("KS1800604B", "KS1800605B", 1))


def test_wrong_kbpk_is_refused(sample: tuple[bytes, str]) -> None:
    kbpk, block = sample
    with raises_code("tr31-mac-mismatch"):
        tr31.unwrap(os.urandom(len(kbpk)), block)


@pytest.mark.parametrize("kbpk_length", [8, 32])
def test_kbpk_of_the_wrong_kind_for_version_b(kbpk_length: int) -> None:
    with raises_code("tr31-kbpk-mismatch"):
        tr31.unwrap(os.urandom(kbpk_length), ANNEX_B_BLOCK)


def test_kbpk_of_the_wrong_kind_for_version_d() -> None:
    with raises_code("tr31-kbpk-mismatch"):
        tr31.unwrap(os.urandom(20), ANNEX_D_BLOCK)


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        (
            "B0064M3TC00E000013F1B06566ECAE897A6DF8C7AA651FCEF9480447EEEC9933",
            "authentic block whose key length is 0 bits",
        ),
        (
            "B0064M3TC00E00000398DC96A5DDB0EF61E26F8935173BD478DF9484050A672A",
            "authentic block claiming 128 bits but holding 64",
        ),
    ],
)
def test_authentic_block_with_a_bad_key_length_is_malformed(block: str, reason: str) -> None:
    with raises_code("tr31-malformed"):
        tr31.unwrap(b"E" * 16, block)


# --- enforcement ----------------------------------------------------------------------


def test_unwrap_for_returns_the_expected_key() -> None:
    kbpk, key = os.urandom(32), os.urandom(16)
    header = KeyBlockHeader("D", "K0", "A", "D", "00", "E")
    block = tr31.wrap(kbpk, header, key)
    got = tr31.unwrap_for(
        kbpk, block, expected_usage={"K0", "K1"}, expected_modes={"B", "D"}, allow_export=True
    )
    assert got == (header, key)


def test_pin_key_where_a_mac_key_is_expected() -> None:
    kbpk = os.urandom(16)
    block = tr31.wrap(kbpk, KeyBlockHeader("B", "P0", "T", "E"), os.urandom(16))
    with raises_code("tr31-usage-mismatch"):
        tr31.unwrap_for(kbpk, block, expected_usage="M3", expected_modes={"C"})


def test_encrypt_only_key_where_decrypt_is_required() -> None:
    kbpk = os.urandom(32)
    block = tr31.wrap(kbpk, KeyBlockHeader("D", "K0", "A", "E"), os.urandom(32))
    with raises_code("tr31-mode-mismatch"):
        tr31.unwrap_for(kbpk, block, expected_usage="K0", expected_modes={"D"})


def test_mode_that_the_usage_does_not_admit() -> None:
    kbpk = os.urandom(16)
    block = psec_wrap(kbpk, "D0000P0AC00N0000", os.urandom(16))  # PIN key "generate+verify"
    assert tr31.unwrap(kbpk, block)[0].mode_of_use == "C"
    with raises_code("tr31-mode-mismatch"):
        tr31.unwrap_for(kbpk, block, expected_usage="P0", expected_modes={"C"})
    with raises_code("tr31-mode-mismatch"):
        tr31.wrap(kbpk, KeyBlockHeader("D", "P0", "A", "C"), os.urandom(16))


def test_non_exportable_key_asked_for_export() -> None:
    kbpk = os.urandom(32)
    block = tr31.wrap(kbpk, KeyBlockHeader("D", "K0", "A", "B", "00", "N"), os.urandom(32))
    with raises_code("tr31-not-exportable"):
        tr31.unwrap_for(kbpk, block, expected_usage="K0", expected_modes={"B"}, allow_export=True)
    # the same block is fine for local use
    tr31.unwrap_for(kbpk, block, expected_usage="K0", expected_modes={"B"})


def test_key_stronger_than_its_kbpk_is_refused() -> None:
    kbpk = os.urandom(16)
    block = psec_wrap(kbpk, "D0000D0AB00N0000", os.urandom(32))  # AES-256 under AES-128
    assert len(tr31.unwrap(kbpk, block)[1]) == 32
    with raises_code("tr31-kbpk-mismatch"):
        tr31.unwrap_for(kbpk, block, expected_usage="D0", expected_modes={"B"})
    with raises_code("tr31-kbpk-mismatch"):
        tr31.wrap(kbpk, KeyBlockHeader("D", "D0", "A", "B"), os.urandom(32))


@pytest.mark.parametrize(
    ("kbpk_length", "header", "key_length"),
    [
        (16, KeyBlockHeader("B", "P0", "T", "E"), 24),  # 3-key TDES under 2-key TDES
        (24, KeyBlockHeader("B", "D0", "A", "B"), 16),  # AES under TDES
    ],
)
def test_wrap_refuses_a_weaker_kbpk(
    kbpk_length: int, header: KeyBlockHeader, key_length: int
) -> None:
    with raises_code("tr31-kbpk-mismatch"):
        tr31.wrap(os.urandom(kbpk_length), header, os.urandom(key_length))


def test_key_length_that_does_not_fit_the_algorithm() -> None:
    kbpk = os.urandom(16)
    block = psec_wrap(kbpk, "D0000D0AB00N0000", os.urandom(20))  # "AES" key of 20 bytes
    with raises_code("tr31-invalid-key-length"):
        tr31.unwrap_for(kbpk, block, expected_usage="D0", expected_modes={"B"})
    with raises_code("tr31-invalid-key-length"):
        tr31.wrap(kbpk, KeyBlockHeader("D", "D0", "T", "B"), os.urandom(8))
    with raises_code("tr31-invalid-key-length"):
        tr31.wrap(kbpk, KeyBlockHeader("D", "M7", "H", "C"), b"")


# --- malformed input ------------------------------------------------------------------

VALID_B = ANNEX_B_KS_BLOCK
VALID_B_KBPK = ANNEX_B_KS_KBPK


def _with_length(block: str) -> str:
    """Fix the length field so that only the defect under test remains."""
    return block[0] + f"{len(block):04d}" + block[5:]


@pytest.mark.parametrize(
    "block",
    [
        pytest.param("", id="empty"),
        pytest.param("B0016P0TE00N00", id="shorter-than-header"),
        pytest.param(VALID_B[:-1], id="truncated"),
        pytest.param(_with_length(VALID_B[:-1]), id="odd-length"),
        pytest.param(_with_length(VALID_B[:-8]), id="truncated-half-block"),
        pytest.param(_with_length(VALID_B[:56]), id="no-key-field"),
        pytest.param(VALID_B[:-3] + "G" + VALID_B[-2:], id="non-hex-mac"),
        pytest.param(VALID_B[:50] + "Z" + VALID_B[51:], id="non-hex-key-field"),
        pytest.param(VALID_B[:40] + VALID_B[40:].lower(), id="lowercase-hex"),
        pytest.param(VALID_B[:50] + "\u00e9" + VALID_B[51:], id="non-ascii"),
        pytest.param("B01X4" + VALID_B[5:], id="non-digit-length"),
        pytest.param("B0105" + VALID_B[5:], id="length-field-too-long"),
        pytest.param(VALID_B[:5] + "ZZ" + VALID_B[7:], id="unknown-usage"),
        pytest.param(VALID_B[:7] + "Q" + VALID_B[8:], id="unknown-algorithm"),
        pytest.param(VALID_B[:8] + "Q" + VALID_B[9:], id="unknown-mode"),
        pytest.param(VALID_B[:9] + "1-" + VALID_B[11:], id="bad-key-version"),
        pytest.param(VALID_B[:11] + "X" + VALID_B[12:], id="unknown-exportability"),
        pytest.param(VALID_B[:12] + "0A" + VALID_B[14:], id="non-digit-block-count"),
        pytest.param(VALID_B[:12] + "02" + VALID_B[14:], id="block-count-too-high"),
        pytest.param(VALID_B[:12] + "00" + VALID_B[14:], id="block-count-too-low"),
        pytest.param(VALID_B[:14] + "3" + VALID_B[15:], id="unknown-context"),
        pytest.param(VALID_B[:15] + "1" + VALID_B[16:], id="reserved-not-zero"),
        pytest.param(VALID_B[:18] + "FF" + VALID_B[20:], id="optional-block-overruns"),
        pytest.param(VALID_B[:18] + "03" + VALID_B[20:], id="optional-block-too-short"),
        pytest.param(VALID_B[:18] + "0G" + VALID_B[20:], id="optional-block-bad-length"),
        pytest.param(VALID_B[:16] + "K\x01" + VALID_B[18:], id="optional-block-bad-id"),
        pytest.param(
            _with_length("B0000P0TE00N0200PB080000KS080000" + "00" * 32),
            id="padding-block-not-last",
        ),
        pytest.param(
            _with_length("B0000P0TE00N0200KS080000KS080000" + "00" * 32),
            id="duplicate-optional-block",
        ),
        pytest.param(
            _with_length("B0000P0TE00N0100KS0000" + "00" * 32), id="extended-length-of-zero"
        ),
        pytest.param(
            _with_length("B0000P0TE00N0100KS000200" + "00" * 32), id="extended-length-too-small"
        ),
    ],
)
def test_malformed_blocks_are_refused(block: str) -> None:
    with raises_code("tr31-malformed"):
        tr31.unwrap(VALID_B_KBPK, block)


@pytest.mark.parametrize("block", [b"B0016P0TE00N0000", None, 42])
def test_non_string_blocks_are_malformed(block: Any) -> None:
    with raises_code("tr31-malformed"):
        tr31.unwrap(VALID_B_KBPK, block)


@pytest.mark.parametrize("version", ["A", "C", "Z", "1"])
def test_other_versions_are_unsupported(version: str) -> None:
    with raises_code("tr31-unsupported-version"):
        tr31.unwrap(VALID_B_KBPK, version + VALID_B[1:])
    with raises_code("tr31-unsupported-version"):
        tr31.wrap(VALID_B_KBPK, KeyBlockHeader(version, "P0", "T", "E"), os.urandom(16))


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(KeyBlockHeader("B", "Z9", "T", "E"), id="usage"),
        pytest.param(KeyBlockHeader("B", "P0", "TT", "E"), id="algorithm"),
        pytest.param(KeyBlockHeader("B", "P0", "T", "e"), id="mode"),
        pytest.param(KeyBlockHeader("B", "P0", "T", "E", "0"), id="key-version"),
        pytest.param(KeyBlockHeader("B", "P0", "T", "E", "00", "Y"), id="exportability"),
        pytest.param(KeyBlockHeader("B", "P0", "T", "E", context="9"), id="context"),
        pytest.param(KeyBlockHeader("B", "P0", "T", "E", optional_blocks=[("PB", "00")]), id="PB"),
        pytest.param(
            KeyBlockHeader("B", "P0", "T", "E", optional_blocks=[("KS", "1"), ("KS", "2")]),
            id="duplicate",
        ),
        pytest.param(
            KeyBlockHeader("B", "P0", "T", "E", optional_blocks=[("KS", "\n")]), id="unprintable"
        ),
        pytest.param(
            KeyBlockHeader("B", "P0", "T", "E", optional_blocks=[("K", "1")]), id="short-id"
        ),
        pytest.param(
            KeyBlockHeader("B", "P0", "T", "E", optional_blocks=[("TT", "x" * 9990)]),
            id="too-long",
        ),
    ],
)
def test_wrap_refuses_invalid_headers(header: KeyBlockHeader) -> None:
    with raises_code("tr31-malformed"):
        tr31.wrap(os.urandom(16), header, os.urandom(16))


def test_random_corruption_never_leaks_a_python_exception() -> None:
    rng = random.Random(31)
    kbpk = os.urandom(32)
    header = KeyBlockHeader("D", "K0", "A", "B", "00", "E", [KS, ("TT", "z" * 270)])
    block = tr31.wrap(kbpk, header, os.urandom(32))
    alphabet = "0123456789ABCDEFPBKS0\x00 ~"
    for _ in range(1500):
        chars = list(block)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(chars))
            action = rng.choice(("replace", "delete", "insert"))
            if action == "replace":
                chars[position] = rng.choice(alphabet)
            elif action == "delete":
                del chars[position]
            else:
                chars.insert(position, rng.choice(alphabet))
        mutated = "".join(chars)
        if rng.random() < 0.5:  # keep the length field right so parsing goes deeper
            mutated = _with_length(mutated)
        if mutated == block:
            continue
        with pytest.raises(tr31.Tr31Error):
            tr31.unwrap(kbpk, mutated)


def test_error_codes_are_stable() -> None:
    assert {
        error.code
        for error in (
            tr31.Tr31Malformed,
            tr31.Tr31MacMismatch,
            tr31.Tr31UsageMismatch,
            tr31.Tr31ModeMismatch,
            tr31.Tr31NotExportable,
            tr31.Tr31KbpkMismatch,
        )
    } == {
        "tr31-malformed",
        "tr31-mac-mismatch",
        "tr31-usage-mismatch",
        "tr31-mode-mismatch",
        "tr31-not-exportable",
        "tr31-kbpk-mismatch",
    }
    assert issubclass(tr31.Tr31Error, CryptoError)
