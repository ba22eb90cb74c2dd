"""SM2 keys (GB/T 32918): small typed objects over gmalg's SM2 core.

gmalg does the curve arithmetic; SM3 (for the Z value, the message digest and the KDF of
encryption) comes from pyca/cryptography, and so does the DER encoding of signatures.

* Signatures are DER ``SEQUENCE { r INTEGER, s INTEGER }`` over SM3(Z || message), where
  Z binds the signer's user ID (``uid``, default ``b"1234567812345678"``) and public key.
* Ciphertexts are ``C1 || C3 || C2`` (GB/T 32918.4-2016 order): C1 the uncompressed point
  ``04 || x || y``, C3 the 32-byte SM3 check value, C2 the masked plaintext.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from gmalg.ellipticcurve import ECDLP
from gmalg.errors import GMError
from gmalg.sm2 import SM2Core

from trustfleet.errors import DecryptionFailed, InvalidInput, InvalidKey, InvalidSignature

DEFAULT_UID = b"1234567812345678"
#: GB/T 32918.1: ENTL is a 16-bit count of ID *bits*
MAX_UID_LENGTH = 8191
COORDINATE_SIZE = 32
POINT_SIZE = 1 + 2 * COORDINATE_SIZE
SM3_SIZE = 32

RandomBits = Callable[[int], int]


class _SM3:
    """pyca's SM3 behind the reset/update/value interface gmalg's core expects."""

    @classmethod
    def hash_length(cls) -> int:
        return SM3_SIZE

    @classmethod
    def max_msg_length(cls) -> int:
        return (1 << 61) - 1

    def __init__(self) -> None:
        self._hash = hashes.Hash(hashes.SM3())

    def reset(self) -> None:
        self._hash = hashes.Hash(hashes.SM3())

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def value(self) -> bytes:
        return self._hash.copy().finalize()


@dataclass(frozen=True, eq=False)
class SM2Curve:
    """An SM2 curve: its name and gmalg's domain parameters."""

    name: str
    p: int
    a: int
    b: int
    gx: int
    gy: int
    n: int
    _ecdlp: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ecdlp = ECDLP(self.p, self.a, self.b, (self.gx, self.gy), self.n)
        object.__setattr__(self, "_ecdlp", ecdlp)

    def core(self, rnd_fn: RandomBits | None = None) -> Any:
        # A fresh core per operation: gmalg's core keeps hash state between calls.
        return SM2Core(self._ecdlp, _SM3(), rnd_fn)


#: GB/T 32918.5 recommended curve (OID 1.2.156.10197.1.301)
SM2P256V1 = SM2Curve(
    name="sm2p256v1",
    p=0xFFFFFFFE_FFFFFFFF_FFFFFFFF_FFFFFFFF_FFFFFFFF_00000000_FFFFFFFF_FFFFFFFF,
    a=0xFFFFFFFE_FFFFFFFF_FFFFFFFF_FFFFFFFF_FFFFFFFF_00000000_FFFFFFFF_FFFFFFFC,
    b=0x28E9FA9E_9D9F5E34_4D5A9E4B_CF6509A7_F39789F5_15AB8F92_DDBCBD41_4D940E93,
    gx=0x32C4AE2C_1F198119_5F990446_6A39C994_8FE30BBF_F2660BE1_715A4589_334C74C7,
    gy=0xBC3736A2_F4F6779C_59BDCEE3_6B692153_D0A9877C_C62A4740_02DF32E5_2139F0A0,
    n=0xFFFFFFFE_FFFFFFFF_FFFFFFFF_FFFFFFFF_7203DF6B_21C6052B_53BBF409_39D54123,
)

Point = tuple[int, int]


def _check_uid(uid: bytes) -> bytes:
    if not isinstance(uid, bytes) or len(uid) > MAX_UID_LENGTH:
        raise InvalidKey(f"an SM2 user ID must be bytes of at most {MAX_UID_LENGTH} bytes")
    return uid


def _encode_point(point: Point) -> bytes:
    x, y = point
    return b"\x04" + x.to_bytes(COORDINATE_SIZE, "big") + y.to_bytes(COORDINATE_SIZE, "big")


def _decode_point(data: bytes) -> Point:
    """Parse ``04 || x || y``; the caller checks that it lies on the curve."""
    if len(data) != POINT_SIZE or data[0] != 0x04:
        raise ValueError("not an uncompressed 65-byte point")
    x = int.from_bytes(data[1 : 1 + COORDINATE_SIZE], "big")
    y = int.from_bytes(data[1 + COORDINATE_SIZE :], "big")
    return x, y


def _in_field(curve: SM2Curve, point: Point) -> bool:
    x, y = point
    return 0 <= x < curve.p and 0 <= y < curve.p


def _is_valid_public_point(curve: SM2Curve, point: Point) -> bool:
    """In the field, on the curve, not infinity, of order n (gmalg's ``verify_pk``)."""
    return _in_field(curve, point) and bool(curve.core().verify_pk(point))


class SM2PublicKey:
    """An SM2 public key with the user ID its signatures are bound to."""

    __slots__ = ("_curve", "_point", "_uid")

    def __init__(self, x: int, y: int, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1):
        if not _is_valid_public_point(curve, (x, y)):
            raise InvalidKey("the SM2 public key is not a valid point of the curve")
        self._init((x, y), uid, curve)

    def _init(self, point: Point, uid: bytes, curve: SM2Curve) -> None:
        self._point = point
        self._uid = _check_uid(uid)
        self._curve = curve

    @classmethod
    def _trusted(cls, point: Point, uid: bytes, curve: SM2Curve) -> SM2PublicKey:
        """For points we computed ourselves (d·G): skips the costly on-curve check."""
        key = cls.__new__(cls)
        key._init(point, uid, curve)
        return key

    @classmethod
    def from_bytes(
        cls, data: bytes, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1
    ) -> SM2PublicKey:
        """Load an uncompressed point ``04 || x || y`` (65 bytes), checking it."""
        try:
            x, y = _decode_point(data)
        except ValueError:
            raise InvalidKey("an SM2 public key must be 04 || x || y (65 bytes)") from None
        return cls(x, y, uid=uid, curve=curve)

    @property
    def uid(self) -> bytes:
        return self._uid

    @property
    def curve(self) -> SM2Curve:
        return self._curve

    @property
    def point(self) -> Point:
        return self._point

    def with_uid(self, uid: bytes) -> SM2PublicKey:
        return SM2PublicKey._trusted(self._point, uid, self._curve)

    def public_bytes(self) -> bytes:
        """The uncompressed point ``04 || x || y``."""
        return _encode_point(self._point)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check a DER signature; raise :class:`trustfleet.errors.InvalidSignature`."""
        try:
            r, s = decode_dss_signature(signature)
        except ValueError:
            raise InvalidSignature("the SM2 signature is not a DER (r, s) pair") from None
        if not self._curve.core().verify(data, r, s, self._uid, self._point):
            raise InvalidSignature("SM2 signature does not verify")

    def encrypt(self, plaintext: bytes, *, _rnd_fn: RandomBits | None = None) -> bytes:
        """SM2 public-key encryption; returns ``C1 || C3 || C2``.

        ``_rnd_fn`` fixes the ephemeral k; known-answer tests only.
        """
        if not plaintext:
            raise InvalidInput("SM2 cannot encrypt an empty message")
        c1, c2, c3 = self._curve.core(_rnd_fn).encrypt(plaintext, self._point)
        return _encode_point(c1) + bytes(c3) + bytes(c2)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SM2PublicKey):
            return NotImplemented
        return (self._curve, self._point, self._uid) == (other._curve, other._point, other._uid)

    def __hash__(self) -> int:
        return hash((self._curve.name, self._point, self._uid))

    def __repr__(self) -> str:
        return f"<SM2PublicKey {self._curve.name} {self.public_bytes()[:9].hex()}…>"


class SM2PrivateKey:
    """An SM2 private key (scalar d, 1 <= d <= n-2) with the user ID it signs under."""

    __slots__ = ("_curve", "_d", "_public")

    def __init__(self, d: int, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1):
        if not 1 <= d <= curve.n - 2:
            raise InvalidKey("the SM2 private key is out of range")
        self._d = d
        self._curve = curve
        point = curve.core().generate_pk(d)
        self._public = SM2PublicKey._trusted(point, _check_uid(uid), curve)

    @classmethod
    def generate(cls, *, uid: bytes = DEFAULT_UID) -> SM2PrivateKey:
        d, _ = SM2P256V1.core().generate_keypair()
        return cls(d, uid=uid)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1
    ) -> SM2PrivateKey:
        """Load the raw 32-byte big-endian scalar."""
        if len(data) != COORDINATE_SIZE:
            raise InvalidKey(f"a raw SM2 private key is {COORDINATE_SIZE} bytes")
        return cls(int.from_bytes(data, "big"), uid=uid, curve=curve)

    @property
    def uid(self) -> bytes:
        return self._public.uid

    @property
    def curve(self) -> SM2Curve:
        return self._curve

    def with_uid(self, uid: bytes) -> SM2PrivateKey:
        key = SM2PrivateKey.__new__(SM2PrivateKey)
        key._d = self._d
        key._curve = self._curve
        key._public = self._public.with_uid(uid)
        return key

    def public_key(self) -> SM2PublicKey:
        return self._public

    def private_bytes(self) -> bytes:
        """The raw 32-byte big-endian scalar d."""
        return self._d.to_bytes(COORDINATE_SIZE, "big")

    def sign(self, data: bytes, *, _rnd_fn: RandomBits | None = None) -> bytes:
        """DER signature over SM3(Z || data). ``_rnd_fn`` fixes k; known-answer tests only."""
        public = self._public
        r, s = self._curve.core(_rnd_fn).sign(data, self._d, public.uid, public.point)
        return encode_dss_signature(r, s)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Inverse of :meth:`SM2PublicKey.encrypt`; raise ``DecryptionFailed``."""
        if len(ciphertext) <= POINT_SIZE + SM3_SIZE:
            raise DecryptionFailed("the SM2 ciphertext is too short")
        c3 = ciphertext[POINT_SIZE : POINT_SIZE + SM3_SIZE]
        c2 = ciphertext[POINT_SIZE + SM3_SIZE :]
        try:
            c1 = _decode_point(ciphertext[:POINT_SIZE])
            if not _in_field(self._curve, c1):  # gmalg checks that C1 is on the curve
                raise ValueError("C1 is out of the field")
            plaintext = bytes(self._curve.core().decrypt(c1, c2, c3, self._d))
        except (ValueError, GMError):
            raise DecryptionFailed("the SM2 ciphertext does not decrypt") from None
        return plaintext

    def __repr__(self) -> str:
        return f"<SM2PrivateKey {self._curve.name} (secret)>"
