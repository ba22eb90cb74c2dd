"""ISO/IEC 7816-4 command and response APDUs: encoding, strict parsing, status words.

A command APDU is ``CLA INS P1 P2 [Lc data] [Le]`` in one of the four cases of ISO 7816-4
§5.1, in short form (Lc 1 byte, Le 1 byte, ``00`` meaning 256) or extended form (a ``00``
marker byte, then Lc on 2 bytes; Le on 2 bytes, or 3 with the marker when there is no
data; ``0000`` meaning 65 536). :meth:`CommandApdu.encode` picks the short form whenever
both fields fit it. A response APDU is ``[data] SW1 SW2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from trustfleet.wire.errors import MalformedMessage

SHORT_MAX_DATA = 255
SHORT_MAX_LE = 256
EXTENDED_MAX_DATA = 65_535
EXTENDED_MAX_LE = 65_536


class MalformedApdu(MalformedMessage):
    code = "apdu-malformed"
    title = "The APDU is malformed"


class SW(IntEnum):
    """The ISO 7816-4 status words trustfleet uses (``63Cx`` is :func:`sw_tries_left`)."""

    OK = 0x9000
    WRONG_LENGTH = 0x6700
    SM_OBJECTS_MISSING = 0x6987
    SM_OBJECTS_INCORRECT = 0x6988
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTHENTICATION_METHOD_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    INCORRECT_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    INCORRECT_P1P2 = 0x6A86
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MEMORY_FAILURE = 0x6581
    NO_PRECISE_DIAGNOSIS = 0x6F00


def sw_tries_left(tries: int) -> int:
    """``63Cx``: verification failed, ``x`` (0-15) tries left."""
    if not 0 <= tries <= 15:
        raise ValueError("63Cx carries 0 to 15 tries")
    return 0x63C0 | tries


def tries_left_of(sw: int) -> int | None:
    """The ``x`` of a ``63Cx`` status word, else None."""
    return sw & 0x0F if sw & 0xFFF0 == 0x63C0 else None


@dataclass(frozen=True, slots=True)
class CommandApdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    #: expected response length; None means no Le field (case 1 or 3)
    le: int | None = None

    def __post_init__(self) -> None:
        if not (
            0 <= self.cla <= 0xFF
            and 0 <= self.ins <= 0xFF
            and 0 <= self.p1 <= 0xFF
            and 0 <= self.p2 <= 0xFF
        ):
            raise MalformedApdu("CLA, INS, P1 and P2 are one byte each")
        if len(self.data) > EXTENDED_MAX_DATA:
            raise MalformedApdu(f"command data is limited to {EXTENDED_MAX_DATA} bytes")
        if self.le is not None and not 1 <= self.le <= EXTENDED_MAX_LE:
            raise MalformedApdu(f"Le must be 1..{EXTENDED_MAX_LE}")

    @property
    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))

    @property
    def is_extended(self) -> bool:
        return len(self.data) > SHORT_MAX_DATA or (self.le or 0) > SHORT_MAX_LE

    def encode(self) -> bytes:
        if self.is_extended:
            return self.header + self._extended_body()
        body = bytes((len(self.data),)) + self.data if self.data else b""
        if self.le is not None:
            body += bytes((self.le % 256,))
        return self.header + body

    def _extended_body(self) -> bytes:
        body = b"\x00" + len(self.data).to_bytes(2, "big") + self.data if self.data else b""
        if self.le is not None:
            le = (self.le % 65_536).to_bytes(2, "big")
            body += le if self.data else b"\x00" + le
        return body

    @classmethod
    def parse(cls, raw: bytes) -> CommandApdu:
        """Strict parse of any of the seven ISO 7816-4 encodings; MalformedApdu otherwise."""
        if len(raw) < 4:
            raise MalformedApdu("a command APDU has at least 4 bytes")
        cla, ins, p1, p2 = raw[:4]
        body = raw[4:]
        data, le = _parse_body(body)
        return cls(cla, ins, p1, p2, data, le)


def _parse_body(body: bytes) -> tuple[bytes, int | None]:
    n = len(body)
    if n == 0:
        return b"", None
    if n == 1:
        return b"", body[0] or SHORT_MAX_LE
    if body[0] != 0:
        return _parse_short(body)
    if n == 3:  # extended case 2
        return b"", int.from_bytes(body[1:3], "big") or EXTENDED_MAX_LE
    return _parse_extended(body)


def _parse_short(body: bytes) -> tuple[bytes, int | None]:
    lc = body[0]
    if len(body) == 1 + lc:
        return body[1:], None
    if len(body) == 2 + lc:
        return body[1 : 1 + lc], body[-1] or SHORT_MAX_LE
    raise MalformedApdu("Lc does not match the command's length")


def _parse_extended(body: bytes) -> tuple[bytes, int | None]:
    if len(body) < 3:
        raise MalformedApdu("truncated extended length")
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0:
        raise MalformedApdu("extended Lc must not be zero")
    rest = body[3:]
    if len(rest) == lc:
        return rest, None
    if len(rest) == lc + 2:
        return rest[:lc], int.from_bytes(rest[lc:], "big") or EXTENDED_MAX_LE
    raise MalformedApdu("extended Lc does not match the command's length")


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    data: bytes
    sw: int

    @property
    def ok(self) -> bool:
        return self.sw == SW.OK

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise MalformedApdu("a response APDU has at least the two status bytes")
        return cls(raw[:-2], int.from_bytes(raw[-2:], "big"))

    @classmethod
    def status(cls, sw: int) -> ResponseApdu:
        return cls(b"", sw)

    def __repr__(self) -> str:
        return f"ResponseApdu({len(self.data)} bytes, SW {self.sw:04X})"
