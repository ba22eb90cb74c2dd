"""The key-sync protocol, sans I/O: both roles of each message (docs/keysync-protocol.md).

- **The key-sync request** a terminal sends by SMS (or through a device gateway over
  HTTP): ``KS1 <key id> [A=<application id>] C=<counter> M=<mac>``, one SMS of GSM-7
  characters. The MAC is HMAC (SHA-256, or SM3 for SM4 keys) truncated to 64 bits, under a
  MAC key derived from the terminal's key with HKDF, over the fields and the sender's MDN.
- **The delivery payload** pushed to an application platform: ``{mdn, key_id, key,
  application_id, algorithm}`` sealed with HPKE to the platform's public key, the
  application ID and the delivery ID bound in HPKE's ``info``.
- **The signed manifest** a manufacturer imports: one compact JWS per terminal (EdDSA or
  ES256, a key registered with trustfleet) whose key values are each sealed with HPKE to
  trustfleet's import public key, the signer, terminal and key ID bound in ``info``.

No database, no HTTP, no clock of its own; key material is passed in by the caller (the
server's key store opens it, the terminal holds it).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trustfleet.crypto import get_suite
from trustfleet.crypto.base import KeyAlgorithm, PrivateKey, PublicKey, Suite
from trustfleet.errors import CryptoError, InvalidSignature
from trustfleet.keysync.errors import KeysyncMalformedMessage, KeysyncPayloadInvalid
from trustfleet.wire import Alphabet, Codec, canonical_json, transcript

CODEC = Codec(malformed=KeysyncMalformedMessage, alphabet=Alphabet.URL, version=1)

# -- identifiers ---------------------------------------------------------------------------

#: key IDs and application IDs: 1-32 characters of GSM-7's basic set, no space
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,32}")
ID_RULE = "1-32 of A-Z a-z 0-9 . _ -"
TERMINAL_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TERMINAL_ID_RULE = "1-64 of A-Z a-z 0-9 . _ : -"
MAX_COUNTER = 2**32 - 1

#: terminal key algorithms and their lengths in bytes
KEY_LENGTHS: Mapping[KeyAlgorithm, tuple[int, ...]] = {
    KeyAlgorithm.AES_128: (16,),
    KeyAlgorithm.AES_256: (32,),
    KeyAlgorithm.SM4: (16,),
    KeyAlgorithm.TDES: (16, 24),
    KeyAlgorithm.HMAC_SHA256: (32,),
}
DEFAULT_ALGORITHM_BY_LENGTH = {
    16: KeyAlgorithm.AES_128,
    24: KeyAlgorithm.TDES,
    32: KeyAlgorithm.AES_256,
}


def key_algorithm(name: str | None, key: bytes) -> KeyAlgorithm:
    """The terminal key's algorithm: ``name`` if given (checked against the key's length),
    else by length (16 AES-128, 24 TDES, 32 AES-256). ValueError if it does not fit."""
    if not name:
        found = DEFAULT_ALGORITHM_BY_LENGTH.get(len(key))
        if found is None:
            raise ValueError("a key is 16, 24 or 32 bytes")
        return found
    try:
        algorithm = KeyAlgorithm(name)
    except ValueError:
        raise ValueError(f"algorithm is one of {', '.join(a.value for a in KEY_LENGTHS)}") from None
    if algorithm not in KEY_LENGTHS:
        raise ValueError(f"algorithm is one of {', '.join(a.value for a in KEY_LENGTHS)}")
    if len(key) not in KEY_LENGTHS[algorithm]:
        raise ValueError(f"an {algorithm.value} key is {KEY_LENGTHS[algorithm]} bytes")
    return algorithm


# =====================================================================================
# The key-sync request
# =====================================================================================

REQUEST_PREFIX = "KS1"
MAC_SIZE = 8  # bytes: 64 bits, 16 hex digits
MAX_SMS_CHARS = 160
_MAC_LABEL = b"trustfleet keysync request v1"
_MAC_KEY_INFO = b"trustfleet keysync request mac key v1"
_REQUEST = re.compile(
    r"KS1 (?P<key>[A-Za-z0-9._-]{1,32})"
    r"(?: A=(?P<app>[A-Za-z0-9._-]{1,32}))?"
    r" C=(?P<counter>[1-9][0-9]{0,9})"
    r" M=(?P<mac>[0-9A-F]{16})"
)


def _mac_suite(algorithm: KeyAlgorithm) -> Suite:
    """SM4 keys MAC with HKDF-SM3 / HMAC-SM3 (gm), every other key with SHA-256."""
    return get_suite("gm" if algorithm is KeyAlgorithm.SM4 else "p256")


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """A parsed key-sync request; the MDN is not in it (it comes from the SMS itself)."""

    key_id: str
    application_id: str | None
    counter: int
    mac: bytes

    def to_text(self) -> str:
        app = f" A={self.application_id}" if self.application_id else ""
        return f"{REQUEST_PREFIX} {self.key_id}{app} C={self.counter} M={self.mac.hex().upper()}"

    @classmethod
    def parse(cls, body: str) -> SyncRequest:
        """Strict parse of an SMS body (surrounding white space is ignored)."""
        if not isinstance(body, str) or len(body) > MAX_SMS_CHARS:
            raise KeysyncMalformedMessage(
                f"a request is text of at most {MAX_SMS_CHARS} characters"
            )
        found = _REQUEST.fullmatch(body.strip())
        if found is None:
            raise KeysyncMalformedMessage(
                "a request is 'KS1 <key id> [A=<application id>] C=<counter> M=<16 hex digits>'"
            )
        counter = int(found["counter"])
        if counter > MAX_COUNTER:
            raise KeysyncMalformedMessage(f"the counter is at most {MAX_COUNTER}")
        return cls(found["key"], found["app"], counter, bytes.fromhex(found["mac"]))


def request_mac_input(mdn: str, key_id: str, application_id: str | None, counter: int) -> bytes:
    return transcript(
        _MAC_LABEL,
        mdn.encode(),
        key_id.encode(),
        (application_id or "").encode(),
        str(counter).encode(),
    )


def request_mac(
    key: bytes,
    algorithm: KeyAlgorithm,
    *,
    mdn: str,
    key_id: str,
    application_id: str | None,
    counter: int,
) -> bytes:
    """The request's 8-byte MAC under the terminal's key (both roles compute it)."""
    suite = _mac_suite(algorithm)
    mac_key = suite.kdf(key, salt=b"", info=_MAC_KEY_INFO, length=32)
    return suite.mac(mac_key, request_mac_input(mdn, key_id, application_id, counter))[:MAC_SIZE]


def compose_request(
    key: bytes,
    algorithm: KeyAlgorithm,
    *,
    mdn: str,
    key_id: str,
    counter: int,
    application_id: str | None = None,
) -> SyncRequest:
    """The terminal's side: a request for ``key_id`` with the next ``counter``."""
    if not ID_PATTERN.fullmatch(key_id) or (
        application_id is not None and not ID_PATTERN.fullmatch(application_id)
    ):
        raise ValueError(f"key and application IDs are {ID_RULE}")
    if not 1 <= counter <= MAX_COUNTER:
        raise ValueError(f"the counter is 1..{MAX_COUNTER}")
    mac = request_mac(
        key, algorithm, mdn=mdn, key_id=key_id, application_id=application_id, counter=counter
    )
    return SyncRequest(key_id, application_id, counter, mac)


def verify_request(request: SyncRequest, key: bytes, algorithm: KeyAlgorithm, mdn: str) -> bool:
    """The server's side: does the MAC verify for this MDN (constant time)?"""
    import hmac

    expected = request_mac(
        key,
        algorithm,
        mdn=mdn,
        key_id=request.key_id,
        application_id=request.application_id,
        counter=request.counter,
    )
    return hmac.compare_digest(expected, request.mac)


# =====================================================================================
# The delivery payload
# =====================================================================================

DELIVERY_EVENT = "keysync.key"
_DELIVERY_LABEL = b"trustfleet keysync delivery v1"
#: the platform's HPKE key kind -> the suite whose HPKE seals to it
PLATFORM_SUITES = {"x25519": "ed25519", "p256": "p256"}


def platform_key_kind(key: PublicKey) -> str:
    if isinstance(key, x25519.X25519PublicKey):
        return "x25519"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "p256"
    raise ValueError("a platform's HPKE key is X25519 or P-256")


def delivery_info(application_id: str, delivery_id: str) -> bytes:
    return transcript(_DELIVERY_LABEL, application_id.encode(), delivery_id.encode())


@dataclass(frozen=True, slots=True)
class KeyDelivery:
    """What an application platform receives, once opened."""

    mdn: str
    key_id: str
    key: bytes
    application_id: str
    algorithm: str

    def _plain(self) -> bytes:
        return canonical_json(
            {
                "mdn": self.mdn,
                "key_id": self.key_id,
                "key": CODEC.encode_bytes(self.key),
                "application_id": self.application_id,
                "algorithm": self.algorithm,
            }
        )

    def __repr__(self) -> str:  # never the key
        return f"KeyDelivery(mdn={self.mdn!r}, key_id={self.key_id!r}, app={self.application_id!r})"


def seal_delivery(
    delivery: KeyDelivery, *, platform_key: PublicKey, delivery_id: str, timestamp: int
) -> bytes:
    """The webhook body (Standard Webhooks' ``{type, timestamp, data}`` shape) with the
    delivery sealed to the platform's key."""
    kind = platform_key_kind(platform_key)
    suite = get_suite(PLATFORM_SUITES[kind])
    sealed = suite.kem_wrap(
        platform_key, delivery._plain(), delivery_info(delivery.application_id, delivery_id)
    )
    return canonical_json(
        {
            "type": DELIVERY_EVENT,
            "timestamp": timestamp,
            "data": {
                "application_id": delivery.application_id,
                "delivery_id": delivery_id,
                "hpke": kind,
                "sealed": CODEC.encode_bytes(sealed),
            },
        }
    )


def open_delivery(
    body: bytes, *, platform_key: PrivateKey, application_id: str, delivery_id: str
) -> KeyDelivery:
    """The platform's side: open a webhook body received under ``delivery_id`` (its
    ``webhook-id``) for ``application_id``; :class:`KeysyncPayloadInvalid` otherwise."""
    try:
        outer = json.loads(body)
        data = outer["data"]
        if outer.get("type") != DELIVERY_EVENT or data["delivery_id"] != delivery_id:
            raise KeysyncPayloadInvalid("the payload is not this delivery's")
        if data["application_id"] != application_id:
            raise KeysyncPayloadInvalid("the payload is for another application")
        kind = data["hpke"]
        sealed = CODEC.decode_bytes(data["sealed"], "sealed")
        suite = get_suite(PLATFORM_SUITES[kind])
        plain = suite.kem_unwrap(platform_key, sealed, delivery_info(application_id, delivery_id))
        fields = CODEC.fields(plain, None)
        delivery = KeyDelivery(
            mdn=fields.text("mdn"),
            key_id=fields.text("key_id"),
            key=fields.blob("key"),
            application_id=fields.text("application_id"),
            algorithm=fields.text("algorithm"),
        )
        fields.done()
    except KeysyncPayloadInvalid:
        raise
    except (KeyError, TypeError, ValueError, CryptoError) as exc:
        raise KeysyncPayloadInvalid(f"the payload does not open ({type(exc).__name__})") from None
    if delivery.application_id != application_id:
        raise KeysyncPayloadInvalid("the sealed payload is for another application")
    return delivery


# =====================================================================================
# The signed manifest
# =====================================================================================

MANIFEST_TYPE = "keysync-manifest+jws"
_MANIFEST_KEY_LABEL = b"trustfleet keysync manifest key v1"
JWS_ALGORITHMS = {"EdDSA": KeyAlgorithm.ED25519, "ES256": KeyAlgorithm.EC_P256}
_IMPORT_SUITE = get_suite("ed25519")  # HPKE X25519 / HKDF-SHA256 / ChaCha20-Poly1305


def manifest_key_info(kid: str, terminal_id: str, key_id: str) -> bytes:
    return transcript(_MANIFEST_KEY_LABEL, kid.encode(), terminal_id.encode(), key_id.encode())


def seal_manifest_key(
    key: bytes, *, import_key: x25519.X25519PublicKey, kid: str, terminal_id: str, key_id: str
) -> bytes:
    """The manufacturer's side: one key value sealed to trustfleet's import key."""
    return _IMPORT_SUITE.kem_wrap(import_key, key, manifest_key_info(kid, terminal_id, key_id))


def open_manifest_key(
    sealed: bytes, *, import_key: x25519.X25519PrivateKey, kid: str, terminal_id: str, key_id: str
) -> bytes:
    """trustfleet's side; :class:`DecryptionFailed` if it was sealed for anything else."""
    return _IMPORT_SUITE.kem_unwrap(import_key, sealed, manifest_key_info(kid, terminal_id, key_id))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ManifestKey:
    key_id: str
    sealed_key: bytes
    application_id: str | None = None
    label: str | None = None
    algorithm: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key_id": self.key_id, "sealed_key": _b64url(self.sealed_key)}
        for name in ("application_id", "label", "algorithm"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def sign_manifest_record(
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
    *,
    kid: str,
    terminal_id: str,
    keys: Sequence[ManifestKey],
) -> str:
    """The manufacturer's side: one terminal's record as a compact JWS (one manifest line)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    else:
        raise ValueError("a manifest is signed with Ed25519 or P-256")
    header = canonical_json({"alg": alg, "kid": kid, "typ": MANIFEST_TYPE})
    payload = canonical_json({"terminal_id": terminal_id, "keys": [k.to_json() for k in keys]})
    signing_input = f"{_b64url(header)}.{_b64url(payload)}".encode()
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(signing_input)
    else:
        der = get_suite("p256").sign(private_key, signing_input)
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{_b64url(signature)}"


class ManifestFormatError(ValueError):
    """A manifest line that is not a compact JWS of this format (report code
    ``unknown-format``)."""


@dataclass(frozen=True, slots=True)
class ManifestLine:
    """A manifest line split, its header read, its signature not checked yet."""

    kid: str
    alg: str
    signing_input: bytes
    signature: bytes
    payload: bytes


def split_manifest_line(line: str) -> ManifestLine:
    parts = line.strip().split(".")
    if len(parts) != 3:
        raise ManifestFormatError("not a compact JWS (three base64url parts)")
    try:
        header = json.loads(_unb64url(parts[0]))
        payload = _unb64url(parts[1])
        signature = _unb64url(parts[2])
    except (ValueError, RecursionError):
        raise ManifestFormatError("a JWS part is not base64url JSON") from None
    if not isinstance(header, dict) or header.get("typ") != MANIFEST_TYPE:
        raise ManifestFormatError(f"the JWS header's typ is not {MANIFEST_TYPE}")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in JWS_ALGORITHMS or not isinstance(kid, str) or set(header) - {"alg", "kid", "typ"}:
        raise ManifestFormatError("the JWS header is alg EdDSA or ES256, a kid and typ only")
    return ManifestLine(kid, alg, f"{parts[0]}.{parts[1]}".encode(), signature, payload)


def verify_manifest_line(line: ManifestLine, public_key: PublicKey) -> None:
    """InvalidSignature unless the line is signed by ``public_key`` with its ``alg``."""
    if line.alg == "EdDSA":
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise InvalidSignature("the signer's key is not Ed25519")
        get_suite("ed25519").verify(public_key, line.signing_input, line.signature)
        return
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(line.signature) != 64:
        raise InvalidSignature("not an ES256 signature of a P-256 key")
    r = int.from_bytes(line.signature[:32], "big")
    s = int.from_bytes(line.signature[32:], "big")
    get_suite("p256").verify(public_key, line.signing_input, encode_dss_signature(r, s))


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    terminal_id: str
    keys: tuple[ManifestKey, ...]


def parse_manifest_payload(payload: bytes) -> ManifestRecord:
    """The signed payload (strict: known fields only); ManifestFormatError otherwise."""
    try:
        obj = json.loads(payload)
        if not isinstance(obj, dict) or set(obj) != {"terminal_id", "keys"}:
            raise ValueError("fields")
        terminal_id, items = obj["terminal_id"], obj["keys"]
        if not isinstance(terminal_id, str) or not isinstance(items, list) or not items:
            raise ValueError("types")
        keys = []
        for item in items:
            if (
                not isinstance(item, dict)
                or not {"key_id", "sealed_key"} <= set(item)
                or set(item) - {"key_id", "sealed_key", "application_id", "label", "algorithm"}
            ):
                raise ValueError("key fields")
            values = {k: item.get(k) for k in ("application_id", "label", "algorithm")}
            if not isinstance(item["key_id"], str) or not all(
                v is None or isinstance(v, str) for v in values.values()
            ):
                raise ValueError("key types")
            keys.append(
                ManifestKey(
                    key_id=item["key_id"],
                    sealed_key=_unb64url(str(item["sealed_key"])),
                    **values,
                )
            )
    except (ValueError, RecursionError, binascii.Error):
        raise ManifestFormatError("the signed payload is not a keysync manifest record") from None
    return ManifestRecord(terminal_id, tuple(keys))
