"""PKI use cases: CA hierarchy, issuing, revocation, CRLs and chain validation.

Each use case runs in one unit of work and writes one audit record when it changes state.
CA private keys stay in the key store: rows hold handles, signing goes through
``KeyStore.sign`` (see :mod:`trustfleet.pki.x509`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import bindparam, select, update

from trustfleet.crypto.base import KeyAlgorithm
from trustfleet.errors import (
    CertificateInvalid,
    CertificateRevoked,
    InvalidInput,
    UnsupportedAlgorithm,
)
from trustfleet.keystore.base import KeyStore, KeyUsage
from trustfleet.pki import x509 as px
from trustfleet.pki.errors import (
    CaExists,
    CaNotFound,
    CaRestricted,
    CaRevoked,
    CertificateAlreadyRevoked,
    CertificateNotFound,
    CrlBusy,
    InvalidValidity,
    PathLengthExceeded,
    RootNotRevocable,
)
from trustfleet.pki.models import CertificateAuthority, IssuedCertificate
from trustfleet.pki.x509 import CertificateKind, Purpose, RevocationReason, ValidatedChain
from trustfleet.store import Database, IntegrityViolation, Reads, UnitOfWork
from trustfleet.store.files import atomic_write, make_private_directory
from trustfleet.wire import as_utc

ROOT_VALIDITY = timedelta(days=3650)
INTERMEDIATE_VALIDITY = timedelta(days=1825)
SERVER_VALIDITY = timedelta(days=397)
DEVICE_VALIDITY = timedelta(days=730)
MAX_VALIDITY = timedelta(days=30 * 366)
MAX_PATH_LENGTH = 4
#: not_before is set this far in the past so that slightly slow clocks accept new certificates
CLOCK_SKEW = timedelta(minutes=5)
CRL_VALIDITY = timedelta(days=7)
#: a CRL younger than this is served again instead of signing a new one (CRLs are public
#: and unauthenticated; each revocation still forces a fresh one)
CRL_REFRESH = timedelta(hours=1)
CRL_ATTEMPTS = 5

LOCAL_ROOT_CA = "trustfleet-root"
LOCAL_ISSUING_CA = "trustfleet-issuing"
DEFAULT_ACTOR = "system"


@dataclass(frozen=True)
class CaInfo:
    name: str
    algorithm: KeyAlgorithm
    key_handle: str
    parent: str | None
    path_length: int
    serial_hex: str
    certificate_der: bytes
    created_at: datetime
    #: issues only through :meth:`PkiService.issue_server_certificate_for_held_key`
    restricted: bool = False

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.certificate_der)

    @property
    def pem(self) -> str:
        return px.to_pem(self.certificate)


@dataclass(frozen=True)
class CertificateInfo:
    serial_hex: str
    issuer: str
    subject: str
    kind: CertificateKind
    not_before: datetime
    not_after: datetime
    der: bytes
    status: str
    revoked_at: datetime | None
    revocation_reason: RevocationReason | None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @property
    def pem(self) -> str:
        return px.to_pem(self.certificate)


def _ca_info(row: Any) -> CaInfo:
    """The info of a row of the CA table's columns."""
    return CaInfo(
        name=row.name,
        algorithm=KeyAlgorithm(row.algorithm),
        key_handle=row.key_handle,
        parent=row.parent_name,
        path_length=row.path_length,
        serial_hex=row.serial_hex,
        certificate_der=row.certificate_der,
        created_at=as_utc(row.created_at),
        restricted=bool(row.restricted),
    )


def _certificate_info(row: Any) -> CertificateInfo:
    """The info of a row of the certificate table's columns."""
    return CertificateInfo(
        serial_hex=row.serial_hex,
        issuer=row.issuer_name,
        subject=row.subject,
        kind=CertificateKind(row.kind),
        not_before=as_utc(row.not_before),
        not_after=as_utc(row.not_after),
        der=row.der,
        status=row.status,
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
        revocation_reason=RevocationReason(row.revocation_reason)
        if row.revocation_reason
        else None,
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _key_algorithm_name(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec-{key.curve.name}"
    return type(key).__name__.removesuffix("PublicKey").lower()


_CA_ROWS = select(*CertificateAuthority.__table__.columns)
_CA_BY_NAME = _CA_ROWS.where(CertificateAuthority.name == bindparam("name"))
_CA_BY_NAME_LOCKED = _CA_BY_NAME.with_for_update()
_ALL_CAS = _CA_ROWS.order_by(CertificateAuthority.id)
_CERTIFICATE_ROWS = select(*IssuedCertificate.__table__.columns)
_CERTIFICATE_BY_SERIAL = _CERTIFICATE_ROWS.where(
    IssuedCertificate.serial_hex == bindparam("serial")
)
_CERTIFICATE_BY_SERIAL_LOCKED = _CERTIFICATE_BY_SERIAL.with_for_update()
_STATUS_BY_SERIAL = select(IssuedCertificate.status).where(
    IssuedCertificate.serial_hex == bindparam("serial")
)
_STATUS_BY_SERIAL_LOCKED = _STATUS_BY_SERIAL.with_for_update()
_RECORDED_BY_SERIAL = select(IssuedCertificate.der, IssuedCertificate.status).where(
    IssuedCertificate.serial_hex == bindparam("serial")
)
_REVOKED_BY_ISSUER = (
    select(
        IssuedCertificate.serial_hex,
        IssuedCertificate.revoked_at,
        IssuedCertificate.created_at,
        IssuedCertificate.revocation_reason,
    )
    .where(IssuedCertificate.issuer_name == bindparam("ca"))
    .where(IssuedCertificate.status == "revoked")
    .order_by(IssuedCertificate.id)
)
_MARK_REVOKED = (
    update(IssuedCertificate)
    .where(IssuedCertificate.serial_hex == bindparam("serial"))
    .values(status="revoked", revoked_at=bindparam("at"), revocation_reason=bindparam("reason"))
)
#: a revocation makes the cached CRL incomplete
_FORGET_CRL = (
    update(CertificateAuthority)
    .where(CertificateAuthority.name == bindparam("ca"))
    .values(crl_der=None, crl_this_update=None)
)
_STORE_CRL = (
    update(CertificateAuthority)
    .where(CertificateAuthority.name == bindparam("ca"))
    .values(
        crl_number=bindparam("number"), crl_der=bindparam("der"), crl_this_update=bindparam("at")
    )
)


class PkiService:
    """The PKI use cases over one database and one key store."""

    def __init__(
        self,
        db: Database,
        keystore: KeyStore,
        *,
        clock: Callable[[], datetime] | None = None,
        crl_validity: timedelta = CRL_VALIDITY,
        crl_refresh: timedelta = CRL_REFRESH,
    ) -> None:
        self._db = db
        self._keystore = keystore
        self._clock = clock or (lambda: datetime.now(UTC))
        self._crl_validity = crl_validity
        self._crl_refresh = crl_refresh

    # -- CAs -------------------------------------------------------------------------

    def create_root_ca(
        self,
        name: str,
        algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
        validity: timedelta = ROOT_VALIDITY,
        *,
        path_length: int = 1,
        actor: str = DEFAULT_ACTOR,
        restricted: bool = False,
    ) -> CaInfo:
        """A self-signed root whose key is generated in the key store. A ``restricted`` one
        issues only through :meth:`issue_server_certificate_for_held_key` (its owner's
        certificates, for keys the key store holds) and has no CA below it."""
        algorithm = self._ca_algorithm(algorithm)
        self._check_new_ca(name, path_length)
        times = self._validity(validity, issuer=None)
        with self._new_ca_key(algorithm, name) as (handle, public_key):
            profile = px.ca_profile(
                CertificateKind.ROOT, name, public_key, path_length=path_length, **times
            )
            sign = partial(self._keystore.sign, handle)
            issuer = px.self_issuer(profile.subject, public_key, algorithm, sign)
            cert = px.issue_certificate(profile, issuer, px.random_serial())
            with self._ca_work() as work:
                self._check_ca_absent(work, name)
                ca = self._store_ca(
                    work, name, algorithm, handle, cert, None, path_length, restricted=restricted
                )
                issued = self._store_certificate(work, cert, name, CertificateKind.ROOT)
                self._audit_ca_created(work, ca, issued, cert, actor)
            return ca

    def create_intermediate_ca(
        self,
        name: str,
        parent: str,
        algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
        validity: timedelta = INTERMEDIATE_VALIDITY,
        *,
        path_length: int = 0,
        actor: str = DEFAULT_ACTOR,
    ) -> CaInfo:
        """A CA below ``parent``; its key is generated in the key store."""
        algorithm = self._ca_algorithm(algorithm)
        self._check_new_ca(name, path_length)
        parent_ca = self._usable_ca(parent)
        self._check_unrestricted(parent_ca)
        self._check_path_length(parent_ca, path_length)
        times = self._validity(validity, issuer=parent_ca)
        with self._new_ca_key(algorithm, name) as (handle, public_key):
            profile = px.ca_profile(
                CertificateKind.INTERMEDIATE, name, public_key, path_length=path_length, **times
            )
            cert = px.issue_certificate(profile, self._issuer(parent_ca), px.random_serial())
            with self._ca_work() as work:
                self._check_ca_absent(work, name)
                self._recheck_usable(work, parent_ca)
                ca = self._store_ca(work, name, algorithm, handle, cert, parent, path_length)
                issued = self._store_certificate(work, cert, parent, CertificateKind.INTERMEDIATE)
                self._audit_ca_created(work, ca, issued, cert, actor)
            return ca

    def get_ca(self, name: str) -> CaInfo:
        return _ca_info(self._db.read(lambda reads: self._load_ca(reads, name)))

    def find_ca(self, name: str) -> CaInfo | None:
        row = self._db.read(lambda reads: self._ca_row(reads, name))
        return _ca_info(row) if row else None

    def list_cas(self) -> list[CaInfo]:
        return [_ca_info(r) for r in self._db.read(lambda reads: reads.all(_ALL_CAS))]

    def ca_chain(self, name: str) -> list[CaInfo]:
        """``name``'s CA and its parents, up to and including the root."""
        chain: list[CaInfo] = []
        with self._db.reading() as reads:
            current: str | None = name
            while current is not None and len(chain) <= MAX_PATH_LENGTH + 1:
                row = self._load_ca(reads, current)
                chain.append(_ca_info(row))
                current = row.parent_name
        return chain

    # -- leaves ------------------------------------------------------------------------

    def issue_server_certificate(
        self,
        ca: str,
        *,
        public_key: object | None = None,
        csr: bytes | None = None,
        dns_names: Iterable[str] = (),
        ips: Iterable[str | px.IPAddressValue] = (),
        validity: timedelta = SERVER_VALIDITY,
        actor: str = DEFAULT_ACTOR,
    ) -> CertificateInfo:
        """A TLS server certificate (serverAuth) for the given names and addresses; the key
        comes from ``public_key`` (key object or PEM) or from a verified ``csr``."""
        key = _subject_key(public_key, csr)
        names, addresses = list(dns_names), list(ips)
        details = {"dns_names": names, "ips": [str(a) for a in addresses]}

        def profile(not_before: datetime, not_after: datetime) -> px.Profile:
            return px.server_profile(
                key, names, addresses, not_before=not_before, not_after=not_after
            )

        return self._issue_leaf(ca, profile, validity, actor, details)

    def issue_server_certificate_for_held_key(
        self,
        ca: str,
        key_handle: str,
        *,
        dns_names: Iterable[str] = (),
        ips: Iterable[str | px.IPAddressValue] = (),
        validity: timedelta = SERVER_VALIDITY,
        actor: str = DEFAULT_ACTOR,
    ) -> CertificateInfo:
        """A server certificate for the key store's key ``key_handle`` (its public key is
        read from the key store: :class:`KeyNotFound` if the store does not hold it). The
        one way a restricted CA issues; no route offers it, its owner calls it (the TMK
        key server's work certificate)."""
        key = px.check_subject_key(self._keystore.public_key(key_handle))
        names, addresses = list(dns_names), list(ips)
        details = {"dns_names": names, "ips": [str(a) for a in addresses], "held_key": True}

        def profile(not_before: datetime, not_after: datetime) -> px.Profile:
            return px.server_profile(
                key, names, addresses, not_before=not_before, not_after=not_after
            )

        return self._issue_leaf(ca, profile, validity, actor, details, held_key=True)

    def issue_device_certificate(
        self,
        ca: str,
        device_id: str,
        *,
        public_key: object | None = None,
        csr: bytes | None = None,
        validity: timedelta = DEVICE_VALIDITY,
        actor: str = DEFAULT_ACTOR,
    ) -> CertificateInfo:
        """A device certificate (clientAuth): ``device_id`` in the subject CN and
        serialNumber, and ``urn:trustfleet:device:<id>`` as its SAN."""
        key = _subject_key(public_key, csr)
        px.check_device_id(device_id)

        def profile(not_before: datetime, not_after: datetime) -> px.Profile:
            return px.device_profile(key, device_id, not_before=not_before, not_after=not_after)

        return self._issue_leaf(ca, profile, validity, actor, {"device_id": device_id})

    def _issue_leaf(
        self,
        ca: str,
        profile: Callable[[datetime, datetime], px.Profile],
        validity: timedelta,
        actor: str,
        details: dict[str, Any],
        *,
        held_key: bool = False,
    ) -> CertificateInfo:
        issuing = self._usable_ca(ca)
        if not held_key:
            self._check_unrestricted(issuing)
        times = self._validity(validity, issuer=issuing)
        leaf = profile(times["not_before"], times["not_after"])
        cert = px.issue_certificate(leaf, self._issuer(issuing), px.random_serial())
        with self._db.work() as work:
            self._recheck_usable(work, issuing)
            issued = self._store_certificate(work, cert, issuing.name, leaf.kind)
            work.audit(
                "pki.certificate_issued",
                actor=actor,
                subject=issued.serial_hex,
                details=self._issued_details(issued, cert) | details,
            )
        return issued

    # -- revocation ----------------------------------------------------------------------

    def revoke(
        self,
        serial: str,
        reason: RevocationReason | str = RevocationReason.UNSPECIFIED,
        *,
        actor: str = DEFAULT_ACTOR,
    ) -> CertificateInfo:
        """Mark the certificate revoked; the issuing CA's next CRL lists it."""
        serial_hex = px.serial_hex(px.parse_serial(serial))
        parsed_reason = px.parse_reason(str(reason))
        with self._db.work() as work:
            row = work.one(_CERTIFICATE_BY_SERIAL_LOCKED, serial=serial_hex)
            if row is None:
                raise CertificateNotFound(f"no certificate with serial {serial_hex}")
            if row.status == "revoked":
                raise CertificateAlreadyRevoked(f"certificate {serial_hex} is already revoked")
            if row.kind == CertificateKind.ROOT:
                raise RootNotRevocable()
            row = row._replace(
                status="revoked", revoked_at=self._now(), revocation_reason=parsed_reason.value
            )
            work.run(
                _MARK_REVOKED, serial=serial_hex, at=row.revoked_at, reason=parsed_reason.value
            )
            self._load_ca(work, row.issuer_name, for_update=True)
            work.run(_FORGET_CRL, ca=row.issuer_name)
            work.audit(
                "pki.certificate_revoked",
                actor=actor,
                subject=serial_hex,
                details={"ca": row.issuer_name, "kind": row.kind, "reason": parsed_reason.value},
            )
        return _certificate_info(row)

    def crl(self, ca_name: str, *, actor: str = DEFAULT_ACTOR) -> bytes:
        """The CA's current CRL (DER): every certificate it issued that is revoked.

        A CRL signed less than ``crl_refresh`` ago is served again unless a revocation
        happened since; otherwise a new one is signed now with the next CRL number. It is
        signed outside any transaction, then stored only if neither the CRL number nor the
        revocations changed meanwhile (else it is done again).
        """
        for _attempt in range(CRL_ATTEMPTS):
            now = self._now()
            with self._db.reading() as reads:
                row = self._load_ca(reads, ca_name)
                cached = self._fresh_crl(row, now)
                if cached is not None:
                    return cached
                ca, number = _ca_info(row), row.crl_number + 1
                entries = self._revoked_entries(reads, ca.name)
            crl = px.build_crl(
                self._issuer(ca),
                number=number,
                this_update=now,
                next_update=now + self._crl_validity,
                revoked=entries,
            )
            der = crl.public_bytes(serialization.Encoding.DER)
            with self._db.work() as work:
                row = self._load_ca(work, ca_name, for_update=True)
                if row.crl_number + 1 != number or self._revoked_entries(work, ca.name) != entries:
                    continue
                work.run(_STORE_CRL, ca=ca_name, number=number, der=der, at=now)
                work.audit(
                    "pki.crl_published",
                    actor=actor,
                    subject=ca.name,
                    details={"crl_number": number, "revoked": len(entries)},
                )
            return der
        raise CrlBusy(f"the CRL of {ca_name!r} kept changing while it was signed; retry")

    @staticmethod
    def _revoked_entries(reads: Reads, ca_name: str) -> list[px.RevokedEntry]:
        rows = reads.all(_REVOKED_BY_ISSUER, ca=ca_name)
        return [
            px.RevokedEntry(
                int(r.serial_hex, 16),
                as_utc(r.revoked_at or r.created_at),
                RevocationReason(r.revocation_reason or RevocationReason.UNSPECIFIED),
            )
            for r in rows
        ]

    def _fresh_crl(self, ca: Any, now: datetime) -> bytes | None:
        if ca.crl_der is None or ca.crl_this_update is None:
            return None
        fresh = now - as_utc(ca.crl_this_update) < self._crl_refresh
        return bytes(ca.crl_der) if fresh else None

    # -- certificates ------------------------------------------------------------------

    def get_certificate(self, serial: str) -> CertificateInfo:
        serial_hex = px.serial_hex(px.parse_serial(serial))
        row = self._db.read(lambda reads: reads.one(_CERTIFICATE_BY_SERIAL, serial=serial_hex))
        if row is None:
            raise CertificateNotFound(f"no certificate with serial {serial_hex}")
        return _certificate_info(row)

    def list_certificates(
        self,
        *,
        issuer: str | None = None,
        kind: CertificateKind | str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[CertificateInfo]:
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidInput("limit is 1-1000 and offset is not negative")
        query = _CERTIFICATE_ROWS.order_by(IssuedCertificate.id)
        if issuer is not None:
            query = query.where(IssuedCertificate.issuer_name == issuer)
        if kind is not None:
            query = query.where(IssuedCertificate.kind == CertificateKind(kind).value)
        if status is not None:
            query = query.where(IssuedCertificate.status == status)
        page = query.limit(limit).offset(offset)
        return [_certificate_info(r) for r in self._db.read(lambda reads: reads.all(page))]

    # -- validation --------------------------------------------------------------------

    def validate(
        self,
        leaf_der: bytes,
        intermediates: Sequence[bytes],
        root_der: bytes,
        at: datetime | None = None,
        crl_ders: Sequence[bytes] | None = None,
        *,
        purpose: Purpose | None = None,
        server_name: str | None = None,
    ) -> ValidatedChain:
        """pyca path validation plus revocation: against ``crl_ders`` when given, else
        against this database (then every non-root certificate must have been issued here).
        Raises CertificateInvalid or CertificateRevoked."""
        at = at or self._now()
        if crl_ders is not None:
            return px.validate_chain(
                leaf_der,
                intermediates,
                root_der,
                at=at,
                crl_ders=crl_ders,
                purpose=purpose,
                server_name=server_name,
            )
        validated = px.verify_path(
            leaf_der, intermediates, root_der, at=at, purpose=purpose, server_name=server_name
        )
        with self._db.reading() as reads:
            for cert in validated.chain[:-1]:
                self._check_recorded_status(reads, cert)
        return validated

    def _check_recorded_status(self, reads: Reads, cert: x509.Certificate) -> None:
        serial_hex = px.serial_hex(cert.serial_number)
        row = reads.one(_RECORDED_BY_SERIAL, serial=serial_hex)
        if row is None or row.der != _der(cert):
            raise CertificateInvalid(
                f"certificate {serial_hex} was not issued here: pass CRLs to check it"
            )
        if row.status == "revoked":
            raise CertificateRevoked(f"certificate {serial_hex} is revoked", serial=serial_hex)

    # -- helpers -----------------------------------------------------------------------

    def _now(self) -> datetime:
        return as_utc(self._clock()).replace(microsecond=0)

    @contextmanager
    def _ca_work(self) -> Iterator[UnitOfWork]:
        try:
            with self._db.work() as work:
                yield work
        except IntegrityViolation as exc:  # another node created a CA of that name first
            raise CaExists("a certificate authority with that name was just created") from exc

    def _validity(self, validity: timedelta, *, issuer: CaInfo | None) -> dict[str, datetime]:
        if not timedelta(0) < validity <= MAX_VALIDITY:
            raise InvalidValidity(f"validity must be positive and at most {MAX_VALIDITY.days} days")
        now = self._now()
        not_before, not_after = now - CLOCK_SKEW, now + validity
        if issuer is not None:
            issuer_cert = issuer.certificate
            if not_after > issuer_cert.not_valid_after_utc:
                raise InvalidValidity(
                    f"the certificate would outlive its issuer {issuer.name!r} "
                    f"(valid until {issuer_cert.not_valid_after_utc.isoformat()})"
                )
            not_before = max(not_before, issuer_cert.not_valid_before_utc)
        return {"not_before": not_before, "not_after": not_after}

    @staticmethod
    def _ca_algorithm(algorithm: KeyAlgorithm | str) -> KeyAlgorithm:
        try:
            parsed = KeyAlgorithm(algorithm)
        except ValueError:
            raise UnsupportedAlgorithm(f"unknown algorithm {algorithm!r}") from None
        if parsed not in px.CA_ALGORITHMS:
            raise UnsupportedAlgorithm(
                f"a CA key must be one of {', '.join(sorted(px.CA_ALGORITHMS))}"
            )
        return parsed

    def _check_new_ca(self, name: str, path_length: int) -> None:
        px.check_ca_name(name)
        if not 0 <= path_length <= MAX_PATH_LENGTH:
            raise PathLengthExceeded(f"a path length is 0-{MAX_PATH_LENGTH}")
        if self.find_ca(name) is not None:
            raise CaExists(f"certificate authority {name!r} already exists")

    @staticmethod
    def _check_unrestricted(ca: CaInfo) -> None:
        if ca.restricted:
            raise CaRestricted(
                f"certificate authority {ca.name!r} is restricted: it issues only its"
                " owner's certificates, for keys the key store holds, and has no CA below it",
                hint="issue from another CA (`trustfleet ca show` lists them)",
            )

    @staticmethod
    def _check_path_length(parent: CaInfo, path_length: int) -> None:
        if parent.path_length <= path_length:
            raise PathLengthExceeded(
                f"{parent.name!r} allows CAs below it a path length of at most "
                f"{parent.path_length - 1}"
            )

    @contextmanager
    def _new_ca_key(
        self, algorithm: KeyAlgorithm, name: str
    ) -> Iterator[tuple[str, px.CaPublicKey]]:
        """A fresh non-exportable signing key, destroyed again if the CA is not created."""
        info = self._keystore.generate(algorithm, KeyUsage.SIGN, label=f"pki-ca:{name}")
        try:
            yield info.handle, px.ca_public_key(self._keystore.public_key(info.handle), algorithm)
        except BaseException:
            self._keystore.destroy(info.handle)
            raise

    @staticmethod
    def _ca_row(reads: Reads, name: str, *, for_update: bool = False) -> Any:
        """The CA's row (its columns), or None."""
        return reads.one(_CA_BY_NAME_LOCKED if for_update else _CA_BY_NAME, name=name)

    def _load_ca(self, reads: Reads, name: str, *, for_update: bool = False) -> Any:
        row = self._ca_row(reads, name, for_update=for_update)
        if row is None:
            raise CaNotFound(f"no certificate authority named {name[:80]!r}")
        return row

    def _usable_ca(self, name: str) -> CaInfo:
        """The CA ``name`` if it may issue (its own certificate is not revoked)."""
        with self._db.reading() as reads:
            ca = _ca_info(self._load_ca(reads, name))
            self._recheck_usable(reads, ca, lock=False)
            return ca

    @staticmethod
    def _recheck_usable(reads: Reads, ca: CaInfo, *, lock: bool = True) -> None:
        # Locking the CA's certificate row serialises this with a revocation of the CA.
        query = _STATUS_BY_SERIAL_LOCKED if lock else _STATUS_BY_SERIAL
        own = reads.scalar(query, serial=ca.serial_hex)
        if own is None:
            raise CaNotFound(f"certificate authority {ca.name!r} no longer exists")
        if own == "revoked":
            raise CaRevoked(f"certificate authority {ca.name!r} is revoked")

    def _check_ca_absent(self, work: UnitOfWork, name: str) -> None:
        if self._ca_row(work, name) is not None:
            raise CaExists(f"certificate authority {name!r} already exists")

    def _issuer(self, ca: CaInfo) -> px.Issuer:
        sign = partial(self._keystore.sign, ca.key_handle)
        return px.issuer_from_certificate(ca.certificate, ca.algorithm, sign)

    def _store_ca(
        self,
        work: UnitOfWork,
        name: str,
        algorithm: KeyAlgorithm,
        handle: str,
        cert: x509.Certificate,
        parent: str | None,
        path_length: int,
        *,
        restricted: bool = False,
    ) -> CaInfo:
        ca = CaInfo(
            name=name,
            algorithm=algorithm,
            key_handle=handle,
            parent=parent,
            path_length=path_length,
            serial_hex=px.serial_hex(cert.serial_number),
            certificate_der=_der(cert),
            created_at=self._now(),
            restricted=restricted,
        )
        work.insert(
            CertificateAuthority,
            name=name,
            algorithm=algorithm.value,
            key_handle=handle,
            certificate_der=ca.certificate_der,
            serial_hex=ca.serial_hex,
            parent_name=parent,
            path_length=path_length,
            crl_number=0,
            created_at=ca.created_at,
            restricted=restricted,
        )
        return ca

    def _store_certificate(
        self, work: UnitOfWork, cert: x509.Certificate, issuer: str, kind: CertificateKind
    ) -> CertificateInfo:
        issued = CertificateInfo(
            serial_hex=px.serial_hex(cert.serial_number),
            issuer=issuer,
            subject=px.subject_text(cert.subject)[:500],
            kind=kind,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            der=_der(cert),
            status="active",
            revoked_at=None,
            revocation_reason=None,
        )
        work.insert(
            IssuedCertificate,
            serial_hex=issued.serial_hex,
            issuer_name=issuer,
            subject=issued.subject,
            kind=kind.value,
            not_before=issued.not_before,
            not_after=issued.not_after,
            der=issued.der,
            status=issued.status,
            created_at=self._now(),
        )
        return issued

    @staticmethod
    def _issued_details(issued: CertificateInfo, cert: x509.Certificate) -> dict[str, Any]:
        return {
            "ca": issued.issuer,
            "kind": issued.kind.value,
            "subject": issued.subject,
            "not_after": issued.not_after.isoformat(),
            "key_algorithm": _key_algorithm_name(cert),
            "sha256": hashlib.sha256(issued.der).hexdigest(),
        }

    def _audit_ca_created(
        self,
        work: UnitOfWork,
        ca: CaInfo,
        issued: CertificateInfo,
        cert: x509.Certificate,
        actor: str,
    ) -> None:
        details = self._issued_details(issued, cert)
        details |= {"name": ca.name, "algorithm": ca.algorithm.value, "path_length": ca.path_length}
        details["restricted"] = ca.restricted
        work.audit("pki.ca_created", actor=actor, subject=ca.serial_hex, details=details)


def _subject_key(public_key: object | None, csr: bytes | None) -> px.SubjectPublicKey:
    if (public_key is None) == (csr is None):
        raise InvalidInput("give exactly one of a public key and a CSR")
    if csr is not None:
        return px.load_csr_public_key(csr)
    if isinstance(public_key, bytes | str):
        pem = public_key.encode() if isinstance(public_key, str) else public_key
        return px.load_public_key_pem(pem)
    return px.check_subject_key(public_key)


# --- the local CA made by `trustfleet init` ----------------------------------------------


@dataclass(frozen=True)
class LocalCa:
    root: CaInfo
    issuing: CaInfo
    root_pem_path: Path
    intermediate_pem_path: Path


def bootstrap(db: Database, keystore: KeyStore, ca_dir: Path, *, actor: str = "init") -> LocalCa:
    """Root CA ``trustfleet-root`` and issuing CA ``trustfleet-issuing`` (each made only if
    missing), with their PEMs written to ``ca_dir``/root.pem and intermediate.pem."""
    service = PkiService(db, keystore)
    root = _ensure_ca(service, LOCAL_ROOT_CA, None, actor)
    issuing = _ensure_ca(service, LOCAL_ISSUING_CA, LOCAL_ROOT_CA, actor)
    make_private_directory(ca_dir)
    root_path, intermediate_path = ca_dir / "root.pem", ca_dir / "intermediate.pem"
    # certificates are public, but the data directory is owner-only, every file in it too
    atomic_write(root_path, root.pem.encode(), mode=0o600)
    atomic_write(intermediate_path, issuing.pem.encode(), mode=0o600)
    return LocalCa(root, issuing, root_path, intermediate_path)


def _ensure_ca(service: PkiService, name: str, parent: str | None, actor: str) -> CaInfo:
    existing = service.find_ca(name)
    if existing is not None:
        return existing
    try:
        if parent is None:
            return service.create_root_ca(name, actor=actor)
        return service.create_intermediate_ca(name, parent, actor=actor)
    except CaExists:  # another process initialised at the same time
        return service.get_ca(name)
