"""ISO 7816-4 APDU and BER-TLV codecs (trustfleet.wire)."""

from __future__ import annotations

import pytest

from trustfleet.wire import tlv
from trustfleet.wire.apdu import (
    CommandApdu,
    MalformedApdu,
    ResponseApdu,
    sw_tries_left,
    tries_left_of,
)

CASES = [
    # (apdu, encoding)
    (CommandApdu(0x00, 0xA4, 0x04, 0x00), "00A40400"),  # case 1
    (CommandApdu(0x00, 0x84, 0, 0, le=16), "0084000010"),  # case 2 short
    (CommandApdu(0x00, 0x84, 0, 0, le=256), "0084000000"),  # Le 00 = 256
    (CommandApdu(0x80, 0x10, 1, 1, b"\x01\x02"), "80100101020102"),  # case 3 short
    (CommandApdu(0x00, 0xA4, 4, 0, b"\xaa", le=256), "00A4040001AA00"),  # case 4 short
    (CommandApdu(0x00, 0xCA, 0, 0xC0, le=257), "00CA00C0000101"),  # case 2 extended
    (CommandApdu(0x00, 0xCA, 0, 0xC0, le=65536), "00CA00C0000000"),  # Le 0000 = 65536
    (CommandApdu(0x80, 0x12, 0, 0, b"\x11" * 256), "80120000000100" + "11" * 256),
    (CommandApdu(0x80, 0x12, 0, 0, b"\x11" * 300, le=1000), "8012000000012C" + "11" * 300 + "03E8"),
    (CommandApdu(0x80, 0x12, 0, 0, b"\x11" * 2, le=300), "801200000000021111012C"),
]


@pytest.mark.parametrize(("apdu", "encoded"), CASES)
def test_every_case_encodes_as_iso_7816_4_and_parses_back(apdu: CommandApdu, encoded: str) -> None:
    assert apdu.encode().hex().upper() == encoded
    assert CommandApdu.parse(bytes.fromhex(encoded)) == apdu


@pytest.mark.parametrize(
    "raw",
    [
        "00A404",  # too short
        "80100101030102",  # Lc 3, 2 bytes of data
        "801001010201020304",  # trailing bytes after Le
        "8010010100000001",  # extended Lc 0
        "80100101000005AABB",  # extended Lc past the end
    ],
)
def test_malformed_commands_are_refused(raw: str) -> None:
    with pytest.raises(MalformedApdu):
        CommandApdu.parse(bytes.fromhex(raw))


def test_field_ranges_are_checked() -> None:
    with pytest.raises(MalformedApdu):
        CommandApdu(0x100, 0, 0, 0)
    with pytest.raises(MalformedApdu):
        CommandApdu(0, 0, 0, 0, le=0)


def test_responses_and_tries_left() -> None:
    resp = ResponseApdu.parse(bytes.fromhex("AABB63C3"))
    assert (resp.data, resp.sw, resp.ok) == (b"\xaa\xbb", 0x63C3, False)
    assert tries_left_of(resp.sw) == 3 and tries_left_of(0x9000) is None
    assert ResponseApdu(b"\x01", 0x9000).encode() == b"\x01\x90\x00"
    assert sw_tries_left(0) == 0x63C0
    with pytest.raises(MalformedApdu):
        ResponseApdu.parse(b"\x90")


def test_tlv_round_trip_and_limits() -> None:
    items = [(0xC0, b"\x01" * 16), (0xDF01, b"x" * 200), (0x84, b"")]
    encoded = tlv.encode_all(items)
    assert encoded.startswith(bytes.fromhex("C010"))
    assert bytes.fromhex("DF0181C8") in encoded  # two-byte tag, 81-form length
    assert tlv.decode(encoded) == items
    with pytest.raises(tlv.MalformedTlv):
        tlv.decode(bytes.fromhex("C005AABB"))  # runs past the end
    with pytest.raises(tlv.MalformedTlv):
        tlv.decode_unique(bytes.fromhex("C001AAC001BB"), frozenset({0xC0}))  # repeated
    with pytest.raises(tlv.MalformedTlv):
        tlv.decode_unique(bytes.fromhex("C101AA"), frozenset({0xC0}))  # unexpected
