"""A small BER-TLV codec (ISO/IEC 7816-4 §6.3 / ISO 8825-1) for flat lists of data objects.

Tags are one or two bytes (a first byte ending in ``1F`` announces a second byte); lengths
use the definite forms ``0x00-0x7F``, ``81 xx`` and ``82 xxxx``. Values are kept as bytes;
a constructed object's value is parsed again by the caller when it needs its content.
"""

from __future__ import annotations

from collections.abc import Iterable

from trustfleet.wire.apdu import MalformedApdu

MAX_LENGTH = 0xFFFF


class MalformedTlv(MalformedApdu):
    code = "tlv-malformed"
    title = "The BER-TLV data is malformed"


def _encode_tag(tag: int) -> bytes:
    if 0 <= tag <= 0xFF and tag & 0x1F != 0x1F:
        return bytes((tag,))
    if 0x1F1F <= tag <= 0xFFFF and (tag >> 8) & 0x1F == 0x1F and not tag & 0x80:
        return tag.to_bytes(2, "big")
    raise ValueError(f"tag {tag:X} is not a one- or two-byte BER tag")


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= MAX_LENGTH:
        return b"\x82" + n.to_bytes(2, "big")
    raise ValueError("BER-TLV values are limited to 65 535 bytes here")


def encode(tag: int, value: bytes) -> bytes:
    return _encode_tag(tag) + _encode_length(len(value)) + value


def encode_all(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(encode(tag, value) for tag, value in items)


def decode(data: bytes) -> list[tuple[int, bytes]]:
    """Every (tag, value) at the top level, in order; MalformedTlv if anything is off."""
    items: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        tag, i = _read_tag(data, i)
        length, i = _read_length(data, i)
        if i + length > len(data):
            raise MalformedTlv("a value runs past the end of the data")
        items.append((tag, data[i : i + length]))
        i += length
    return items


def decode_unique(data: bytes, allowed: frozenset[int]) -> dict[int, bytes]:
    """Decode and index by tag, refusing repeated or unexpected tags."""
    found: dict[int, bytes] = {}
    for tag, value in decode(data):
        if tag not in allowed:
            raise MalformedTlv(f"unexpected tag {tag:X}")
        if tag in found:
            raise MalformedTlv(f"tag {tag:X} appears twice")
        found[tag] = value
    return found


def _read_tag(data: bytes, i: int) -> tuple[int, int]:
    first = data[i]
    if first & 0x1F != 0x1F:
        return first, i + 1
    if i + 1 >= len(data) or data[i + 1] & 0x80:
        raise MalformedTlv("tags longer than two bytes are not used here")
    return (first << 8) | data[i + 1], i + 2


def _read_length(data: bytes, i: int) -> tuple[int, int]:
    if i >= len(data):
        raise MalformedTlv("a tag has no length")
    first = data[i]
    if first < 0x80:
        return first, i + 1
    size = first & 0x7F
    if size not in (1, 2) or i + 1 + size > len(data):
        raise MalformedTlv("unsupported or truncated length field")
    return int.from_bytes(data[i + 1 : i + 1 + size], "big"), i + 1 + size
