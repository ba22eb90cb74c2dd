"""PKI errors, each with a stable machine code (see :mod:`trustfleet.errors`)."""

from __future__ import annotations

from trustfleet.errors import CertificateInvalid, Conflict, InvalidInput, NotFound, PkiError


class CsrInvalid(PkiError):
    code = "csr-invalid"
    title = "The certificate signing request is malformed or its signature does not verify"


class InvalidSubject(PkiError):
    code = "invalid-subject"
    title = "A name, address or identifier for the certificate is not valid"


class InvalidValidity(PkiError):
    code = "invalid-validity"
    title = "The requested validity is not allowed (non-positive or beyond the issuer's)"


class PathLengthExceeded(PkiError):
    code = "path-length-exceeded"
    title = "The parent CA's path length does not allow another CA below it"


class CaNotFound(NotFound):
    code = "ca-not-found"
    title = "No certificate authority has that name"


class CaExists(Conflict):
    code = "ca-exists"
    title = "A certificate authority with that name already exists"


class CertificateNotFound(NotFound):
    code = "certificate-not-found"
    title = "No issued certificate has that serial number"


class CertificateAlreadyRevoked(Conflict):
    code = "certificate-already-revoked"
    title = "The certificate is already revoked"


class InvalidRevocationReason(InvalidInput):
    code = "invalid-revocation-reason"
    title = "The revocation reason is not one trustfleet accepts"


class CrlInvalid(CertificateInvalid):
    code = "crl-invalid"
    title = "No current, correctly signed CRL covers a certificate of the chain"


class CaKeyMismatch(PkiError):
    code = "ca-key-mismatch"
    status = 500
    title = "The key store's signature does not verify under the CA's public key"


class CaRevoked(Conflict):
    code = "ca-revoked"
    title = "The certificate authority's own certificate is revoked; it cannot issue"


class CaRestricted(PkiError):
    code = "ca-restricted"
    status = 403
    title = (
        "The certificate authority is restricted: it issues only its owner's certificates,"
        " for keys the key store holds"
    )


class RootNotRevocable(Conflict):
    code = "root-not-revocable"
    title = "A root certificate cannot be revoked by a CRL; remove it from the trust stores"


class CrlBusy(Conflict):
    code = "crl-busy"
    title = "The CRL changed while it was being signed; retry"
