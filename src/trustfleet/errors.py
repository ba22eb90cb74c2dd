"""The root of every trustfleet error.

Each error class carries a stable machine ``code`` (kebab-case, never reused for another
meaning) and the HTTP ``status`` the API answers it with. The API renders them as RFC 9457
problem+json; the CLI prints the message and exits non-zero. Messages never contain key
material.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TrustfleetError(Exception):
    """Base class; subclasses set ``code`` and ``status``."""

    code: ClassVar[str] = "internal-error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.title
        self.extra = extra
        super().__init__(self.message)


class InvalidInput(TrustfleetError):
    code = "invalid-input"
    status = 400
    title = "The input is not valid"


class NotFound(TrustfleetError):
    code = "not-found"
    status = 404
    title = "Not found"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported-media-type"
    status = 415
    title = "The content type is not supported"


class Conflict(TrustfleetError):
    code = "conflict"
    status = 409
    title = "Conflicts with the current state"


class AuthenticationRequired(TrustfleetError):
    code = "authentication-required"
    status = 401
    title = "A valid API token is required"


class Forbidden(TrustfleetError):
    code = "forbidden"
    status = 403
    title = "The token's role may not do this"


class ConfigurationError(TrustfleetError):
    code = "configuration-error"
    status = 500
    title = "trustfleet is not configured correctly"


# --- crypto -------------------------------------------------------------------------


class CryptoError(TrustfleetError):
    code = "crypto-error"
    status = 400
    title = "A cryptographic operation failed"


class InvalidSignature(CryptoError):
    code = "invalid-signature"
    title = "The signature does not verify"


class DecryptionFailed(CryptoError):
    code = "decryption-failed"
    title = "The ciphertext could not be decrypted or authenticated"


class InvalidKey(CryptoError):
    code = "invalid-key"
    title = "The key is malformed or of an unsupported kind"


class UnsupportedAlgorithm(CryptoError):
    code = "unsupported-algorithm"
    title = "The algorithm is not supported here"


# --- key store ----------------------------------------------------------------------


class KeyStoreError(TrustfleetError):
    code = "keystore-error"
    status = 500
    title = "The key store failed"


class KeyNotFound(KeyStoreError):
    code = "key-not-found"
    status = 404
    title = "No key has that handle"


class KeyUsageNotAllowed(KeyStoreError):
    code = "key-usage-not-allowed"
    status = 403
    title = "The key's usage flags do not allow this operation"


class KeyNotExportable(KeyStoreError):
    code = "key-not-exportable"
    status = 403
    title = "The key is not exportable"


class MasterKeyError(KeyStoreError, ConfigurationError):  # set-up: the CLI exits 2
    code = "master-key-error"
    status = 500
    title = "The master key is missing, malformed or does not match the stored keys"


class DataDirPermissions(ConfigurationError):  # set-up: the CLI exits 2
    code = "data-dir-permissions"
    title = "The data directory is open to other users"


# --- PKI ----------------------------------------------------------------------------


class PkiError(TrustfleetError):
    code = "pki-error"
    status = 400
    title = "A certificate operation failed"


class CertificateInvalid(PkiError):
    code = "certificate-invalid"
    title = "The certificate chain does not validate"


class CertificateRevoked(PkiError):
    code = "certificate-revoked"
    title = "The certificate is revoked"
