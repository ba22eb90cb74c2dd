"""The transcript encoding: what signatures, MACs and key-transport labels cover."""

from __future__ import annotations

LENGTH_SIZE = 4
_MAX_FIELD = 1 << (8 * LENGTH_SIZE)


def transcript(*fields: bytes) -> bytes:
    """Unambiguous concatenation: each field prefixed with its length as 4 bytes, big
    endian. Two different field lists never give the same bytes, so nothing signed for one
    purpose can be read as another (each protocol puts its own label first)."""
    for item in fields:
        if len(item) >= _MAX_FIELD:
            raise ValueError("a transcript field must be shorter than 4 GiB")
    return b"".join(len(item).to_bytes(LENGTH_SIZE, "big") + item for item in fields)
