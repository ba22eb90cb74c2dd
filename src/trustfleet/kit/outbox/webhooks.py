"""Standard Webhooks: how a request is signed, and how a receiver checks it.

A request carries ``webhook-id`` (the message id, the same on every retry),
``webhook-timestamp`` (seconds since the epoch, when this attempt was signed) and
``webhook-signature``: space-separated ``<version>,<base64 signature>`` over
``<id>.<timestamp>.<body>``. Version ``v1`` is HMAC-SHA256 under a shared secret (written
``whsec_<base64>``), ``v1a`` Ed25519 (the public key written ``whpk_<base64>``). The sender
signs with a key store key; this module also holds what a receiver (which holds the secret
or public key itself) needs to verify.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidSignature as _PycaInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustfleet.errors import TrustfleetError

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
PUBLIC_KEY_PREFIX = "whpk_"
DEFAULT_TOLERANCE_SECONDS = 5 * 60
HMAC_VERSION = "v1"
ED25519_VERSION = "v1a"


class WebhookVerificationFailed(TrustfleetError):
    code = "webhook-verification-failed"
    status = 401
    title = "The webhook request's signature or timestamp does not check out"


def signed_content(message_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{message_id}.{timestamp}.".encode() + body


def encode_secret(secret: bytes) -> str:
    return SECRET_PREFIX + base64.b64encode(secret).decode("ascii")


def decode_secret(text: str) -> bytes:
    """The bytes of a ``whsec_...`` secret (the prefix is optional)."""
    raw = text[len(SECRET_PREFIX) :] if text.startswith(SECRET_PREFIX) else text
    try:
        secret = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationFailed("the webhook secret is not base64") from None
    if not secret:
        raise WebhookVerificationFailed("the webhook secret is empty")
    return secret


def encode_public_key(key: ed25519.Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> ed25519.Ed25519PublicKey:
    raw = text[len(PUBLIC_KEY_PREFIX) :] if text.startswith(PUBLIC_KEY_PREFIX) else text
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError):
        raise WebhookVerificationFailed("not an Ed25519 public key (whpk_...)") from None


def hmac_sha256(secret: bytes, data: bytes) -> bytes:
    mac = pyca_hmac.HMAC(secret, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def headers(message_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


@dataclass(frozen=True)
class Verifier:
    """What a receiver checks a request with: the HMAC secret (``v1``) or the sender's
    Ed25519 public key (``v1a``), and how far the timestamp may be from its clock."""

    secret: bytes | None = None
    public_key: ed25519.Ed25519PublicKey | None = None
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS

    def verify(self, body: bytes, request_headers: Mapping[str, str], now: datetime) -> str:
        """The ``webhook-id`` of a request whose signature and timestamp check out; else
        :class:`WebhookVerificationFailed`."""
        lowered = {k.lower(): v for k, v in request_headers.items()}
        message_id = lowered.get("webhook-id", "")
        stamp = lowered.get("webhook-timestamp", "")
        signatures = lowered.get("webhook-signature", "")
        if not (message_id and stamp and signatures):
            raise WebhookVerificationFailed("missing webhook-id, -timestamp or -signature")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise WebhookVerificationFailed("webhook-timestamp is not a number") from None
        if abs(now.timestamp() - timestamp) > self.tolerance_seconds:
            raise WebhookVerificationFailed("webhook-timestamp is too old or too new")
        content = signed_content(message_id, timestamp, body)
        for candidate in signatures.split(" "):
            version, _, encoded = candidate.partition(",")
            try:
                signature = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            if self._matches(version, content, signature):
                return message_id
        raise WebhookVerificationFailed("no signature matches")

    def _matches(self, version: str, content: bytes, signature: bytes) -> bool:
        if version == HMAC_VERSION and self.secret is not None:
            return hmac.compare_digest(hmac_sha256(self.secret, content), signature)
        if version == ED25519_VERSION and self.public_key is not None:
            try:
                self.public_key.verify(signature, content)
            except _PycaInvalidSignature:
                return False
            return True
        return False
