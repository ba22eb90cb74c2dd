"""SM2 keys (GB/T 32918): small typed objects over gmalglib's SM2 in C.

gmalglib (MIT, by the author of gmalg) implements SM2 on the recommended curve
sm2p256v1 only, with SM3 built in for the Z value, the message digest and the KDF of
encryption; the DER encoding of signatures comes from pyca/cryptography.

* Signatures are DER ``SEQUENCE { r INTEGER, s INTEGER }`` over SM3(Z || message), where
  Z binds the signer's user ID (``uid``, default ``b"1234567812345678"``) and public key.
* Ciphertexts are ``C1 || C3 || C2`` (GB/T 32918.4-2016 order): C1 the uncompressed point
  ``04 || x || y``, C3 the 32-byte SM3 check value, C2 the masked plaintext.

Each key keeps the gmalglib object it signs, verifies, encrypts or decrypts with (built on
first use): building one costs a scalar multiplication and the Z value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from gmalglib.sm2 import SM2 as _GmalglibSM2

from trustfleet.errors import (
    CryptoError,
    DecryptionFailed,
    InvalidInput,
    InvalidKey,
    InvalidSignature,
)

DEFAULT_UID = b"1234567812345678"
#: GB/T 32918.1: ENTL is a 16-bit count of ID *bits*
MAX_UID_LENGTH = 8191
COORDINATE_SIZE = 32
POINT_SIZE = 1 + 2 * COORDINATE_SIZE
SM3_SIZE = 32

#: Draws a random integer of the given number of bits (known-answer tests fix it).
RandomBits = Callable[[int], int]

#: gmalglib 0.5.9 does not redraw k when the KDF output t is all zero (GB/T 32918.4
#: step A5): it returns ``C1 || 0^32 || 0^len`` instead. That happens with probability
#: 2^-(8*len), so 1 in 256 for a one-byte message; we draw again, at most this often.
_ENCRYPT_ATTEMPTS = 32
_ZERO_C3 = bytes(SM3_SIZE)


@dataclass(frozen=True, eq=False)
class SM2Curve:
    """An SM2 curve: its name and domain parameters.

    Keys exist on :data:`SM2P256V1` only: the C implementation is built for that curve.
    """

    name: str
    p: int
    a: int
    b: int
    gx: int
    gy: int
    n: int


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


def _check_curve(curve: SM2Curve) -> SM2Curve:
    if curve is not SM2P256V1:
        raise InvalidKey(f"SM2 keys are supported on sm2p256v1 only, not {curve.name}")
    return curve


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


def _in_field(point: Point) -> bool:
    # gmalglib reduces coordinates modulo p before its on-curve check; we want them < p.
    x, y = point
    return 0 <= x < SM2P256V1.p and 0 <= y < SM2P256V1.p


def _is_valid_public_point(point: Point) -> bool:
    """In the field and on the curve (cofactor 1: of order n; 04 || x || y is never the
    point at infinity)."""
    return _in_field(point) and bool(_GmalglibSM2.is_pk_valid(_encode_point(point)))


def _gmalglib_random(rnd_fn: RandomBits) -> Callable[[int], bytes]:
    """gmalglib's ``rnd_fn`` returns bytes, which it reads as a little-endian integer
    (its native limb order on x86-64 and arm64); ours returns the integer."""

    def draw(size: int) -> bytes:
        return rnd_fn(8 * size).to_bytes(size, "little")

    return draw


class SM2PublicKey:
    """An SM2 public key with the user ID its signatures are bound to."""

    __slots__ = ("_engine", "_point", "_uid")

    def __init__(self, x: int, y: int, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1):
        _check_curve(curve)
        if not _is_valid_public_point((x, y)):
            raise InvalidKey("the SM2 public key is not a valid point of the curve")
        self._init((x, y), uid)

    def _init(self, point: Point, uid: bytes) -> None:
        self._point = point
        self._uid = _check_uid(uid)
        self._engine: Any = None

    @classmethod
    def _trusted(cls, point: Point, uid: bytes) -> SM2PublicKey:
        """For points we computed ourselves (d·G) or checked already."""
        key = cls.__new__(cls)
        key._init(point, uid)
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
        return SM2P256V1

    @property
    def point(self) -> Point:
        return self._point

    def with_uid(self, uid: bytes) -> SM2PublicKey:
        return SM2PublicKey._trusted(self._point, uid)

    def public_bytes(self) -> bytes:
        """The uncompressed point ``04 || x || y``."""
        return _encode_point(self._point)

    def _sm2(self) -> Any:
        engine = self._engine
        if engine is None:
            engine = self._engine = _GmalglibSM2(pk=self.public_bytes(), uid=self._uid)
        return engine

    def verify(self, signature: bytes, data: bytes) -> None:
        """Check a DER signature; raise :class:`trustfleet.errors.InvalidSignature`."""
        try:
            r, s = decode_dss_signature(signature)
        except ValueError:
            raise InvalidSignature("the SM2 signature is not a DER (r, s) pair") from None
        n = SM2P256V1.n
        if not (0 < r < n and 0 < s < n):
            raise InvalidSignature("SM2 signature does not verify")
        raw = r.to_bytes(COORDINATE_SIZE, "big") + s.to_bytes(COORDINATE_SIZE, "big")
        if not self._sm2().verify(data, raw):
            raise InvalidSignature("SM2 signature does not verify")

    def encrypt(self, plaintext: bytes, *, _rnd_fn: RandomBits | None = None) -> bytes:
        """SM2 public-key encryption; returns ``C1 || C3 || C2``.

        ``_rnd_fn`` fixes the ephemeral k; known-answer tests only.
        """
        if not plaintext:
            raise InvalidInput("SM2 cannot encrypt an empty message")
        engine = self._sm2()
        if _rnd_fn is not None:
            engine = _GmalglibSM2(
                pk=self.public_bytes(), uid=self._uid, rnd_fn=_gmalglib_random(_rnd_fn)
            )
        for _ in range(_ENCRYPT_ATTEMPTS):
            ciphertext: bytes = engine.encrypt(plaintext)
            if ciphertext[POINT_SIZE : POINT_SIZE + SM3_SIZE] != _ZERO_C3:
                return ciphertext
        raise CryptoError("SM2 encryption drew a degenerate k too often")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SM2PublicKey):
            return NotImplemented
        return (self._point, self._uid) == (other._point, other._uid)

    def __hash__(self) -> int:
        return hash((SM2P256V1.name, self._point, self._uid))

    def __repr__(self) -> str:
        return f"<SM2PublicKey {SM2P256V1.name} {self.public_bytes()[:9].hex()}…>"


class SM2PrivateKey:
    """An SM2 private key (scalar d, 1 <= d <= n-2) with the user ID it signs under."""

    __slots__ = ("_d", "_engine", "_public")

    def __init__(self, d: int, *, uid: bytes = DEFAULT_UID, curve: SM2Curve = SM2P256V1):
        _check_curve(curve)
        if not 1 <= d <= SM2P256V1.n - 2:
            raise InvalidKey("the SM2 private key is out of range")
        point = _decode_point(_GmalglibSM2.get_pk(d.to_bytes(COORDINATE_SIZE, "big")))
        self._init(d, SM2PublicKey._trusted(point, uid))

    def _init(self, d: int, public: SM2PublicKey) -> None:
        self._d = d
        self._public = public
        self._engine: Any = None

    @classmethod
    def generate(cls, *, uid: bytes = DEFAULT_UID) -> SM2PrivateKey:
        sk, pk = _GmalglibSM2().generate_keypair()
        key = cls.__new__(cls)
        key._init(int.from_bytes(sk, "big"), SM2PublicKey._trusted(_decode_point(pk), uid))
        return key

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
        return SM2P256V1

    def with_uid(self, uid: bytes) -> SM2PrivateKey:
        key = SM2PrivateKey.__new__(SM2PrivateKey)
        key._init(self._d, self._public.with_uid(uid))
        return key

    def public_key(self) -> SM2PublicKey:
        return self._public

    def private_bytes(self) -> bytes:
        """The raw 32-byte big-endian scalar d."""
        return self._d.to_bytes(COORDINATE_SIZE, "big")

    def _sm2(self, rnd_fn: RandomBits | None = None) -> Any:
        if rnd_fn is not None:
            return _GmalglibSM2(self.private_bytes(), uid=self.uid, rnd_fn=_gmalglib_random(rnd_fn))
        engine = self._engine
        if engine is None:
            engine = self._engine = _GmalglibSM2(self.private_bytes(), uid=self.uid)
        return engine

    def sign(self, data: bytes, *, _rnd_fn: RandomBits | None = None) -> bytes:
        """DER signature over SM3(Z || data). ``_rnd_fn`` fixes k; known-answer tests only."""
        raw: bytes = self._sm2(_rnd_fn).sign(data)
        r = int.from_bytes(raw[:COORDINATE_SIZE], "big")
        s = int.from_bytes(raw[COORDINATE_SIZE:], "big")
        return encode_dss_signature(r, s)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Inverse of :meth:`SM2PublicKey.encrypt`; raise ``DecryptionFailed``."""
        if len(ciphertext) <= POINT_SIZE + SM3_SIZE:
            raise DecryptionFailed("the SM2 ciphertext is too short")
        try:
            # gmalglib would also take a compressed C1; the format has the uncompressed one
            if not _in_field(_decode_point(ciphertext[:POINT_SIZE])):
                raise ValueError("C1 is out of the field")
            plaintext: bytes = self._sm2().decrypt(ciphertext)
        except ValueError:  # C1 not on the curve, C3 mismatch
            raise DecryptionFailed("the SM2 ciphertext does not decrypt") from None
        return plaintext

    def __repr__(self) -> str:
        return f"<SM2PrivateKey {SM2P256V1.name} (secret)>"
